"""Speculative decoding with n-gram drafts: the proposer, the acceptance rule, and the scheduler
verifying drafts with a fake deterministic model. No torch in this file."""

from __future__ import annotations

import random

import pytest

from lorafleet.engine.config import SchedulerConfig
from lorafleet.engine.kv_cache import KVCacheManager
from lorafleet.engine.request import FinishReason, Request, SamplingParams
from lorafleet.engine.scheduler import Scheduler, SchedulerOutput
from lorafleet.engine.speculative import accept, propose

EOS = 0


def test_propose_takes_the_longest_most_recent_match():
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 1, 5, 6, 8, 2, 5, 6]
    assert propose(tokens, 3, 1, 4) == [8, 2, 5]  # "5 6" last seen at 4, followed by 8 2 5
    assert propose(tokens, 1, 1, 4) == [8]
    assert propose([1, 2, 3, 9, 2, 3, 4, 3], 2, 1, 4) == [4, 3]  # "3" alone: most recent is at 5
    # A longer match wins over a more recent shorter one: "1 2" at 0 beats "2" at 3.
    assert propose([1, 2, 7, 2, 8, 1, 2], 1, 1, 4) == [7]


def test_propose_finds_nothing_when_nothing_repeats():
    assert propose([1, 2, 3, 4], 4, 1, 4) == []
    assert propose([4], 4, 1, 4) == []
    assert propose([], 4, 1, 4) == []
    assert propose([1, 2, 9, 2], 4, 2, 4) == []  # only a 1-gram repeats, and min_n is 2
    assert propose([1, 2, 9, 2], 4, 1, 4) == [9, 2]  # proposals stop at the end of the context


def naive_propose(tokens, k, min_n, max_n):
    for n in range(max_n, min_n - 1, -1):
        for i in range(len(tokens) - n - 1, -1, -1):  # latest start first, a token must follow
            if n < len(tokens) and tokens[i : i + n] == tokens[len(tokens) - n :]:
                return tokens[i + n : i + n + k]
    return []


def test_propose_agrees_with_a_plain_scan():
    rng = random.Random(0)
    for _ in range(2000):
        tokens = [rng.randrange(rng.choice([2, 5, 50])) for _ in range(rng.randrange(0, 40))]
        k, lo = rng.randint(1, 5), rng.randint(1, 3)
        hi = rng.randint(lo, 5)
        assert propose(tokens, k, lo, hi) == naive_propose(tokens, k, lo, hi), (tokens, k, lo, hi)


def test_accept_keeps_the_agreeing_prefix_and_the_models_next_token():
    assert accept([], [9]) == [9]
    assert accept([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]
    assert accept([4, 5, 6], [4, 9, 6, 7]) == [4, 9]
    assert accept([4, 5, 6], [8, 5, 6, 7]) == [8]
    with pytest.raises(ValueError, match="verified"):
        accept([4, 5], [4, 5])


def rule(context: list[int]) -> int:
    """A fake model: a periodic text with a twist, so n-gram guesses are sometimes right and
    sometimes wrong."""
    last = context[-1]
    return 1 + (last * 3 + len(context) // 7) % 6


def make(num_blocks=64, block_size=4, budget=64, max_seqs=8, spec=3, spec_seqs=4, max_len=256):
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, admission_watermark=0,
        num_speculative_tokens=spec, speculative_max_seqs=spec_seqs,
    )  # fmt: skip
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size), max_model_len=max_len, eos_token_ids=[EOS])


def verify(out: SchedulerOutput) -> dict[str, list[int]]:
    """What the model runner returns: the model's token after the known tokens and after each
    draft prefix."""
    sampled = {}
    for c in out.chunks:
        if c.samples:
            known = c.request.all_token_ids
            sampled[c.request.request_id] = [rule(known + c.draft[:i]) for i in range(len(c.draft) + 1)]
    return sampled


def run(s: Scheduler, reqs: list[Request], max_steps=10_000) -> list[SchedulerOutput]:
    for r in reqs:
        s.add(r)
    outs = []
    while s.has_work():
        out = s.schedule()
        for c in out.chunks:
            if c.draft:  # only a decode guesses: one known token, then the guesses
                assert c.start == c.request.num_tokens - 1 and c.num_tokens == 1 + len(c.draft)
            else:
                assert c.num_tokens <= c.request.num_tokens - c.start
            assert len(c.draft) <= s.config.num_speculative_tokens
            assert c.start + c.num_tokens <= s.max_model_len
            assert s.kv.blocks_for(c.start + c.num_tokens) <= len(c.block_table)
        assert out.num_tokens <= s.config.max_num_batched_tokens
        s.update(out, verify(out))
        for c in out.chunks:  # a sampling chunk leaves exactly its last token to compute
            if c.samples and c.request in s.running:
                assert c.request.num_computed_tokens == c.request.num_tokens - 1
        outs.append(out)
        assert len(outs) < max_steps
    return outs


def greedy(rid, prompt, max_tokens=40, **kw):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw))


PROMPTS = [[1, 2, 3, 4, 5, 6, 1, 2], [3], [2, 2, 2, 2, 2], [6, 5, 4, 3, 2, 1, 6, 5, 4]]


def test_drafts_change_the_steps_but_not_the_tokens():
    plain, spec = make(spec=0), make(spec=3)
    a = [greedy(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    b = [greedy(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    plain_steps, spec_steps = run(plain, a), run(spec, b)
    assert [r.output_token_ids for r in b] == [r.output_token_ids for r in a]
    assert all(len(r.output_token_ids) == 40 and r.finish_reason is FinishReason.LENGTH for r in b)
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens
    assert len(spec_steps) < len(plain_steps)
    assert plain.num_draft_tokens == 0
    assert spec.kv.num_free_blocks == spec.kv.num_blocks


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 17])
def test_drafts_stop_at_max_tokens_and_the_context_length(max_tokens):
    s = make(spec=4, max_len=30)
    reqs = [greedy("a", [1, 2, 3, 4, 1, 2, 3], max_tokens), greedy("b", [2, 2, 2, 2], 100)]
    run(s, reqs)
    assert len(reqs[0].output_token_ids) == max_tokens
    assert reqs[1].num_tokens == 30 and reqs[1].finish_reason is FinishReason.LENGTH


def test_a_stop_token_inside_the_kept_drafts_ends_the_output_there():
    s = make(spec=4)
    r = greedy("a", [1, 2, 3, 4, 5, 1, 2], 40, stop_token_ids=(4,))
    s.add(r)
    out = s.schedule()  # the prompt, no guesses
    assert [c.draft for c in out.chunks] == [[]]
    assert s.update(out, {"a": [3]}) == {"a": [3]}
    out = s.schedule()
    (chunk,) = out.chunks
    assert chunk.draft == [4, 5, 1, 2]  # "1 2 3" was followed by "4 5 1 2"
    assert chunk.num_tokens == 5 and len(chunk.block_table) == 3  # room for 8 + 4 tokens
    gained = s.update(out, {"a": [4, 5, 1, 2, 3]})  # the model agrees with every guess
    assert gained == {"a": [4]} and r.output_token_ids == [3, 4]
    assert r.finish_reason is FinishReason.STOP and s.kv.num_free_blocks == s.kv.num_blocks


def test_rejected_guesses_leave_the_request_where_the_model_is():
    s = make(spec=4)
    r = greedy("a", [1, 2, 3, 4, 5, 1, 2], 40)
    s.add(r)
    s.update(s.schedule(), {"a": [3]})
    out = s.schedule()
    assert s.update(out, {"a": [4, 5, 6, 9, 9]}) == {"a": [4, 5, 6]}  # two kept, then the model's own
    assert r.output_token_ids == [3, 4, 5, 6]
    assert r.num_computed_tokens == r.num_tokens - 1  # the KV of "6" is not computed yet
    assert (s.num_draft_tokens, s.num_accepted_tokens) == (4, 2)


def test_drafts_for_sampled_requests_but_not_seeded_ones_or_wide_batches():
    drafted = {}
    for seed in (None, 1):
        s = make(spec=3, spec_seqs=2)
        r = Request("t", [1, 2, 1, 2, 1], SamplingParams(max_tokens=20, temperature=0.8, seed=seed))
        s.add(r)
        drafted[seed] = 0
        for _ in range(5):
            out = s.schedule()
            drafted[seed] += sum(len(c.draft) for c in out.chunks)
            s.update(out, {c.request.request_id: [1] * (len(c.draft) + 1) for c in out.chunks if c.samples})
    assert drafted[None] > 0 and drafted[1] == 0
    wide = make(spec=3, spec_seqs=2, max_seqs=8)
    reqs = [greedy(f"r{i}", [1, 2, 1, 2, 1], 30) for i in range(3)]
    for out in run(wide, reqs):
        running = sum(1 for c in out.chunks)
        assert running <= 2 or all(not c.draft for c in out.chunks)


def test_a_draft_never_preempts_anyone():
    # 4 blocks of 4 tokens, two 7-token prompts: after the prompts every block is taken, and the
    # next decode of each still fits its second block, but no guess fits anywhere.
    s = make(num_blocks=4, block_size=4, spec=4)
    reqs = [greedy("a", [1, 2, 1, 2, 1, 2, 1], 10), greedy("b", [2, 1, 2, 1, 2, 1, 2], 10)]
    for r in reqs:
        s.add(r)
    s.update(s.schedule(), {"a": [2], "b": [1]})
    assert s.kv.num_free_blocks == 0
    out = s.schedule()
    assert not out.preempted and [c.draft for c in out.chunks] == [[], []]
    assert propose(reqs[0].all_token_ids, 4, 1, 4)  # there was something to guess
    s.update(out, verify(out))
    assert [len(r.output_token_ids) for r in reqs] == [2, 2]
