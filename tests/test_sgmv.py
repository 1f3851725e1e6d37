"""The compiled multi-LoRA kernel against the formula, and LoRALinear's two paths against each other."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from lorafleet.engine import sgmv
from lorafleet.engine.lora import LoRABatch, LoRALinear

SLOTS, MAX_RANK, D_IN, D_OUT = 4, 8, 48, 80
RANKS = [8, 3, 0, 1]  # slot 2 has no weights for this projection
SCALES = [2.0, 0.5, 0.0, 16.0]


def stacks(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(SLOTS, MAX_RANK, D_IN)
    b = torch.zeros(SLOTS, MAX_RANK, D_OUT)
    for s, r in enumerate(RANKS):
        a[s, :r] = torch.randn(r, D_IN, generator=g)
        b[s, :r] = torch.randn(r, D_OUT, generator=g)
    return a, b


def reference(x, a, b, token_slot, y0):
    """y0 + scale * (x @ A[:r].T) @ B[:r] per token, in float64."""
    y = y0.double().clone()
    for t, s in enumerate(token_slot):
        if s >= 0 and RANKS[s]:
            r = RANKS[s]
            y[t] += SCALES[s] * (x[t].double() @ a[s, :r].double().T) @ b[s, :r].double()
    return y


def items_of(token_slot: list[int]) -> np.ndarray:
    """The kernel's work items for rows whose slots are `token_slot` (-1: no adapter)."""
    segments: list[tuple[int, int, int]] = []
    for t, s in enumerate(token_slot):
        if segments and segments[-1][0] == s and segments[-1][2] == t:
            segments[-1] = (s, segments[-1][1], t + 1)
        elif s >= 0:
            segments.append((s, t, t + 1))
    return sgmv.work_items(segments)


# Runs of 1-9 tokens of one slot: full 4-token items, short ones, and both in one segment.
@pytest.mark.parametrize(
    "token_slot", [[-1, -1, 0, 0, 0, 1, 2, 3, 3], [3], [-1, -1], [1] * 40, [0] * 9 + [-1] + [3] * 6 + [1] * 4]
)
def test_kernel_adds_each_tokens_own_adapter_delta(token_slot):
    a, b = stacks()
    x = torch.randn(len(token_slot), D_IN)
    y0 = torch.randn(len(token_slot), D_OUT)
    y = y0.clone()
    sgmv.add_lora(x, a, b, items_of(token_slot), np.array(RANKS, np.int64), np.array(SCALES, np.float32), y)
    torch.testing.assert_close(y.double(), reference(x, a, b, token_slot, y0), rtol=1e-5, atol=1e-4)
    untouched = [t for t, s in enumerate(token_slot) if s < 0 or RANKS[s] == 0]
    assert torch.equal(y[untouched], y0[untouched])  # base-model tokens and rank-0 slots: bit for bit


def test_kernel_calls_from_several_threads_each_get_their_own_result():
    a, b = stacks()
    ranks, scales = np.array(RANKS, np.int64), np.array(SCALES, np.float32)
    slots = [0, 1, 3, 0]
    xs = [torch.randn(4, D_IN) for _ in range(4)]
    outs = [torch.zeros(4, D_OUT) for _ in range(4)]

    def run(i: int) -> None:
        for _ in range(20):
            outs[i].zero_()
            sgmv.add_lora(xs[i], a, b, items_of(slots), ranks, scales, outs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, out in zip(xs, outs):
        want = reference(x, a, b, slots, torch.zeros(4, D_OUT))
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)


def test_lora_linear_kernel_and_torch_loop_agree(monkeypatch):
    torch.manual_seed(0)
    batch = LoRABatch()
    layer = LoRALinear(nn.Linear(D_IN, D_OUT), batch, SLOTS, MAX_RANK, torch.float32)
    a, b = stacks(1)
    for s, r in enumerate(RANKS):
        if r:
            layer.set_lora(s, a[s, :r], b[s, :r].T, SCALES[s])
    batch.set([(0, 2, 5), (1, 5, 6), (2, 6, 7), (3, 7, 10)], num_rows=11)  # rows 0-1 and 10: no adapter
    assert batch.items.tolist() == [[2, 3, 0], [5, 1, 1], [6, 1, 2], [7, 3, 3]]  # (row, tokens, slot)
    x = torch.randn(11, D_IN)
    with torch.inference_mode():
        assert sgmv.supported(x, layer.lora_a)
        fast = layer(x)
        monkeypatch.setattr(sgmv, "supported", lambda *_: False)
        slow = layer(x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fast, layer.base(x))  # the delta is there at all


def test_kernel_is_only_used_for_float32_on_cpu():
    assert sgmv.supported(torch.zeros(1), torch.zeros(1))
    assert not sgmv.supported(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16))


def test_kernel_leaves_torch_thread_count_alone():
    """numba's first parallel launch sets OpenMP's thread count to its own; torch's must survive
    it, or a one-thread engine would spin a second core its adapter loaders need."""
    a, b = stacks()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sgmv.add_lora(torch.randn(2, D_IN), a, b, items_of([0, 1]), np.array(RANKS, np.int64),
                      np.array(SCALES, np.float32), torch.zeros(2, D_OUT))  # fmt: skip
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_work_items_split_segments_into_the_kernels_width():
    items = sgmv.work_items([(2, 0, 9), (0, 9, 10)])
    assert items.tolist() == [[0, 4, 2], [4, 4, 2], [8, 1, 2], [9, 1, 0]]


def test_kernel_refuses_slot_tensors_whose_rank_rows_it_would_overrun():
    with pytest.raises(ValueError, match="multiple of 4"):
        sgmv.add_lora(torch.zeros(1, 2), torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), items_of([0]),
                      np.ones(1, np.int64), np.ones(1, np.float32), torch.zeros(1, 2))  # fmt: skip


def test_lora_linear_rounds_its_rank_rows_up_for_the_kernel():
    layer = LoRALinear(nn.Linear(D_IN, D_OUT), LoRABatch(), SLOTS, 6, torch.float32)
    assert layer.lora_a.shape == (SLOTS, 8, D_IN) and layer.lora_b.shape == (SLOTS, 8, D_OUT)
