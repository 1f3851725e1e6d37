"""Paged attention, both paths: the C++ decode op (engine/csrc) and the torch groups, against a
dense per-request softmax over the same keys and values."""

from __future__ import annotations

import random

import pytest
import torch

from lorafleet.engine import native
from lorafleet.engine.attention import AttentionMetadata, DecodeBatch, build_group, paged_attention

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler")  # the CI has g++


def random_cache(blocks, block_size, kv_heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (blocks + 1, block_size, kv_heads, head_dim)  # + the scratch block
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def dense_reference(q, k_cache, v_cache, table, ctx, scale):
    """One query token [heads, dim] over the first `ctx` tokens of `table`'s blocks."""
    kv_heads, dim = k_cache.shape[2:]
    k = k_cache[table].reshape(-1, kv_heads, dim)[:ctx].repeat_interleave(q.shape[0] // kv_heads, 1)
    v = v_cache[table].reshape(-1, kv_heads, dim)[:ctx].repeat_interleave(q.shape[0] // kv_heads, 1)
    w = torch.softmax(torch.einsum("hd,thd->ht", q, k) * scale, dim=-1)
    return torch.einsum("ht,thd->hd", w, v)


def random_batch(batch, block_size, blocks, max_ctx, rng):
    """Contexts (some exact block multiples) and block tables drawn from shuffled blocks."""
    ids = list(range(blocks))
    rng.shuffle(ids)
    ctx, tables = [], []
    for _ in range(batch):
        c = rng.choice([1, block_size, 2 * block_size, rng.randint(1, max_ctx)])
        n = -(-c // block_size)
        ctx.append(c)
        tables.append([ids.pop() for _ in range(n)])
    return ctx, tables


@pytest.mark.parametrize(
    "q_heads,kv_heads,head_dim,block_size",
    [
        (9, 3, 64, 16),  # SmolLM2
        (4, 2, 16, 4),  # the tiny test models
        (14, 2, 64, 32),  # seven query heads per kv head: kernels for 4 and 3 at once
        (8, 8, 128, 16),  # no GQA, the widest vectorized head
        (6, 2, 32, 1),
        (4, 1, 48, 8),  # a head size the vectorized kernel lacks: the portable loop
        (2, 2, 8, 16),
    ],
)
def test_decode_op_matches_a_dense_softmax(q_heads, kv_heads, head_dim, block_size):
    rng = random.Random(q_heads * head_dim + block_size)
    blocks, batch = 400, 12
    k_cache, v_cache = random_cache(blocks, block_size, kv_heads, head_dim)
    ctx, tables = random_batch(batch, block_size, blocks, max_ctx=150, rng=rng)
    tokens = batch + 3  # some rows are not decodes: the op leaves them alone
    rows = rng.sample(range(tokens), batch)
    q = torch.randn(tokens, q_heads, head_dim)
    out = torch.full_like(q, 7.0)
    d = DecodeBatch.build(rows, ctx, tables, scratch_block=blocks)
    native.decode_attention(q, k_cache, v_cache, d.rows, d.ctx_lens, d.tables, head_dim**-0.5, out)
    for r, c, t in zip(rows, ctx, tables):
        ref = dense_reference(q[r], k_cache, v_cache, t, c, head_dim**-0.5)
        torch.testing.assert_close(out[r], ref, rtol=1e-5, atol=1e-5, msg=f"ctx {c}")
    untouched = sorted(set(range(tokens)) - set(rows))
    assert (out[untouched] == 7.0).all()


def test_decode_op_and_torch_groups_agree():
    """The engine's two paths for the same decodes (what LORAFLEET_NATIVE=0 switches between)."""
    rng = random.Random(1)
    blocks, bs = 300, 16
    k_cache, v_cache = random_cache(blocks, bs, 3, 64, seed=1)
    ctx, tables = random_batch(20, bs, blocks, max_ctx=200, rng=rng)
    q = torch.randn(20, 9, 64)
    group = build_group([[i] for i in range(20)], [1] * 20, ctx, tables, block_size=bs, scratch_block=blocks,
                        group_size=3, dtype=torch.float32, device=torch.device("cpu"))  # fmt: skip
    slots = torch.zeros(20, dtype=torch.long)
    by_torch = paged_attention(q, k_cache, v_cache, AttentionMetadata(slots, [group]), 0.125)
    decode = DecodeBatch.build(list(range(20)), ctx, tables, scratch_block=blocks)
    by_op = paged_attention(q, k_cache, v_cache, AttentionMetadata(slots, [], decode), 0.125)
    torch.testing.assert_close(by_op, by_torch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.tables.fill_(10_000), "block out of range"),
        (lambda d: d.tables.fill_(-1), "block out of range"),
        (lambda d: d.ctx_lens.add_(64), "context outside its table"),
        (lambda d: d.ctx_lens.zero_(), "context outside its table"),
        (lambda d: d.rows.add_(100), "row out of range"),
    ],
)
def test_decode_op_refuses_what_would_read_out_of_bounds(change, message):
    k_cache, v_cache = random_cache(8, 16, 1, 16)
    q = torch.randn(2, 1, 16)
    d = DecodeBatch.build([0, 1], [20, 3], [[0, 1], [2]], scratch_block=8)
    change(d)
    with pytest.raises(RuntimeError, match=message):
        native.decode_attention(q, k_cache, v_cache, d.rows, d.ctx_lens, d.tables, 0.25, torch.empty_like(q))


def test_decode_op_refuses_other_dtypes_and_layouts():
    k_cache, v_cache = random_cache(4, 16, 1, 16)
    d = DecodeBatch.build([0], [5], [[0]], scratch_block=4)
    q = torch.randn(1, 1, 16)
    with pytest.raises(RuntimeError, match="float32"):
        native.decode_attention(q.double(), k_cache, v_cache, d.rows, d.ctx_lens, d.tables, 0.25, q.double())
    k2, v2 = random_cache(4, 16, 2, 16)
    strided = k2.transpose(1, 2).contiguous().transpose(1, 2)  # same shape, not contiguous
    q2 = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="contiguous"):
        native.decode_attention(q2, strided, v2, d.rows, d.ctx_lens, d.tables, 0.25, torch.empty_like(q2))
    with pytest.raises(RuntimeError, match="head layout"):
        q3 = torch.randn(1, 3, 16)  # 3 query heads cannot share 2 kv heads
        native.decode_attention(q3, k2, v2, d.rows, d.ctx_lens, d.tables, 0.25, torch.empty_like(q3))


def test_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left
    edited = tmp_path / "edited.cpp"
    edited.write_text(native.SOURCES[0].read_text() + "\n// edited\n")
    monkeypatch.setattr(native, "SOURCES", [edited, *native.SOURCES[1:]])
    assert native.build(tmp_path) != first


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++")
    monkeypatch.setattr(native, "SOURCES", [broken])
    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="failed"):
        native.build(out)
    assert list(out.iterdir()) == []


def test_native_zero_switches_the_op_off(monkeypatch):
    monkeypatch.setenv("LORAFLEET_NATIVE", "0")
    assert not native.available()
    assert not native.supports(torch.float32, torch.device("cpu"), 9, 64)
    monkeypatch.delenv("LORAFLEET_NATIVE")
    assert native.supports(torch.float32, torch.device("cpu"), 9, 64)
    assert not native.supports(torch.bfloat16, torch.device("cpu"), 9, 64)


def test_a_model_past_the_ops_limits_keeps_torch():
    """What the op would refuse at every step is never chosen for it: the engine stays on torch."""
    cpu = torch.device("cpu")
    assert native.supports(torch.float32, cpu, native.MAX_HEADS, native.MAX_HEAD_DIM)
    assert not native.supports(torch.float32, cpu, native.MAX_HEADS + 1, 64)
    assert not native.supports(torch.float32, cpu, 8, native.MAX_HEAD_DIM + 16)
    k_cache, v_cache = random_cache(2, 4, 1, 16)
    q = torch.randn(1, native.MAX_HEADS + 1, 16)
    d = DecodeBatch.build([0], [3], [[0]], scratch_block=2)
    with pytest.raises(RuntimeError, match="head layout"):  # and the op agrees on the limit
        native.decode_attention(q, k_cache, v_cache, d.rows, d.ctx_lens, d.tables, 0.25, torch.empty_like(q))
