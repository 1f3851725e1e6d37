"""Which requests run in the next step. Pure Python: no torch, no I/O.

There are no prefill and decode phases: every request has tokens whose KV is not yet cached
(`num_tokens - num_computed_tokens`), and each step hands out up to `max_num_batched_tokens`
of them. Running requests go first, in arrival order, so a long prompt is chunked across steps
while decodes keep flowing; waiting requests join as soon as blocks and budget allow. When the
KV cache is full, the newest running request is preempted and later recomputed from scratch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .config import SchedulerConfig
from .kv_cache import KVCacheManager
from .request import FinishReason, Request, Status


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first token position computed in this step
    num_tokens: int  # tokens computed in this step
    block_table: list[int]  # the request's KV blocks (a live view; do not mutate)
    samples: bool  # the chunk reaches the end of the known tokens, so the step samples a new one


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

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
    ) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._reserve = int(config.admission_watermark * kv.num_blocks)
        self.num_preemptions = 0  # since start, for metrics

    # -- intake ---------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Finish a request wherever it is (cancel, stop string, error). Idempotent."""
        if request.finished:
            return
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
        request.status = Status.FINISHED
        request.finish_reason = reason
        request.finish_time = time.monotonic()

    # -- one step -------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # req preempted itself: every later request is gone too
            out.chunks.append(self._chunk(req, n))
            budget -= n
            i += 1

        # Admitting while preempting would thrash; static mode admits only into an empty batch.
        admit = not out.preempted and not (self.config.mode == "static" and self.running)
        while admit and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            reserve = self._reserve if self.running else 0  # an empty batch may use every block
            if not self.kv.allocate(req.request_id, req.num_computed_tokens + n, reserve):
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.chunks.append(self._chunk(req, n))
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Record the step's results. `sampled` maps request id to its new token.

        Returns the requests that finished in this step."""
        now = time.monotonic()
        finished = []
        for chunk in out.chunks:
            req = chunk.request
            if req.finished:
                continue  # cancelled while the step ran
            req.num_computed_tokens += chunk.num_tokens
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.output_token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            reason = self._stop_reason(req, token)
            if reason is not None:
                self.finish(req, reason)
                finished.append(req)
        return finished

    # -- helpers --------------------------------------------------------------------------------

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        return ScheduledChunk(req, start, n, self.kv.block_table(req.request_id), start + n == req.num_tokens)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0  # recompute: the prompt and the outputs so far become the prompt
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        params = req.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        if len(req.output_token_ids) >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
