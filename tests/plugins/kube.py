"""Kubernetes fixtures: kmock's API emulator on loopback, the real operator against it, and the
`--e2e` option for real-cluster tests.

The emulator is stateful but not a cluster: it fills no uid or timestamps, stores no Namespaces,
runs no controllers and collects no garbage, so tests supply uids, namespaces and Deployment
statuses themselves (and `Emulator` adds resourceVersions). It slows as objects pile up: keep
each test's object count small.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest

from lorafleet.operator.config import OperatorConfig
from lorafleet.operator.handlers import build_registry
from lorafleet.operator.kube import KubeClient, object_path
from lorafleet.operator.registry_writer import WriterSettings

CUSTOM_RESOURCES = {
    "lorafleet.io/v1alpha1/basemodels": {
        "kind": "BaseModel",
        "shortnames": ["bm"],
        "subresources": ["status", "scale"],
    },
    "lorafleet.io/v1alpha1/loraadapters": {
        "kind": "LoRAAdapter",
        "shortnames": ["lora"],
        "subresources": ["status"],
    },
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


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


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with a resourceVersion that changes on every write, as on a real API server.

    kopf relies on it: after patching an object it skips watch events older than its patch's
    resourceVersion. With a constant version, stale events look fresh and the handlers run again
    for changes they already handled. (`_handle` is kmock's request hook, pinned at kmock 0.8.)
    """

    async def _handle(self, request: Any) -> Any:
        if request.action in (kmock.action.CREATE, kmock.action.UPDATE) and isinstance(request.data, dict):
            request.data.setdefault("metadata", {})["resourceVersion"] = str(request.id + 1)
        return await super()._handle(request)


@dataclass
class Cluster:
    """The emulator, and a client to act as the user (kubectl) would."""

    emulator: kmock.KubernetesEmulator
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
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources.load_bundled()
        for key, info in CUSTOM_RESOURCES.items():
            emulator.resources[key] = {"namespaced": True, "verbs": VERBS, **info}  # type: ignore[typeddict-item]
        connection = kopf.ConnectionInfo(server=f"http://{server.host}:{server.port}", token="test-token")
        api = KubeClient(connection)
        try:
            yield Cluster(emulator, connection, api)
        finally:
            await api.close()


@dataclass
class RunningOperator:
    """The real operator (all its handlers) in its own thread and event loop; stop() and start()
    again to simulate a restart.

    Its own loop, as kopf's embedding guide advises: on shutdown kopf cancels every task of its
    loop created after it started, which in the test's loop would be the test itself, the
    fixtures' finalizers and the emulator's request handlers.
    """

    cluster: Cluster
    config: OperatorConfig
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    async def start(self, timeout_s: float = 20) -> None:
        self._stop, ready, self._error = threading.Event(), threading.Event(), None
        registry = build_registry(self.config, self.cluster.connection)

        def run() -> None:
            try:
                asyncio.run(
                    kopf.operator(
                        registry=registry,
                        clusterwide=True,
                        standalone=True,
                        stop_flag=self._stop,
                        ready_flag=ready,
                    )
                )
            except BaseException as e:  # re-raised in the test by start() or stop()
                self._error = e
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name="operator", daemon=True)
        self._thread.start()
        if not await asyncio.to_thread(ready.wait, timeout_s):
            raise TimeoutError(f"the operator did not start within {timeout_s} s")
        if self._error is not None:
            raise self._error

    async def stop(self, timeout_s: float = 20) -> None:
        if self._thread is None:
            return
        self._stop.set()
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join, timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"the operator did not stop within {timeout_s} s")
        if self._error is not None:
            raise self._error


# Fast timings for tests: short debounce, frequent status refresh, quick retries.
TEST_CONFIG = OperatorConfig(
    writer=WriterSettings(debounce_s=0.05, max_delay_s=0.5, retry_s=0.2),
    retry_delay_s=0.5,
    status_interval_s=0.5,
    revalidate_interval_s=3600,
)


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("kopf", "lorafleet")):
            self.records.append(record)


@pytest.fixture
async def operator(kube: Cluster) -> AsyncIterator[RunningOperator]:
    """The operator, started against `kube`. A handler that failed with an unexpected error (kopf
    logs it and retries) fails the test."""
    errors = _ErrorLog()
    logging.getLogger().addHandler(errors)
    running = RunningOperator(kube, TEST_CONFIG)
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
