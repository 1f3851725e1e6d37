"""SmolLM2-135M-Instruct in float32: the engine's continuous batch (prefix caching on) against HF
`generate`, and a batch mixing 8 adapters with base requests against PEFT running each adapter
alone."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorafleet.bench.lora_adapters import write_random_adapter
from lorafleet.engine.adapter_store import AdapterStoreConfig
from lorafleet.engine.adapters import base_spec, open_adapters
from lorafleet.engine.config import EngineConfig, LoRAConfig, SchedulerConfig
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
    """The plain engine, and the engine drafting n-gram guesses for every request (speculative
    decoding is usually off above 4 running requests; here it runs at 20)."""
    engines = {
        "plain": SchedulerConfig(128, 64),
        "speculative": SchedulerConfig(128, 64, num_speculative_tokens=4, speculative_max_seqs=64),
    }
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    outputs = {}
    for name, sched in engines.items():
        eng = LLMEngine(EngineConfig(model=str(smollm2_dir), scheduler=sched), model_dir=smollm2_dir)
        prompts = [eng.encode_chat(m) for m in bench_messages[:NUM_PROMPTS]]
        outputs[name] = [o.token_ids for o in eng.generate(prompts, params)]
        assert eng.kv.num_free_blocks == eng.kv.num_blocks
        # The chat template's system prompt fills the first 16-token block of every prompt: all
        # but the first request compute from its cached KV, and still match HF below.
        assert eng.scheduler.num_cached_tokens >= 16 * (NUM_PROMPTS - 1)
        if name == "speculative":
            assert eng.scheduler.num_accepted_tokens > 0.05 * NUM_PROMPTS * NEW_TOKENS  # ~12% here
        del eng
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    divergent: dict[str, list[str]] = {name: [] for name in engines}
    for i, p in enumerate(prompts):
        res = hf.generate(
            torch.tensor([p]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
        ref = res.sequences[0, len(p) :].tolist()
        for name, outs in outputs.items():
            if ref != outs[i]:
                divergent[name].append(f"prompt {i}: {explain(list(res.logits), ref, outs[i])}")
    for name, diverged in divergent.items():
        identical = NUM_PROMPTS - len(diverged)
        assert identical >= 0.95 * NUM_PROMPTS, f"{name}: {identical}/{NUM_PROMPTS} identical; " + "; ".join(
            diverged
        )


LORA_TOKENS = 32
RANKS = [2, 4, 8, 16, 8, 4, 16, 2]


def test_mixed_adapter_batch_matches_peft_on_smollm2(smollm2_dir, bench_messages, tmp_path):
    base = base_spec(smollm2_dir, max_rank=16)
    names = [f"bench/a{i}" for i in range(len(RANKS))]
    for i, (name, rank) in enumerate(zip(names, RANKS)):
        write_random_adapter(tmp_path / name, base, rank, seed=i)
    adapters = open_adapters(
        smollm2_dir, AdapterStoreConfig(max_rank=16), "smollm2", adapter_dir=str(tmp_path)
    )
    assert adapters is not None
    eng = LLMEngine(
        EngineConfig(model=str(smollm2_dir), scheduler=SchedulerConfig(256, 64), lora=LoRAConfig(8, 16)),
        model_dir=smollm2_dir,
        adapters=adapters,
    )
    # Two prompts per adapter and four on the base model, all in one continuous batch.
    jobs: list[tuple[str | None, list[int]]] = [
        (name, eng.encode_chat(bench_messages[2 * i + k])) for i, name in enumerate(names) for k in range(2)
    ] + [(None, eng.encode_chat(m)) for m in bench_messages[16:20]]
    greedy = SamplingParams(max_tokens=LORA_TOKENS, temperature=0.0)
    reqs = [eng.add_request(p, greedy, adapter_id=a) for a, p in jobs]
    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            assert o.error is None, o.error
            got.setdefault(o.request_id, []).extend(o.token_ids)
    adapters.close()

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, tmp_path / names[0], adapter_name=names[0].replace("/", "_"))
    for name in names[1:]:
        peft.load_adapter(tmp_path / name, adapter_name=name.replace("/", "_"))
    divergent, changed = [], 0
    for (adapter, p), req in zip(jobs, reqs):
        kwargs = dict(
            max_new_tokens=LORA_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        if adapter is None:
            with peft.disable_adapter():
                res = peft.generate(input_ids=torch.tensor([p]), **kwargs)
        else:
            peft.set_adapter(adapter.replace("/", "_"))
            res = peft.generate(input_ids=torch.tensor([p]), **kwargs)
            with peft.disable_adapter():
                base_ids = peft.generate(
                    input_ids=torch.tensor([p]), max_new_tokens=LORA_TOKENS, do_sample=False
                )
            changed += base_ids[0, len(p) :].tolist() != res.sequences[0, len(p) :].tolist()
        ref = res.sequences[0, len(p) :].tolist()
        if ref != got[req.request_id]:
            divergent.append(f"{adapter}: {explain(list(res.logits), ref, got[req.request_id])}")
    identical = len(jobs) - len(divergent)
    assert identical >= 0.95 * len(jobs), f"{identical}/{len(jobs)} identical; " + "; ".join(divergent)
    # Rank-2 adapters with small B barely move some answers; most must still change.
    assert changed >= 6, f"only {changed}/16 adapter requests differ from the base model"
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
