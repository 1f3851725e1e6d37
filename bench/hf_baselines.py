"""Hugging Face transformers baselines: static padded batches and the built-in continuous batching.

Both generate greedily from the same prompt token ids as the engine, stop on EOS, and report one
`RequestTiming` per request on the same clock (seconds since the workload was submitted).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from .stats import RequestTiming, SystemRun

STATIC_BATCH_SIZE = 16
# transformers sizes its continuous-batching KV cache at 60% of host RAM on CPU unless told
# otherwise; we size it to the workload so it neither swaps nor starves other processes.
CB_PAGE_SIZE = 256  # transformers' default page size, in tokens


def load_hf_model(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    # sdpa is the attention that both plain generate() and continuous batching accept on CPU.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


class _StepClock(BaseStreamer):
    """Stamps each decoding step. generate() hands the prompt to put() first, then one column of new
    tokens per step, so stamp i is when every row's (i+1)-th token was ready."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self._seen_prompt:
            self.stamps.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


def _greedy(max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(eos_token_ids),
        pad_token_id=pad_token_id,
    )


def _until_eos(token_ids: Sequence[int], eos_ids: set[int]) -> list[int]:
    """Tokens up to and including the first EOS; what follows it in a padded batch is padding."""
    for i, token in enumerate(token_ids):
        if token in eos_ids:
            return list(token_ids[: i + 1])
    return list(token_ids)


def run_hf_static(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    batch_size: int = STATIC_BATCH_SIZE,
) -> SystemRun:
    """generate() on consecutive left-padded batches of `batch_size` prompts, one batch at a time.

    generate() returns a batch only when all its rows are done, so per-request times come from a
    streamer that stamps each decoding step: a request's first token is the batch's first step, its
    finish the step that produced its EOS (or its last token). Requests in later batches therefore
    see the earlier batches in their time to first token, as clients of a static server would.
    """
    config = _greedy(max_new_tokens, eos_token_ids, pad_token_id)
    outputs: list[list[int]] = []
    timings: list[RequestTiming] = []
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in batch])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        clock = _StepClock()
        with torch.inference_mode():
            generated = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config, streamer=clock
            )
        for row in generated[:, width:].tolist():
            ids = _until_eos(row, set(eos_token_ids))
            outputs.append(ids)
            t_first, t_last = clock.stamps[0], clock.stamps[len(ids) - 1]
            timings.append(RequestTiming(len(ids), t_first - start, t_last - start))
    return SystemRun(outputs, timings, time.perf_counter() - start)


def run_hf_continuous(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
) -> SystemRun:
    """transformers' built-in continuous batching (`generate_batch`), all requests submitted at once.

    Its KV cache holds the whole workload, so no request is ever evicted. The timings come from
    its per-token timestamps (`record_timestamps=True`).
    """
    config = _greedy(max_new_tokens, eos_token_ids, pad_token_id)
    pages = sum(math.ceil((len(p) + max_new_tokens) / CB_PAGE_SIZE) for p in prompts)
    cb_config = ContinuousBatchingConfig(page_size=CB_PAGE_SIZE, num_blocks=pages)
    start = time.perf_counter()
    with torch.inference_mode():
        results = model.generate_batch(
            inputs=[list(p) for p in prompts],
            generation_config=config,
            continuous_batching_config=cb_config,
            record_timestamps=True,
        )
    seconds = time.perf_counter() - start
    if len(results) != len(prompts) or any(r.error for r in results.values()):
        errors = sorted({str(r.error) for r in results.values() if r.error})
        done = f"{len(results)}/{len(prompts)}"
        raise RuntimeError(f"transformers generate_batch finished {done} requests; errors: {errors}")
    outputs = [list(r.generated_tokens) for r in results.values()]  # in input order
    timings = [
        RequestTiming(len(r.generated_tokens), r.timestamps[0] - start, r.timestamps[-1] - start)
        for r in results.values()
    ]
    return SystemRun(outputs, timings, seconds)
