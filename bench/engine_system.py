"""The system under test: LoRAFleet's engine, in continuous or static scheduling mode, with or
without speculative decoding, with or without prefix caching."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lorafleet.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from lorafleet.engine.llm_engine import LLMEngine
from lorafleet.engine.request import SamplingParams

from .stats import RequestTiming, SystemRun

STATIC_BATCH = 16


class LoRAFleetSystem:
    """One engine, built once (model load and KV cache allocation are not timed), run many times."""

    def __init__(
        self,
        model_dir: Path,
        dtype: str,
        mode: Literal["continuous", "static"],
        speculative_tokens: int = 0,
        prefix_caching: bool = True,
    ) -> None:
        # Static batches of 16, as hf_static's: with one batch of all 128 requests, static and
        # continuous scheduling would be the same thing.
        sched = (
            SchedulerConfig(mode=mode, max_num_seqs=STATIC_BATCH)
            if mode == "static"
            else SchedulerConfig(num_speculative_tokens=speculative_tokens)
        )
        cache = CacheConfig(prefix_caching=prefix_caching)
        config = EngineConfig(model=str(model_dir), dtype=dtype, cache=cache, scheduler=sched)
        self.engine = LLMEngine(config)

    def run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> SystemRun:
        """Greedy generation of every prompt, all submitted at once."""
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        # Every run starts cold: only what the workload's own requests share is reused (the
        # system prompt of the chat template), never blocks of a warm-up or an earlier round.
        self.engine.kv.reset_prefix_cache()
        start = time.monotonic()  # the engine stamps requests with time.monotonic()
        outputs = self.engine.generate([list(p) for p in prompts], params)
        seconds = time.monotonic() - start
        failed = [o for o in outputs if o.error or o.first_token_time is None or o.finish_time is None]
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed in the engine, e.g. {failed[0].error!r}")
        timings = [
            RequestTiming(len(o.token_ids), o.first_token_time - start, o.finish_time - start)  # type: ignore[operator]
            for o in outputs
        ]
        cached = sum(o.num_cached_tokens for o in outputs)
        return SystemRun([list(o.token_ids) for o in outputs], timings, seconds, cached)
