"""Weights, KV cache tensors and the forward pass for one scheduler step. Knows nothing of HTTP.

`execute(out)` turns a `SchedulerOutput` into packed tensors, runs the model once and samples
one token for every request whose chunk reached the end of its known tokens, plus one after
each of its draft tokens (speculative decoding) for the scheduler to verify them with.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from . import native, quant, sgmv
from .attention import AttentionGroup, AttentionMetadata, DecodeBatch, build_group, group_key
from .config import EngineConfig
from .cpu_linear import pack_linears
from .kv_cache import bytes_per_block
from .lora import LoRABatch, LoRALinear, LoRAWeights, add_lora_slots
from .model import CausalLM, ModelShape, StepInputs, rope_inv_freq, use_concurrent_linears, use_fused_ops
from .request import Request
from .sampler import sample
from .scheduler import ScheduledChunk, SchedulerOutput

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_checkpoint(model_dir: Path, shape: ModelShape, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory's *.safetensors (never pickle), in `dtype` (None: as stored)."""
    state: dict[str, torch.Tensor] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                state[name] = f.get_tensor(name).to(dtype)
    if shape.tie_word_embeddings:  # a tied checkpoint may store either name
        tied = state.get("lm_head.weight", state.get("model.embed_tokens.weight"))
        if tied is not None:
            state["lm_head.weight"] = state["model.embed_tokens.weight"] = tied
    return state


def quantized_checkpoint(
    model_dir: Path, shape: ModelShape, fmt: str, cache_dir: Path | None
) -> dict[str, torch.Tensor]:
    """The model quantized to `fmt`, read from `cache_dir` when an earlier start saved it there."""
    path = quant.cache_path(cache_dir, model_dir, fmt) if cache_dir is not None else None
    if path is not None and path.is_file():
        return quant.load_quantized(path, fmt)
    state = quant.quantize_checkpoint(
        read_checkpoint(model_dir, shape, None), fmt, shape.num_layers, shape.tie_word_embeddings
    )
    if path is not None:
        quant.save_quantized(state, path, fmt)
        log.info("saved the %s checkpoint to %s", fmt, path)
    return state


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str | None = None,
    quantized_cache_dir: Path | None = None,
    small_step_weights: bool = True,
) -> tuple[CausalLM, object]:
    """Build the model from a HF directory's config.json and *.safetensors (never pickle).
    `small_step_weights`: see EngineConfig."""
    hf_config = AutoConfig.from_pretrained(model_dir)
    shape = ModelShape.from_hf(hf_config)
    inv_freq, rope_scaling = rope_inv_freq(hf_config)
    with torch.device("meta"):
        model = CausalLM(shape, inv_freq.to("meta"), rope_scaling)
    if quantization is None:
        state = read_checkpoint(model_dir, shape, dtype)
    else:
        state = quantized_checkpoint(model_dir, shape, quantization, quantized_cache_dir)
        quant.swap_quantized(model, state, quantization, dtype, device)  # takes the quantized tensors
        state = {name: t.to(dtype) for name, t in state.items()}  # norms and biases
    expected = set(model.state_dict())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}"
        )
    if unexpected:
        log.warning("ignoring %d unexpected tensors, e.g. %s", len(unexpected), sorted(unexpected)[:3])
        state = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(state, assign=True)
    del state  # the model holds the tensors now; packing frees each dense weight it replaces
    model.inv_freq = inv_freq.to(device)
    model = model.to(device).eval()
    panels = small_step_weights and native.small_step_kernel(dtype, device)
    pack_linears(model, panels)  # CPU float32/bfloat16: oneDNN, and the small-step kernel (see cpu_linear)
    if native.fused_ops(dtype, device):
        use_fused_ops(model)
    if device.type == "cpu" and native.available():
        use_concurrent_linears(model)
    return model, hf_config


class ModelRunner:
    def __init__(self, model_dir: Path, config: EngineConfig) -> None:
        self.device = torch.device(config.device)
        self.dtype = TORCH_DTYPES[config.dtype]
        cache = Path(config.quantized_cache_dir) if config.quantized_cache_dir else None
        self.model, self.hf_config = load_model(
            model_dir, self.dtype, self.device, config.quantization, cache, config.small_step_weights
        )
        s = self.model.shape
        self.shape = s
        self.max_model_len = min(
            config.max_model_len or min(s.max_position_embeddings, 8192), s.max_position_embeddings
        )
        self.block_size = config.cache.block_size
        per_block = bytes_per_block(
            s.num_layers, s.num_kv_heads, s.head_dim, self.block_size, self.dtype.itemsize
        )
        self.num_blocks = config.cache.kv_cache_bytes // per_block
        if self.num_blocks * self.block_size < self.max_model_len:
            need = -(-self.max_model_len // self.block_size) * per_block
            raise ValueError(
                f"kv_cache_bytes={config.cache.kv_cache_bytes} cannot hold one {self.max_model_len}-token sequence; "
                f"raise it to at least {need} or lower max_model_len"
            )
        # One scratch block past the end absorbs padded block-table entries.
        cache_shape = (self.num_blocks + 1, self.block_size, s.num_kv_heads, s.head_dim)
        for layer in self.model.model.decoder_layers():
            layer.self_attn.k_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
            layer.self_attn.v_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
        self.lora_batch = LoRABatch()
        self.lora_layers: dict[tuple[int, str], LoRALinear] = {}
        if config.lora is not None:
            self.lora_batch, self.lora_layers = add_lora_slots(
                self.model, config.lora.max_loras, config.lora.max_rank, self.dtype
            )
            sgmv.warm_up()
        # Decodes attend in the C++ op where it runs (see attention.py), else with the prefills' SDPA.
        self.native_decode = native.supports(self.dtype, self.device, s.num_heads, s.head_dim)
        self.default_generator = torch.Generator().manual_seed(config.seed)
        self._generators: dict[str, torch.Generator] = {}
        log.info(
            "model %s: %d layers, %s%s, weights %.0f MiB, KV cache %d blocks x %d tokens (%.0f MiB), %s decode attention",
            s.model_type, s.num_layers, config.dtype,
            f" ({config.quantization} weights)" if config.quantization else "", quant.weight_bytes(self.model) / 2**20,
            self.num_blocks, self.block_size, self.num_blocks * per_block / 2**20, "C++" if self.native_decode else "torch",
        )  # fmt: skip

    # -- per step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def load_lora(self, slot: int, adapter: LoRAWeights) -> None:
        """Copy an adapter into a slot of every projection (zeros where it has no weights)."""
        for key, layer in self.lora_layers.items():
            ab = adapter.weights.get(key)
            if ab is None:
                layer.reset_lora(slot)
            else:
                layer.set_lora(slot, ab[0].to(self.dtype), ab[1].to(self.dtype), adapter.scale)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, list[int]]:
        """The sampled tokens of each request whose chunk samples, one per sampled row."""
        # Each adapter's tokens form one contiguous segment; base-model tokens come first.
        chunks = sorted(out.chunks, key=lambda c: -1 if c.slot is None else c.slot)
        inputs, sample_rows, sampling = self._prepare(chunks)
        # Before the forward and in order: `src` may already be handed out again (even as `dst`),
        # but nothing writes it before the forward does, and an earlier copy into it comes first.
        for src, dst, n in out.copies:
            for layer in self.model.model.decoder_layers():
                attn = layer.self_attn
                attn.k_cache[dst, :n] = attn.k_cache[src, :n]
                attn.v_cache[dst, :n] = attn.v_cache[src, :n]
        hidden = self.model(inputs)
        if not sample_rows:
            return {}
        logits = self.model.logits(hidden.index_select(0, torch.tensor(sample_rows, device=self.device)))
        rows = [c.request for c in sampling for _ in range(len(c.draft) + 1)]
        drafts: list[int | None] = [d for c in sampling for d in [*c.draft, None]]
        tokens = sample(logits.cpu(), [r.params for r in rows], [self._generator(r) for r in rows], drafts)
        picked: dict[str, list[int]] = {}
        for r, t in zip(rows, tokens):
            picked.setdefault(r.request_id, []).append(t)
        return picked

    @torch.inference_mode()
    def hidden_states(self, chunk: ScheduledChunk) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden] of one chunk, with no sampling: teacher-forced
        scoring (perplexity, agreement). The chunk's KV blocks must be allocated as for a step."""
        inputs, _, _ = self._prepare([chunk])
        return self.model(inputs)

    def release(self, request: Request) -> None:
        self._generators.pop(request.request_id, None)

    def _generator(self, req: Request) -> torch.Generator:
        if req.params.seed is None:
            return self.default_generator
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = self._generators[req.request_id] = torch.Generator().manual_seed(req.params.seed)
        return gen

    def _prepare(self, chunks: list[ScheduledChunk]):
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        groups: dict[tuple[bool, int], tuple[list, list, list, list]] = {}
        decodes: tuple[list[int], list[int], list[list[int]]] = ([], [], [])
        sample_rows: list[int] = []
        sampling: list[ScheduledChunk] = []
        segments: list[tuple[int, int, int]] = []
        for c in chunks:
            row0, end = len(ids), c.start + c.num_tokens
            if c.slot is not None:
                if segments and segments[-1][0] == c.slot:
                    segments[-1] = (c.slot, segments[-1][1], row0 + c.num_tokens)
                else:
                    segments.append((c.slot, row0, row0 + c.num_tokens))
            ids += c.request.all_token_ids[c.start : end - len(c.draft)] + c.draft
            positions += range(c.start, end)
            slots += [c.block_table[p // bs] * bs + p % bs for p in range(c.start, end)]
            if self.native_decode and c.num_tokens == 1:
                decodes[0].append(row0)
                decodes[1].append(end)
                decodes[2].append(c.block_table[: -(-end // bs)])
            else:
                key = group_key(c.num_tokens, end, bs)
                rows, q_lens, ctx_lens, tables = groups.setdefault(key, ([], [], [], []))
                rows.append(list(range(row0, len(ids))))
                q_lens.append(c.num_tokens)
                ctx_lens.append(end)
                tables.append(c.block_table)
            if c.samples:
                sample_rows += range(len(ids) - 1 - len(c.draft), len(ids))
                sampling.append(c)
        attn_groups: list[AttentionGroup] = [
            build_group(
                *g,
                block_size=bs,
                scratch_block=self.num_blocks,
                group_size=self.shape.num_heads // self.shape.num_kv_heads,
                dtype=self.dtype,
                device=self.device,
            )
            for g in groups.values()
        ]
        self.lora_batch.set(segments, len(ids))
        meta = AttentionMetadata(
            torch.tensor(slots, device=self.device),
            attn_groups,
            DecodeBatch.build(*decodes, scratch_block=self.num_blocks) if decodes[0] else None,
        )
        inputs = StepInputs(
            torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device), meta
        )
        return inputs, sample_rows, sampling
