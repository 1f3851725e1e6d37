"""Per-request sampling over a batch of logits: greedy, temperature, top-k, top-p and seeds.

Greedy rows take an argmax together. Sampled rows share the vectorized filtering; only the
random draw is per row, from that request's own generator, so a seeded request produces the
same tokens whatever else is in the batch.

A sampled row that verifies a speculative draft token d keeps d with probability p(d), and
otherwise draws from p with d taken out (rejection sampling with a one-token draft, as in
speculative sampling): either way the token is distributed exactly as p.
"""

from __future__ import annotations

import torch

from .request import SamplingParams


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    drafts: list[int | None] | None = None,
) -> list[int]:
    """`logits` is [S, V] float32; `generators[i]` draws row i's random numbers; `drafts[i]` is
    the draft token row i verifies, if any (greedy rows verify by the argmax alone)."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows)
        picked = _sample_rows(
            logits.index_select(0, idx),
            [params[i] for i in rows],
            [generators[i] for i in rows],
            [drafts[i] for i in rows] if drafts is not None else [None] * len(rows),
        )
        tokens.index_copy_(0, idx, picked)
    return tokens.tolist()


def _sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator], drafts: list[int | None]
) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
    logits = logits / temps
    top_k = [p.top_k for p in params]
    if any(top_k):
        k = torch.tensor([kk if kk else logits.shape[-1] for kk in top_k])[:, None].clamp(
            max=logits.shape[-1]
        )
        kth = logits.sort(dim=-1, descending=True).values.gather(1, k - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)[:, None]
    if (top_p < 1.0).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    kept: dict[int, int] = {}
    for row, (d, g) in enumerate(zip(drafts, gens)):
        if d is not None:
            if torch.rand((), generator=g).item() < probs[row, d].item():
                kept[row] = d
            else:
                probs[row, d] = 0.0  # rejected: the race below draws from the rest of p
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one generator per row.
    noise = torch.stack([torch.empty(probs.shape[-1]).exponential_(generator=g) for g in gens])
    tokens = (probs / noise).argmax(dim=-1)
    for row, d in kept.items():
        tokens[row] = d
    return tokens
