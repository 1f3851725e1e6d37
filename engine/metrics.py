"""Prometheus metrics of one server: HTTP, latency, engine load, adapters.

Each `Metrics` has its own `CollectorRegistry`, so two apps in one process (tests) never share
counters. Besides LoRAFleet's own names it exports the gauges of the Gateway API Inference
Extension's model-server protocol (`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`,
`vllm:lora_requests_info`, ...), which an endpoint picker scrapes to route requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds; CPU tests and GPU serving both land inside these ranges.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's load at one moment, as published by the engine thread."""

    num_waiting: int
    num_running: int
    kv_usage: float  # fraction of KV blocks in use, 0.0 to 1.0
    running_adapters: frozenset[str]
    waiting_adapters: frozenset[str]
    num_draft_tokens: int = 0  # speculative guesses computed since start
    num_accepted_tokens: int = 0  # ... and kept
    num_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache since start
    num_cached_tokens: int = 0  # ... and found there


if TYPE_CHECKING:
    from .adapter_store import AdapterStoreStats


class AdapterMetrics:
    """The hook the adapter store fills: residency per tier, hits and misses, load latency.

    Tiers are "gpu", "cpu", "disk"; loads are labelled by the tier they came from ("cpu",
    "disk", "s3"). The server only defines these; it never sets them.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.resident = Gauge(
            "lorafleet_adapters_resident", "Adapters resident per tier", ["tier"], registry=r
        )
        self.resident_bytes = Gauge(
            "lorafleet_adapters_resident_bytes", "Bytes of adapter weights per tier", ["tier"], registry=r
        )
        self.hits = Counter(
            "lorafleet_adapter_cache_hits", "Adapter lookups served by a tier", ["tier"], registry=r
        )
        self.misses = Counter(
            "lorafleet_adapter_cache_misses", "Adapter lookups a tier missed", ["tier"], registry=r
        )
        self.evictions = Counter(
            "lorafleet_adapter_evictions", "Adapters evicted from a tier", ["tier"], registry=r
        )
        self.load_seconds = Histogram(
            "lorafleet_adapter_load_seconds", "Time to make an adapter GPU-ready, by source tier",
            ["source"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.load_failures = Counter(
            "lorafleet_adapter_load_failures", "Failed adapter loads", ["source"], registry=r
        )
        self.active = Gauge("lorafleet_adapters_active", "Adapters with running requests", registry=r)
        self.waiting = Gauge("lorafleet_adapters_waiting", "Adapters with only waiting requests", registry=r)
        self.max_lora = 0  # GPU adapter slots; reported in vllm:lora_requests_info
        self._seen: dict[str, dict[str, int]] = {}  # the store's cumulative counts already exported

    def observe(self, s: AdapterStoreStats, slotted: int, active: int, waiting: int) -> None:
        """Export a snapshot of the store's counters; `slotted`: adapters in GPU slots; `active`:
        adapters with running requests; `waiting`: adapters whose requests all wait."""
        self.resident.labels("gpu").set(slotted)
        self.active.set(active)
        self.waiting.set(waiting)
        for tier in ("cpu", "disk"):
            self.resident.labels(tier).set(s.resident.get(tier, 0))
            self.resident_bytes.labels(tier).set(s.resident_bytes.get(tier, 0))
        for name, counter, counts in (
            ("hits", self.hits, s.hits), ("misses", self.misses, s.misses), ("evictions", self.evictions, s.evictions),
            ("failures", self.load_failures, s.load_failures),
        ):  # fmt: skip
            seen = self._seen.setdefault(name, {})
            for label, n in counts.items():
                counter.labels(label).inc(max(0, n - seen.get(label, 0)))
                seen[label] = n
        seen = self._seen.setdefault("loads", {})
        for source, n in s.loads.items():
            samples = s.load_seconds.get(source, ())
            for seconds in list(samples)[len(samples) - min(len(samples), n - seen.get(source, 0)) :]:
                self.load_seconds.labels(source).observe(seconds)
            seen[source] = n


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "lorafleet_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.ttft = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "lorafleet_time_per_output_token_seconds", "Mean time between output tokens, per request",
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "lorafleet_e2e_request_latency_seconds",
            "Arrival to last token, or to the end of a request that did not finish",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter("lorafleet_generation_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("lorafleet_prompt_tokens", "Prompt tokens processed", registry=r)
        self.inflight = Gauge(
            "lorafleet_server_requests_inflight", "Requests admitted by the server", registry=r
        )
        self.queue_depth = Gauge("lorafleet_queue_depth", "Requests waiting in the engine", registry=r)
        self.running = Gauge("lorafleet_requests_running", "Requests running in the engine", registry=r)
        self.kv_usage = Gauge(
            "lorafleet_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r
        )
        # The Gateway API Inference Extension model-server protocol (vLLM's names).
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests in the running batch", registry=r)
        self.vllm_kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "KV cache usage; 1 means 100 percent", registry=r
        )
        self.vllm_gpu_kv_usage = Gauge(
            "vllm:gpu_cache_usage_perc", "Older name of kv_cache_usage_perc", registry=r
        )
        self.vllm_lora_info = Gauge(
            "vllm:lora_requests_info", "Last update time (unix seconds) of the running and waiting adapters",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r,
        )  # fmt: skip
        # Speculative decoding: accepted / draft is the acceptance rate (vLLM's spec_decode counters).
        self.draft_tokens = Counter(
            "lorafleet_spec_decode_draft_tokens", "Speculative draft tokens computed", registry=r
        )
        self.accepted_tokens = Counter(
            "lorafleet_spec_decode_accepted_tokens",
            "Speculative draft tokens the model agreed with",
            registry=r,
        )
        # Prefix caching: hits / queries is the hit rate (vLLM's prefix_cache_* counters).
        self.prefix_queries = Counter(
            "lorafleet_prefix_cache_queries", "Prompt tokens of admitted requests looked up in the prefix cache",
            registry=r,
        )  # fmt: skip
        self.prefix_hits = Counter(
            "lorafleet_prefix_cache_hits", "Tokens found in the prefix cache (their KV not computed again)",
            registry=r,
        )  # fmt: skip
        self._totals: dict[Counter, float] = {}  # what the engine's running totals were last seen at
        self.adapters = AdapterMetrics(r)

    def observe_engine(self, s: EngineSnapshot) -> None:
        for gauge, value in (
            (self.queue_depth, s.num_waiting), (self.vllm_waiting, s.num_waiting),
            (self.running, s.num_running), (self.vllm_running, s.num_running),
            (self.kv_usage, s.kv_usage), (self.vllm_kv_usage, s.kv_usage), (self.vllm_gpu_kv_usage, s.kv_usage),
        ):  # fmt: skip
            gauge.set(value)
        for counter, total in (
            (self.draft_tokens, s.num_draft_tokens), (self.accepted_tokens, s.num_accepted_tokens),
            (self.prefix_queries, s.num_queried_tokens), (self.prefix_hits, s.num_cached_tokens),
        ):  # fmt: skip
            seen = self._totals.get(counter, 0)
            if total > seen:
                counter.inc(total - seen)
                self._totals[counter] = total
        # One series only: the endpoint picker reads the newest one, so old label sets must go.
        self.vllm_lora_info.clear()
        self.vllm_lora_info.labels(
            max_lora=str(self.adapters.max_lora),
            running_lora_adapters=",".join(sorted(s.running_adapters)),
            waiting_lora_adapters=",".join(sorted(s.waiting_adapters)),
        ).set(time.time())

    def observe_request(
        self, arrival: float, first_token: float | None, last_token: float | None, end: float, num_tokens: int
    ) -> None:
        """Latencies of one request, finished or not (timed out, failed, client gone), from
        `time.monotonic()` stamps. Its tokens are counted in `generated_tokens` as they come."""
        self.e2e.observe(end - arrival)
        if first_token is not None and last_token is not None:
            self.ttft.observe(first_token - arrival)
            if num_tokens > 1:
                self.tpot.observe((last_token - first_token) / (num_tokens - 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
