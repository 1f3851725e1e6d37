"""Decoder-only transformer for the Llama family and Qwen2, over a packed batch of tokens.

Parameter names match Hugging Face's, so checkpoints load as they are and PEFT target module
names (q_proj, ..., down_proj) address the same layers. The forward pass takes a flat [T]
token batch from many requests plus paged-attention metadata; it knows nothing about
requests, tokenization or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMetadata, paged_attention, write_kv
from .cpu_linear import project

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the engine needs to know about an architecture, read from a HF config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_hf(cls, cfg) -> ModelShape:
        if cfg.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {cfg.model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported")
        heads = cfg.num_attention_heads
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        qwen = cfg.model_type == "qwen2"
        return cls(
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=qwen or attention_bias,  # Qwen2 always has q/k/v biases
            o_bias=attention_bias and not qwen,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        )


def rope_inv_freq(cfg) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, from transformers' own RoPE table so that every
    rope_type it knows (default, llama3, yarn, ...) matches the reference exactly."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(cfg, "rope_parameters", None) or {"rope_type": "default"}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("dynamic RoPE scaling is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv_freq, float(scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def use_fused_ops(model: nn.Module) -> None:
    """Run RMSNorm, RoPE with the KV cache write, and SiLU-and-mul as the one-pass C++ ops of
    native.py (float32 on an AVX-512 CPU; the caller checks). Same arithmetic, fewer passes."""
    for m in model.modules():
        if isinstance(m, RMSNorm | Attention | MLP):
            m.fused = True


def use_concurrent_linears(model: nn.Module) -> None:
    """Let small steps run each layer's q, k, v (and gate, up) projections at once, one per thread
    (cpu_linear.project; the C++ op must be loaded)."""
    for m in model.modules():
        if isinstance(m, Attention | MLP):
            m.concurrent = True


class RMSNorm(nn.Module):
    fused = False

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x += delta in place (the residual stream), then the norm of x."""
        if not self.fused:
            return self(x.add_(delta))
        out = torch.empty_like(x)
        torch.ops.lorafleet.add_rms_norm(x, delta, self.weight, self.eps, out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            out = torch.empty_like(x)
            torch.ops.lorafleet.rms_norm(x, self.weight, self.eps, out)
            return out
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass
class StepInputs:
    """One forward pass: the packed tokens of every scheduled request."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: AttentionMetadata


class Attention(nn.Module):
    fused = False
    concurrent = False

    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.scale = s.head_dim**-0.5
        self.q_proj = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=s.o_bias)
        # Set by the model runner once the cache is allocated.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata):
        t = x.shape[0]
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj), self.concurrent)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.fused:
            ops = torch.ops.lorafleet
            ops.rope_write_kv(q, k, v, cos, sin, self.k_cache, self.v_cache, meta.slot_mapping)
        else:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            write_kv(self.k_cache, self.v_cache, k, v, meta.slot_mapping)
        # Only now, with the whole step's keys and values written, does any token attend: a request
        # may read prefix blocks another request in the same step is filling (kv_cache.commit).
        o = paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(o.view(t, -1))


class MLP(nn.Module):
    fused = False
    concurrent = False

    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=s.mlp_bias)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=s.mlp_bias)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=s.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj), self.concurrent)
        if self.fused:
            torch.ops.lorafleet.silu_and_mul(gate, up, gate)
            return self.down_proj(gate)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = MLP(s)

    def forward(self, x, cos, sin, meta):
        """x is the residual stream, updated in place."""
        h = self.post_attention_layernorm.add_and_norm(
            x, self.self_attn(self.input_layernorm(x), cos, sin, meta)
        )
        return x.add_(self.mlp(h))


class Backbone(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    def decoder_layers(self) -> list[DecoderLayer]:
        return list(self.layers)  # type: ignore[arg-type]  # ModuleList iterates as Module


class CausalLM(nn.Module):
    model: Backbone
    inv_freq: torch.Tensor

    def __init__(self, s: ModelShape, inv_freq: torch.Tensor, rope_scaling: float = 1.0) -> None:
        super().__init__()
        self.shape = s
        self.model = Backbone(s)
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scaling = rope_scaling

    def forward(self, inp: StepInputs) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden]."""
        x = self.model.embed_tokens(inp.input_ids)
        freqs = inp.positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(x.dtype)[:, None, :]
        sin = (emb.sin() * self.rope_scaling).to(x.dtype)[:, None, :]
        for layer in self.model.layers:
            x = layer(x, cos, sin, inp.attention)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
