"""oneDNN-packed linear layers: the same outputs as nn.Linear, and the engine's model uses them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafleet.engine.config import EngineConfig, LoRAConfig
from lorafleet.engine.cpu_linear import PackedLinear, can_pack, pack_linears
from lorafleet.engine.llm_engine import LLMEngine
from lorafleet.engine.lora import LoRALinear
from lorafleet.engine.quant import weight_bytes

pytestmark = pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.float32), reason="torch built without oneDNN"
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_nn_linear_at_every_row_count(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).to(dtype)
    packed = PackedLinear(linear)
    assert packed.weight.is_mkldnn and (packed.in_features, packed.out_features) == (96, 200)
    # Tuned for 128 rows, and fewer than MIN_ROWS are padded: every count must be right.
    for rows in (1, 2, 3, 4, 128, 300):
        x = torch.randn(rows, 96, dtype=dtype)
        got, want = packed(x), linear(x)
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_pack_linears_swaps_only_what_onednn_runs():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8).half(), nn.Linear(8, 4).bfloat16()))
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][1], PackedLinear)
    assert type(model[1][0]) is nn.Linear  # float16 needs AVX512-FP16: left to nn.Linear


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_engine_model_runs_packed_projections_under_lora(tiny_llama_dir, dtype):
    def model_of(lora):
        config = EngineConfig(model=str(tiny_llama_dir), dtype=dtype, max_model_len=64, lora=lora)
        return LLMEngine(config, model_dir=tiny_llama_dir).runner.model

    model = model_of(None)
    layer = model.model.decoder_layers()[0]
    packed = dtype != "float16"
    assert isinstance(layer.self_attn.q_proj, PackedLinear) is packed
    assert isinstance(model.lm_head, PackedLinear) is packed
    # A tied LM head is packed as a copy; the embedding keeps the dense table it looks rows up in.
    assert not model.model.embed_tokens.weight.is_mkldnn
    assert weight_bytes(model) > 0

    lora_model = model_of(LoRAConfig(max_loras=2, max_rank=4))
    wrapped = lora_model.model.decoder_layers()[0].mlp.down_proj
    assert isinstance(wrapped, LoRALinear) and isinstance(wrapped.base, PackedLinear) is packed
