"""Which requests run in the next step. Pure Python: no torch, no I/O.

There are no prefill and decode phases: every request has tokens whose KV is not yet cached
(`num_tokens - num_computed_tokens`), and each step hands out up to `max_num_batched_tokens`
of them. Running requests go first, in arrival order, so a long prompt is chunked across steps
while decodes keep flowing. Waiting requests sit in one queue per adapter and are admitted
round-robin across adapters, so a flood for one adapter cannot starve a trickle for another.
An adapter's requests are admitted only once its weights are loaded and it holds one of the
fixed LoRA slots; a cold adapter's load is started here and its queue simply waits meanwhile.
A load that fails for good fails its queue at once; one that fails retryably (S3 down) is
retried, and fails the queue only if it keeps failing for `ADAPTER_RETRY_S`.
When every slot serves running requests and another adapter waits, the adapter that has held
its slot longest stops admitting (it "yields"): its running requests finish, its slot frees up
and the waiting adapter takes it. Slots thus rotate like time slices, and with more adapters
than slots each still gets its share.
A request starts computing after the longest start of its tokens found in the prefix cache
(kv_cache.py): shared full blocks, then the first tokens of a cached block, copied. Each chunk
names the blocks it fills, so requests admitted later, even in the same step, share them.
When the KV cache is full, the newest running request is preempted and later recomputed (from
what of it is still cached).
With speculative decoding on, the decode of a greedy or unseeded sampled request may carry
n-gram guesses of its next tokens (`ScheduledChunk.draft`, see speculative.py); `update` keeps
the ones the model agreed with.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .adapter_slots import SlotTable
from .config import SchedulerConfig
from .kv_cache import KVCacheManager
from .request import FinishReason, Request, Status
from .speculative import accept, propose

PREFETCH_DEPTH = 4  # cold adapters, in turn order, whose loads run at once
MIN_SLOT_STEPS = 16  # an adapter keeps admitting for at least this many steps after taking a slot
# How long an adapter's waiting requests wait while its loads keep failing retryably (S3 down),
# retried with backoff meanwhile; then they fail (HTTP 503) instead of waiting out their timeout.
ADAPTER_RETRY_S = 30.0


@dataclass(frozen=True)
class AdapterFailure:
    """Why an adapter's last load failed."""

    message: str
    retryable: bool  # its source is down (S3) or memory is short: a later load may work


class AdapterPort(Protocol):
    """What the scheduler asks of the adapter store, keyed by `Request.adapter_id`."""

    def get(self, adapter: str) -> Any | None: ...  # its weights if they are in memory now, else None

    def load(self, adapter: str) -> None: ...  # start a background load if none runs (idempotent)

    def error(self, adapter: str) -> AdapterFailure | None: ...  # why the last load failed, if it did

    def current(self, adapter: str) -> str: ...  # the key its name resolves to now (a republish moves it)


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first token position computed in this step
    num_tokens: int  # tokens computed in this step
    block_table: list[int]  # the request's KV blocks (a live view; do not mutate)
    samples: bool  # the chunk reaches the end of the known tokens, so the step samples a new one
    slot: int | None = None  # LoRA slot of the request's adapter
    # Guessed tokens computed after the known ones (counted in num_tokens); the step samples a
    # token after each of them too, to verify them.
    draft: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # (slot, adapter, weights from AdapterPort.get) to fill before running
    slot_loads: list[tuple[int, str, Any]] = field(default_factory=list)
    failed: list[tuple[Request, AdapterFailure]] = field(default_factory=list)  # ended: their adapter failed
    # (source block, destination block, tokens): KV to copy before the step runs, the first
    # tokens of a cached block that a new request's prompt starts with (see kv_cache.lookup)
    copies: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
        adapters: AdapterPort | None = None,
        num_slots: int = 0,
    ) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.adapters = adapters
        self.slots = SlotTable(num_slots)
        self.queues: dict[str | None, deque[Request]] = {}  # per adapter (None: the base model)
        self._turns: deque[str | None] = deque()  # adapters with waiting requests, in round-robin order
        self.running: list[Request] = []
        self._step = 0
        self._forming = True  # static mode: the batch still takes requests
        self._slotted_at: dict[str, int] = {}  # step at which an adapter took its slot
        self._yielding: set[str] = set()  # slotted adapters admitting nothing until they lose the slot
        self._failing_since: dict[str, float] = {}  # adapter -> first retryable failure its queue met
        self._reserve = int(config.admission_watermark * kv.num_blocks)
        self.num_preemptions = 0  # since start, for metrics
        self.num_draft_tokens = 0  # speculative guesses computed, since start
        self.num_accepted_tokens = 0  # ... and kept
        self.num_queried_tokens = 0  # prompt tokens of admitted requests, looked up in the prefix cache
        self.num_cached_tokens = 0  # ... and found there (not computed again)

    # -- intake ---------------------------------------------------------------------------------

    def add(self, request: Request, front: bool = False) -> None:
        request.status = Status.WAITING
        queue = self.queues.get(request.adapter_id)
        if queue is None:
            queue = self.queues[request.adapter_id] = deque()
            self._turns.append(request.adapter_id)
        queue.appendleft(request) if front else queue.append(request)

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def waiting(self) -> Iterator[Request]:
        for q in self.queues.values():
            yield from q

    def has_work(self) -> bool:
        return bool(self.queues or self.running)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Finish a request wherever it is (cancel, stop string, error). Idempotent."""
        if request.finished:
            return
        if request.status is Status.RUNNING:
            self.running.remove(request)
            self.slots.release(request.adapter_id)
        elif request.adapter_id in self.queues and request in self.queues[request.adapter_id]:
            self.queues[request.adapter_id].remove(request)
            self._drop_if_empty(request.adapter_id)
        self.kv.free(request.request_id)
        request.status = Status.FINISHED
        request.finish_reason = reason
        request.finish_time = time.monotonic()

    # -- one step -------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        # Blocks named for a step that neither `update` nor `fail` closed (it was interrupted): their
        # KV may never have been written.
        self.kv.settle(computed=False)
        self._step += 1
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        cfg = self.config
        drafting = cfg.num_speculative_tokens > 0 and len(self.running) <= cfg.speculative_max_seqs

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            draft = self._draft(req, budget) if drafting and n == 1 else []
            # Room for the guesses, if there is some to spare: a guess never preempts anyone.
            if draft and self.kv.allocate(
                req.request_id, req.num_computed_tokens + 1 + len(draft), self._reserve
            ):
                n += len(draft)
            else:
                draft = []
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # req preempted itself: every later request is gone too
            out.chunks.append(self._chunk(req, n, draft))
            budget -= n
            i += 1

        # Admitting while preempting would thrash. Static mode forms a batch (up to max_num_seqs,
        # its prompts chunked over as many steps as the budget needs), then admits nothing more
        # until the whole batch has finished.
        static = self.config.mode == "static"
        if static and not self.running:
            self._forming = True
        if not out.preempted and not (static and not self._forming):
            self._admit(out, budget)
            if len(self.running) >= self.config.max_num_seqs or not self.queues:
                self._forming = False
        self._prefetch()
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        if not any(a is not None and self.slots.slot_of(a) is None for a in self._turns):
            self._yielding.clear()  # nobody waits for a slot: no need to give one up
        skipped = 0  # adapters visited in a row that could not admit anything
        while budget > 0 and len(self.running) < self.config.max_num_seqs and skipped < len(self._turns):
            adapter = self._turns[0]
            self._turns.rotate(-1)
            if adapter in self._yielding or (adapter is not None and not self._slot_ready(adapter, out)):
                skipped += 1
                continue
            req = self.queues[adapter][0]
            tokens = req.all_token_ids
            prefix = self.kv.lookup(tokens, req.cache_key)  # waiting requests have nothing computed
            cached = prefix.num_tokens
            n = min(len(tokens) - cached, budget)
            reserve = self._reserve if self.running else 0  # an empty batch may use every block
            if not self.kv.allocate(req.request_id, cached + n, reserve, prefix):
                return  # out of KV memory: nobody else fits either
            req.num_computed_tokens = cached
            if prefix.copy_from is not None:
                own = self.kv.block_table(req.request_id)[len(prefix.blocks)]
                out.copies.append((prefix.copy_from, own, prefix.copy_tokens))
            if not req.num_preemptions:  # a preempted request coming back may find its own blocks
                req.num_cached_tokens = cached
                self.num_queried_tokens += len(tokens)
                self.num_cached_tokens += cached
            self.queues[adapter].popleft()
            self._drop_if_empty(adapter)
            req.status = Status.RUNNING
            self.running.append(req)
            self.slots.acquire(adapter)
            out.chunks.append(self._chunk(req, n))
            budget -= n
            skipped = 0

    def _slot_ready(self, adapter: str, out: SchedulerOutput) -> bool:
        """True when the adapter holds a slot (claiming one if its weights are loaded)."""
        if self.slots.slot_of(adapter) is not None:
            return True
        if self.adapters is None:
            raise RuntimeError(f"request for adapter {adapter!r} but the engine has no adapter store")
        failure = self.adapters.error(adapter)
        if failure is not None and failure.retryable:
            failure = self._outlasted(adapter, failure)
        if failure is not None:
            for req in list(self.queues[adapter]):
                self.finish(req, FinishReason.ERROR)
                out.failed.append((req, failure))
            return False
        weights = self.adapters.get(adapter)  # only the weights of exactly this version
        if weights is None:
            current = self.adapters.current(adapter)
            if current != adapter:  # republished while these waited: they run on the new version
                self._rekey(adapter, current)
            return False  # _prefetch starts its load when it is among the next few cold adapters
        self._failing_since.pop(adapter, None)
        slot, evicted = self.slots.assign(adapter)
        if slot is None:  # every slot serves running requests: ask the longest holder to yield
            holders = [a for a in self.slots.active() if a not in self._yielding]
            if holders:
                oldest = min(holders, key=lambda a: self._slotted_at.get(a, 0))
                if self._step - self._slotted_at.get(oldest, 0) >= MIN_SLOT_STEPS:
                    self._yielding.add(oldest)
            return False
        if evicted is not None:
            self._yielding.discard(evicted)
            self._slotted_at.pop(evicted, None)
        self._slotted_at[adapter] = self._step
        out.slot_loads.append((slot, adapter, weights))
        return True

    def _outlasted(self, adapter: str, failure: AdapterFailure) -> AdapterFailure | None:
        """The failure to end the adapter's waiting requests with, once its loads have failed
        retryably for ADAPTER_RETRY_S; None until then (_prefetch retries them, with backoff), so
        a short S3 blip fails nobody."""
        now = time.monotonic()
        since = self._failing_since.setdefault(adapter, now)
        if now - since < ADAPTER_RETRY_S:
            return None
        return AdapterFailure(
            f"{failure.message} (still failing after {now - since:.0f} s; retry later)", True
        )

    def _prefetch(self) -> None:
        if self.adapters is None:
            return
        # Only the next few cold adapters load at once: loading every queued adapter would churn
        # the CPU tier, each load evicting one that waits for its turn.
        started = 0
        for adapter in self._turns:
            if started == PREFETCH_DEPTH:
                break
            if (
                adapter is not None
                and self.slots.slot_of(adapter) is None
                and self.adapters.get(adapter) is None
            ):
                self.adapters.load(adapter)
                started += 1

    def fail(self, out: SchedulerOutput) -> None:
        """The step that ran `out` failed: what it loaded into slots and the KV blocks it was
        computing are unknown, and its requests end with an error."""
        for slot, _, _ in out.slot_loads:
            self.slots.forget(slot)
        self.kv.settle(computed=False)
        for chunk in out.chunks:
            self.finish(chunk.request, FinishReason.ERROR)

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> dict[str, list[int]]:
        """Record the step's results. `sampled` maps the id of each request whose chunk samples to
        the tokens the model picked: one, or one per draft token plus one.

        Returns the tokens each request gained (finished requests included: check `finished`)."""
        now = time.monotonic()
        self.kv.settle(computed=True)
        gained: dict[str, list[int]] = {}
        for chunk in out.chunks:
            req = chunk.request
            if req.finished:
                continue  # cancelled while the step ran
            picked = sampled.get(req.request_id)
            if picked is None:
                req.num_computed_tokens += chunk.num_tokens
                continue
            tokens = accept(chunk.draft, picked)
            # The KV of the known tokens and of the kept guesses is valid; the rest is overwritten
            # when those positions are computed again.
            req.num_computed_tokens += chunk.num_tokens - len(chunk.draft) + len(tokens) - 1
            if chunk.draft:  # blocks the kept guesses filled (the guesses are not in the request yet)
                fed = req.all_token_ids + chunk.draft[: len(tokens) - 1]
                self.kv.commit(req.request_id, req.num_computed_tokens, lambda: fed)  # noqa: B023 - called at once
            self.num_draft_tokens += len(chunk.draft)
            self.num_accepted_tokens += len(tokens) - 1
            if req.first_token_time is None:
                req.first_token_time = now
            new = gained[req.request_id] = []
            for token in tokens:
                req.output_token_ids.append(token)
                new.append(token)
                reason = self._stop_reason(req, token)
                if reason is not None:
                    self.finish(req, reason)
                    break
        return gained

    # -- helpers --------------------------------------------------------------------------------

    def _chunk(self, req: Request, n: int, draft: list[int] | None = None) -> ScheduledChunk:
        start = req.num_computed_tokens
        slot = None if req.adapter_id is None else self.slots.slot_of(req.adapter_id)
        draft = draft or []
        samples = start + n - len(draft) == req.num_tokens
        # Guesses are not known tokens: their blocks are named once the step has verified them.
        self.kv.commit(req.request_id, start + n - len(draft), lambda: req.all_token_ids, in_flight=True)
        return ScheduledChunk(req, start, n, self.kv.block_table(req.request_id), samples, slot, draft)

    def _draft(self, req: Request, budget: int) -> list[int]:
        """Guesses of a request's next tokens, never past its max_tokens, the context length or
        the step's token budget."""
        if not req.params.greedy and req.params.seed is not None:
            # A seeded request gives the same tokens in any batch, and whether drafts run depends
            # on the batch; verifying one consumes random numbers a plain step would not.
            return []
        cfg = self.config
        room = min(
            cfg.num_speculative_tokens,
            budget - 1,
            req.params.max_tokens - len(req.output_token_ids) - 1,
            self.max_model_len - req.num_tokens - 1,
        )
        if room <= 0:
            return []
        return propose(req.all_token_ids, room, cfg.prompt_lookup_min, cfg.prompt_lookup_max)

    def _rekey(self, old: str, new: str) -> None:
        """Move the requests waiting for `old` to the back of `new`'s queue. A slot is only ever
        named after the version its weights are, so a later rollback cannot find stale weights."""
        waiting = list(self.queues[old])
        self.queues[old].clear()
        self._drop_if_empty(old)
        for req in waiting:
            req.adapter_id = new
            self.add(req)

    def _drop_if_empty(self, adapter: str | None) -> None:
        if not self.queues[adapter]:
            del self.queues[adapter]
            self._turns.remove(adapter)
            if adapter is not None:  # a failure streak counts only while requests wait through it
                self._failing_since.pop(adapter, None)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.slots.release(req.adapter_id)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0  # recompute: the prompt and the outputs so far become the prompt
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.add(req, front=True)

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        params = req.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        if len(req.output_token_ids) >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
