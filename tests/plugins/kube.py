"""Kubernetes fixtures: kmock's API emulator on loopback, the real operator against it, and the
`--e2e` option for real-cluster tests.

The emulator is stateful but not a cluster: it fills no uid or timestamps, stores no Namespaces,
runs no controllers and collects no garbage, so tests supply uids, namespaces and Deployment
statuses themselves (and `Emulator` adds resourceVersions). It slows as objects pile up: keep
each test's object count small. The emulator and the operator's thread runner are shared with
the operator benchmark (bench/operator_bench.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import pytest

from lorafleet.bench.operator_bench import Emulator, OperatorThread, emulated_api
from lorafleet.operator.config import OperatorConfig
from lorafleet.operator.kube import KubeClient, object_path
from lorafleet.operator.registry_writer import WriterSettings


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--e2e",
        action="store_true",
        default=False,
        help="run real-cluster end-to-end tests (marked e2e); needs a kubeconfig (KUBECONFIG or ~/.kube/config)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--e2e"):
        return
    skip = pytest.mark.skip(reason="real-cluster test: run with --e2e and a kubeconfig")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


@dataclass
class Cluster:
    """The emulator, and a client to act as the user (kubectl) would."""

    emulator: Emulator
    connection: kopf.ConnectionInfo
    api: KubeClient

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """POST `obj`, with the uid and generation the real API server would have filled in."""
        meta = obj["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        return await self.api.request("POST", object_path(obj["kind"], meta["namespace"]), obj)

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Serve the Namespace `name` with `labels` (what the operator reads of a namespace).

        kmock 0.8 cannot store Namespaces: its path parser reads /api/v1/namespaces/NAME as the
        prefix of a namespaced path (and a POST to /api/v1/namespaces fails with a 500), so the
        object is served by a reaction instead.
        """
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
        self.emulator[f"get /api/v1/namespaces/{name}"] << body

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.api.get(kind, namespace, name)

    async def patch(
        self, kind: str, namespace: str, name: str, body: dict[str, Any], sub: str | None = None
    ) -> None:
        path = object_path(kind, namespace, name, sub)
        await self.api.request("PATCH", path, body, content_type="application/merge-patch+json")

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        await self.api.delete(kind, namespace, name)

    async def wait_for(
        self,
        kind: str,
        namespace: str,
        name: str,
        check: Callable[[dict[str, Any] | None], bool],
        timeout_s: float = 20,
    ) -> dict[str, Any] | None:
        """Poll until `check(object)` holds (the object is None while it does not exist)."""
        deadline = time.monotonic() + timeout_s
        while True:
            obj = await self.get(kind, namespace, name)
            if check(obj):
                return obj
            if time.monotonic() > deadline:
                raise AssertionError(f"{kind} {namespace}/{name} never satisfied the check; last seen: {obj}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def kube() -> AsyncIterator[Cluster]:
    """A fresh emulated API server on 127.0.0.1 with the built-in kinds and the lorafleet CRDs."""
    async with emulated_api() as (emulator, connection):
        api = KubeClient(connection)
        try:
            yield Cluster(emulator, connection, api)
        finally:
            await api.close()


# Fast timings for tests: short debounce, frequent status refresh, quick retries.
TEST_CONFIG = OperatorConfig(
    writer=WriterSettings(debounce_s=0.05, max_delay_s=0.5, min_interval_s=0.1, retry_s=0.2),
    retry_delay_s=0.5,
    status_interval_s=0.5,
    revalidate_interval_s=3600,
)


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        # kopf logs a `TemporaryError` (an expected retry: S3 or the API unavailable) at ERROR too.
        if record.name.startswith(("kopf", "lorafleet")) and "failed temporarily" not in record.getMessage():
            self.records.append(record)


@pytest.fixture
async def operator(kube: Cluster) -> AsyncIterator[OperatorThread]:
    """The operator, started against `kube`. A handler that failed with an unexpected error (kopf
    logs it and retries) fails the test."""
    errors = _ErrorLog()
    logging.getLogger().addHandler(errors)
    running = OperatorThread(TEST_CONFIG, kube.connection)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()
        logging.getLogger().removeHandler(errors)
    assert not errors.records, "\n".join(r.getMessage() for r in errors.records)


def kubeconfig_text(server: str, token: str = "test-token") -> str:
    """A kubeconfig for `server` (for a subprocess operator or kubectl)."""
    return (
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
        f"clusters: [{{name: test, cluster: {{server: '{server}'}}}}]\n"
        f"users: [{{name: test, user: {{token: '{token}'}}}}]\n"
        "contexts: [{name: test, context: {cluster: test, user: test}}]\n"
    )


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(kubeconfig_text(server))
    return path
