"""Engine configuration: one small dataclass per concern, validated on construction.

Nothing here reads environment variables; the CLI turns flags into these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8", "int4")  # weight-only; see quant.py


@dataclass(frozen=True)
class CacheConfig:
    """KV cache sizing. The cache is preallocated once, so its size is a hard byte budget."""

    block_size: int = 16  # tokens per KV block; small blocks waste less on short sequences
    kv_cache_bytes: int = 512 << 20  # keys + values of every layer; 512 MiB holds ~28k SmolLM2 tokens in fp32
    # Share the KV of full blocks between requests that start with the same tokens under the same
    # adapter (see kv_cache.py): a common system prompt is computed once, not once per request.
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")


@dataclass(frozen=True)
class SchedulerConfig:
    """What runs in one step."""

    # Token budget per step: prefill chunks and decodes share it. Larger budgets keep the matmuls
    # wide (throughput); smaller ones bound the time of one step (latency of running requests).
    max_num_batched_tokens: int = 512  # bench: 340 tok/s at 512 vs 313 at 256 and 335 at 1024 (N=128, M=128)
    max_num_seqs: int = 128  # running requests at once
    # "static" admits a new batch only when the previous one has fully finished. It exists only
    # as the baseline the benchmarks compare continuous batching against.
    mode: Literal["continuous", "static"] = "continuous"
    # Keep this fraction of KV blocks free when admitting new requests, so running requests can
    # grow for a while without being preempted right after a new one is admitted.
    admission_watermark: float = 0.01
    # Speculative decoding with n-gram drafts (see speculative.py): up to this many guessed tokens
    # per request (greedy, or sampled without a seed) and step; 0 turns it off. Guesses come from the last prompt_lookup_max
    # down to prompt_lookup_min tokens found earlier in the request. Drafting stops while more than
    # speculative_max_seqs requests run: wide steps are bound by compute, not by reading weights,
    # so guesses there cost their full price (vLLM's disable_by_batch_size).
    num_speculative_tokens: int = 0
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    speculative_max_seqs: int = 4

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.mode not in ("continuous", "static"):
            raise ValueError(f"mode must be 'continuous' or 'static', got {self.mode!r}")
        if not 0.0 <= self.admission_watermark < 1.0:
            raise ValueError("admission_watermark must be in [0, 1)")
        if not 0 <= self.num_speculative_tokens <= 16:
            raise ValueError(
                f"num_speculative_tokens must be between 0 and 16, got {self.num_speculative_tokens}"
            )
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max")
        if self.speculative_max_seqs < 1:
            raise ValueError("speculative_max_seqs must be at least 1")


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving. The slots are what one forward pass can mix; adapters beyond them wait
    in their queues (and in the CPU/disk tiers) until a slot frees up."""

    max_loras: int = 8  # adapter slots: distinct adapters in one step
    max_rank: int = 64  # adapters with a higher rank are refused

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        if not 1 <= self.max_rank <= 1024:
            raise ValueError(f"max_rank must be between 1 and 1024, got {self.max_rank}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start."""

    model: str | None = None  # local HF directory, s3://bucket/prefix, or None for the built-in model
    dtype: str = "float32"  # activations, KV cache, and the weights unless quantized
    # None: weights in `dtype`. "int8": per-channel int8 weights (about 0.25x float32 bytes);
    # "int4": group-wise int4 projections (about 0.18x). LoRA deltas stay in `dtype`.
    quantization: str | None = None
    # Where quantized checkpoints are saved so that a restart skips quantizing; None: not saved.
    quantized_cache_dir: str | None = None
    device: str = "cpu"
    # float32 on an AVX-512 CPU: keep a second copy of the linear weights, laid out for steps of at
    # most 8 tokens (cpu_linear, csrc/gemv.cpp). Batch-1 decoding ~1.5x faster, weights 2x the memory.
    small_step_weights: bool = True
    max_model_len: int | None = None  # context length; default: the model's, capped at 8192
    seed: int = 0  # seeds requests that do not bring their own seed
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig | None = None  # None: no adapters, and no LoRA cost in the forward pass

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)} or unset, got {self.quantization!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
