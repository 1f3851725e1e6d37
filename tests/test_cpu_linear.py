"""oneDNN-packed linear layers: the same outputs as nn.Linear, and the engine's model uses them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from lorafleet.engine import native
from lorafleet.engine.cli import build_parser, engine_config
from lorafleet.engine.config import EngineConfig, LoRAConfig
from lorafleet.engine.cpu_linear import GEMV_ROWS, PackedLinear, can_pack, gemv_panels, pack_linears, project
from lorafleet.engine.llm_engine import LLMEngine
from lorafleet.engine.lora import LoRABatch, LoRALinear
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
    # Small steps run q, k, v (and gate, up) side by side wherever the C++ ops load.
    assert layer.self_attn.concurrent is layer.mlp.concurrent is native.available()
    # A tied LM head is packed as a copy; the embedding keeps the dense table it looks rows up in.
    assert not model.model.embed_tokens.weight.is_mkldnn
    assert weight_bytes(model) > 0
    # float32 steps of a few tokens read csrc/gemv.cpp's panels, where that op runs.
    panels = dtype == "float32" and gemv_runs()
    assert (getattr(layer.self_attn.q_proj, "panels", None) is not None) is panels
    assert (getattr(model.lm_head, "panels", None) is not None) is panels
    if panels:  # back to back in one buffer, in the order a step reads them
        starts = [m.panels.data_ptr() for m in model.modules() if isinstance(m, PackedLinear)]
        ends = [m.panels.data_ptr() + m.panels.nbytes for m in model.modules() if isinstance(m, PackedLinear)]
        assert starts[1:] == ends[:-1]
        assert (
            len(
                {
                    m.panels.untyped_storage().data_ptr()
                    for m in model.modules()
                    if isinstance(m, PackedLinear)
                }
            )
            == 1
        )

    lora_model = model_of(LoRAConfig(max_loras=2, max_rank=4))
    wrapped = lora_model.model.decoder_layers()[0].mlp.down_proj
    assert isinstance(wrapped, LoRALinear) and isinstance(wrapped.base, PackedLinear) is packed


@pytest.mark.skipif(not native.available(), reason="the C++ ops are not built (no compiler)")
@pytest.mark.parametrize("panels", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 9])
def test_project_runs_projections_side_by_side_with_their_lora_deltas(rows, panels):
    if panels and not gemv_runs():
        pytest.skip("csrc/gemv.cpp needs AVX-512")
    torch.manual_seed(0)
    q, k = nn.Linear(64, 96, bias=True), nn.Linear(64, 32, bias=False)
    batch = LoRABatch()
    lora = LoRALinear(PackedLinear(k, panels), batch, num_slots=2, max_rank=4, dtype=torch.float32)
    lora.set_lora(1, torch.randn(4, 64), torch.randn(32, 4), scale=0.5)
    batch.set([(1, 0, (rows + 1) // 2)], rows)  # the first rows use the adapter in slot 1
    layers = (PackedLinear(q, panels), lora)
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        want = [layer(x) for layer in layers]
        got, calls = gemv_calls(lambda: project(x, layers, concurrent=True))
    assert calls == (1 if panels and rows <= GEMV_ROWS else 0)  # both layers in one call
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.is_contiguous()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    delta = (x[: (rows + 1) // 2] @ lora.lora_a[1, :4].T) @ lora.lora_b[1, :4] * 0.5
    torch.testing.assert_close(
        got[1][: (rows + 1) // 2], k(x[: (rows + 1) // 2]) + delta, rtol=1e-4, atol=1e-4
    )


@pytest.mark.skipif(not native.available(), reason="the C++ ops are not built (no compiler)")
def test_concurrent_linears_report_a_bad_layer_instead_of_crashing():
    x = torch.randn(4, 64)
    good, bad = PackedLinear(nn.Linear(64, 8)), PackedLinear(nn.Linear(32, 8))  # bad: wrong width
    with pytest.raises(RuntimeError):
        torch.ops.lorafleet.linears(x, [good.weight, bad.weight], [good.bias, bad.bias])
    (y,) = torch.ops.lorafleet.linears(x, [good.weight], [good.bias])  # the op still works
    torch.testing.assert_close(y, good(x))


def gemv_runs() -> bool:
    return native.small_step_kernel(torch.float32, torch.device("cpu"))


def gemv_calls(f) -> tuple[object, int]:
    """f() and how many times it called csrc/gemv.cpp."""
    with torch.profiler.profile() as prof:
        result = f()
    return result, sum(e.name == "lorafleet::gemv" for e in prof.events())


needs_gemv = pytest.mark.skipif(not gemv_runs(), reason="csrc/gemv.cpp needs the C++ ops and AVX-512")


@needs_gemv
@pytest.mark.parametrize("in_features", [1, 37, 64])
def test_gemv_matches_linear_for_every_small_row_count_and_ragged_widths(in_features):
    torch.manual_seed(0)
    # Widths that fill no panel, part of one, and several with a ragged last one; one call for all.
    layers = [nn.Linear(in_features, n, bias=n != 200) for n in (5, 16, 200)]
    panels = [gemv_panels(layer.weight.detach()) for layer in layers]
    assert [p.shape[0] for p in panels] == [1, 1, 13] and all(
        p.shape[1:] == (in_features, 16) for p in panels
    )
    with torch.inference_mode():
        for rows in range(1, GEMV_ROWS + 1):
            x = torch.randn(rows, in_features)
            ys = torch.ops.lorafleet.gemv(
                x, panels, [layer.bias for layer in layers], [layer.out_features for layer in layers]
            )
            for y, layer in zip(ys, layers):
                assert y.shape == (rows, layer.out_features) and y.is_contiguous()
                torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)


@needs_gemv
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_with_panels_switches_kernels_at_gemv_rows(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(linear, panels=True)
    calls = []
    with torch.inference_mode():
        for rows in (1, 2, 5, GEMV_ROWS, GEMV_ROWS + 1, 128):
            x = torch.randn(rows, 96)
            got, n = gemv_calls(lambda: packed(x))  # noqa: B023 - called at once
            calls.append(n == 1)
            torch.testing.assert_close(got, linear(x), rtol=1e-5, atol=1e-5)
    assert calls == [True, True, True, True, False, False]


@needs_gemv
def test_gemv_refuses_bad_shapes_and_keeps_working():
    x, w = torch.randn(2, 64), torch.randn(40, 64)
    p = gemv_panels(w)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        torch.ops.lorafleet.gemv(torch.randn(GEMV_ROWS + 1, 64), [p], [None], [40])
    with pytest.raises(RuntimeError, match="must be"):
        torch.ops.lorafleet.gemv(torch.randn(2, 32), [p], [None], [40])  # inputs of the wrong width
    with pytest.raises(RuntimeError, match="must be"):
        torch.ops.lorafleet.gemv(x, [p], [None], [60])  # more outputs than the panels hold
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.lorafleet.gemv(x, [p], [torch.zeros(8)], [40])
    with pytest.raises(RuntimeError, match="one bias"):
        torch.ops.lorafleet.gemv(x, [p], [], [40])
    (y,) = torch.ops.lorafleet.gemv(x, [p], [None], [40])  # the op still works
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)


def test_small_step_weights_can_be_turned_off(tiny_llama_dir):
    args = build_parser().parse_args(["engine", "--model", str(tiny_llama_dir), "--no-small-step-weights"])
    config = engine_config(args)
    assert config.small_step_weights is False
    assert engine_config(build_parser().parse_args(["engine"])).small_step_weights is True
    model = LLMEngine(config, model_dir=tiny_llama_dir).runner.model
    assert all(m.panels is None for m in model.modules() if isinstance(m, PackedLinear))
    default = LLMEngine(replace(config, small_step_weights=True), model_dir=tiny_llama_dir).runner.model
    assert all(
        (m.panels is not None) is gemv_runs() for m in default.modules() if isinstance(m, PackedLinear)
    )


def test_panels_are_float32_only():
    with pytest.raises(ValueError, match="float32"):
        PackedLinear(nn.Linear(16, 16).bfloat16(), panels=True)
