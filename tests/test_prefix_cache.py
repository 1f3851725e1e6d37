"""Prefix caching in the KV bookkeeping and the scheduler, with a fake model: no torch.

The fake model writes, for every token it computes, what real KV depends on (the request's
cache key and all its tokens up to that position) into a dict standing for the cache tensors.
Before each chunk runs, every position the chunk attends to must hold exactly the request's
own entries: a block shared in error, evicted while in use or written after being cached fails.
"""

from __future__ import annotations

import random

import pytest

from lorafleet.engine.config import SchedulerConfig
from lorafleet.engine.kv_cache import KVCacheManager
from lorafleet.engine.request import FinishReason, Request, SamplingParams
from lorafleet.engine.scheduler import ScheduledChunk, Scheduler

EOS = 0
BS = 4


def make(num_blocks=64, budget=64, max_seqs=8, spec=0, caching=True):
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, admission_watermark=0,
        num_speculative_tokens=spec, speculative_max_seqs=max_seqs,
    )  # fmt: skip
    return Scheduler(cfg, KVCacheManager(num_blocks, BS, caching), max_model_len=256, eos_token_ids=[EOS])


def req(rid, prompt, max_tokens=4, salt=None):
    r = Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0))
    r.cache_salt = salt
    return r


class FakeModel:
    """Like the real one, a step first writes the keys and values of all its tokens, then every
    token attends to its request's positions up to its own."""

    def __init__(self) -> None:
        self.cache: dict[tuple[int, int], tuple] = {}  # (block, offset) -> what its KV depends on

    def run(self, chunks: list[ScheduledChunk], copies: list[tuple[int, int, int]] = ()) -> None:
        for src, dst, n in copies:
            for off in range(n):
                self.cache[(dst, off)] = self.cache.get((src, off))
        for c in chunks:
            for p, kv in self._kv(c).items():
                if p >= c.start:
                    self.cache[(c.block_table[p // BS], p % BS)] = kv
        for c in chunks:
            for p, kv in self._kv(c).items():
                got = self.cache.get((c.block_table[p // BS], p % BS))
                assert got == kv, f"{c.request.request_id} attends to someone else's KV at position {p}"

    @staticmethod
    def _kv(c: ScheduledChunk) -> dict[int, tuple]:
        tokens = c.request.all_token_ids[: c.start + c.num_tokens - len(c.draft)] + c.draft
        return {p: (c.request.cache_key, tuple(tokens[: p + 1])) for p in range(c.start + c.num_tokens)}


def step(s: Scheduler, model: FakeModel, token=lambda r: 7):
    out = s.schedule()
    model.run(out.chunks, out.copies)
    s.update(
        out, {c.request.request_id: [token(c.request)] * (len(c.draft) + 1) for c in out.chunks if c.samples}
    )
    return out


def run_all(s: Scheduler, model: FakeModel, **kw) -> None:
    for _ in range(10_000):
        if not s.has_work():
            return
        step(s, model, **kw)
    raise AssertionError("no progress")


def assert_blocks_accounted(s: Scheduler) -> None:
    used = {b for r in s.running for b in s.kv.block_table(r.request_id)}
    assert len(used) + s.kv.num_free_blocks == s.kv.num_blocks


def a_third_block(s: Scheduler, system: list[int]) -> int | None:
    """The cached block that starts with system[8:10] (a's third block)."""
    return s.kv.lookup([*system, 0, 0, 0], req("probe", []).cache_key).copy_from


def test_a_shared_prompt_start_is_computed_once():
    s, model = make(), FakeModel()
    system = list(range(100, 110))  # 10 tokens: two full blocks and a half
    a = req("a", [*system, 1, 2])
    s.add(a)
    run_all(s, model)
    a_blocks = s.kv.block_table("a")
    assert a_blocks == []  # a is done: its blocks wait, cached, in the free list
    b, c = req("b", [*system, 3]), req("c", system[:8])
    s.add(b)
    s.add(c)
    out = step(s, model)
    # b shares both full blocks of the system prompt and copies the first 2 tokens of a's third
    # block into one of its own. c's prompt is exactly the 8 tokens of two blocks, but its last
    # token is computed again (the step samples from it): it shares the first block and copies
    # 3 tokens of the second.
    assert [(ch.request.request_id, ch.start, ch.num_tokens) for ch in out.chunks] == [
        ("b", 10, 1),
        ("c", 7, 1),
    ]
    tb, tc = s.kv.block_table("b"), s.kv.block_table("c")
    assert tc[0] == tb[0] and tb[1] not in tc
    assert sorted(out.copies) == sorted([(tb[1], tc[1], 3), (a_third_block(s, system), tb[2], 2)])
    assert b.num_cached_tokens == 10 and c.num_cached_tokens == 7
    assert s.num_cached_tokens == 17 and s.num_queried_tokens == 12 + 11 + 8
    assert s.kv.lookup([*system, 3], b.cache_key).blocks == tb[:2]
    assert_blocks_accounted(s)
    run_all(s, model)
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_requests_in_one_step_share_the_blocks_it_computes():
    s, model = make(), FakeModel()
    system = list(range(100, 110))
    a, b, c = req("a", [*system, 1]), req("b", [*system, 2]), req("c", [*system[:6], 3])
    for r in (a, b, c):
        s.add(r)
    out = step(s, model)  # FakeModel: b reads blocks that a writes in this very step
    # ... but nobody copies from a block before its KV is written: b and c compute the tokens
    # after the blocks they share.
    assert [(ch.start, ch.num_tokens) for ch in out.chunks] == [(0, 11), (8, 3), (4, 3)]
    assert out.copies == []
    assert (
        s.kv.block_table("b")[:2]
        == s.kv.block_table("a")[:2]
        == [*s.kv.block_table("c")[:1], s.kv.block_table("a")[1]]
    )


def test_a_failed_step_forgets_the_blocks_it_was_computing():
    s, model = make(), FakeModel()
    s.add(req("early", [1] * 5, max_tokens=1))
    run_all(s, model)  # its first block is computed and cached
    doomed = req("doomed", [1] * 9 + [2] * 8, max_tokens=3)
    s.add(doomed)
    out = s.schedule()
    assert doomed.num_cached_tokens == 4 and s.kv.num_cached_blocks == 4  # 3 named in flight
    s.fail(out)
    assert doomed.finish_reason is FinishReason.ERROR and s.kv.num_free_blocks == s.kv.num_blocks
    assert s.kv.num_cached_blocks == 1  # only what an earlier step computed
    retry = req("retry", [1] * 9 + [2] * 8)
    s.add(retry)
    step(s, model)
    assert retry.num_cached_tokens == 4


def test_cache_keys_keep_requests_apart():
    s, model = make(), FakeModel()
    prompt = list(range(100, 113))
    s.add(req("plain", prompt))
    s.add(req("salted", prompt, salt="tenant-a"))
    run_all(s, model)
    assert s.num_cached_tokens == 0
    adapter = req("adapter", prompt)
    adapter.adapter_id = "ns/a@1"  # LoRA changes the keys and values: never the base model's blocks
    assert s.kv.lookup(prompt, adapter.cache_key).blocks == []
    assert s.kv.lookup(prompt, req("b", prompt, salt="tenant-b").cache_key).blocks == []
    assert len(s.kv.lookup(prompt, req("p", prompt).cache_key).blocks) == 3
    same_salt = req("same", prompt, salt="tenant-a")
    s.add(same_salt)
    step(s, model)
    assert same_salt.num_cached_tokens == 12


def test_generated_tokens_are_cached_too():
    """A conversation's next turn starts with the previous turn's prompt and answer."""
    s, model = make(), FakeModel()
    first = req("turn1", [5, 6, 7], max_tokens=10)
    s.add(first)
    run_all(s, model, token=lambda r: 40 + len(r.output_token_ids))
    turn2 = req("turn2", [*first.all_token_ids, 9, 9])
    s.add(turn2)
    step(s, model)
    assert turn2.num_cached_tokens == 12  # 13 known tokens: 3 full blocks computed by turn 1


def test_blocks_filled_by_kept_guesses_are_named_by_their_tokens():
    s, model = make(spec=3), FakeModel()
    # The model says 7 again and again, so guesses are kept; with 6 prompt tokens, some kept guess
    # completes a block before the request holds it as a token.
    first = req("first", [7] * 6, max_tokens=20)
    s.add(first)
    run_all(s, model)
    assert s.num_accepted_tokens > 0
    n = first.num_tokens
    turn2 = req("turn2", [*first.all_token_ids, 9])
    s.add(turn2)
    step(s, model)
    assert turn2.num_cached_tokens == (n - 1) // BS * BS  # all but the unsampled last token's block


def test_cached_blocks_are_evicted_least_recently_freed_first_and_only_when_needed():
    s, model = make(num_blocks=6), FakeModel()
    s.add(req("a", [1] * 9, max_tokens=1))  # blocks: [1,1,1,1] [1,1,1,1] [1 + output]
    run_all(s, model)
    assert s.kv.num_cached_blocks == 2 and s.kv.num_free_blocks == 6
    s.add(req("b", [2] * 9, max_tokens=1))
    run_all(s, model)
    assert s.kv.num_cached_blocks == 4  # uncached free blocks were used before cached ones
    s.add(req("c", [3] * 13, max_tokens=1))  # needs 4 blocks: 2 uncached + a's 2 cached (older)
    run_all(s, model)
    late_a, late_b = req("a2", [1] * 9), req("b2", [2] * 9)
    s.add(late_b)  # first: a2's fresh blocks would evict b's (now the least recently freed)
    s.add(late_a)
    step(s, model)
    assert late_a.num_cached_tokens == 0 and late_b.num_cached_tokens == 8


def test_an_evicted_block_is_no_source_to_copy_from():
    s, model = make(num_blocks=3), FakeModel()
    s.add(req("a", [1, 2, 3, 4, 5, 6], max_tokens=1))  # names its first block [1, 2, 3, 4]
    run_all(s, model)
    probe = [1, 2, 3, 9, 9]
    assert s.kv.lookup(probe, "").copy_from is None  # another key
    assert s.kv.lookup(probe, req("p", []).cache_key).copy_tokens == 3
    s.add(req("hog", [7] * 9, max_tokens=1))  # takes all 3 blocks: a's cached one is evicted
    run_all(s, model)
    assert s.kv.lookup(probe, req("p", []).cache_key).copy_from is None
    late = req("late", probe)
    s.add(late)
    step(s, model)
    assert late.num_cached_tokens == 0


def test_a_block_copied_from_counts_as_recently_used():
    s, model = make(num_blocks=6), FakeModel()
    for first in (1, 2):  # name [1, 1, 1, 1], then [2, 2, 2, 2]: the first is evicted first...
        s.add(req(f"r{first}", [first] * 5, max_tokens=1))
        run_all(s, model)
    s.add(req("copier", [1, 1, 9], max_tokens=1))  # ... until a request copies from it
    run_all(s, model)
    uncached = s.kv.num_free_blocks - s.kv.num_cached_blocks
    s.add(req("big", [3] * ((uncached + 1) * BS - 1), max_tokens=1))  # evicts one cached block
    step(s, model)
    key = req("p", []).cache_key
    assert len(s.kv.lookup([1] * 5, key).blocks) == 1 and s.kv.lookup([2] * 5, key).blocks == []


def test_a_cached_block_in_use_is_never_evicted():
    s, model = make(num_blocks=10), FakeModel()
    long = req("long", [1] * 9, max_tokens=11)  # 20 tokens: 5 blocks, held while it runs
    s.add(long)
    step(s, model)
    for i in range(12):  # others churn through the other 5 blocks, evicting each other's
        s.add(req(f"churn{i}", [i + 2] * 9, max_tokens=2))
    while not long.finished:
        step(s, model)  # FakeModel checks every position each request attends to
        assert len(s.kv.lookup([1] * 9, long.cache_key).blocks) == 2
        assert_blocks_accounted(s)
    assert long.num_preemptions == 0  # the newest requests yield when memory runs out
    run_all(s, model)
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_a_preempted_request_finds_its_own_blocks_again():
    s, model = make(num_blocks=8), FakeModel()
    a, b = req("a", list(range(1, 10)), max_tokens=12), req("b", list(range(50, 59)), max_tokens=12)
    s.add(a)
    s.add(b)
    preempted, restarts = [], []
    while s.has_work():
        out = step(s, model)
        restarts += [c.start for c in out.chunks if c.request in preempted]
        preempted += out.preempted
        assert_blocks_accounted(s)
    assert b in preempted
    assert restarts and restarts[0] > 0  # b's computed blocks outlived its preemption
    assert s.num_cached_tokens == 0  # the metrics count first admissions only


def test_reset_forgets_only_blocks_nobody_uses():
    s, model = make(), FakeModel()
    s.add(req("done", [1] * 9, max_tokens=1))
    run_all(s, model)
    s.add(req("live", [2] * 9, max_tokens=50))
    step(s, model)
    s.kv.reset_prefix_cache()
    assert s.kv.num_cached_blocks == 2  # live's blocks stay named: they are in use and valid
    again = req("again", [1] * 9)
    s.add(again)
    step(s, model)
    assert again.num_cached_tokens == 0


def test_prefix_caching_off_shares_nothing():
    s, model = make(caching=False), FakeModel()
    s.add(req("a", [1] * 20, max_tokens=2))
    run_all(s, model)
    s.add(req("b", [1] * 20, max_tokens=2))
    step(s, model)
    assert s.num_cached_tokens == 0 and s.kv.num_cached_blocks == 0


@pytest.mark.parametrize("spec", [0, 3])  # 3: drafts written past the computed tokens, some refused
@pytest.mark.parametrize("seed", range(4))
def test_random_shared_prompts_cancels_and_preemption_keep_kv_right(seed, spec):
    rng = random.Random(seed)
    s, model = make(num_blocks=12, budget=rng.choice([4, 16, 64]), max_seqs=8, spec=spec), FakeModel()
    starts = [[rng.randint(1, 9) for _ in range(rng.randint(0, 14))] for _ in range(4)]
    live: list[Request] = []
    for i in range(1500):
        prompt = rng.choice(starts) + [rng.randint(1, 9) for _ in range(rng.randint(1, 10))]
        r = req(f"r{i}", prompt, max_tokens=rng.randint(1, 12), salt=rng.choice([None, None, "t"]))
        s.add(r)
        live.append(r)
        if rng.random() < 0.6:
            step(s, model, token=lambda r: rng.choice([3, 3, 3, 4, EOS]))
        if rng.random() < 0.2:
            s.finish(rng.choice(live), FinishReason.ABORT)
        live = [x for x in live if not x.finished]
        assert_blocks_accounted(s)
    run_all(s, model)
    assert s.kv.num_free_blocks == s.kv.num_blocks and s.kv.usage == 0.0
    assert s.num_cached_tokens > 0 and s.num_preemptions > 0
