"""`lorafleet operator`, the real command in a subprocess, against the API emulator on loopback:
its kubeconfig login, its liveness endpoint and its namespace scoping."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from lorafleet.bench.operator_bench import Emulator
from tests.plugins.kube import Cluster, write_kubeconfig

LORAFLEET = Path(sys.executable).parent / "lorafleet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def basemodel(namespace: str) -> dict:
    return {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": "smol", "namespace": namespace},
        "spec": {"replicas": 1},
    }


def watched_namespaces(emulator: Emulator, plural: str) -> set[str | None]:
    """Namespaces of the list and watch requests for `plural` (None: all namespaces)."""
    return {
        r.namespace
        for r in emulator
        if r.resource is not None and r.resource.plural == plural and r.action in ("LIST", "WATCH")
    }


async def healthz(port: int) -> int | None:
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as r:
            return r.status
    except aiohttp.ClientConnectionError:
        return None


async def test_operator_command_scopes_namespaces_and_serves_liveness(kube: Cluster, tmp_path):
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", kube.connection.server)
    port = free_port()
    # A BaseModel outside the watched namespace, there before the operator starts: never touched.
    await kube.create(basemodel("elsewhere"))
    log = (tmp_path / "operator.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(LORAFLEET),
        "operator",
        "--standalone",
        "--namespace",
        "models",
        "--liveness-port",
        str(port),
        env=os.environ | {"KUBECONFIG": str(kubeconfig)},
        stdout=log,
        stderr=log,
    )

    def running(check):  # fail at once, with its output, if the operator died
        def alive_and(obj):
            if proc.returncode is not None:
                raise AssertionError((tmp_path / "operator.log").read_text()[-3000:])
            return check(obj)

        return alive_and

    try:
        await kube.create(basemodel("models"))
        deployment = await kube.wait_for("Deployment", "models", "smol", running(lambda o: o is not None), 60)
        assert deployment["spec"]["replicas"] == 1
        await kube.wait_for("BaseModel", "models", "smol", running(lambda o: "status" in o), 30)
        assert await healthz(port) == 200

        assert watched_namespaces(kube.emulator, "basemodels") == {"models"}
        assert watched_namespaces(kube.emulator, "loraadapters") == {"models"}
        untouched = await kube.get("BaseModel", "elsewhere", "smol")
        assert untouched is not None and "status" not in untouched
        assert not (untouched["metadata"].get("finalizers") or untouched["metadata"].get("annotations"))
        assert await kube.get("Deployment", "elsewhere", "smol") is None
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), 30)
        finally:
            log.close()
            if proc.returncode is None:
                proc.kill()
    output = (tmp_path / "operator.log").read_text()
    assert code == 0, output[-3000:]
    assert await healthz(port) is None  # the endpoint went with the process


@pytest.mark.parametrize(
    "flags", [["--namespace", "a", "--all-namespaces"], ["--standalone", "--peering", "p"]]
)
def test_operator_command_refuses_conflicting_flags(flags, capsys):
    from lorafleet.engine.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["operator", *flags])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
