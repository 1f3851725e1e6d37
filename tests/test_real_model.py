"""SmolLM2-135M-Instruct in float32: the engine's continuous batch against HF `generate`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafleet.engine.config import EngineConfig, SchedulerConfig
from lorafleet.engine.llm_engine import LLMEngine
from lorafleet.engine.request import SamplingParams

NEW_TOKENS = 64
NUM_PROMPTS = 20

pytestmark = pytest.mark.slow


def explain(hf_logits: list[torch.Tensor], ref: list[int], got: list[int]) -> str:
    """Where two greedy sequences part, and how close the reference's top two logits were there."""
    pos = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    if pos >= len(hf_logits):
        return f"lengths differ ({len(ref)} vs {len(got)}) with equal prefixes"
    top = hf_logits[pos][0].topk(2)
    gap = (top.values[0] - top.values[1]).item()
    return f"diverges at token {pos}: HF {ref[pos]} vs engine {got[pos]}, HF top-2 logit gap {gap:.5f}"


def test_greedy_matches_hf_generate_on_smollm2(smollm2_dir, bench_messages):
    eng = LLMEngine(
        EngineConfig(model=str(smollm2_dir), scheduler=SchedulerConfig(128, 64)), model_dir=smollm2_dir
    )
    prompts = [eng.encode_chat(m) for m in bench_messages[:NUM_PROMPTS]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    divergent = []
    for i, (p, out) in enumerate(zip(prompts, outs)):
        res = hf.generate(
            torch.tensor([p]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
        ref = res.sequences[0, len(p) :].tolist()
        if ref != out.token_ids:
            divergent.append(f"prompt {i}: {explain(list(res.logits), ref, out.token_ids)}")
    identical = NUM_PROMPTS - len(divergent)
    assert identical >= 0.95 * NUM_PROMPTS, f"{identical}/{NUM_PROMPTS} identical; " + "; ".join(divergent)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
