"""What the machine can do: matmul FLOP/s for a dtype, plus the facts that explain a run.

A decode step of a small model is a handful of (tokens x hidden) @ (hidden x ffn) matmuls, so the
roofline uses a matmul of that shape; a large square matmul is reported next to it as the
machine's best case. CPUs without native bfloat16/float16 kernels run those dtypes up to ~100x
slower than float32, so the square matmul shrinks until one call fits the time budget.

Each shape is timed with every kernel the engine could use, torch.matmul (MKL for float32 on CPU)
and oneDNN with a prepacked weight (the engine's CPU linear layers, see engine/cpu_linear.py),
and the machine's rate is the faster one: on AMD CPUs MKL takes its AVX2 path and reaches less
than half of what oneDNN does, and a roofline drawn from the slower kernel would flatter the engine.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafleet.engine.cpu_linear import PackedLinear, can_pack

SQUARE_SIZES = (2048, 1024, 512)  # the first whose single call fits the time budget is measured
WINDOWS = 5  # matmul timing windows; the fastest counts (see matmul_flops)


def matmul_flops(
    m: int,
    k: int,
    n: int,
    dtype: torch.dtype,
    min_seconds: float = 0.5,
    kernel: str = "matmul",
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """FLOP/s of (m x k) @ (k x n) in `dtype` through `kernel`: "matmul" (torch.matmul) or "onednn"
    (a PackedLinear, as the engine runs). The best of WINDOWS windows of min_seconds / WINDOWS (and
    3 calls) each: other tenants of a VM slow some windows down, and the roofline is what the
    machine can do, so a slow minute must not lower it (that would flatter the engine)."""
    a = torch.randn(m, k).to(dtype)
    if kernel == "onednn":
        linear = PackedLinear(nn.Linear(k, n, bias=False, dtype=dtype))
        call = partial(linear, a)
    else:
        b = torch.randn(k, n).to(dtype)
        call = partial(torch.matmul, a, b, out=torch.matmul(a, b))
    call()  # warm-up: first-call allocation and kernel selection
    windows = []
    for _ in range(WINDOWS):
        calls, start = 0, clock()
        while True:
            call()
            calls += 1
            elapsed = clock() - start
            if elapsed >= min_seconds / WINDOWS and calls >= 3:
                windows.append(2.0 * m * k * n * calls / elapsed)
                break
    return max(windows)


def square_size(flops: float, budget_s: float) -> int:
    """The largest of SQUARE_SIZES whose single matmul, at `flops` FLOP/s, takes at most twice `budget_s`.

    Pass the model-shaped rate: big square matmuls run faster, so the prediction errs on the slow side.
    """
    for size in SQUARE_SIZES:
        if 2.0 * size**3 / flops <= 2 * budget_s:
            return size
    return SQUARE_SIZES[-1]


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(
    dtype: torch.dtype, model_shape: tuple[int, int, int], min_seconds: float = 0.5
) -> dict[str, Any]:
    """Machine facts for a benchmark's JSON, with both matmul measurements.

    `model_shape` is (m, k, n) of the model's typical matmul; its FLOP/s is the one the roofline uses.
    """
    kernels = ["matmul", "onednn"] if can_pack(torch.device("cpu"), dtype) else ["matmul"]
    by_kernel = {kern: matmul_flops(*model_shape, dtype, min_seconds, kern) for kern in kernels}
    best = max(by_kernel, key=by_kernel.__getitem__)
    square = square_size(by_kernel[best], budget_s=min_seconds)
    return {
        # Other processes share the CPU on dev machines; a load near cpu_count makes every figure suspect.
        "load_avg_1m_before": os.getloadavg()[0],
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "matmul_flops_model_shaped": by_kernel[best],
        "matmul_shape_model_shaped": "x".join(map(str, model_shape)),
        "matmul_flops_model_shaped_by_kernel": by_kernel,
        "matmul_kernel": best,
        "matmul_flops_square": matmul_flops(square, square, square, dtype, min_seconds, best),
        "matmul_shape_square": f"{square}x{square}x{square}",
        "roofline_matmul": "model_shaped",
    }
