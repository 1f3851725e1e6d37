"""Batched multi-LoRA over stacked slot tensors: many adapters in one forward pass.

Each `LoRALinear` wraps a base `nn.Linear` (never merged, never copied) and holds every slot's
A and B for that projection. The runner groups the packed batch by slot, so each adapter's
tokens are one contiguous segment, and writes the segments into the shared `LoRABatch` before
the forward pass. The delta costs each token only its own adapter's rank (SGMV semantics);
tokens without an adapter skip it. In float32 on CPU the delta of a projection is one compiled
kernel call for the whole batch (`sgmv`); otherwise it is two matmuls per adapter segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from . import sgmv
from .model import PROJECTIONS, CausalLM


class LoRAWeights(Protocol):
    """An adapter's weights in memory, as the adapter store hands them over (read only)."""

    @property
    def scale(self) -> float: ...  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA

    @property
    def weights(
        self,
    ) -> dict[
        tuple[int, str], tuple[torch.Tensor, torch.Tensor]
    ]: ...  # (layer, proj) -> (A [r, in], B [out, r])


@dataclass
class LoRABatch:
    """This step's token segments, shared by every LoRALinear: the packed rows split into
    consecutive pieces of `sizes`, and (piece index, slot) for the pieces an adapter owns."""

    sizes: list[int] = field(default_factory=list)
    parts: list[tuple[int, int]] = field(default_factory=list)
    items: np.ndarray = field(default_factory=lambda: sgmv.work_items([]))  # the kernel's work items

    def set(self, segments: list[tuple[int, int, int]], num_rows: int) -> None:
        """From (slot, start row, end row) segments, sorted and disjoint, over `num_rows` rows."""
        self.sizes, self.parts = [], []
        self.items = sgmv.work_items(segments)
        row = 0
        for slot, start, end in segments:
            if start > row:
                self.sizes.append(start - row)
            self.parts.append((len(self.sizes), slot))
            self.sizes.append(end - start)
            row = end
        if row < num_rows:
            self.sizes.append(num_rows - row)


class BaseProjection(Protocol):
    """nn.Linear or a quantized stand-in from `quant` (whose weight dtype is not the activations')."""

    in_features: int
    out_features: int
    weight: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class LoRALinear(nn.Module):
    def __init__(
        self, base: BaseProjection, batch: LoRABatch, num_slots: int, max_rank: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        device = base.weight.device  # dtype: the activations', so deltas stay in that precision
        # A is stored [slot, rank, in] and B [slot, rank, out] so that a rank-r prefix is contiguous;
        # the rows past a slot's rank stay zero (the kernel rounds the rank up over them).
        rows = -(-max_rank // sgmv.RANK_MULTIPLE) * sgmv.RANK_MULTIPLE
        self.lora_a = torch.zeros(num_slots, rows, base.in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(num_slots, rows, base.out_features, dtype=dtype, device=device)
        self.ranks = np.zeros(num_slots, np.int64)  # 0: the slot's adapter does not target this projection
        self.scales = np.zeros(num_slots, np.float32)
        # Per slot, views of A.T [in, r] and B [r, out] (None: no adapter), built once per load so
        # that the forward pass issues only two matmuls per adapter segment.
        self._a: list[torch.Tensor | None] = [None] * num_slots
        self._b: list[torch.Tensor | None] = [None] * num_slots

    def set_lora(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Load A [r, in] and B [out, r] into `slot`."""
        r = a.shape[0]
        if a.shape != (r, self.base.in_features) or b.shape != (self.base.out_features, r):
            raise ValueError(f"LoRA shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit {self.base}")
        self.reset_lora(slot)
        self.lora_a[slot, :r] = a
        self.lora_b[slot, :r] = b.T
        self.ranks[slot], self.scales[slot] = r, scale
        self._a[slot], self._b[slot] = self.lora_a[slot, :r].T, self.lora_b[slot, :r]

    def reset_lora(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.ranks[slot], self.scales[slot] = 0, 0.0
        self._a[slot] = self._b[slot] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Semantics: y[i] = base(x[i]) + scale[s] * (x[i] @ A[s].T) @ B[s].T, s = slot of token i."""
        return self.add_delta(x, self.base(x))

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (this projection's base output for x, [tokens, out], contiguous) plus the LoRA
        deltas, added in place."""
        if not self.batch.parts:
            return y
        if sgmv.supported(x, self.lora_a):  # one kernel call for every segment
            sgmv.add_lora(x, self.lora_a, self.lora_b, self.batch.items, self.ranks, self.scales, y)
            return y
        xs, ys = x.split(self.batch.sizes), y.split(self.batch.sizes)
        for i, slot in self.batch.parts:
            a, b = self._a[slot], self._b[slot]
            if a is not None and b is not None:
                ys[i].addmm_(xs[i] @ a, b, alpha=float(self.scales[slot]))  # in place: ys[i] is a view of y
        return y


def add_lora_slots(
    model: CausalLM, num_slots: int, max_rank: int, dtype: torch.dtype
) -> tuple[LoRABatch, dict[tuple[int, str], LoRALinear]]:
    """Swap every projection of every decoder layer for a LoRALinear; return the shared batch
    state and the layers by (layer index, projection name)."""
    batch = LoRABatch()
    layers: dict[tuple[int, str], LoRALinear] = {}
    for i, layer in enumerate(model.model.decoder_layers()):
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                base = getattr(parent, name, None)
                if base is not None:  # nn.Linear, or its quantized stand-in
                    wrapped = LoRALinear(base, batch, num_slots, max_rank, dtype)
                    setattr(parent, name, wrapped)
                    layers[(i, name)] = wrapped
    return batch, layers
