"""Weight-only quantization of the base model: a module swap of nn.Linear, as in gpt-fast.

- int8: every projection, the embedding and the LM head hold int8 weights with one float scale
  per output channel (symmetric).
- int4: the projections hold 4-bit weights in groups of `GROUP_SIZE` input columns, each group
  with a bfloat16 scale and zero point; the embedding and the LM head stay int8, because a tied
  table serves both the lookup and the output projection, and the LM head is the layer most
  sensitive to quantization.

Activations, norms, attention and the KV cache stay in the engine dtype, and LoRA wraps these
modules as it wraps nn.Linear, so adapter deltas are added in activation precision on top of the
quantized base (QLoRA-style serving). The quantized matmul itself runs on bfloat16 activations:
torch's CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) are vectorized for
bfloat16 only and fall back to scalar loops 30-70x slower for float32, and the CUDA int4 kernel
takes bfloat16 only.

A quantized checkpoint is a plain state dict (int8 / nibble-packed uint8 / float tensors) saved
as safetensors; the device-specific int4 packing is derived when the modules are built, so one
checkpoint serves CPU and CUDA. Knows nothing about LoRA, requests or the engine's config.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .model import PROJECTIONS, CausalLM

FORMATS = ("int8", "int4")
GROUP_SIZE = 32  # int4 input columns per scale/zero; 32 keeps agreement high for 0.125 B/weight of overhead
KERNEL_DTYPE = torch.bfloat16  # activation dtype of the quantized matmul kernels (see above)
CUDA_INNER_K_TILES = 8  # tiling of the CUDA int4 packed layout (as in gpt-fast and torchao)
CHECKPOINT_VERSION = "1"  # bump when the saved layout changes, so stale caches are not read
EMBED, LM_HEAD = "model.embed_tokens", "lm_head"


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied if its data is not 64-byte aligned: tensors read from a safetensors file sit at
    arbitrary offsets, and the vectorized CPU int8 kernel crashes on them."""
    return (
        t if t.is_contiguous() and t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)
    )


class Int8WeightOnlyLinear(nn.Module):
    """y = (x @ q.T) * scale + bias, q int8 [out, in], scale [out]."""

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Buffers are not persistent: the quantized checkpoint, not state_dict, is what gets saved.
        self.register_buffer("weight", aligned(weight), persistent=False)
        self.register_buffer("scales", aligned(scales.to(KERNEL_DTYPE)), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE), self.weight, self.scales).to(x.dtype)
        else:  # gpt-fast's form; torch.compile fuses the dequantization into the matmul
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4WeightOnlyLinear(nn.Module):
    """y = x @ W.T + bias, W[o, i] = (q[o, i] - 8) * scale[i // G, o] + zero[i // G, o]."""

    weight: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(
        self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size = group_size
        if packed.device.type == "cpu":
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed), 1)
        else:
            weight = torch.ops.aten._convert_weight_to_int4pack(aligned(packed), CUDA_INNER_K_TILES)
        self.register_buffer("weight", weight, persistent=False)  # opaque, device-specific layout
        self.register_buffer("scales_and_zeros", aligned(scales_and_zeros.to(KERNEL_DTYPE)), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xk = x.to(KERNEL_DTYPE)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                xk, self.weight, self.group_size, self.scales_and_zeros
            )
        else:
            y = torch.ops.aten._weight_int4pack_mm(xk, self.weight, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """Rows of an int8 table with one scale per row: the same tensors as a tied int8 LM head."""

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.register_buffer("weight", aligned(weight), persistent=False)  # shared with a tied LM head
        self.register_buffer("scales", scales, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[ids].float() * self.scales[ids, None].float()).to(self.dtype)


# -- quantizing a checkpoint (pure tensor functions) ---------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row: int8 [out, in] and float32 scales [out]."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per group of input columns: nibble-packed uint8 [out, in / 2] (the even column
    in the high nibble) and bfloat16 scales and zeros [in / group_size, out, 2]."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"int4 needs input widths divisible by {group_size}, got a {out_f}x{in_f} weight")
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scales = (hi - lo).clamp(min=1e-6) / 15
    zeros = lo + scales * 8
    q = torch.round((g - lo) / scales).clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
    packed = (q[:, ::2] << 4) | q[:, 1::2]
    sz = torch.stack([scales, zeros], -1).reshape(out_f, -1, 2).transpose(0, 1).contiguous()
    return packed, sz.to(KERNEL_DTYPE)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Nibble-packed uint8 [out, in / 2] -> int32 [out, in] in 0..15."""
    return torch.stack([packed >> 4, packed & 15], -1).reshape(packed.shape[0], -1).to(torch.int32)


def projection_names(num_layers: int) -> Iterable[str]:
    for i in range(num_layers):
        for name in PROJECTIONS:
            parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            yield f"model.layers.{i}.{parent}.{name}"


def quantize_checkpoint(
    state: dict[str, torch.Tensor], fmt: str, num_layers: int, tied: bool, group_size: int = GROUP_SIZE
) -> dict[str, torch.Tensor]:
    """A float checkpoint -> a quantized one: projection weights in `fmt`, the embedding and LM
    head in int8 (the LM head stored once when tied), every other tensor as it was."""
    if fmt not in FORMATS:
        raise ValueError(f"quantization must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = dict(state)
    for prefix in projection_names(num_layers):
        w = out.pop(f"{prefix}.weight")
        if fmt == "int8":
            out[f"{prefix}.weight"], out[f"{prefix}.scales"] = quantize_int8(w)
        else:
            out[f"{prefix}.weight"], out[f"{prefix}.scales_and_zeros"] = quantize_int4(w, group_size)
    heads = [EMBED] if tied else [EMBED, LM_HEAD]
    if tied:
        out.pop(f"{LM_HEAD}.weight", None)
    for prefix in heads:
        out[f"{prefix}.weight"], out[f"{prefix}.scales"] = quantize_int8(out[f"{prefix}.weight"])
    return out


# -- building the quantized model ----------------------------------------------------------------


def swap_quantized(
    model: CausalLM,
    state: dict[str, torch.Tensor],
    fmt: str,
    dtype: torch.dtype,
    device: torch.device,
    group_size: int = GROUP_SIZE,
) -> None:
    """Replace the projections, embedding and LM head of `model` (which may sit on the meta
    device) with quantized modules built on `device` from a quantized checkpoint. Pops the
    tensors it uses from `state`, leaving the float tensors for `load_state_dict`."""

    def take(key: str, to: torch.dtype | None = None) -> torch.Tensor:
        return state.pop(key).to(device=device, dtype=to)

    def bias(prefix: str) -> torch.Tensor | None:
        return take(f"{prefix}.bias", dtype) if f"{prefix}.bias" in state else None

    for prefix in projection_names(model.shape.num_layers):
        parent_name, name = prefix.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        module: nn.Module
        if fmt == "int8":
            module = Int8WeightOnlyLinear(take(f"{prefix}.weight"), take(f"{prefix}.scales"), bias(prefix))
        else:
            sz = take(f"{prefix}.scales_and_zeros")
            module = Int4WeightOnlyLinear(take(f"{prefix}.weight"), sz, group_size, bias(prefix))
        setattr(parent, name, module)
    embed = Int8Embedding(take(f"{EMBED}.weight"), take(f"{EMBED}.scales"), dtype)
    model.model.embed_tokens = embed  # type: ignore[assignment]  # same call signature
    if model.shape.tie_word_embeddings:
        model.lm_head = Int8WeightOnlyLinear(embed.weight, embed.scales, None)  # type: ignore[assignment]
    else:
        head = Int8WeightOnlyLinear(take(f"{LM_HEAD}.weight"), take(f"{LM_HEAD}.scales"), None)
        model.lm_head = head  # type: ignore[assignment]


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, shared storage (tied weights) once.
    The KV cache and LoRA slots are plain attributes, not buffers, so they are not counted."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_mkldnn:  # oneDNN's opaque layout (cpu_linear) has no storage and is never shared
            seen[id(t)] = t.numel() * t.element_size()
        else:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# -- saving and reloading without quantizing again ------------------------------------------------


def cache_path(cache_dir: Path, model_dir: Path, fmt: str, group_size: int = GROUP_SIZE) -> Path:
    """Where the quantized checkpoint of `model_dir` lives: keyed by the model directory, its
    weight files' sizes and modification times, the format and the layout version."""
    key = hashlib.sha256(f"{model_dir.resolve()}|{fmt}|{group_size}|{CHECKPOINT_VERSION}".encode())
    for f in sorted(model_dir.glob("*.safetensors")):
        st = f.stat()
        key.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache_dir / f"{model_dir.name}-{fmt}-{key.hexdigest()[:16]}.safetensors"


def save_quantized(
    state: dict[str, torch.Tensor], path: Path, fmt: str, group_size: int = GROUP_SIZE
) -> None:
    """Write a quantized checkpoint atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    meta = {"quantization": fmt, "group_size": str(group_size), "version": CHECKPOINT_VERSION}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def load_quantized(path: Path, fmt: str, group_size: int = GROUP_SIZE) -> dict[str, torch.Tensor]:
    """Read a checkpoint written by `save_quantized`; refuse one of another format or layout."""
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        want = {"quantization": fmt, "group_size": str(group_size), "version": CHECKPOINT_VERSION}
        if {k: meta.get(k) for k in want} != want:
            raise ValueError(f"{path} holds a {meta} checkpoint, not {want}")
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - no __iter__
