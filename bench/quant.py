"""Base-weight formats side by side: memory, speed and quality of each, in one run.

float32, bfloat16 and float16 are the engine dtype; int8 and int4 are weight-only quantization
over float32 activations (the quantized matmuls run on bfloat16, see engine/quant.py). For each
format in turn one engine is built (not timed; a quantized checkpoint is cached, so later runs
skip quantizing) and measured:

- weight_bytes: the model's parameters and buffers; KV cache and LoRA slots are not weights.
  Every format holds its weights once here: float32's second copy for small steps (EngineConfig.
  small_step_weights, a speed-for-memory trade of any float32 engine) is off.
- tok_s: N chat prompts submitted at once, greedy, M new tokens each (no EOS stop), wall clock.
- agreement: teacher-forced greedy agreement with float32. float32's greedy continuation of each
  prompt is fed to the format in one prefill, and a position agrees when the format's argmax is
  float32's token. Free-running outputs diverge for good at the first near-tie (bfloat16 itself
  leaves float32 within 32 tokens on about half the prompts), so they are reported separately:
- identical_prefix: the fraction of float32's generated tokens before the first difference.
- perplexity: of a small fixed English text (tests/data/perplexity.txt), one prefill.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafleet.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from lorafleet.engine.llm_engine import LLMEngine
from lorafleet.engine.quant import weight_bytes
from lorafleet.engine.request import Request, SamplingParams
from lorafleet.engine.scheduler import ScheduledChunk

from .report import plot_bars, write_json
from .workload import load_messages

log = logging.getLogger(__name__)

# format -> (engine dtype, quantization)
FORMATS: dict[str, tuple[str, str | None]] = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "float16": ("float16", None),
    "int8": ("float32", "int8"),
    "int4": ("float32", "int4"),
}
# The targets, checked in the report (never in the test suite).
TARGETS = {"int8": {"max_weight_ratio": 0.3, "min_agreement": 0.9}, "int4": {"max_weight_ratio": 0.2}}
QUANT_PANELS = (
    ("weight_ratio", "weight memory / float32"),
    ("tok_s", "throughput (generated tok/s)"),
    ("agreement", "greedy agreement with float32"),
    ("perplexity", "perplexity of the fixed text"),
)
_score_ids = itertools.count()


def default_text_path() -> Path:
    """`<repo root>/tests/data/perplexity.txt`, the text the tests also score."""
    return Path(__file__).resolve().parents[1] / "tests" / "data" / "perplexity.txt"


@dataclass(frozen=True)
class QuantBenchConfig:
    model_dir: Path
    requests: int = 16
    max_new_tokens: int = 32
    formats: tuple[str, ...] = tuple(FORMATS)
    prompts_path: Path | None = None
    text_path: Path | None = None
    quantized_cache_dir: Path | None = None  # None: quantize at every run

    def __post_init__(self) -> None:
        if self.requests < 1 or self.max_new_tokens < 1:
            raise ValueError("--requests and --max-new-tokens must be at least 1")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or "float32" not in self.formats:
            raise ValueError(
                f"formats must include float32 and come from {', '.join(FORMATS)}; got {unknown}"
            )


@torch.inference_mode()
def score(
    engine: LLMEngine, token_ids: list[int], first_row: int = 0, slot: int | None = None
) -> torch.Tensor:
    """Float32 logits [len - first_row, vocab] of every position from `first_row` on, in one
    teacher-forced prefill (row i predicts token i + 1). Run it while the engine is idle."""
    req = Request(f"score-{next(_score_ids)}", list(token_ids), SamplingParams(max_tokens=1))
    if not engine.kv.allocate(req.request_id, len(token_ids)):
        raise ValueError(f"{len(token_ids)} tokens do not fit in the KV cache")
    try:
        block_table = engine.kv.block_table(req.request_id)
        hidden = engine.runner.hidden_states(ScheduledChunk(req, 0, len(token_ids), block_table, False, slot))
        return engine.runner.model.logits(hidden[first_row:])
    finally:
        engine.kv.free(req.request_id)


def perplexity(engine: LLMEngine, token_ids: list[int]) -> float:
    logits = score(engine, token_ids)[:-1]
    targets = torch.tensor(token_ids[1:])
    nll = torch.nn.functional.cross_entropy(logits, targets)
    return math.exp(nll.item())


def teacher_forced_agreement(
    engine: LLMEngine, prompts: list[list[int]], references: list[list[int]], slot: int | None = None
) -> float:
    """The fraction of reference tokens that are the engine's argmax given the reference prefix
    (with the adapter loaded in LoRA `slot`, if any)."""
    agree = total = 0
    for prompt, ref in zip(prompts, references):
        if not ref:
            continue
        logits = score(engine, prompt + ref[:-1], first_row=len(prompt) - 1, slot=slot)
        agree += int((logits.argmax(-1) == torch.tensor(ref)).sum())
        total += len(ref)
    return agree / total


def identical_prefix(outputs: list[list[int]], references: list[list[int]]) -> float:
    """The fraction of reference tokens generated before each output first differs from its reference."""
    same = sum(
        next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
        for out, ref in zip(outputs, references)
    )
    return same / max(1, sum(len(r) for r in references))


def build_engine(config: QuantBenchConfig, fmt: str) -> LLMEngine:
    dtype, quantization = FORMATS[fmt]
    engine_config = EngineConfig(
        model=str(config.model_dir),
        dtype=dtype,
        quantization=quantization,
        quantized_cache_dir=str(config.quantized_cache_dir) if config.quantized_cache_dir else None,
        max_model_len=4096,
        small_step_weights=False,  # see weight_bytes above
        cache=CacheConfig(kv_cache_bytes=256 << 20),
        scheduler=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=64),
    )
    return LLMEngine(engine_config, model_dir=config.model_dir)


def run_quant(config: QuantBenchConfig) -> dict[str, Any]:
    """Run the benchmark and return its JSON payload; float32 runs first, as the reference."""
    prompts_messages = load_messages(config.requests, config.prompts_path)
    text_path = config.text_path or default_text_path()
    text = text_path.read_text(encoding="utf-8")
    params = SamplingParams(max_tokens=config.max_new_tokens, temperature=0.0, ignore_eos=True)
    order = ["float32", *(f for f in config.formats if f != "float32")]
    results: dict[str, dict[str, Any]] = {}
    references: list[list[int]] = []
    for fmt in order:
        engine = build_engine(config, fmt)
        prompts = [engine.encode_chat(m) for m in prompts_messages]
        text_ids = engine.tokenizer.encode(text)
        engine.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
        start = time.monotonic()
        outputs = [o.token_ids for o in engine.generate(prompts, params)]
        seconds = time.monotonic() - start
        if fmt == "float32":
            references = outputs
        tokens = sum(len(o) for o in outputs)
        results[fmt] = {
            "dtype": FORMATS[fmt][0],
            "quantization": FORMATS[fmt][1],
            "weight_bytes": weight_bytes(engine.runner.model),
            "tok_s": tokens / seconds,
            "tokens": tokens,
            "seconds": seconds,
            "agreement": teacher_forced_agreement(engine, prompts, references),
            "identical_prefix": identical_prefix(outputs, references),
            "perplexity": perplexity(engine, text_ids),
        }
        results[fmt]["weight_ratio"] = results[fmt]["weight_bytes"] / results["float32"]["weight_bytes"]
        log.info("%s: %s", fmt, results[fmt])
        del engine  # frees its weights and KV cache before the next format is built
    targets = {
        fmt: {
            **t,
            "met": results[fmt]["weight_ratio"] <= t["max_weight_ratio"]
            and results[fmt]["agreement"] >= t.get("min_agreement", 0.0),
        }
        for fmt, t in TARGETS.items()
        if fmt in results
    }
    return {
        "results": {fmt: results[fmt] for fmt in config.formats},
        "targets": targets,
        "config": {
            "benchmark": "quant",
            "model": str(config.model_dir),
            "requests": config.requests,
            "max_new_tokens": config.max_new_tokens,
            "text": str(text_path),
            "text_tokens": len(text_ids),
            "threads": torch.get_num_threads(),
            "agreement_method": "teacher-forced on float32's greedy continuation; identical_prefix is free-running",
        },
    }


def save_quant(payload: dict[str, Any], json_path: Path, plot_path: Path | None) -> None:
    write_json(json_path, payload)
    if plot_path is not None:
        c = payload["config"]
        title = f"Weight formats: N={c['requests']} prompts, M={c['max_new_tokens']} new tokens"
        plot_bars(plot_path, payload["results"], QUANT_PANELS, title)
