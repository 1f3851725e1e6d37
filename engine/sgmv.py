"""The batched LoRA delta of one projection as one compiled CPU kernel (SGMV semantics).

For every token t with adapter slot s = slot[t] >= 0 and rank r = ranks[s] > 0:
    y[t] += scales[s] * (x[t] @ A[s, :r].T) @ B[s, :r]
with A stored [slots, max_rank, in] and B [slots, max_rank, out], as LoRALinear holds them.

Why a kernel: with 32 adapters in a step, doing this with torch ops costs 2 small matmuls per
adapter segment and projection, ~13,000 calls a step for SmolLM2, each paying 5-7 us of dispatch
and BLAS setup for a few hundred FLOPs (87 ms of a 120 ms step). Batched matmuls over padded
segments (bmm) or torch._grouped_mm still loop per segment inside. This kernel runs each token's
own rank-r product, parallel over tokens, and is bound by reading the active adapters' weights
once (0.55 ms per layer with 32 rank-16 adapters, about the memory-bandwidth floor here). It is
the CPU counterpart of Punica's SGMV / S-LoRA's kernels.

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

_lock = threading.Lock()
_MAX_THREADS = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # from the environment


@njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True)
def _add_lora(x, a, b, token_slot, ranks, scales, y):  # pragma: no cover - compiled
    tokens, d_in = x.shape
    d_out = y.shape[1]
    for t in prange(tokens):
        s = token_slot[t]
        if s < 0:
            continue
        r = ranks[s]
        if r == 0:
            continue
        xa = np.empty(r, np.float32)
        for k in range(r):
            acc = np.float32(0.0)
            for i in range(d_in):
                acc += x[t, i] * a[s, k, i]
            xa[k] = acc * scales[s]
        for k in range(r):
            c = xa[k]
            for o in range(d_out):
                y[t, o] += c * b[s, k, o]


def supported(x: torch.Tensor, a: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == a.dtype == torch.float32


def add_lora(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    token_slot: np.ndarray,
    ranks: np.ndarray,
    scales: np.ndarray,
    y: torch.Tensor,
) -> None:
    """y += the LoRA delta of every token (see the module docstring), in place. x [T, in] and
    y [T, out] float32 on CPU; token_slot int64 [T] (-1: no adapter); ranks int64 and scales
    float32 per slot."""
    with _lock:
        # As many threads as torch uses (numba's default is every CPU of the host). numba's
        # OpenMP layer loads the system libgomp beside torch's bundled one, so it is a second
        # thread pool of that size. Its first launch sets OpenMP's thread count to numba's:
        # put torch's back then (and only then: the hot path leaves OpenMP's settings alone).
        threads = torch.get_num_threads()
        numba.set_num_threads(min(threads, _MAX_THREADS))
        _add_lora(x.contiguous().numpy(), a.numpy(), b.numpy(), token_slot, ranks, scales, y.numpy())
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def warm_up() -> None:
    """Compile (or load from numba's cache) before the first step needs it."""
    x = torch.zeros(1, 2)
    add_lora(x, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), np.zeros(1, np.int64),
             np.ones(1, np.int64), np.ones(1, np.float32), torch.zeros(1, 2))  # fmt: skip
