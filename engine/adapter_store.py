"""The adapter store: registry lookup and the tiers below the GPU slots (CPU, disk, S3).

The engine's step loop asks for adapters by id and never waits for I/O: `get` returns an adapter
already in CPU memory or None; `request` starts at most one background load per (id, version) on
a small thread pool; `status` and `wait` report how it went. Loads read the disk tier, else the
source (S3 or a local directory), validate before deserializing (adapter_format), and fill the
CPU tier. The running batch `acquire`s the adapters it uses, so they are never evicted; pinned
adapters are preloaded and never evicted either.

Identity is (id, version): every cache is keyed by both, so a republished adapter is loaded
afresh and old weights are never served for a new version. One lock guards the store's state
and is never held during I/O. Knows nothing about slots, batches or metrics libraries: the
counters in `AdapterStoreStats` are exported by the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from .adapter_disk import DiskTier
from .adapter_format import (
    CONFIG_NAME,
    DEFAULT_MAX_BYTES,
    WEIGHTS_NAME,
    AdapterError,
    BaseModelSpec,
    check_files,
)
from .adapter_sources import SourceUnavailable, fetch_s3_adapter, read_local_adapter
from .adapter_weights import LoadedAdapter, load_adapter_weights
from .registry import Registry, RegistryEntry, validate_adapter_id
from .s3 import S3Client, make_s3_client

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (adapter id, version)
Tier = Literal["cpu", "disk", "s3"]
LOADER_NICE = 15  # niceness of loader threads (Linux: per thread); see _lower_priority
LOAD_SAMPLES = 4096  # latency samples kept per source, newest last
PINNED_RETRY_S = 30.0  # a pinned adapter whose preload failed (retryably) is tried again this often


class UnknownAdapter(KeyError):
    """No adapter of that id in the registry (HTTP 404)."""

    def __str__(self) -> str:
        return f"unknown adapter {self.args[0]!r}: it is not in the registry"


class InvalidAdapterName(ValueError):
    """An id that is not `<namespace>/<name>` by Kubernetes rules (path tricks included)."""


class AdapterLoadError(Exception):
    """A load that failed. Requests waiting for the adapter fail with this; `retryable` says whether
    asking again later can help (S3 down) or not until the adapter is republished (invalid)."""

    def __init__(self, adapter_id: str, version: str, reason: str, message: str, retryable: bool) -> None:
        super().__init__(f"adapter {adapter_id} (version {version}): {message}")
        self.adapter_id, self.version, self.reason, self.retryable = adapter_id, version, reason, retryable


@dataclass(frozen=True)
class AdapterStatus:
    state: Literal["absent", "loading", "ready", "failed"]  # absent: not requested, or evicted
    version: str
    error: AdapterLoadError | None = None  # set when failed

    @property
    def retryable(self) -> bool:
        return self.error is not None and self.error.retryable


@dataclass(frozen=True)
class AdapterStoreConfig:
    """Sizes and sources of the adapter tiers. Byte budgets count float32 weights (CPU) or files (disk)."""

    cpu_bytes: int = 2 << 30  # ~100 rank-16 SmolLM2 adapters on all 7 projections (19.5 MB each)
    disk_dir: Path | None = None  # None: no disk tier, every cold load reads the source
    disk_bytes: int = 10 << 30
    max_rank: int = 64  # the width of the engine's slot tensors; higher ranks are refused
    max_adapter_bytes: int = DEFAULT_MAX_BYTES  # refused above this, before downloading
    s3_endpoint_url: str | None = None  # for S3-compatible stores (SeaweedFS, MinIO)
    s3_region: str | None = None
    s3_connect_timeout_s: float = 5.0
    s3_read_timeout_s: float = 30.0
    s3_max_attempts: int = 5  # per S3 call, with boto3's exponential backoff in between
    fetch_threads: int = 2  # concurrent loads; each also deserializes, so more than cores gains little

    def __post_init__(self) -> None:
        for name in (
            "cpu_bytes",
            "disk_bytes",
            "max_rank",
            "max_adapter_bytes",
            "s3_max_attempts",
            "fetch_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"AdapterStoreConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.s3_connect_timeout_s <= 0 or self.s3_read_timeout_s <= 0:
            raise ValueError("S3 timeouts must be positive seconds")


@dataclass
class AdapterStoreStats:
    """Counters and gauges for the metrics exporter. Tiers: "cpu", "disk"; load sources: "disk", "s3"."""

    resident: dict[str, int] = field(default_factory=dict)  # tier -> adapters held
    resident_bytes: dict[str, int] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=lambda: {"cpu": 0, "disk": 0})
    misses: dict[str, int] = field(default_factory=lambda: {"cpu": 0, "disk": 0})
    evictions: dict[str, int] = field(default_factory=lambda: {"cpu": 0, "disk": 0})
    loads: dict[str, int] = field(default_factory=lambda: {"disk": 0, "s3": 0})  # completed, by source
    load_failures: dict[str, int] = field(default_factory=lambda: {"disk": 0, "s3": 0})
    # Seconds from request() to ready in CPU memory, by source; the last LOAD_SAMPLES of each.
    # An exporter observes the newest `loads[s] - seen[s]` of them.
    load_seconds: dict[str, deque[float]] = field(
        default_factory=lambda: {s: deque(maxlen=LOAD_SAMPLES) for s in ("disk", "s3")}
    )
    active: int = 0  # adapters acquired by the running batch
    loading: int = 0  # loads in flight


@dataclass
class _Load:
    started: float  # time.monotonic() of the request that started it
    done: threading.Event = field(default_factory=threading.Event)
    error: AdapterLoadError | None = None
    future: Future[None] | None = None  # close() fails the loads it cancels before they start

    @property
    def retryable_failure(self) -> bool:
        """Finished with an error that a new attempt may not meet (S3 down, CPU tier full)."""
        return self.done.is_set() and self.error is not None and self.error.retryable


class AdapterStore:
    def __init__(
        self,
        config: AdapterStoreConfig,
        base: BaseModelSpec,
        registry: Registry,
        *,
        s3_client: S3Client | None = None,
    ) -> None:
        """`s3_client` defaults to one made from `config` with the standard credential chain."""
        self.config = config
        self.base = dataclasses.replace(base, max_rank=config.max_rank)
        self._s3 = s3_client or make_s3_client(
            config.s3_endpoint_url,
            config.s3_region,
            config.s3_connect_timeout_s,
            config.s3_read_timeout_s,
            config.s3_max_attempts,
        )
        self._disk = DiskTier(config.disk_dir, config.disk_bytes) if config.disk_dir else None
        self._pool = ThreadPoolExecutor(
            config.fetch_threads, thread_name_prefix="adapter-load", initializer=_lower_priority
        )
        self._lock = threading.Lock()
        self._registry = Registry(registry.base_model)
        self._cpu: OrderedDict[Key, LoadedAdapter] = OrderedDict()  # least recently used first
        self._cpu_bytes = 0
        self._refs: dict[str, int] = {}  # adapter id -> acquisitions by the running batch
        self._loads: dict[Key, _Load] = {}  # in flight, or failed (until the next request)
        self._stats = AdapterStoreStats()
        self.update_registry(registry)

    # -- the step loop's calls: none of them waits for I/O ---------------------------------

    def get(self, adapter_id: str) -> LoadedAdapter | None:
        """The current version of the adapter if it is in CPU memory, else None."""
        with self._lock:
            key = self._key(adapter_id)
            adapter = self._cpu.get(key)
            if adapter is not None:
                self._cpu.move_to_end(key)
            return adapter

    def request(self, adapter_id: str) -> AdapterStatus:
        """Make the adapter ready: start its load unless it is in memory or already loading.

        A retryable failure (S3 down, CPU tier full of in-use adapters) is retried by the next
        request; a refused adapter stays failed until it is republished (a new version), since
        the same bytes would be refused again. Counts a CPU hit or miss (joining a load in flight
        counts neither). Raises UnknownAdapter or InvalidAdapterName.
        """
        with self._lock:
            key = self._key(adapter_id)
            entry = self._registry.adapters[adapter_id]
            load = self._loads.get(key)
            if key in self._cpu:
                self._cpu.move_to_end(key)
                self._stats.hits["cpu"] += 1
            elif load is None or load.retryable_failure:
                self._stats.misses["cpu"] += 1
                load = self._loads[key] = _Load(time.monotonic())
                load.future = self._pool.submit(self._load, key, entry, load)
            return self._status(key)

    def prefetch(self, adapter_ids: Iterable[str]) -> None:
        """request() each adapter that can be requested; unknown or invalid ids are skipped."""
        for adapter_id in adapter_ids:
            with contextlib.suppress(UnknownAdapter, InvalidAdapterName):
                self.request(adapter_id)

    def status(self, adapter_id: str) -> AdapterStatus:
        with self._lock:
            return self._status(self._key(adapter_id))

    def acquire(self, adapter_id: str) -> LoadedAdapter | None:
        """get(), and keep the adapter in memory until the matching release()."""
        with self._lock:
            key = self._key(adapter_id)
            adapter = self._cpu.get(key)
            if adapter is not None:
                self._cpu.move_to_end(key)
                self._refs[adapter_id] = self._refs.get(adapter_id, 0) + 1
            return adapter

    def release(self, adapter_id: str) -> None:
        with self._lock:
            refs = self._refs.get(adapter_id, 0)
            if refs < 1:
                raise RuntimeError(f"release({adapter_id!r}) without a matching acquire()")
            if refs == 1:
                del self._refs[adapter_id]
                self._drop_stale(adapter_id)
            else:
                self._refs[adapter_id] = refs - 1

    def update_registry(self, registry: Registry) -> None:
        """Serve `registry` from now on: drop unused old versions, preload pinned adapters."""
        with self._lock:
            self._registry = registry
            for adapter_id in {key[0] for key in (*self._cpu, *self._loads)}:
                if self._refs.get(adapter_id, 0) == 0:
                    self._drop_stale(adapter_id)
            # A refusal for want of room beside the pinned adapters holds only while they stay pinned.
            for key, load in list(self._loads.items()):
                if load.done.is_set() and load.error is not None and load.error.reason == "CpuTierFull":
                    del self._loads[key]
            cold = [k for k, e in registry.adapters.items() if e.pinned and (k, e.version) not in self._cpu]
        for adapter_id in cold:  # pinned ones already in memory are not requested: no false CPU hits
            self.request(adapter_id)

    def retry_pinned(self, min_interval_s: float = PINNED_RETRY_S) -> None:
        """Start again the preload of each pinned adapter whose last attempt failed retryably (S3
        down, CPU tier full of in-use adapters) at least `min_interval_s` ago: pinned adapters are
        meant to be in memory before anyone asks, not only after the next request fails."""
        since = time.monotonic() - min_interval_s
        with self._lock:
            loads = [
                (adapter_id, self._loads.get((adapter_id, entry.version)))
                for adapter_id, entry in self._registry.adapters.items()
                if entry.pinned
            ]
            retry = [a for a, load in loads if load and load.retryable_failure and load.started <= since]
        for adapter_id in retry:
            self.request(adapter_id)

    # -- for tests, benchmarks and the metrics exporter -------------------------------------

    def wait(self, adapter_id: str, timeout_s: float) -> AdapterStatus:
        """Block until the adapter's load in flight (if any) finishes or `timeout_s` passes."""
        with self._lock:
            load = self._loads.get(self._key(adapter_id))
        if load is not None:
            load.done.wait(timeout_s)
        return self.status(adapter_id)

    @property
    def registry(self) -> Registry:
        return self._registry

    def stats(self) -> AdapterStoreStats:
        """A snapshot of the counters and gauges."""
        disk = self._disk.usage() if self._disk else (0, 0)
        with self._lock:
            s = self._stats
            return dataclasses.replace(
                s,
                resident={"cpu": len(self._cpu), "disk": disk[0]},
                resident_bytes={"cpu": self._cpu_bytes, "disk": disk[1]},
                hits=dict(s.hits),
                misses=dict(s.misses),
                evictions={"cpu": s.evictions["cpu"], "disk": self._disk.evictions if self._disk else 0},
                loads=dict(s.loads),
                load_failures=dict(s.load_failures),
                load_seconds={k: deque(v, maxlen=LOAD_SAMPLES) for k, v in s.load_seconds.items()},
                active=len(self._refs),
                loading=sum(not load.done.is_set() for load in self._loads.values()),
            )

    def close(self) -> None:
        """Stop the loader threads; loads in flight finish, queued ones fail (retryable) at once."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            cancelled = [
                (k, load) for k, load in self._loads.items() if load.future and load.future.cancelled()
            ]
        for key, load in cancelled:  # never started: without this, wait() would sit out its timeout
            load.error = AdapterLoadError(*key, "StoreClosed", "the adapter store is shutting down", True)
            load.done.set()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals: _key, _status, _drop_stale, _insert expect the lock held -------------------

    def _key(self, adapter_id: str) -> Key:
        try:
            validate_adapter_id(adapter_id)
        except ValueError as e:
            raise InvalidAdapterName(str(e)) from None
        entry = self._registry.adapters.get(adapter_id)
        if entry is None:
            raise UnknownAdapter(adapter_id)
        return (adapter_id, entry.version)

    def _status(self, key: Key) -> AdapterStatus:
        if key in self._cpu:
            return AdapterStatus("ready", key[1])
        load = self._loads.get(key)
        if load is None:
            return AdapterStatus("absent", key[1])
        if not load.done.is_set():
            return AdapterStatus("loading", key[1])
        return AdapterStatus("failed", key[1], load.error)

    def _is_current(self, key: Key) -> bool:
        entry = self._registry.adapters.get(key[0])
        return entry is not None and entry.version == key[1]

    def _drop_stale(self, adapter_id: str) -> None:
        """Forget versions of `adapter_id` the registry no longer names (it is not acquired)."""
        for key in [k for k in self._cpu if k[0] == adapter_id and not self._is_current(k)]:
            self._cpu_bytes -= self._cpu.pop(key).nbytes
        for key in [k for k, load in self._loads.items() if k[0] == adapter_id and not self._is_current(k)]:
            if self._loads[key].done.is_set():
                del self._loads[key]

    def _load(self, key: Key, entry: RegistryEntry, load: _Load) -> None:
        """On a loader thread: read the adapter from the nearest tier and put it in CPU memory."""
        try:
            adapter, source = self._read(key, entry)
            with self._lock:
                self._insert(adapter)
                self._stats.loads[source] += 1
                self._stats.load_seconds[source].append(time.monotonic() - load.started)
                self._loads.pop(key, None)
        except (AdapterError, SourceUnavailable, AdapterLoadError) as e:
            load.error = _load_error(key, e)
            log.warning("%s", load.error)
        except Exception as e:  # a bug, not the adapter's fault: say so loudly, keep serving others
            log.exception("loading adapter %s@%s failed unexpectedly", *key)
            load.error = AdapterLoadError(*key, "InternalError", f"internal error: {e!r}", retryable=False)
        if load.error is not None:
            with self._lock:
                self._stats.load_failures["disk" if entry.uri.startswith("file://") else "s3"] += 1
                if not self._is_current(key) and self._loads.get(key) is load:
                    del self._loads[key]  # republished meanwhile: nobody can ask for this version again
        load.done.set()

    def _read(self, key: Key, entry: RegistryEntry) -> tuple[LoadedAdapter, Tier]:
        """Deserialized weights, from a local directory, the disk tier or S3 (then kept on disk)."""
        max_bytes = self.config.max_adapter_bytes
        if entry.uri.startswith("file://"):
            files = read_local_adapter(entry.uri, entry.version, self.base, max_bytes)
            return self._deserialize(key, files), "disk"
        disk = self._disk
        if disk is not None:
            try:
                cached = disk.read(key)
            except OSError as e:  # the disk tier is a cache: without it, read the source
                log.warning("adapter disk cache unusable for %s@%s: %s", *key, e)
                cached, disk = None, None
            with self._lock:
                (self._stats.hits if cached is not None else self._stats.misses)["disk"] += 1
            if cached is not None:
                return self._deserialize(key, cached), "disk"
        staging = None
        if disk is not None:
            try:
                staging = disk.staging_dir()
            except OSError as e:
                log.warning("cannot stage adapter %s@%s on disk: %s", *key, e)
                disk = None
        staging = staging or Path(tempfile.mkdtemp(prefix="lorafleet-adapter-"))
        try:
            dest = staging / "files"
            files = fetch_s3_adapter(self._s3, entry.uri, entry.version, self.base, max_bytes, dest)
            adapter = self._deserialize(key, files)  # only what deserializes is kept on disk
            if disk is not None:
                try:
                    disk.put(key, dest, files)
                except OSError as e:  # disk full or read-only: serve from memory, fetch again next time
                    log.warning("cannot keep adapter %s@%s on disk: %s", *key, e)
            return adapter, "s3"
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _deserialize(self, key: Key, files: dict[str, bytes]) -> LoadedAdapter:
        # Files from the disk tier were checked against an earlier configuration; check the cap again.
        check_files({name: len(data) for name, data in files.items()}, self.config.max_adapter_bytes)
        return load_adapter_weights(*key, files[CONFIG_NAME], files[WEIGHTS_NAME], self.base)

    def _insert(self, adapter: LoadedAdapter) -> None:
        """Put a loaded adapter in the CPU tier, evicting least recently used ones to fit."""
        if not self._is_current(adapter.key):
            return  # republished or removed while loading: nobody will ask for this version
        budget = self.config.cpu_bytes
        if adapter.nbytes > budget:
            raise AdapterLoadError(
                *adapter.key,
                "TooLarge",
                f"needs {adapter.nbytes} bytes of memory, more than the whole CPU tier (cpu_bytes={budget})",
                retryable=False,
            )
        pinned = {key for key in self._cpu if self._is_current(key) and self._pinned(key[0])}
        evictable = [key for key in self._cpu if key not in pinned and self._refs.get(key[0], 0) == 0]
        # Refuse before evicting anything: a refusal must not cost other tenants their warm adapters.
        if self._cpu_bytes - sum(self._cpu[k].nbytes for k in evictable) + adapter.nbytes > budget:
            pinned_bytes = sum(self._cpu[k].nbytes for k in pinned)
            raise AdapterLoadError(
                *adapter.key,
                "CpuTierFull",
                f"the CPU tier (cpu_bytes={budget}) is full of pinned ({pinned_bytes} bytes) and in-use "
                "adapters; retry when requests finish, or raise cpu_bytes",
                retryable=pinned_bytes + adapter.nbytes <= budget,  # in-use ones are released later
            )
        for key in evictable:  # least recently used first
            if self._cpu_bytes + adapter.nbytes <= budget:
                break
            self._cpu_bytes -= self._cpu.pop(key).nbytes
            self._stats.evictions["cpu"] += 1
        self._cpu[adapter.key] = adapter
        self._cpu_bytes += adapter.nbytes

    def _pinned(self, adapter_id: str) -> bool:
        entry = self._registry.adapters.get(adapter_id)
        return entry is not None and entry.pinned


def _load_error(key: Key, e: Exception) -> AdapterLoadError:
    if isinstance(e, AdapterLoadError):
        return e
    if isinstance(e, AdapterError):
        return AdapterLoadError(*key, e.reason, f"refused ({e.reason}): {e}", retryable=False)
    assert isinstance(e, SourceUnavailable)
    return AdapterLoadError(*key, e.reason, str(e), retryable=True)


def _lower_priority() -> None:
    """Loader threads yield the CPU to the step loop: on a CPU-only host, fetching and
    deserializing an adapter competes with the forward pass for the same cores, and running
    tokens matter more. Measured on 2 cores with 16 requests decoding (bench lora): p50 step time
    while loads run x1.17 at nice 10, x1.05 at 15, x1.0 at 19, while a load under that load
    took about 0.9 s, 2 s and 4.5 s (0.18 s on an idle engine, whatever the niceness). 15 keeps
    running requests within 10% and a cold adapter's wait within seconds. On a GPU host the
    forward pass does not use these cores, and loads run at full speed either way."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or not permitted
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
