"""Quantized base weights (int8 per channel, int4 group-wise) under live LoRA adapters.

Floors, teacher-forced greedy agreement with float32 (see bench/quant.py for why teacher-forced):
- tiny seeded models (Gaussian weights scaled x8, so logits are far from smooth): int8 >= 0.85,
  int4 >= 0.35. Gaussian groups are the worst case for 4 bits: 8% relative weight error.
- SmolLM2-135M: int8 >= 0.9 and int4 >= 0.9. Its weights come from a Q4_1 GGUF (4-bit groups of
  32 with a scale and a minimum), so int4 with groups of 32 nearly reproduces them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from lorafleet.bench.quant import default_text_path, perplexity, teacher_forced_agreement
from lorafleet.engine import quant
from lorafleet.engine.adapter_store import AdapterStoreConfig
from lorafleet.engine.adapters import open_adapters
from lorafleet.engine.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lorafleet.engine.llm_engine import LLMEngine
from lorafleet.engine.request import SamplingParams
from tests.plugins.tiny_models import ALL, make_peft_adapter

TEXTS = ["The quick brown", "a", "Serving many adapters over one base", "over the lazy dog", "日本語 🚀"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
TINY_FLOOR = {"int8": 0.85, "int4": 0.35}
MAX_WEIGHT_RATIO = {"int8": 0.3, "int4": 0.21}  # tiny models: norms and biases weigh relatively more
PPL_TOKENS = 256  # the tiny models' context is 512 tokens
PPL_TOLERANCE = {"int8": 0.02, "int4": 0.1}  # relative to float32's perplexity


def engine_for(model_dir: Path, quantization: str | None = None, adapters=None, **kw) -> LLMEngine:
    config = EngineConfig(
        model=str(model_dir),
        quantization=quantization,
        max_model_len=512,
        cache=CacheConfig(block_size=4, kv_cache_bytes=2 << 20),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16),
        **kw,
    )
    return LLMEngine(config, model_dir=model_dir, adapters=adapters)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def test_kernels_match_dequantized_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 128, generator=gen), torch.randn(5, 128, generator=gen)
    q8, s8 = quant.quantize_int8(w)
    int8 = quant.Int8WeightOnlyLinear(q8, s8, bias=torch.ones(96))
    assert rel_error(int8(x) - 1, x @ (q8.float() * s8[:, None]).T) < 0.01
    assert rel_error(int8(x) - 1, x @ w.T) < 0.015
    # Tensors read from safetensors sit at any offset; the vectorized CPU kernel needs alignment.
    unaligned = torch.empty(q8.numel() + 8, dtype=torch.int8)[8:].view_as(q8).copy_(q8)
    assert unaligned.data_ptr() % 64 and torch.equal(
        quant.Int8WeightOnlyLinear(unaligned, s8, None)(x), int8(x) - 1
    )
    packed, sz = quant.quantize_int4(w)
    q4 = quant.unpack_int4(packed).float().reshape(96, -1, quant.GROUP_SIZE)
    dequant = ((q4 - 8) * sz[..., 0].T.float()[..., None] + sz[..., 1].T.float()[..., None]).reshape(96, 128)
    int4 = quant.Int4WeightOnlyLinear(packed, sz, quant.GROUP_SIZE, bias=None)
    assert int4(x).dtype == torch.float32
    assert rel_error(int4(x), x @ dequant.T) < 0.01
    assert rel_error(int4(x), x @ w.T) < 0.1  # 4 bits over Gaussian groups of 32: about 8%
    with pytest.raises(ValueError, match="divisible by 32"):
        quant.quantize_int4(torch.randn(8, 48))


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantized_tiny_model_generates_close_to_float32(tiny_model_dir, fmt) -> None:
    fp32, eng = engine_for(tiny_model_dir, small_step_weights=False), engine_for(tiny_model_dir, fmt)
    layer = eng.runner.model.model.decoder_layers()[0]
    assert isinstance(
        layer.mlp.down_proj, quant.Int8WeightOnlyLinear if fmt == "int8" else quant.Int4WeightOnlyLinear
    )
    ratio = quant.weight_bytes(eng.runner.model) / quant.weight_bytes(fp32.runner.model)
    assert ratio <= MAX_WEIGHT_RATIO[fmt]
    prompts = [eng.tokenizer.encode(t) for t in TEXTS]
    reference = [o.token_ids for o in fp32.generate(prompts, GREEDY)]
    outs = eng.generate(prompts, GREEDY)
    assert all(o.error is None and len(o.token_ids) == GREEDY.max_tokens for o in outs)
    assert teacher_forced_agreement(eng, prompts, reference) >= TINY_FLOOR[fmt]
    text = eng.tokenizer.encode(default_text_path().read_text())[:PPL_TOKENS]
    ppl, ppl32 = perplexity(eng, text), perplexity(fp32, text)
    assert abs(ppl / ppl32 - 1) < PPL_TOLERANCE[fmt], f"perplexity {ppl:.1f} vs float32 {ppl32:.1f}"
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


ADAPTERS = [f"tenant/a{i}" for i in range(4)]


@pytest.fixture(scope="module")
def adapter_root(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(ADAPTERS):
        make_peft_adapter(tiny_llama_dir, root / name, rank=4, alpha=8, targets=ALL, seed=i)
    return root


def mixed_batch(model_dir: Path, root: Path, quantization: str | None) -> tuple[LLMEngine, dict, list[int]]:
    """Every adapter and the base model in one batch: (engine, outputs by adapter, prompt)."""
    adapters = open_adapters(model_dir, AdapterStoreConfig(max_rank=8), "tiny", adapter_dir=str(root))
    lora = LoRAConfig(max_loras=len(ADAPTERS), max_rank=8)
    eng = engine_for(model_dir, quantization, lora=lora, adapters=adapters)
    prompt = eng.tokenizer.encode(TEXTS[0])
    reqs = {n: eng.add_request(prompt, GREEDY, adapter_id=n) for n in [None, *ADAPTERS]}
    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            assert o.error is None
            got.setdefault(o.request_id, []).extend(o.token_ids)
    return eng, {n: got[r.request_id] for n, r in reqs.items()}, prompt


@pytest.fixture(scope="module")
def float32_mixed_batch(tiny_llama_dir, adapter_root) -> dict:
    return mixed_batch(tiny_llama_dir, adapter_root, None)[1]


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_adapters_change_quantized_outputs_as_in_float32(
    tiny_llama_dir, adapter_root, float32_mixed_batch, fmt
) -> None:
    names, fp = ADAPTERS, float32_mixed_batch
    eng, q, prompt = mixed_batch(tiny_llama_dir, adapter_root, fmt)
    assert [n for n in names if q[n] != q[None]] == [n for n in names if fp[n] != fp[None]] == names
    lora = eng.runner.lora_layers[(0, "q_proj")]
    assert isinstance(lora.base, quant.Int8WeightOnlyLinear | quant.Int4WeightOnlyLinear)
    assert lora.lora_a.dtype == torch.float32  # deltas in activation precision, not the base's
    # Teacher-forced on float32's output with each adapter: the quantized engine follows it with
    # the adapter in a slot, and does not without it, so the delta is live and the right one.
    assert eng.adapters is not None
    with_adapter, without = [], []
    for slot, name in enumerate(names):
        weights = eng.adapters.get(eng.adapters.key_of(name))
        assert weights is not None
        eng.runner.load_lora(slot, weights)
        with_adapter.append(teacher_forced_agreement(eng, [prompt], [fp[name]], slot=slot))
        without.append(teacher_forced_agreement(eng, [prompt], [fp[name]]))
    assert sum(with_adapter) / len(names) >= TINY_FLOOR[fmt], with_adapter
    assert max(without) < 0.3, without


def test_saved_checkpoint_reloads_without_quantizing(tiny_qwen2_dir, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lorafleet.engine.model_runner")
    first = engine_for(tiny_qwen2_dir, "int4", quantized_cache_dir=str(tmp_path))
    (saved,) = tmp_path.glob("*.safetensors")
    stamp = saved.stat().st_mtime_ns
    assert sum("saved the int4 checkpoint" in r.message for r in caplog.records) == 1
    second = engine_for(tiny_qwen2_dir, "int4", quantized_cache_dir=str(tmp_path))
    assert sum("saved the int4 checkpoint" in r.message for r in caplog.records) == 1
    assert saved.stat().st_mtime_ns == stamp
    a, b = dict(first.runner.model.named_buffers()), dict(second.runner.model.named_buffers())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompts = [first.tokenizer.encode(t) for t in TEXTS]
    assert [o.token_ids for o in first.generate(prompts, GREEDY)] == [
        o.token_ids for o in second.generate(prompts, GREEDY)
    ]
    with pytest.raises(ValueError, match="int8"):
        quant.load_quantized(saved, "int8")
    # A changed weight file gets a new cache entry instead of stale weights.
    (weights,) = tiny_qwen2_dir.glob("*.safetensors")
    assert quant.cache_path(tmp_path, tiny_qwen2_dir, "int4") == saved
    assert quant.cache_path(tmp_path, tiny_qwen2_dir, "int8") != saved
    weights.touch()
    assert quant.cache_path(tmp_path, tiny_qwen2_dir, "int4") != saved


def test_config_refuses_unknown_quantization() -> None:
    with pytest.raises(ValueError, match="int8, int4"):
        EngineConfig(quantization="int3")


@pytest.mark.slow
def test_smollm2_quantized_agreement_and_perplexity(smollm2_dir, bench_messages, tmp_path) -> None:
    def build(fmt: str | None) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=str(smollm2_dir),
                quantization=fmt,
                # The converted model's cache: quantized once, like the engine CLI does.
                quantized_cache_dir=str(smollm2_dir.parent.parent / "quantized"),
                max_model_len=1024,
                cache=CacheConfig(kv_cache_bytes=96 << 20),
                scheduler=SchedulerConfig(256, 8),
            ),
            model_dir=smollm2_dir,
        )

    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    fp32 = build(None)
    prompts = [fp32.encode_chat(m) for m in bench_messages[:4]]
    reference = [o.token_ids for o in fp32.generate(prompts, params)]
    text = fp32.tokenizer.encode(default_text_path().read_text())
    ppl32 = perplexity(fp32, text)
    del fp32
    for fmt in quant.FORMATS:
        eng = build(fmt)
        agreement = teacher_forced_agreement(eng, prompts, reference)
        assert agreement >= 0.9, f"{fmt}: {agreement:.3f} greedy agreement with float32"
        ppl = perplexity(eng, text)
        assert abs(ppl / ppl32 - 1) < 0.02, f"{fmt}: perplexity {ppl:.2f} vs float32 {ppl32:.2f}"


def test_bench_quant_reports_every_format(tiny_llama_dir, tmp_path) -> None:
    from lorafleet.bench.cli import main

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    json_path, png_path = tmp_path / "quant.json", tmp_path / "quant.png"
    argv = ["quant", "--requests", "2", "--max-new-tokens", "4", "--model", str(tiny_llama_dir)]
    argv += [
        "--text",
        str(text),
        "--cache-dir",
        str(tmp_path),
        "--json",
        str(json_path),
        "--plot",
        str(png_path),
    ]
    assert main(argv) == 0
    results = json.loads(json_path.read_text())["results"]
    assert list(results) == ["float32", "bfloat16", "float16", "int8", "int4"]
    for r in results.values():
        assert {"weight_bytes", "tok_s", "agreement", "perplexity"} <= r.keys()
    assert results["float32"]["agreement"] == 1.0
    assert (
        results["int4"]["weight_bytes"]
        < results["int8"]["weight_bytes"]
        < results["bfloat16"]["weight_bytes"]
    )
    assert png_path.read_bytes().startswith(b"\x89PNG")
