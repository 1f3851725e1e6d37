"""Served adapters: the adapter store as the HTTP server and the step loop see it.

The server asks which adapters exist (`list`, `resolve`: the `AdapterCatalog` contract); the
engine turns a name into a versioned key (`key_of`) and the scheduler takes a key's weights
when they are in memory (`get`), starts loads (`load`) and reads failures (`error`): final ones
(the adapter is invalid) and retryable ones (S3 down), which `load` retries with backoff. Keys are
`<namespace>/<name>@<version>`, so the slot table treats a republished adapter as a new adapter
and never keeps serving old weights to requests that resolved the new version.

A background thread polls the registry source (registry file, adapter directory or S3 prefix)
and hands changes to the store.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Protocol

from .adapter_format import BaseModelSpec
from .adapter_store import AdapterStore, AdapterStoreConfig, InvalidAdapterName, UnknownAdapter
from .adapter_weights import LoadedAdapter
from .protocol import AdapterInfo
from .protocol import InvalidAdapterName as InvalidName
from .protocol import UnknownAdapter as NotFound
from .registry import Registry, RegistryWatcher
from .request import InvalidRequest, split_adapter_key
from .scheduler import AdapterFailure

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 2.0
# Backoff between loads of an adapter whose source is down: capped well below the scheduler's
# ADAPTER_RETRY_S, so that a source back within that window is found before requests fail.
RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0


class RegistrySource(Protocol):
    def poll(self) -> Registry | None: ...  # the registry if it changed since the last poll


class ServedAdapters:
    def __init__(
        self, store: AdapterStore, source: RegistrySource | None = None, served_base: str = ""
    ) -> None:
        self.store = store
        self.source = source
        self.served_base = served_base
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry_at: dict[str, float] = {}  # key -> monotonic time of the next retry after a failure
        self._retry_delay: dict[str, float] = {}
        self.refresh()

    # -- AdapterCatalog, for the server --------------------------------------------------------

    def list(self) -> list[AdapterInfo]:
        return [
            AdapterInfo(adapter_id, self.served_base or None)
            for adapter_id in sorted(self.store.registry.adapters)
        ]

    def resolve(self, name: str) -> str:
        not_found = NotFound(f"the adapter {name!r} does not exist or you do not have access to it")
        if "/" not in name:
            raise not_found  # a model name that is not ours (say "gpt-4"): 404 like OpenAI, not 400
        try:
            self.store.status(name)
        except InvalidAdapterName as e:
            raise InvalidName(str(e)) from None
        except UnknownAdapter:
            raise not_found from None
        return name

    # -- AdapterSource, for the engine and its scheduler ---------------------------------------

    def key_of(self, name: str) -> str:
        try:
            return f"{name}@{self.store.status(name).version}"
        except (InvalidAdapterName, UnknownAdapter) as e:
            raise InvalidRequest(str(e)) from None

    def load(self, key: str) -> None:
        adapter_id, _ = split_adapter_key(key)
        now = time.monotonic()
        try:
            # Retryable failures (S3 down) back off instead of retrying every step; get() resets
            # the backoff once the weights are in (not a retry in flight: it may fail again).
            if self.store.status(adapter_id).state == "failed":
                if now < self._retry_at.get(key, 0.0):
                    return
                delay = min(2 * self._retry_delay.get(key, RETRY_MIN_S / 2), RETRY_MAX_S)
                self._retry_delay[key], self._retry_at[key] = delay, now + delay
            self.store.request(adapter_id)
        except (InvalidAdapterName, UnknownAdapter):
            return  # unpublished while queued: error() reports it

    def error(self, key: str) -> AdapterFailure | None:
        adapter_id, _ = split_adapter_key(key)
        try:
            status = self.store.status(adapter_id)
        except (InvalidAdapterName, UnknownAdapter):
            return AdapterFailure(f"adapter {adapter_id} was unpublished while the request waited", False)
        if status.state == "failed" and status.error is not None:
            return AdapterFailure(str(status.error), status.retryable)  # retryable: the next load() retries
        return None

    def get(self, key: str) -> LoadedAdapter | None:
        """The adapter's weights if they are in memory and of the key's version (the scheduler
        names a slot after the key it loads, so it must never hold another version's weights)."""
        adapter_id, version = split_adapter_key(key)
        try:
            weights = self.store.get(adapter_id)
        except (InvalidAdapterName, UnknownAdapter):
            return None
        if weights is None or weights.version != version:
            return None
        self._retry_delay.pop(key, None)  # loaded: a later failure starts its backoff afresh
        self._retry_at.pop(key, None)
        return weights

    def current(self, key: str) -> str:
        """The key requests for this adapter get now: a request queued before a republish is
        moved to the new version (the old one is gone from every tier)."""
        adapter_id, _ = split_adapter_key(key)
        try:
            return self.key_of(adapter_id)
        except InvalidRequest:  # unpublished: error() reports it
            return key

    # -- registry refresh ----------------------------------------------------------------------

    def refresh(self) -> None:
        if self.source is None:
            return
        try:
            registry = self.source.poll()
        except Exception as e:  # a half-written or unreachable registry keeps the last good one
            log.warning("adapter registry not reloaded: %s", e)
            return
        if registry is not None:
            self.store.update_registry(registry)
            log.info("adapter registry: %d adapters", len(registry.adapters))

    def start(self, interval_s: float = POLL_INTERVAL_S) -> None:
        def run() -> None:
            while not self._stop.wait(interval_s):
                self.refresh()
                self.store.retry_pinned()

        self._thread = threading.Thread(target=run, name="adapter-registry", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.store.close()


def base_spec(model_dir: Path, max_rank: int, name: str | None = None) -> BaseModelSpec:
    """The base model adapters are checked against; its name is `name`, else the directory's (an
    S3 model's cache directory is named after its URI, so the operator passes the name)."""
    config = json.loads((model_dir / "config.json").read_text())
    return BaseModelSpec.from_hf_config(config, name=name or model_dir.name, max_rank=max_rank)


def open_adapters(
    model_dir: Path,
    store_config: AdapterStoreConfig,
    served_base: str,
    base_model_name: str | None = None,
    registry_path: str | None = None,
    adapter_dir: str | None = None,
    adapter_s3_prefix: str | None = None,
) -> ServedAdapters | None:
    """The adapters named by one of the three registry sources, or None when none is given."""
    from .adapter_sources import AdapterDirRegistry, S3PrefixRegistry
    from .s3 import make_s3_client

    given = [x for x in (registry_path, adapter_dir, adapter_s3_prefix) if x]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError("give one of --registry, --adapter-dir and --adapter-s3-prefix")
    source: RegistrySource
    if registry_path:
        source = RegistryWatcher(registry_path)
    elif adapter_dir:
        source = AdapterDirRegistry(Path(adapter_dir), served_base)
    else:
        assert adapter_s3_prefix is not None
        client = make_s3_client(
            store_config.s3_endpoint_url,
            store_config.s3_region,
            store_config.s3_connect_timeout_s,
            store_config.s3_read_timeout_s,
            store_config.s3_max_attempts,
        )
        source = S3PrefixRegistry(client, adapter_s3_prefix, served_base)
    store = AdapterStore(
        store_config, base_spec(model_dir, store_config.max_rank, base_model_name), Registry(served_base)
    )
    return ServedAdapters(store, source, served_base)
