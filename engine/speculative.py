"""Speculative decoding with n-gram drafts (prompt lookup). Pure Python: no torch.

At small batches a decode step is bound by reading the weights, so running a few more token
rows through the same pass costs little. The scheduler guesses the next tokens by finding the
request's last few tokens earlier in its own prompt and output and proposing what followed them
there (vLLM's `ngram` method, from "prompt lookup decoding"). The step then computes the known
token and the guesses together, and the longest prefix of guesses that matches what the model
itself picks is kept, plus the model's own token after it. Outputs are unchanged:
- greedy requests keep a guess only where it equals the argmax, so they get the same tokens;
- sampled requests keep a guess d with probability p(d) and otherwise draw from p without d
  (sampler.py), so their tokens follow the same distribution. Seeded requests are not drafted
  for: they promise the same tokens in any batch, and drafting depends on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence


def propose(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the last n tokens of
    `tokens`, trying the longest n in [min_n, max_n] first; [] when nothing matches."""
    size = len(tokens)
    # Search the reversed context, so that list.index (C speed) walks from the most recent token
    # back: a long context with no match costs ~0.1 ms, not a Python loop over every position.
    rev = list(reversed(tokens))
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        tail = rev[:n]
        j = 0  # rev[j : j + n] == tail is an occurrence that ends where tokens[size - j] follows it
        while True:
            try:
                j = rev.index(tail[0], j + 1, size - n + 1)
            except ValueError:
                break
            if rev[j : j + n] == tail:
                return list(tokens[size - j : size - j + k])
    return []


def accept(draft: Sequence[int], verified: Sequence[int]) -> list[int]:
    """The tokens a drafted step produces. `verified[i]` is the model's token after the known
    tokens and draft[:i]; the drafts it agrees with are kept, then its first disagreeing token
    (or, when every draft holds, its token after the last one)."""
    if len(verified) != len(draft) + 1:
        raise ValueError(f"{len(draft)} draft tokens need {len(draft) + 1} verified, got {len(verified)}")
    kept = 0
    while kept < len(draft) and draft[kept] == verified[kept]:
        kept += 1
    return list(verified[: kept + 1])
