"""nn.Linear on CPU through oneDNN, with the weight reordered once into oneDNN's blocked layout.

`F.linear` on CPU calls MKL's sgemm for float32, and MKL picks its AVX2 code path on AMD CPUs:
on a 2-core AMD EPYC (Zen 5, AVX-512) we benchmarked on, a 128x576x1536 float32 matmul runs at
~200 GFLOP/s through MKL and ~470 through oneDNN with a prepacked weight (on a Zen 4 one, ~150-175
and ~215), and a batch-1 pass over SmolLM2's weights reads them at ~17 GB/s through MKL's gemv
against ~35 GB/s. This is the kernel
torch's own compiler (inductor's mkldnn fusion) and vLLM's CPU backend use for linear layers.

Steps of fewer than MIN_ROWS tokens are padded with zero rows up to it: oneDNN's kernels for one
or two rows read the weights ~15-20% slower than its kernel for four, on that CPU (a SmolLM2
pass in float32: 26.4 ms at one row, 21.7 at four; bfloat16 17.4 vs 14.8), and at that size the
extra rows cost no memory traffic. This is what sets single-request decoding speed.

Steps of at most GEMV_ROWS tokens in float32 run csrc/gemv.cpp instead where it runs (AVX-512, the
C++ ops loaded: native.small_step_kernel) and the engine asks for it. It reads a second copy of
each weight, laid out in panels of 16 output features, at ~26-34 GB/s where oneDNN's few-row
kernels manage ~15-22 on the Zen 4 machine, so a batch-1 SmolLM2 step runs ~1.5x faster there,
for the linear weights' size again in memory.

Only float32 and bfloat16 are packed; float16 needs AVX512-FP16, and other devices keep nn.Linear.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

# oneDNN keeps one compiled primitive per input shape, 1,024 by default, least recently used
# first out. A serving engine feeds every token count from 1 to the step budget through each of
# its few weight shapes (SmolLM2: 5 shapes x up to 512 rows), so the default cache thrashes and
# steps pay for recompiling primitives; 4,096 holds them all. Read when oneDNN creates its first
# primitive, so set before any (an explicit setting in the environment wins).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")

PACKED_DTYPES = (torch.float32, torch.bfloat16)
PACK_BATCH_HINT = 128  # rows oneDNN tunes the layout for; any row count is correct
MIN_ROWS = 4  # fewer rows are padded up to this (see above)
# Steps of at most this many rows run a layer's independent projections side by side, one per
# thread (csrc/linears.cpp): q, k and v read ~30% faster so, gate and up a few percent. Wider
# steps are bound by compute, where oneDNN's own threading is the better split.
CONCURRENT_ROWS = 8
GEMV_ROWS = 8  # csrc/gemv.cpp's limit; at 12-16 rows oneDNN reads as fast


class PackedLinear(nn.Module):
    """y = x @ W.T + bias for 2-D x, with W held only in oneDNN's opaque layout."""

    weight: torch.Tensor

    panels: torch.Tensor | None

    def __init__(self, linear: nn.Linear, panels: bool = False, arena: torch.Tensor | None = None) -> None:
        """With `panels`, also csrc/gemv.cpp's copy of the weight, written into `arena` (a flat
        float32 slice of panels_numel elements) if given."""
        super().__init__()
        self.out_features, self.in_features = linear.out_features, linear.in_features
        w = linear.weight.detach()
        if panels and w.dtype != torch.float32:
            raise ValueError(f"csrc/gemv.cpp's panels are float32 only, not {w.dtype}")
        self.register_buffer(
            "weight", torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT), persistent=False
        )
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
        self.register_buffer("panels", gemv_panels(w, arena) if panels else None, persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN packed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.panels is not None and 0 < x.shape[0] <= GEMV_ROWS:
            (y,) = torch.ops.lorafleet.gemv(x.contiguous(), [self.panels], [self.bias], [self.out_features])
            return y
        y = torch.ops.mkldnn._linear_pointwise(pad_rows(x), self.weight, self.bias, "none", [], "")
        return y if x.shape[0] >= MIN_ROWS else y[: x.shape[0]]


def gemv_panels(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A weight [N, K] as csrc/gemv.cpp reads it: float32 [ceil(N / 16), K, 16], panel p holding
    outputs 16p to 16p + 15 (zero rows pad the last one); written into `out` (flat) if given."""
    n, k = w.shape
    if out is None:
        out = torch.empty(panels_numel(w), dtype=torch.float32)
    panels = out.view(-1, k, 16)
    panels.copy_(F.pad(w.float(), (0, 0, 0, -n % 16)).view(-1, 16, k).transpose(1, 2))
    return panels


def panels_numel(w: torch.Tensor) -> int:
    n, k = w.shape
    return -(-n // 16) * 16 * k


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """x with zero rows appended up to MIN_ROWS (see above); the caller keeps the first rows."""
    rows = x.shape[0]
    return F.pad(x, (0, 0, 0, MIN_ROWS - rows)) if rows < MIN_ROWS else x


def project(x: torch.Tensor, layers: tuple[nn.Module, ...], concurrent: bool) -> list[torch.Tensor]:
    """[layer(x) for layer in layers], PackedLinear layers (bare or under LoRA: a `base` and
    `add_delta(x, y)`) of a small step in one C++ call: csrc/gemv.cpp where they have panels, else,
    with `concurrent` (the C++ ops are loaded), oneDNN's linears side by side."""
    bases = [getattr(layer, "base", layer) for layer in layers]
    rows = x.shape[0]
    if any(type(b) is not PackedLinear for b in bases):
        return [layer(x) for layer in layers]
    if 0 < rows <= GEMV_ROWS and all(b.panels is not None for b in bases):
        ys = torch.ops.lorafleet.gemv(
            x.contiguous(),
            [b.panels for b in bases],
            [b.bias for b in bases],
            [b.out_features for b in bases],
        )
    elif concurrent and rows <= CONCURRENT_ROWS:
        ys = [
            y[:rows]
            for y in torch.ops.lorafleet.linears(
                pad_rows(x), [b.weight for b in bases], [b.bias for b in bases]
            )
        ]
    else:
        return [layer(x) for layer in layers]
    return [y if layer is base else layer.add_delta(x, y) for layer, base, y in zip(layers, bases, ys)]  # type: ignore[operator]


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available()


def pack_linears(model: nn.Module, panels: bool = False) -> int:
    """Swap every nn.Linear of `model` (on CPU, float32 or bfloat16) for a PackedLinear whose
    output matches it to float rounding; return how many were swapped. With `panels`, float32
    layers also keep csrc/gemv.cpp's copy (the caller checks that the op runs). A tied LM head
    gets its own packed copy, as the embedding lookup still reads the dense table."""
    # In module order, which is the order a step reads them in. A root that is itself a Linear
    # cannot be swapped in place; a Linear shared by two parents is swapped under both.
    targets = [
        (model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], child)
        for name, child in model.named_modules(remove_duplicate=False)
        if name and type(child) is nn.Linear and can_pack(child.weight.device, child.weight.dtype)
    ]
    # The panels of every layer lie back to back in one buffer, so that a step streams through one
    # region: ~7% faster steps than with a separate allocation per layer.
    sizes = [
        panels_numel(c.weight) if panels and c.weight.dtype == torch.float32 else 0 for _, _, c in targets
    ]
    arena, offset = torch.empty(sum(sizes), dtype=torch.float32), 0
    for size in sizes:
        module, name, child = targets.pop(0)  # held nowhere else: freed once swapped
        setattr(module, name, PackedLinear(child, size > 0, arena[offset : offset + size]))
        offset += size
    return len(sizes)
