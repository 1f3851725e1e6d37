"""Scheduler and KV bookkeeping with fake model outputs: no torch anywhere in this file."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from lorafleet.engine.config import SchedulerConfig
from lorafleet.engine.kv_cache import KVCacheManager
from lorafleet.engine.request import FinishReason, Request, SamplingParams, Status
from lorafleet.engine.scheduler import Scheduler

EOS = 0


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, mode="continuous", max_len=256, spec=0):
    kv = KVCacheManager(num_blocks, block_size)
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, mode=mode, admission_watermark=0,
        num_speculative_tokens=spec, speculative_max_seqs=max_seqs,
    )  # fmt: skip
    return Scheduler(cfg, kv, max_model_len=max_len, eos_token_ids=[EOS])


def req(rid, prompt_len=5, max_tokens=4, **kw):
    return Request(
        rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)
    )


def fake_step(s: Scheduler, token=7):
    """Run one step with a fake model that always emits `token`."""
    out = s.schedule()
    sampled = {c.request.request_id: [token] * (len(c.draft) + 1) for c in out.chunks if c.samples}
    gained = s.update(out, sampled)
    return out, [c.request for c in out.chunks if c.request.request_id in gained and c.request.finished]


def run_all(s, max_steps=100_000):
    steps = 0
    while s.has_work():
        fake_step(s)
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps


def test_scheduler_does_not_import_torch():
    assert "lorafleet.engine.scheduler" in sys.modules
    # The engine package as a whole imports torch, so check the module's own imports instead.
    import lorafleet.engine.kv_cache as kv
    import lorafleet.engine.scheduler as sched
    import lorafleet.engine.speculative as spec

    for mod in (sched, kv, spec):
        assert "torch" not in mod.__dict__
        source = Path(mod.__file__).read_text()
        assert "import torch" not in source


def test_token_budget_is_respected_and_prefill_is_chunked():
    s = make(budget=8)
    s.add(req("a", prompt_len=20))
    out, _ = fake_step(s)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 8)]
    assert not out.chunks[0].samples
    out, _ = fake_step(s)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(8, 8)]
    out, _ = fake_step(s)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(16, 4)]
    assert out.chunks[0].samples
    assert s.running[0].output_token_ids == [7]


def test_decodes_and_prefill_chunks_share_a_step():
    s = make(budget=10)
    s.add(req("a", prompt_len=4, max_tokens=50))
    fake_step(s)  # a: prefill 4
    s.add(req("b", prompt_len=30))
    out, _ = fake_step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 9)]
    assert out.num_tokens == 10


def test_requests_join_and_leave_every_step():
    s = make(budget=64)
    s.add(req("short", max_tokens=1))
    s.add(req("long", max_tokens=5))
    _, finished = fake_step(s)
    assert [r.request_id for r in finished] == ["short"]
    assert s.kv.block_table("short") == []
    s.add(req("late", max_tokens=2))
    out, _ = fake_step(s)
    assert {c.request.request_id for c in out.chunks} == {"long", "late"}


def test_static_mode_admits_only_into_an_empty_batch():
    s = make(budget=64, mode="static")
    s.add(req("a", max_tokens=1))
    s.add(req("b", max_tokens=3))
    fake_step(s)  # both prompts fit this step: the batch produced tokens and is now closed
    s.add(req("c", max_tokens=1))
    out, _ = fake_step(s)
    assert [c.request.request_id for c in out.chunks] == ["b"]  # c waits although there is room
    fake_step(s)
    out, _ = fake_step(s)
    assert [c.request.request_id for c in out.chunks] == ["c"]


def test_static_batch_fills_over_several_prefill_steps():
    s = make(budget=8, mode="static", max_seqs=4)
    for i in range(6):
        s.add(req(f"r{i}", prompt_len=5, max_tokens=2))
    sizes = []
    while s.has_work():
        out, _ = fake_step(s)
        sizes.append(len(s.running) + len([c for c in out.chunks if c.request.finished]))
    # The first batch grows to max_num_seqs while its prompts prefill, then runs alone.
    assert max(sizes) == 4 and s.kv.num_free_blocks == s.kv.num_blocks


def test_max_num_seqs_bounds_the_running_batch():
    s = make(budget=1000, max_seqs=3)
    for i in range(5):
        s.add(req(f"r{i}"))
    out, _ = fake_step(s)
    assert len(out.chunks) == 3 and s.num_waiting == 2


def test_preemption_when_blocks_run_out_and_recompute_later():
    # 6 blocks of 4 tokens; two requests of 8 prompt tokens growing by 10 each cannot both fit.
    s = make(num_blocks=6, block_size=4, budget=64)
    a, b = req("a", prompt_len=8, max_tokens=10), req("b", prompt_len=8, max_tokens=10)
    s.add(a)
    s.add(b)
    preempted = []
    while s.has_work():
        out, _ = fake_step(s)
        preempted += [r.request_id for r in out.preempted]
        assert s.kv.num_free_blocks + sum(len(s.kv.block_table(r.request_id)) for r in s.running) == 6
    assert preempted and preempted[0] == "b"  # the newest request yields
    assert b.num_preemptions >= 1
    assert a.output_token_ids == [7] * 10 and b.output_token_ids == [7] * 10
    assert s.kv.num_free_blocks == 6


def test_cancel_frees_blocks_wherever_the_request_is():
    s = make(budget=8)
    running, waiting = req("run", prompt_len=20), req("wait")
    s.add(running)
    fake_step(s)
    s.add(waiting)
    s.finish(running, FinishReason.ABORT)
    s.finish(waiting, FinishReason.ABORT)
    s.finish(waiting, FinishReason.ABORT)  # idempotent
    assert running.finish_reason is FinishReason.ABORT and waiting.status is Status.FINISHED
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert not s.has_work()


def test_cancel_during_a_step_is_not_overwritten_by_its_results():
    s = make()
    r = req("a")
    s.add(r)
    out = s.schedule()
    s.finish(r, FinishReason.ABORT)
    assert s.update(out, {"a": [7]}) == {}
    assert r.output_token_ids == [] and r.finish_reason is FinishReason.ABORT


def test_stop_conditions():
    s = make(max_len=12)
    eos = req("eos", max_tokens=10)
    stop_id = req("stop_id", max_tokens=10, stop_token_ids=(7,))
    ctx = req("ctx", prompt_len=10, max_tokens=50)
    ign = req("ign", max_tokens=3, ignore_eos=True)
    for r in (eos, stop_id, ctx, ign):
        s.add(r)
    out = s.schedule()
    s.update(out, {"eos": [EOS], "stop_id": [7], "ctx": [5], "ign": [EOS]})
    assert eos.finish_reason is FinishReason.STOP
    assert stop_id.finish_reason is FinishReason.STOP
    assert not ctx.finished and not ign.finished
    out = s.schedule()
    s.update(out, {"ctx": [5], "ign": [EOS]})
    assert ctx.finish_reason is FinishReason.LENGTH  # 12 tokens = the context length
    run_all(s)
    assert ign.finish_reason is FinishReason.LENGTH and ign.output_token_ids == [EOS, EOS, 7]


def test_an_empty_batch_may_use_every_block_despite_the_watermark():
    kv = KVCacheManager(4, 4)
    s = Scheduler(SchedulerConfig(admission_watermark=0.5), kv, max_model_len=16)
    s.add(req("big", prompt_len=15, max_tokens=1))
    out = s.schedule()
    assert len(out.chunks) == 1 and kv.num_free_blocks == 0


@pytest.mark.parametrize("spec", [0, 3])  # 3: greedy decodes carry n-gram drafts, some kept
@pytest.mark.parametrize("seed", range(5))
def test_thousands_of_requests_with_random_cancels_leave_every_block_free(seed, spec):
    rng = random.Random(seed)
    s = make(
        num_blocks=40,
        block_size=4,
        budget=rng.choice([4, 16, 64]),
        max_seqs=rng.choice([2, 8, 32]),
        spec=spec,
    )
    live: list[Request] = []
    for i in range(2000):
        r = req(f"r{i}", prompt_len=rng.randint(1, 40), max_tokens=rng.randint(1, 30))
        s.add(r)
        live.append(r)
        if rng.random() < 0.5:
            fake_step(s, token=rng.choice([7, 7, 7, EOS]))
        if rng.random() < 0.3:
            s.finish(rng.choice(live), FinishReason.ABORT)
        live = [x for x in live if not x.finished]
        owned = sum(len(s.kv.block_table(x.request_id)) for x in s.running)
        assert owned + s.kv.num_free_blocks == s.kv.num_blocks
        assert all(not s.kv.block_table(x.request_id) for x in s.waiting())
    run_all(s)
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert s.kv.usage == 0.0
    assert (s.num_accepted_tokens > 0) is (spec > 0)


def test_kv_allocate_is_all_or_nothing():
    kv = KVCacheManager(3, 4)
    assert kv.allocate("a", 8)
    assert not kv.allocate("b", 8)
    assert kv.block_table("b") == [] and kv.num_free_blocks == 1
    assert kv.allocate("a", 12) and kv.num_free_blocks == 0
    assert kv.usage == 1.0
    kv.free("a")
    assert kv.num_free_blocks == 3
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        KVCacheManager(0, 4)
