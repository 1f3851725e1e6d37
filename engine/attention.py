"""Paged attention over a packed batch, in plain torch.

The KV cache of one layer is a pair of tensors shaped [num_blocks + 1, block_size, kv_heads,
head_dim]; the extra last block is a scratch block that padded block-table entries point at.
Gathering a group's blocks copies whole blocks (one contiguous run each) and lands as [batch,
context, kv_heads, head_dim], which the attention kernel reads as [batch, kv_heads, context,
head_dim] through a transposed view, with no second copy and no per-request Python. (A
head-major cache, [kv_heads, blocks, ...], made the same gather copy one small run per head and
block: 3x slower on SmolLM2, and then attention still needed its operands reshaped.)

Requests that compute one token this step (decodes) and those that compute several (prefill
chunks) attend in separate groups, so one long prompt does not pad every decode; decodes are
further grouped by context length.

On CPU in float32, decodes skip all of that: the C++ op in `native` reads each request's blocks in
place, with no gather and no padding (a `DecodeBatch`). Prefill chunks keep SDPA, whose matmuls
suit many queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import native


@dataclass
class AttentionGroup:
    rows: torch.Tensor  # [B * Qmax] packed-batch row of each (request, query) slot; padding -> 0
    valid: torch.Tensor  # [n_valid] positions in `rows` that are real queries
    blocks: torch.Tensor  # [B * nb] KV block ids, request-major; padding -> the scratch block
    bias: torch.Tensor  # [B, 1, G * Qmax, nb * block_size] additive mask, 0 or -inf-ish, for every kv head
    batch: int
    q_max: int


@dataclass
class DecodeBatch:
    """Requests that compute one token, for the native op."""

    rows: torch.Tensor  # [B] int64 packed-batch row of each request's token
    ctx_lens: torch.Tensor  # [B] int32 tokens in its cache, this one included
    tables: torch.Tensor  # [B, nb] int32 block tables, padded with the scratch block

    @classmethod
    def build(cls, rows: list[int], ctx_lens: list[int], tables: list[list[int]], scratch_block: int):
        nb = max(len(t) for t in tables)
        padded = [t + [scratch_block] * (nb - len(t)) for t in tables]
        return cls(
            torch.tensor(rows),
            torch.tensor(ctx_lens, dtype=torch.int32),
            torch.tensor(padded, dtype=torch.int32),
        )


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of each new token
    groups: list[AttentionGroup]
    decode: DecodeBatch | None = None


def group_key(q_len: int, ctx_len: int, block_size: int) -> tuple[bool, int]:
    """Which attention group a request joins: prefill chunks together, and decodes bucketed by
    context length (powers of two in blocks), so a short context is padded at most to twice its
    length instead of to the longest context in the batch."""
    if q_len > 1:
        return (False, 0)
    return (True, int(math.log2(max(1, -(-ctx_len // block_size)))))


def build_group(
    rows: list[list[int]],
    q_lens: list[int],
    ctx_lens: list[int],
    tables: list[list[int]],
    *,
    block_size: int,
    scratch_block: int,
    group_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> AttentionGroup:
    """`rows[b]` are the packed rows of request b's new tokens, the last `q_lens[b]` of its
    `ctx_lens[b]` tokens; `tables[b]` its block table."""
    batch, q_max = len(rows), max(q_lens)
    nb = max(-(-c // block_size) for c in ctx_lens)
    flat_rows, blocks = [], []
    for b in range(batch):
        flat_rows += rows[b] + [0] * (q_max - q_lens[b])
        blocks += tables[b][:nb] + [scratch_block] * (nb - min(nb, len(tables[b])))
    q_len = torch.tensor(q_lens, device=device)[:, None, None]
    ctx = torch.tensor(ctx_lens, device=device)[:, None, None]
    qi = torch.arange(q_max, device=device)[None, :, None]
    kj = torch.arange(nb * block_size, device=device)[None, None, :]
    # Query i of request b sits at position ctx - q_len + i and sees every key up to itself.
    allowed = (kj <= ctx - q_len + qi) & (qi < q_len)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    bias = bias[:, None, None].expand(batch, 1, group_size, q_max, nb * block_size)
    bias = bias.reshape(batch, 1, group_size * q_max, -1)
    valid = (torch.arange(q_max, device=device)[None, :] < q_len[:, :, 0]).flatten().nonzero().squeeze(1)
    return AttentionGroup(
        rows=torch.tensor(flat_rows, device=device),
        valid=valid,
        blocks=torch.tensor(blocks, device=device),
        bias=bias.contiguous(),
        batch=batch,
        q_max=q_max,
    )


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
):
    """Store the new tokens' keys and values ([T, kv_heads, head_dim]) at their slots."""
    heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, heads, head_dim).index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Semantics, per request r and query position i:
    out[i] = softmax(q[i] @ K_r[:pos(i)+1].T * scale) @ V_r[:pos(i)+1], with K_r, V_r gathered
    from r's blocks and query heads sharing kv heads in groups (GQA)."""
    tokens, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    g = q_heads // kv_heads
    out = q.new_empty(tokens, q_heads, head_dim)
    if meta.decode is not None:
        d = meta.decode
        native.decode_attention(q, k_cache, v_cache, d.rows, d.ctx_lens, d.tables, scale, out)
    for grp in meta.groups:
        b, qm = grp.batch, grp.q_max
        # Each kv head's g query heads x qm queries form its rows of queries.
        qg = q.index_select(0, grp.rows).view(b, qm, kv_heads, g, head_dim)
        qg = qg.permute(0, 2, 3, 1, 4).reshape(b, kv_heads, g * qm, head_dim)
        k = k_cache.index_select(0, grp.blocks).view(b, -1, kv_heads, head_dim).transpose(1, 2)
        v = v_cache.index_select(0, grp.blocks).view(b, -1, kv_heads, head_dim).transpose(1, 2)
        # One fused kernel (scores, mask, softmax, weighted sum) that never materializes the scores.
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=grp.bias, scale=scale)
        o = o.view(b, kv_heads, g, qm, head_dim).permute(0, 3, 1, 2, 4)
        o = o.reshape(b * qm, q_heads, head_dim).index_select(0, grp.valid)
        out.index_copy_(0, grp.rows.index_select(0, grp.valid), o)
    return out
