"""The sampler's verification of speculative draft tokens keeps each row's distribution."""

from __future__ import annotations

import torch

from lorafleet.engine.request import SamplingParams
from lorafleet.engine.sampler import sample

ROWS = 20_000


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


def test_a_verified_draft_token_leaves_the_distribution_unchanged():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    for params, draft in [
        (SamplingParams(temperature=1.0), 1),  # a likely guess
        (SamplingParams(temperature=1.0), 3),  # an unlikely one
        (SamplingParams(temperature=0.7, top_k=3), 3),  # a guess top-k filters out: never kept
    ]:
        scaled = logits / params.temperature
        if params.top_k:
            scaled = scaled.masked_fill(scaled < scaled.topk(params.top_k).values[-1], float("-inf"))
        p = scaled.softmax(-1).double()
        tokens = sample(logits.expand(ROWS, -1).clone(), [params] * ROWS, [gen] * ROWS, [draft] * ROWS)
        got = frequencies(tokens, logits.numel())
        # Every token within 5 standard deviations of its probability.
        bound = 5 * (p * (1 - p) / ROWS).sqrt() + 1e-3
        assert ((got - p).abs() <= bound).all(), (draft, got, p)
        plain = frequencies(sample(logits.expand(ROWS, -1).clone(), [params] * ROWS, [gen] * ROWS), 5)
        assert ((plain - p).abs() <= bound).all()


def test_greedy_rows_ignore_drafts_and_undrafted_rows_sample_as_before():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, seed=7)]
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(7)]
    with_drafts = sample(logits, params, gens, [2, None])
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(7)]
    assert with_drafts == sample(logits, params, gens) and with_drafts[0] == 1
