"""Offline throughput: N chat prompts submitted at once, greedy, up to M new tokens each.

Systems run one after another in this process on the same prompt token ids: the engine in
continuous and in static mode, and two Hugging Face baselines. Model loading and engine
construction are not timed; every system first runs an untimed two-prompt warm-up.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from lorafleet.engine.config import DTYPES
from lorafleet.engine.llm_engine import eos_token_ids

from .engine_system import LoRAFleetSystem
from .hf_baselines import STATIC_BATCH_SIZE, load_hf_model, run_hf_continuous, run_hf_static
from .machine import describe_machine
from .report import THROUGHPUT_PANELS, plot_bars, write_json
from .stats import SystemRun, median_run
from .workload import chat_prompts, default_prompts_path, load_messages

log = logging.getLogger(__name__)

SYSTEMS = (
    "lorafleet",
    "lorafleet_static",
    "hf_static",
    "hf_continuous",
    "lorafleet_ngram",
    "lorafleet_no_prefix_cache",
)
# lorafleet_ngram is lorafleet unless a few requests run (a latency run); lorafleet_no_prefix_cache
# shows what sharing the chat template's system prompt is worth.
DEFAULT_SYSTEMS = SYSTEMS[:4]
# Engine systems: scheduling mode, speculative (n-gram) tokens per step, prefix caching.
ENGINE_SYSTEMS: dict[str, tuple[Literal["continuous", "static"], int, bool]] = {
    "lorafleet": ("continuous", 0, True),
    "lorafleet_static": ("static", 0, True),
    "lorafleet_ngram": ("continuous", 4, True),
    "lorafleet_no_prefix_cache": ("continuous", 0, False),
}
MODEL_SHAPED_TOKENS = 128  # rows of the roofline matmul: one decode step of 128 running requests
TTFT_METHOD = (
    "seconds from submitting the whole workload to each request's first generated token. hf_static: "
    "the first decoding step of the request's batch, stamped by a streamer, so later batches include "
    "the wait for earlier ones; hf_continuous: generate_batch's per-token timestamps; lorafleet: the "
    "engine's first_token_time. TPOT: (last token time - first token time) / (tokens - 1), same stamps."
)


@dataclass(frozen=True)
class ThroughputConfig:
    model_dir: Path  # local Hugging Face directory
    requests: int = 128
    max_new_tokens: int = 128
    dtype: str = "float32"
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    prompts_path: Path | None = None  # default: the shared workload file
    matmul_seconds: float = 1.0  # time budget of each machine matmul measurement
    rounds: int = 1  # runs of each system, interleaved; each reports its median round

    def __post_init__(self) -> None:
        if min(self.requests, self.max_new_tokens, self.rounds) < 1:
            raise ValueError("--requests, --max-new-tokens and --rounds must be at least 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise ValueError(f"unknown systems {unknown}; choose among {', '.join(SYSTEMS)}")


def num_parameters(model_dir: Path) -> int:
    """Parameters stored in the model's safetensors files (tied weights are stored once)."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            # safe_open handles have keys() but are not iterable.
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    return total


def run_systems(
    config: ThroughputConfig, prompts: list[list[int]], eos: list[int], pad: int
) -> dict[str, list[SystemRun]]:
    """Each system built, warmed up on two short requests, then timed on the workload, once per
    round. Rounds are interleaved (a, b, a, b), so the machine's drift over minutes reaches every
    system alike; with one round, each system is dropped before the next is built."""
    runs: dict[str, list[SystemRun]] = {name: [] for name in config.systems}
    runners: dict[str, Callable[[list[list[int]], int], SystemRun]] = {}
    hf_model = None
    for _ in range(config.rounds):
        for name in config.systems:
            runner = runners.get(name)
            if runner is None:
                if name in ENGINE_SYSTEMS:
                    runner = LoRAFleetSystem(config.model_dir, config.dtype, *ENGINE_SYSTEMS[name]).run
                else:
                    if hf_model is None:
                        hf_model = load_hf_model(config.model_dir, getattr(torch, config.dtype))
                    run = run_hf_static if name == "hf_static" else run_hf_continuous
                    runner = partial(run, hf_model, eos_token_ids=eos, pad_token_id=pad)
                runner(prompts[:2], 2)
                if config.rounds > 1:
                    runners[name] = runner
            log.info("%s: %d requests, up to %d new tokens each", name, len(prompts), config.max_new_tokens)
            runs[name].append(runner(prompts, config.max_new_tokens))
            log.info("%s: %s", name, runs[name][-1].summary())
            del runner  # with one round: drops the engine and its KV cache before the next is built
    return runs


def identical_fraction(runs: dict[str, SystemRun], reference: str) -> dict[str, float]:
    """Per system, the fraction of requests whose greedy tokens equal the reference system's."""
    ref = runs[reference].token_ids
    return {name: sum(a == b for a, b in zip(run.token_ids, ref)) / len(ref) for name, run in runs.items()}


@dataclass(frozen=True)
class Workload:
    """What every generation benchmark starts from: the prompts as token ids, the model's EOS and
    pad ids, and the machine's description (with its matmul FLOP/s in `dtype`)."""

    prompts_path: Path
    prompts: list[list[int]]
    eos: list[int]
    pad: int
    machine: dict[str, Any]


def prepare_workload(
    model_dir: Path, requests: int, prompts_path: Path | None, dtype: str, matmul_seconds: float
) -> Workload:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts_path = prompts_path or default_prompts_path()
    prompts = chat_prompts(tokenizer, load_messages(requests, prompts_path))
    eos = sorted(eos_token_ids(model_dir, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    model_config = AutoConfig.from_pretrained(model_dir)
    shape = (MODEL_SHAPED_TOKENS, model_config.hidden_size, model_config.intermediate_size)
    machine = describe_machine(getattr(torch, dtype), shape, min_seconds=matmul_seconds)
    return Workload(prompts_path, prompts, eos, pad, machine)


def run_throughput(config: ThroughputConfig) -> dict[str, Any]:
    """Run the benchmark and return its JSON payload."""
    w = prepare_workload(
        config.model_dir, config.requests, config.prompts_path, config.dtype, config.matmul_seconds
    )
    prompts_path, prompts, eos, pad, machine = w.prompts_path, w.prompts, w.eos, w.pad, w.machine
    params = num_parameters(config.model_dir)

    rounds = run_systems(config, prompts, eos, pad)
    runs = {name: median_run(rs) for name, rs in rounds.items()}
    results = {name: run.summary().as_dict() for name, run in runs.items()}
    roofline_tok_s = machine["matmul_flops_model_shaped"] / (2 * params)
    reference = "hf_static" if "hf_static" in runs else next(iter(runs))
    return {
        "results": results,
        "roofline_fraction": results["lorafleet"]["tok_s"] / roofline_tok_s if "lorafleet" in runs else None,
        "machine": machine,
        "config": {
            "benchmark": "throughput",
            "requests": config.requests,
            "max_new_tokens": config.max_new_tokens,
            "dtype": config.dtype,
            "systems": list(config.systems),
            "model": str(config.model_dir),
            "num_parameters": params,
            "roofline_tok_s": roofline_tok_s,
            "prompts": str(prompts_path),
            "prompt_tokens": sum(len(p) for p in prompts),
            "eos_token_ids": eos,
            "hf_static_batch_size": STATIC_BATCH_SIZE,
            "ttft_method": TTFT_METHOD,
            "rounds": config.rounds,
        },
        # Every round's tok/s and TPOT p50; `results` holds each system's median round (by tok/s).
        "rounds": {
            name: [
                {k: v for k, v in r.summary().as_dict().items() if k in ("tok_s", "tpot_p50_s")} for r in rs
            ]
            for name, rs in rounds.items()
        },
        "agreement": {"reference": reference, "identical_fraction": identical_fraction(runs, reference)},
        # Of config.prompt_tokens, those each engine system took from its prefix cache (median round).
        "cached_prompt_tokens": {
            n: r.cached_prompt_tokens for n, r in runs.items() if r.cached_prompt_tokens is not None
        },
    }


def save_throughput(payload: dict[str, Any], json_path: Path, plot_path: Path | None) -> None:
    write_json(json_path, payload)
    if plot_path is not None:
        c = payload["config"]
        title = f"Throughput: N={c['requests']} requests, M={c['max_new_tokens']} new tokens, {c['dtype']}"
        plot_bars(plot_path, payload["results"], THROUGHPUT_PANELS, title)
