"""The batched LoRA delta of one projection as one compiled CPU kernel (SGMV semantics).

For every token t with adapter slot s and rank r = ranks[s] > 0:
    y[t] += scales[s] * (x[t] @ A[s, :r].T) @ B[s, :r]
with A stored [slots, rank_capacity, in] and B [slots, rank_capacity, out], as LoRALinear holds
them: rows r and beyond of a slot are zero, and the capacity is a multiple of 4.

Why a kernel: with 32 adapters in a step, doing this with torch ops costs 2 small matmuls per
adapter segment and projection, ~13,000 calls a step for SmolLM2, each paying 5-7 us of dispatch
and BLAS setup for a few hundred FLOPs (87 ms of a 120 ms step). Batched matmuls over padded
segments (bmm) or torch._grouped_mm still loop per segment inside. This kernel is the CPU
counterpart of Punica's SGMV / S-LoRA's kernels: one call per projection for the whole batch,
parallel over work items of up to 4 tokens of one adapter. Each item is a register-blocked
4 tokens x 4 ranks micro-kernel, so one load of A or B feeds four tokens' FMAs (a token at a
time, every FMA needed its own load: 18.8 ms of LoRA per 128-token step with one adapter, now
10.2 ms). Rank is rounded up to 4 over the zero rows. With 32 rank-16 adapters in a 128-token
step it is then bound by reading the adapters' weights (625 MB a step for SmolLM2's 210
projections).

float32 on CPU only (numpy has no bfloat16); LoRALinear falls back to its torch loop otherwise.
Calls are serialized by a lock (numba's fallback threading layer aborts on concurrent launches)
and run on as many threads as torch uses, in numba's own OpenMP pool.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from numba import njit, prange

ITEM_TOKENS = 4  # tokens of one adapter per work item: the micro-kernel's width
RANK_MULTIPLE = 4  # the micro-kernel's rank step: slot tensors hold a multiple of this many rows
_lock = threading.Lock()
_MAX_THREADS = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # from the environment


@njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True)
def _add_lora(x, a, b, items, ranks, scales, y):  # pragma: no cover - compiled
    d_in = x.shape[1]
    d_out = y.shape[1]
    xa = np.empty((x.shape[0], a.shape[1]), np.float32)  # scale * x @ A.T, per token
    for it in prange(items.shape[0]):
        t0, n, s = items[it, 0], items[it, 1], items[it, 2]
        r = (ranks[s] + 3) // 4 * 4  # the zero rows past the rank add nothing
        sc = scales[s]
        # A short item repeats its last token in the unused lanes (computed, stored twice, harmless).
        t1, t2, t3 = t0 + min(1, n - 1), t0 + min(2, n - 1), t0 + min(3, n - 1)
        for k in range(0, r, 4):
            p0 = p1 = p2 = p3 = q0 = q1 = q2 = q3 = np.float32(0.0)
            u0 = u1 = u2 = u3 = v0 = v1 = v2 = v3 = np.float32(0.0)
            for i in range(d_in):
                w0, w1, w2, w3 = a[s, k, i], a[s, k + 1, i], a[s, k + 2, i], a[s, k + 3, i]
                e = x[t0, i]
                p0, p1, p2, p3 = p0 + e * w0, p1 + e * w1, p2 + e * w2, p3 + e * w3
                e = x[t1, i]
                q0, q1, q2, q3 = q0 + e * w0, q1 + e * w1, q2 + e * w2, q3 + e * w3
                e = x[t2, i]
                u0, u1, u2, u3 = u0 + e * w0, u1 + e * w1, u2 + e * w2, u3 + e * w3
                e = x[t3, i]
                v0, v1, v2, v3 = v0 + e * w0, v1 + e * w1, v2 + e * w2, v3 + e * w3
            xa[t0, k], xa[t0, k + 1], xa[t0, k + 2], xa[t0, k + 3] = p0 * sc, p1 * sc, p2 * sc, p3 * sc
            xa[t1, k], xa[t1, k + 1], xa[t1, k + 2], xa[t1, k + 3] = q0 * sc, q1 * sc, q2 * sc, q3 * sc
            xa[t2, k], xa[t2, k + 1], xa[t2, k + 2], xa[t2, k + 3] = u0 * sc, u1 * sc, u2 * sc, u3 * sc
            xa[t3, k], xa[t3, k + 1], xa[t3, k + 2], xa[t3, k + 3] = v0 * sc, v1 * sc, v2 * sc, v3 * sc
        if n == 4:
            for k in range(0, r, 4):
                p0, p1, p2, p3 = xa[t0, k], xa[t0, k + 1], xa[t0, k + 2], xa[t0, k + 3]
                q0, q1, q2, q3 = xa[t1, k], xa[t1, k + 1], xa[t1, k + 2], xa[t1, k + 3]
                u0, u1, u2, u3 = xa[t2, k], xa[t2, k + 1], xa[t2, k + 2], xa[t2, k + 3]
                v0, v1, v2, v3 = xa[t3, k], xa[t3, k + 1], xa[t3, k + 2], xa[t3, k + 3]
                for o in range(d_out):
                    w0, w1, w2, w3 = b[s, k, o], b[s, k + 1, o], b[s, k + 2, o], b[s, k + 3, o]
                    y[t0, o] += p0 * w0 + p1 * w1 + p2 * w2 + p3 * w3
                    y[t1, o] += q0 * w0 + q1 * w1 + q2 * w2 + q3 * w3
                    y[t2, o] += u0 * w0 + u1 * w1 + u2 * w2 + u3 * w3
                    y[t3, o] += v0 * w0 + v1 * w1 + v2 * w2 + v3 * w3
        else:  # a token at a time: the repeated lanes must not add twice
            for t in range(t0, t0 + n):
                for k in range(0, r, 4):
                    p0, p1, p2, p3 = xa[t, k], xa[t, k + 1], xa[t, k + 2], xa[t, k + 3]
                    for o in range(d_out):
                        y[t, o] += (
                            p0 * b[s, k, o] + p1 * b[s, k + 1, o] + p2 * b[s, k + 2, o] + p3 * b[s, k + 3, o]
                        )


def work_items(segments: list[tuple[int, int, int]]) -> np.ndarray:
    """(start row, tokens, slot) rows of up to ITEM_TOKENS tokens, from (slot, start, end) segments."""
    items = [
        (t, min(ITEM_TOKENS, end - t), slot)
        for slot, start, end in segments
        for t in range(start, end, ITEM_TOKENS)
    ]
    return np.array(items, np.int64).reshape(-1, 3)


def supported(x: torch.Tensor, a: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == a.dtype == torch.float32


def add_lora(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    items: np.ndarray,
    ranks: np.ndarray,
    scales: np.ndarray,
    y: torch.Tensor,
) -> None:
    """y += the LoRA delta of every token in `items` (see the module docstring), in place. x [T, in]
    and y [T, out] float32 on CPU; items from `work_items`; ranks int64 and scales float32 per slot."""
    if a.shape[1] % RANK_MULTIPLE:
        raise ValueError(f"slot tensors need a multiple of {RANK_MULTIPLE} rank rows, got {a.shape[1]}")
    with _lock:
        # As many threads as torch uses (numba's default is every CPU of the host). numba's
        # OpenMP layer loads the system libgomp beside torch's bundled one, so it is a second
        # thread pool of that size. Its first launch sets OpenMP's thread count to numba's:
        # put torch's back then (and only then: the hot path leaves OpenMP's settings alone).
        threads = torch.get_num_threads()
        numba.set_num_threads(min(threads, _MAX_THREADS))
        _add_lora(x.contiguous().numpy(), a.numpy(), b.numpy(), items, ranks, scales, y.numpy())
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def warm_up() -> None:
    """Compile (or load from numba's cache) before the first step needs it."""
    x = torch.zeros(1, 2)
    add_lora(x, torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), work_items([(0, 0, 1)]),
             np.ones(1, np.int64), np.ones(1, np.float32), torch.zeros(1, 2))  # fmt: skip
