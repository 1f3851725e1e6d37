"""Adapter loading as requests see it: cold-load latency per tier, the first-token penalty of a cold
S3 load, and how much other requests' decoding slows down while loads run.

Each measurement uses adapters that no earlier measurement touched, so "cold" really means that
the adapter is only in S3. The step loop is driven as `AsyncEngine` drives it: `step()` again
and again while anything is unfinished, even when every request waits for an adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lorafleet.engine.adapter_store import AdapterStore
from lorafleet.engine.async_engine import IDLE_POLL_S
from lorafleet.engine.llm_engine import LLMEngine
from lorafleet.engine.request import FinishReason, SamplingParams

from .lora_adapters import NAMESPACE
from .stats import percentile

LOAD_TIMEOUT_S = 120.0  # one adapter load; far above any healthy load, it only bounds a broken run
QUIET_STEPS = 8  # decode steps timed with no load in flight before each load
BACKGROUND_REQUESTS = 16  # requests decoding while adapters load (a static-batch baseline's batch)
FIRST_TOKEN = SamplingParams(max_tokens=1, temperature=0.0)

METHOD = {
    "cold_load_s": "s3: request() to ready in CPU memory, disk tier empty (list, verify, download, "
    "deserialize); disk: the same from the disk tier in a restarted store; cpu: copying a CPU-resident "
    "adapter into a GPU slot (ModelRunner.load_lora). One load at a time, nothing else running.",
    "cold_ttft_penalty_s": "p50 over adapters of (TTFT of a one-token request for an adapter only in S3) "
    "minus (TTFT of the same request right after, adapter resident), on an otherwise idle engine.",
    "tpot_during_load_ratio": f"{BACKGROUND_REQUESTS} requests decode (warm adapters); p50 step time while "
    f"a request's cold adapter loads from S3, divided by p50 step time over the {QUIET_STEPS} steps before it.",
}


def cold_adapter_names(samples: int) -> dict[str, list[str]]:
    """Fresh adapters for each measurement, disjoint from each other and from the workload's."""
    return {
        part: [f"{NAMESPACE}/{part}-{j:03d}" for j in range(samples)] for part in ("tiers", "ttft", "load")
    }


@dataclass(frozen=True)
class ColdLoads:
    tiers: dict[str, list[float]]  # "s3", "disk", "cpu" -> seconds per load
    cold_ttft_s: list[float]
    warm_ttft_s: list[float]
    quiet_step_s: list[float]
    loading_step_s: list[float]

    def as_payload(self) -> dict[str, Any]:
        def p(values: Sequence[float]) -> dict[str, float]:
            return {"p50": percentile(values, 50), "p99": percentile(values, 99)}

        penalties = [c - w for c, w in zip(self.cold_ttft_s, self.warm_ttft_s)]
        quiet, loading = percentile(self.quiet_step_s, 50), percentile(self.loading_step_s, 50)
        return {
            "cold_load_s": {tier: p(v) for tier, v in self.tiers.items()},
            "cold_ttft_penalty_s": percentile(penalties, 50),
            "tpot_during_load_ratio": loading / quiet,
            "load_details": {
                "cold_ttft_p50_s": percentile(self.cold_ttft_s, 50),
                "warm_ttft_p50_s": percentile(self.warm_ttft_s, 50),
                "tpot_quiet_p50_s": quiet,
                "tpot_loading_p50_s": loading,
                "quiet_steps": len(self.quiet_step_s),
                "loading_steps": len(self.loading_step_s),
                "samples": len(self.cold_ttft_s),
                "method": METHOD,
            },
        }


def measure_cold_loads(
    engine: LLMEngine,
    store: AdapterStore,
    restarted_store: Callable[[], AdapterStore],
    names: dict[str, list[str]],
    prompts: Sequence[Sequence[int]],
) -> ColdLoads:
    """`engine` is fresh, serves `store` (whose disk tier is empty) and has run nothing yet;
    `restarted_store()` opens another store on the same disk tier, as after a restart."""
    tiers = tier_latencies(engine, store, restarted_store, names["tiers"])
    cold, warm = [], []
    for adapter in names["ttft"]:
        cold.append(ttft(engine, prompts[0], adapter))
        warm.append(ttft(engine, prompts[0], adapter))
    quiet, loading = steps_during_loads(engine, store, names["ttft"], names["load"], prompts)
    return ColdLoads(tiers, cold, warm, quiet, loading)


def _timed_load(store: AdapterStore, adapter: str) -> float:
    start = time.perf_counter()
    store.request(adapter)
    status = store.wait(adapter, LOAD_TIMEOUT_S)
    seconds = time.perf_counter() - start
    if status.state != "ready":
        raise RuntimeError(f"adapter {adapter} did not load: {status.error or status.state}")
    return seconds


def tier_latencies(
    engine: LLMEngine, store: AdapterStore, restarted_store: Callable[[], AdapterStore], adapters: list[str]
) -> dict[str, list[float]]:
    s3 = [_timed_load(store, a) for a in adapters]
    if store.stats().loads["s3"] < len(adapters):
        raise RuntimeError("cold loads did not come from S3: is the disk tier empty?")
    slot = engine.config.lora.max_loras - 1 if engine.config.lora else 0  # unassigned in a fresh engine
    cpu = []
    for adapter in adapters:
        weights = store.get(adapter)
        if weights is None:
            raise RuntimeError(f"adapter {adapter} left the CPU tier; raise its budget")
        start = time.perf_counter()
        engine.runner.load_lora(slot, weights)
        cpu.append(time.perf_counter() - start)
    with restarted_store() as again:
        disk = [_timed_load(again, a) for a in adapters]
        if again.stats().loads["disk"] < len(adapters):
            raise RuntimeError("loads after the restart did not come from the disk tier")
    return {"s3": s3, "disk": disk, "cpu": cpu}


def ttft(engine: LLMEngine, prompt: Sequence[int], adapter: str) -> float:
    """Time to first token of a one-token request, the engine otherwise idle."""
    req = engine.add_request(list(prompt), FIRST_TOKEN, adapter_id=adapter)
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while engine.has_unfinished():
        outputs = engine.step()
        for out in outputs:
            if out.error:
                raise RuntimeError(f"request for {adapter} failed: {out.error}")
        if not outputs and not engine.scheduler.running:
            time.sleep(IDLE_POLL_S)  # as AsyncEngine does while every request waits for a load
        if time.monotonic() > deadline:
            raise RuntimeError(f"no first token for {adapter} within {LOAD_TIMEOUT_S:g} s")
    assert req.first_token_time is not None
    return req.first_token_time - req.arrival_time


def steps_during_loads(
    engine: LLMEngine,
    store: AdapterStore,
    warm: list[str],
    cold: list[str],
    prompts: Sequence[Sequence[int]],
) -> tuple[list[float], list[float]]:
    """Step times of a decoding batch: before each cold load (quiet) and while it runs (loading)."""
    slots = engine.config.lora.max_loras if engine.config.lora else 1
    warm = warm[: max(1, slots - 1)]  # every background request runs, and one slot is left to load into
    background = []
    for i in range(BACKGROUND_REQUESTS):
        prompt = list(prompts[i % len(prompts)])
        # Long enough never to finish during the measurement; aborted at the end.
        params = SamplingParams(
            max_tokens=engine.max_model_len - len(prompt) - 1, temperature=0.0, ignore_eos=True
        )
        background.append(engine.add_request(prompt, params, adapter_id=warm[i % len(warm)]))
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while any(r.first_token_time is None for r in background):  # every prompt prefilled
        _timed_step(engine)
        if time.monotonic() > deadline:
            raise RuntimeError(
                "the background requests did not all start; raise the KV cache or max_num_seqs"
            )
    quiet: list[float] = []
    loading: list[float] = []
    try:
        for adapter in cold:
            quiet += [_timed_step(engine) for _ in range(QUIET_STEPS)]
            req = engine.add_request(list(prompts[0]), FIRST_TOKEN, adapter_id=adapter)
            deadline = time.monotonic() + LOAD_TIMEOUT_S
            while not req.finished:
                before = store.status(adapter).state
                seconds = _timed_step(engine)
                # From the step that starts the load (absent before it) to the one that sees it end.
                if before != "ready" or store.status(adapter).state == "loading":
                    loading.append(seconds)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"adapter {adapter} did not load within {LOAD_TIMEOUT_S:g} s")
            if req.finish_reason is FinishReason.ERROR:
                raise RuntimeError(f"request for {adapter} failed")
        if any(r.finished for r in background):
            raise RuntimeError("a background request finished early; the decode batch shrank")
    finally:
        for r in background:
            engine.abort(r.request_id)
    if not loading:
        raise RuntimeError("no step ran while an adapter loaded")
    return quiet, loading


def _timed_step(engine: LLMEngine) -> float:
    start = time.perf_counter()
    for out in engine.step():
        if out.error:
            raise RuntimeError(f"step failed: {out.error}")
    return time.perf_counter() - start
