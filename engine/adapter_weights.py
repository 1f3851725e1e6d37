"""An adapter's weights in memory: the unit the adapter store hands to the engine.

Turns the two files of a PEFT LoRA adapter (as bytes) into float32 torch tensors keyed by
(layer, projection). Validation (adapter_format) runs first, on the config and the safetensors
header, so nothing is deserialized from a file that was refused. Knows nothing about where the
bytes came from (S3, disk, a local directory) or about slots and batches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import safetensors.torch
import torch

from .adapter_format import (
    AdapterManifest,
    BaseModelSpec,
    check_weights,
    header_length,
    parse_adapter_config,
    parse_safetensors_header,
)

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare to a bool
class LoadedAdapter:
    """One version of one adapter, ready to copy into a GPU slot.

    Semantics of the weights: for token x on projection p of layer l,
    `y += scale * (x @ A.T) @ B.T` with `(A, B) = weights[(l, p)]`.
    """

    adapter_id: str  # "<namespace>/<name>"
    version: str  # the registry version these weights were verified against
    rank: int
    scale: float  # PEFT's lora_alpha / r (or / sqrt(r) with rsLoRA)
    weights: dict[
        tuple[int, str], tuple[torch.Tensor, torch.Tensor]
    ]  # (layer, "q_proj") -> (A [r, in], B [out, r])
    nbytes: int  # float32 bytes of all tensors: what the CPU tier budgets with

    @property
    def key(self) -> tuple[str, str]:
        return (self.adapter_id, self.version)


def load_adapter_weights(
    adapter_id: str, version: str, config_raw: bytes, weights_raw: bytes, base: BaseModelSpec
) -> LoadedAdapter:
    """Validate both files against `base`, then deserialize the weights as float32."""
    manifest = validate_adapter_bytes(config_raw, weights_raw, base)
    tensors = safetensors.torch.load(weights_raw)
    modules = base.module_names()
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        # check_weights accepted every name: "base_model.model.<module>.lora_A.weight"
        module, ab = name.removeprefix("base_model.model.").rsplit(".", 2)[:2]
        layer = int(_LAYER_RE.search(module).group(1))  # type: ignore[union-attr]
        pairs.setdefault((layer, modules[module]), {})[ab] = tensor.to(torch.float32).contiguous()
    weights = {k: (ab["lora_A"], ab["lora_B"]) for k, ab in sorted(pairs.items())}
    nbytes = sum(a.nbytes + b.nbytes for a, b in weights.values())
    return LoadedAdapter(adapter_id, version, manifest.rank, manifest.scale, weights, nbytes)


def validate_adapter_bytes(config_raw: bytes, weights_raw: bytes, base: BaseModelSpec) -> AdapterManifest:
    """adapter_format's checks on in-memory files; raises AdapterError with a reason code."""
    config = parse_adapter_config(config_raw, base)
    head = weights_raw[: header_length(weights_raw[:8])]
    header = parse_safetensors_header(head, len(weights_raw))
    return check_weights(config, header, base, len(weights_raw))
