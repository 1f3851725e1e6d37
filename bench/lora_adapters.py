"""Benchmark adapters: random-weight PEFT LoRA adapters published to a local S3 server, and the
Zipf popularity that decides which adapter each request names.

No training: A and B are seeded random tensors written with safetensors in PEFT's layout
(`adapter_config.json` + `adapter_model.safetensors`), so adapter i always has the same bytes,
and so the same S3 ETags, for a given base model, rank and seed. Knows nothing about engines.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafleet.engine.adapter_format import CONFIG_NAME, PROJECTIONS, WEIGHTS_NAME, BaseModelSpec
from lorafleet.engine.adapter_sources import put_s3_adapter
from lorafleet.engine.registry import Registry, RegistryEntry
from lorafleet.engine.s3 import S3Client

NAMESPACE = "bench"
BUCKET = "lorafleet-bench"
PREFIX = "adapters/"  # the registry's URIs and --adapter-s3-prefix point below this
# B is drawn small, as fine-tuned LoRA deltas are next to the base weights: every adapter changes
# the model's output without drowning it.
B_STD = 0.02


def adapter_id(index: int) -> str:
    return f"{NAMESPACE}/a{index:04d}"


def zipf_choices(num_requests: int, num_adapters: int, exponent: float, seed: int) -> list[int]:
    """Adapter index per request: index k is drawn with probability proportional to 1 / (k + 1)^s."""
    if num_adapters < 1:
        raise ValueError(f"the number of adapters must be at least 1, got {num_adapters}")
    weights = [1.0 / (k + 1) ** exponent for k in range(num_adapters)]
    return random.Random(seed).choices(range(num_adapters), weights=weights, k=num_requests)


def write_random_adapter(out: Path, base: BaseModelSpec, rank: int, seed: int) -> Path:
    """A rank-`rank` LoRA adapter on every projection of every layer of `base`, in PEFT's format."""
    gen = torch.Generator().manual_seed(seed)
    shapes = base.projection_shapes()
    tensors = {}
    for module, proj in base.module_names().items():
        fan_in, fan_out = shapes[proj]
        # A as PEFT initializes it (uniform, kaiming-like bound); B random instead of PEFT's zeros.
        a = (torch.rand(rank, fan_in, generator=gen) * 2 - 1) / math.sqrt(fan_in)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = (
            torch.randn(fan_out, rank, generator=gen) * B_STD
        )
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS_NAME)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.name,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(PROJECTIONS),
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


@dataclass(frozen=True)
class PublishedAdapters:
    registry: Registry  # id -> s3:// URI and version, for every published adapter
    registry_path: Path  # the same, as a registry file
    local_dirs: dict[str, Path]  # id -> the local copy (PEFT loads adapters from directories)
    bytes_per_adapter: int  # size of one adapter_model.safetensors

    @property
    def s3_prefix(self) -> str:
        return f"s3://{BUCKET}/{PREFIX}"


def publish_adapters(
    names: Iterable[str],
    base: BaseModelSpec,
    rank: int,
    client: S3Client,
    work_dir: Path,
    served_base: str,
) -> PublishedAdapters:
    """Write each named adapter (seeded by its name) locally, upload it, and write a registry file."""
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)
    entries: dict[str, RegistryEntry] = {}
    local_dirs: dict[str, Path] = {}
    size = 0
    for name in names:
        seed = int.from_bytes(name.encode(), "little") % 2**63
        local = write_random_adapter(work_dir / "adapters" / name, base, rank, seed)
        key = f"{PREFIX}{name}/"
        version = put_s3_adapter(client, BUCKET, key, local)
        size = (local / WEIGHTS_NAME).stat().st_size
        entries[name] = RegistryEntry(
            uri=f"s3://{BUCKET}/{key}",
            version=version,
            rank=rank,
            bytes=size,
            target_modules=PROJECTIONS,
        )
        local_dirs[name] = local
    registry = Registry(served_base, entries)
    path = work_dir / "registry.json"
    path.write_text(json.dumps(registry.to_json(), indent=2) + "\n")
    return PublishedAdapters(registry, path, local_dirs, size)
