"""Paged attention over a packed batch, in plain torch.

The KV cache of one layer is a pair of tensors shaped [kv_heads, num_blocks + 1, block_size,
head_dim]; the extra last block is a scratch block that padded block-table entries point at.
Head-major layout makes a gather of a group's blocks land directly as [kv_heads, batch,
context, head_dim], so attention is two batched matmuls with no per-request Python.

Requests that compute one token this step (decodes) and those that compute several (prefill
chunks) attend in separate groups, so one long prompt does not pad every decode; decodes are
further grouped by context length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    rows: torch.Tensor  # [B * Qmax] packed-batch row of each (request, query) slot; padding -> 0
    valid: torch.Tensor  # [n_valid] positions in `rows` that are real queries
    blocks: torch.Tensor  # [B * nb] KV block ids, request-major; padding -> the scratch block
    bias: torch.Tensor  # [kv_heads * B, G * Qmax, nb * block_size] additive mask: 0 or -inf-ish
    batch: int
    q_max: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of each new token
    groups: list[AttentionGroup]


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
    num_kv_heads: int,
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
    shape = (num_kv_heads, batch, group_size, q_max, nb * block_size)
    bias = bias[None, :, None].expand(shape).reshape(num_kv_heads * batch, group_size * q_max, -1)
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
    heads, head_dim = k_cache.shape[0], k_cache.shape[-1]
    k_cache.view(heads, -1, head_dim).index_copy_(1, slots, k.transpose(0, 1))
    v_cache.view(heads, -1, head_dim).index_copy_(1, slots, v.transpose(0, 1))


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Semantics, per request r and query position i:
    out[i] = softmax(q[i] @ K_r[:pos(i)+1].T * scale) @ V_r[:pos(i)+1], with K_r, V_r gathered
    from r's blocks and query heads sharing kv heads in groups (GQA)."""
    tokens, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[0]
    g = q_heads // kv_heads
    out = q.new_empty(tokens, q_heads, head_dim)
    for grp in meta.groups:
        b, qm = grp.batch, grp.q_max
        qg = q.index_select(0, grp.rows).view(b, qm, kv_heads, g, head_dim)
        qg = qg.permute(2, 0, 3, 1, 4).reshape(kv_heads * b, 1, g * qm, head_dim)
        k = k_cache.index_select(1, grp.blocks).view(kv_heads * b, 1, -1, head_dim)
        v = v_cache.index_select(1, grp.blocks).view(kv_heads * b, 1, -1, head_dim)
        # One fused kernel (scores, mask, softmax, weighted sum) that never materializes the scores.
        mask = grp.bias.view(kv_heads * b, 1, g * qm, -1)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
        o = o.view(kv_heads, b, g, qm, head_dim).permute(1, 3, 0, 2, 4)
        o = o.reshape(b * qm, q_heads, head_dim).index_select(0, grp.valid)
        out.index_copy_(0, grp.rows.index_select(0, grp.valid), o)
    return out
