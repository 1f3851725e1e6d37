"""The fused elementwise ops (engine/csrc/elementwise.cpp) against model.py's torch versions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafleet.engine import native
from lorafleet.engine.attention import write_kv
from lorafleet.engine.model import RMSNorm, rotate_half

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not native.fused_ops(torch.float32, CPU), reason="needs g++ and AVX-512")
ops = torch.ops.lorafleet


@pytest.mark.parametrize("tokens,hidden", [(1, 576), (37, 64), (5, 100), (300, 24)])  # tails of 16 too
def test_rms_norm_and_add_rms_norm(tokens, hidden):
    x, delta = torch.randn(tokens, hidden) * 3, torch.randn(tokens, hidden)
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = torch.randn(hidden)
    with torch.inference_mode():
        expected = norm(x)
        out = torch.empty_like(x)
        ops.rms_norm(x, norm.weight, 1e-5, out)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        residual, out = x.clone(), torch.empty_like(x)
        ops.add_rms_norm(residual, delta, norm.weight, 1e-5, out)
        torch.testing.assert_close(residual, x + delta, rtol=0, atol=0)  # the residual stream, exactly
        torch.testing.assert_close(out, norm(x + delta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [1536, 40, 7])
def test_silu_and_mul_even_where_exp_overflows(width):
    gate, up = torch.randn(9, width) * 4, torch.randn(9, width)
    gate[0, :4] = torch.tensor([-100.0, 100.0, -88.5, 0.0])[: min(4, width)]
    out = torch.empty_like(gate)
    ops.silu_and_mul(gate, up, out)
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=1e-5, atol=1e-6)
    ops.silu_and_mul(gate, up, gate)  # in place, as the MLP calls it
    torch.testing.assert_close(gate, out, rtol=0, atol=0)


@pytest.mark.parametrize("q_heads,kv_heads,dim", [(9, 3, 64), (4, 2, 16), (2, 1, 40)])
def test_rope_write_kv(q_heads, kv_heads, dim):
    tokens, blocks, block_size = 11, 6, 4
    q, k, v = (
        torch.randn(tokens, q_heads, dim),
        torch.randn(tokens, kv_heads, dim),
        torch.randn(tokens, kv_heads, dim),
    )
    angles = torch.rand(tokens, dim // 2) * 50
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    slots = torch.randperm(blocks * block_size)[:tokens]
    k_cache, v_cache = (
        torch.zeros(blocks, block_size, kv_heads, dim),
        torch.zeros(blocks, block_size, kv_heads, dim),
    )
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = q * cos + rotate_half(q) * sin
    write_kv(k_ref, v_ref, k * cos + rotate_half(k) * sin, v, slots)
    k_before = k.clone()
    ops.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, k_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(v_cache, v_ref) and torch.equal(k, k_before)  # k itself is left as it was
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots + blocks * block_size)


def test_the_ops_refuse_what_they_cannot_read():
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.rms_norm(x.double(), torch.ones(16), 1e-5, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.silu_and_mul(x.t(), x.t(), torch.empty(16, 4))
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(x, torch.ones(8), 1e-5, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="rope_write_kv"):
        k = torch.randn(3, 1, 16)  # a token count that differs from q's
        cache = torch.zeros(2, 4, 1, 16)
        ops.rope_write_kv(torch.randn(2, 2, 16), k, k, torch.randn(2, 16), torch.randn(2, 16), cache, cache,
                          torch.zeros(2, dtype=torch.long))  # fmt: skip


def test_a_fused_model_matches_the_torch_one(tiny_llama_dir):
    from lorafleet.engine.model_runner import load_model

    fused, _ = load_model(tiny_llama_dir, torch.float32, CPU)
    assert fused.model.norm.fused and fused.model.layers[0].mlp.fused
    # The same weights with the fused flags off: torch's ops.
    plain, _ = load_model(tiny_llama_dir, torch.float32, CPU)
    for m in plain.modules():
        if hasattr(m, "fused"):
            m.fused = False
    x = torch.randn(6, fused.shape.hidden_size)
    with torch.inference_mode():
        for a, b in zip(fused.model.layers, plain.model.layers):
            torch.testing.assert_close(a.mlp(x), b.mlp(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.input_layernorm(x), b.input_layernorm(x), rtol=1e-5, atol=1e-5)
