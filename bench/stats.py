"""Per-request timings and their summaries. Pure Python: no torch, no I/O.

Every system under test reports one `RequestTiming` per request, with times measured from the
moment the whole workload was submitted, so that systems are compared on the same clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RequestTiming:
    """One finished request. Times are seconds since the workload was submitted."""

    num_tokens: int  # generated tokens, including the EOS token when the request stopped on it
    first_token_s: float
    finish_s: float  # when the last token came out

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None when only one token was generated."""
        if self.num_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.num_tokens - 1)


@dataclass(frozen=True)
class ThroughputSummary:
    tok_s: float  # generated tokens per wall-clock second of the whole run
    ttft_p50_s: float  # median time to first token
    # Median over requests of their mean time per output token; None when no request had two tokens.
    tpot_p50_s: float | None
    tokens: int  # generated tokens, all requests
    seconds: float  # wall-clock time from submission to the last request's completion

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@dataclass(frozen=True)
class SystemRun:
    """What one system under test produced for the whole workload."""

    token_ids: list[list[int]]  # generated ids per request, in workload order; kept to compare systems
    timings: list[RequestTiming]  # in workload order
    seconds: float  # wall clock from submission to the last completion
    cached_prompt_tokens: int | None = None  # prompt tokens served from a prefix cache; None: it has none

    def summary(self) -> ThroughputSummary:
        return summarize(self.timings, self.seconds)


def median_run(runs: Sequence[SystemRun]) -> SystemRun:
    """The run with the median throughput (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r.summary().tok_s)[(len(runs) - 1) // 2]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(timings: Sequence[RequestTiming], seconds: float) -> ThroughputSummary:
    """Throughput and median latencies of one run of `seconds` wall-clock time."""
    if not timings:
        raise ValueError("no requests to summarize")
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    tokens = sum(t.num_tokens for t in timings)
    tpots = [t.tpot_s for t in timings if t.tpot_s is not None]
    return ThroughputSummary(
        tok_s=tokens / seconds,
        ttft_p50_s=percentile([t.first_token_s for t in timings], 50),
        tpot_p50_s=percentile(tpots, 50) if tpots else None,
        tokens=tokens,
        seconds=seconds,
    )
