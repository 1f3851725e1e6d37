"""Async bridge for the HTTP layer: submit a request, iterate its outputs, cancel it.

The step loop runs in one dedicated thread, because a forward pass is long, synchronous torch
work that must not block the event loop. The thread owns the `LLMEngine`; everything else
talks to it through a command queue, and results come back through `call_soon_threadsafe`.
No lock is held across a forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .llm_engine import LLMEngine, RequestOutput
from .request import SamplingParams

log = logging.getLogger(__name__)


IDLE_POLL_S = 0.005  # engine loop poll while every waiting request waits for an adapter load


class EngineDead(RuntimeError):
    """The engine thread has stopped; no request can be served."""


@dataclass
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None
    sink: asyncio.Queue[RequestOutput | BaseException]
    admitted: asyncio.Future[None] = field(repr=False)
    cache_salt: str | None = field(default=None, repr=False)


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[_Submit | _Abort | None] = queue.SimpleQueue()
        self._sinks: dict[str, _Submit] = {}  # touched only by the engine thread
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set by the engine thread, under the lock, when it stops reading `_commands`; a submit
        # checks it under the same lock, so none is left in the queue with nobody to answer it.
        self._closing = threading.Lock()
        self._closed = False
        self.num_running = 0  # updated by the engine thread; read for metrics and drain
        self.num_waiting = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lorafleet-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._commands.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests -------------------------------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter_id: str | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield deltas until the request finishes. Raises `InvalidRequest` before the first
        yield for a request the engine refuses. Closing the iterator early cancels the request."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        assert self._loop is not None
        request_id = request_id or f"async-{next(self._ids)}"
        sink: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        admitted: asyncio.Future[None] = self._loop.create_future()
        with self._closing:
            if self._closed:  # it stopped since the check above
                raise EngineDead("the engine is not running")
            self._commands.put(
                _Submit(request_id, prompt_token_ids, params, adapter_id, sink, admitted, cache_salt)
            )
        try:
            await admitted
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._commands.put(_Abort(request_id))  # a no-op for a finished or refused request

    # -- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        reason = "the engine stopped"
        try:
            idle = False
            while True:
                # Nothing to run: wait for a command. Every waiting request is waiting for its
                # adapter's load: poll gently instead of spinning against the loader threads.
                wait = None if not self.engine.has_unfinished() else IDLE_POLL_S if idle else 0.0
                if not self._drain_commands(wait):
                    break
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
                    idle = not outputs and not self.engine.scheduler.running
                    self._publish(outputs)
                self.num_running = len(self.engine.scheduler.running)
                self.num_waiting = self.engine.scheduler.num_waiting
        except BaseException as e:  # a bug: fail every open request loudly, then stop
            log.exception("engine loop crashed")
            reason = f"engine loop crashed: {e!r}"
            raise
        finally:
            with self._closing:
                self._closed = True
            with contextlib.suppress(queue.Empty):  # submits that came after the stop or the crash
                while True:
                    cmd = self._commands.get_nowait()
                    if isinstance(cmd, _Submit):
                        self._resolve(cmd.admitted, EngineDead(reason))
            sinks, self._sinks = self._sinks, {}
            for sub in sinks.values():  # every open request hears first: an abort below may fail
                self._send(sub, EngineDead(reason))
            for rid in sinks:
                with contextlib.suppress(Exception):  # after a crash the engine's state is suspect
                    self.engine.abort(rid)

    def _drain_commands(self, wait: float | None) -> bool:
        """Apply queued submits and aborts, first waiting up to `wait` seconds for one (None:
        for ever). False means stop."""
        while True:
            try:
                cmd = self._commands.get(timeout=wait) if wait != 0.0 else self._commands.get_nowait()
            except queue.Empty:
                return True
            wait = 0.0
            if cmd is None:
                return False
            if isinstance(cmd, _Abort):
                if self._sinks.pop(cmd.request_id, None) is not None:
                    self.engine.abort(cmd.request_id)
                continue
            try:
                self.engine.add_request(
                    cmd.prompt_token_ids, cmd.params, cmd.request_id, cmd.adapter_id, cmd.cache_salt
                )
            except Exception as e:  # InvalidRequest and friends go back to the caller
                self._resolve(cmd.admitted, e)
                continue
            self._sinks[cmd.request_id] = cmd
            self._resolve(cmd.admitted, None)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sub = self._sinks.get(out.request_id)
            if sub is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
            self._send(sub, out)

    def _send(self, sub: _Submit, item: RequestOutput | BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(sub.sink.put_nowait, item)

    def _resolve(self, fut: asyncio.Future[None], error: BaseException | None) -> None:
        def set_result() -> None:
            if fut.done():
                return
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(set_result)
