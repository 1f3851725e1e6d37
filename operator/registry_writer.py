"""Coalesced registry writes: many adapter changes per BaseModel become a few ConfigMap writes.

Each BaseModel's registry lives here in memory, seeded from what is already published (so a
restarted operator never publishes a partial registry while adapters are still resuming).
`put` and `remove` change it and wait until a flush has published the change; a flush waits for
`debounce_s` of quiet (or at most `max_delay_s` after the first unpublished change), and at least
`min_interval_s` after the previous write. So a burst of 1,000 publishes costs a handful of
writes, a trickle (one adapter Ready every second, as when the API server is slow) costs at most
one write per `min_interval_s`, and a lone publish is visible within `debounce_s`.
Pure asyncio: reading and writing the ConfigMaps are the callables it is given.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lorafleet.engine.registry import Registry, RegistryEntry

logger = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name) of a BaseModel
LoadFn = Callable[[Key], Awaitable[Registry | None]]  # the published registry, None if none
FlushFn = Callable[[Key, Registry], Awaitable[int]]  # publish; returns the ConfigMap writes made


@dataclass(frozen=True)
class WriterSettings:
    debounce_s: float = (
        0.5  # quiet time before a write: long enough to batch a kubectl apply of many adapters
    )
    max_delay_s: float = 5.0  # no change waits longer than this under a steady stream of changes
    # Writes are at least this far apart. Pods see a ConfigMap change only after the kubelet's
    # sync (a minute or more), so 15 s more are invisible to serving, and when changes trickle in
    # slower than the debounce (an API server admitting 1,000 adapters one by one over ten
    # minutes, as in the operator benchmark) the registry is rewritten at most 4 times a minute.
    min_interval_s: float = 15.0
    retry_s: float = 2.0  # after a failed write (API down, conflict)


@dataclass
class _State:
    base_model: str | None = None
    adapters: dict[str, RegistryEntry] = field(default_factory=dict)
    version: int = 0  # bumped by every change
    published: int = 0  # the version the cluster has
    first_unpublished: float | None = None  # loop time of the oldest unpublished change
    last_change: float = 0.0
    last_write: float | None = None  # loop time of the last successful write
    waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None


class RegistryWriter:
    def __init__(self, load: LoadFn, flush: FlushFn, settings: WriterSettings | None = None) -> None:
        self._load, self._flush = load, flush
        self.settings = settings or WriterSettings()
        self._states: dict[Key, _State] = {}
        self._locks: dict[Key, asyncio.Lock] = {}
        self.writes = 0  # ConfigMap writes so far (the benchmark reports it)

    async def _state(self, key: Key) -> _State:
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._states:
                published = await self._load(key)
                state = _State()
                if published is not None:
                    state.base_model, state.adapters = published.base_model, dict(published.adapters)
                self._states[key] = state
            return self._states[key]

    def snapshot(self, key: Key) -> Registry | None:
        """The registry as it will be published (None if this BaseModel was never touched)."""
        state = self._states.get(key)
        return None if state is None else Registry(state.base_model, dict(state.adapters))

    async def set_base_model(self, key: Key, served_name: str) -> None:
        """Make sure the registry is published and names the base model's served name."""
        state = await self._state(key)
        if state.base_model != served_name:
            state.base_model = served_name
            await self._change(key, state)
        else:
            await self._wait_published(state, state.version)

    async def republish(self, key: Key) -> None:
        """Write the registry again, unchanged (its ConfigMap was deleted)."""
        state = await self._state(key)
        await self._change(key, state)

    async def put(self, key: Key, adapter_id: str, entry: RegistryEntry, *, base_model: str) -> None:
        """Add or replace an entry; `base_model` is the served name, in case this is the first write."""
        state = await self._state(key)
        if state.adapters.get(adapter_id) != entry or state.base_model != base_model:
            state.adapters[adapter_id] = entry
            state.base_model = base_model
            await self._change(key, state)
        else:
            await self._wait_published(state, state.version)

    async def remove(self, key: Key, adapter_id: str) -> None:
        state = await self._state(key)
        if state.adapters.pop(adapter_id, None) is not None:
            await self._change(key, state)
        else:
            await self._wait_published(state, state.version)

    async def retain(self, key: Key, live: Callable[[], set[str]]) -> list[str]:
        """Drop entries whose adapter no longer exists (e.g. its finalizer was removed by hand).

        `live()` names the adapters that exist; it is called at the moment of comparison, with no
        await in between: an adapter created and published while the caller was busy must not be
        mistaken for a deleted one.
        """
        state = await self._state(key)
        stale = sorted(set(state.adapters) - live())
        for adapter_id in stale:
            del state.adapters[adapter_id]
        if stale:
            await self._change(key, state)
        return stale

    def forget(self, key: Key) -> None:
        """The BaseModel is gone (its ConfigMaps are garbage-collected with it)."""
        state = self._states.pop(key, None)
        if state is not None and state.flusher is not None:
            state.flusher.cancel()
        for _, future in state.waiters if state else []:
            if not future.done():
                future.set_exception(RuntimeError("the BaseModel was deleted"))

    async def close(self) -> None:
        tasks = [s.flusher for s in self._states.values() if s.flusher is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _change(self, key: Key, state: _State) -> None:
        loop = asyncio.get_running_loop()
        state.version += 1
        state.last_change = loop.time()
        if state.first_unpublished is None:
            state.first_unpublished = state.last_change
        if state.flusher is None or state.flusher.done():
            state.flusher = asyncio.create_task(
                self._flush_loop(key, state), name=f"registry-writer {key[0]}/{key[1]}"
            )
        await self._wait_published(state, state.version)

    async def _wait_published(self, state: _State, version: int) -> None:
        if state.published >= version:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiters.append((version, future))
        await future

    async def _flush_loop(self, key: Key, state: _State) -> None:
        loop = asyncio.get_running_loop()
        while state.published < state.version:
            assert state.first_unpublished is not None
            due = min(
                state.last_change + self.settings.debounce_s,
                state.first_unpublished + self.settings.max_delay_s,
            )
            if state.last_write is not None:
                due = max(due, state.last_write + self.settings.min_interval_s)
            if loop.time() < due:
                await asyncio.sleep(due - loop.time())
                continue
            version = state.version
            state.first_unpublished = None
            try:
                self.writes += await self._flush(key, Registry(state.base_model, dict(state.adapters)))
            except Exception as e:
                logger.warning(
                    "registry of %s/%s not written, retrying in %s s: %s", *key, self.settings.retry_s, e
                )
                self._resolve(state, version, e)
                if state.first_unpublished is None:
                    state.first_unpublished = loop.time()
                await asyncio.sleep(self.settings.retry_s)
                continue
            state.published, state.last_write = version, loop.time()
            self._resolve(state, version, None)

    @staticmethod
    def _resolve(state: _State, version: int, error: Exception | None) -> None:
        keep = []
        for wanted, future in state.waiters:
            if wanted > version:
                keep.append((wanted, future))
            elif not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
        state.waiters = keep
