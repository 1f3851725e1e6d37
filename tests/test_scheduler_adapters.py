"""Adapter-aware scheduling with fake model outputs and a fake adapter store: no torch here.

Slots bound the adapters per step, cold adapters wait without stalling anyone, failed loads
fail only their own requests, and under saturating load every adapter gets its share.
"""

from __future__ import annotations

from collections import Counter

from lorafleet.engine.config import SchedulerConfig
from lorafleet.engine.kv_cache import KVCacheManager
from lorafleet.engine.request import FinishReason, Request, SamplingParams
from lorafleet.engine.scheduler import ADAPTER_RETRY_S, PREFETCH_DEPTH, AdapterFailure, Scheduler


class FakeAdapters:
    """Adapters are ready, loading (until `finish_load`), or failed; counts load() calls."""

    def __init__(self, ready: set[str] | None = None) -> None:
        self.ready = set(ready or ())
        self.failed: dict[str, AdapterFailure] = {}
        self.loads: Counter[str] = Counter()
        self.republished: dict[str, str] = {}  # old key -> the key the name resolves to now

    def get(self, adapter: str) -> object | None:
        return f"weights of {adapter}" if adapter in self.ready else None

    def load(self, adapter: str) -> None:
        self.loads[adapter] += 1

    def error(self, adapter: str) -> AdapterFailure | None:
        return self.failed.get(adapter)

    def finish_load(self, adapter: str) -> None:
        self.ready.add(adapter)

    def current(self, adapter: str) -> str:
        return self.republished.get(adapter, adapter)


def make(
    adapters: FakeAdapters, slots: int, budget: int = 64, max_seqs: int = 8, blocks: int = 512
) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, admission_watermark=0)
    return Scheduler(cfg, KVCacheManager(blocks, 4), 256, [0], adapters, num_slots=slots)


_ids = iter(range(10**9))


def req(adapter: str | None, max_tokens: int = 8) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return Request(f"r{next(_ids)}", [1, 2, 3, 4], params, adapter_id=adapter)


def step(s: Scheduler):
    out = s.schedule()
    s.update(out, {c.request.request_id: [7] for c in out.chunks if c.samples})
    return out


def test_distinct_adapters_per_step_are_bounded_by_the_slots():
    names = [f"ns/a{i}" for i in range(10)]
    s = make(FakeAdapters(set(names)), slots=3)
    for i in range(60):
        s.add(req(names[i % 10]))
    slot_owner: dict[int, str] = {}
    while s.has_work():
        out = step(s)
        for slot, adapter, weights in out.slot_loads:
            assert weights == f"weights of {adapter}"
            # A slot is only reloaded when no running request still reads it.
            assert not any(r.adapter_id == slot_owner.get(slot) for r in s.running if r not in out.chunks)
            slot_owner[slot] = adapter
        slots = {c.slot for c in out.chunks}
        assert len(slots) <= 3 and None not in slots
        for c in out.chunks:  # every token reads the slot its adapter was loaded into
            assert slot_owner[c.slot] == c.request.adapter_id
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_a_cold_adapter_waits_while_everyone_else_keeps_going():
    adapters = FakeAdapters({"ns/warm"})
    s = make(adapters, slots=2)
    cold = [req("ns/cold") for _ in range(3)]
    for r in cold:
        s.add(r)
    warm = [req("ns/warm", max_tokens=50) for _ in range(2)] + [req(None, max_tokens=50)]
    for r in warm:
        s.add(r)
    for _ in range(5):
        out = step(s)
        assert {c.request.adapter_id for c in out.chunks} == {"ns/warm", None}
    assert all(len(r.output_token_ids) == 5 for r in warm)
    assert adapters.loads["ns/cold"] >= 1 and all(not r.output_token_ids for r in cold)
    adapters.finish_load("ns/cold")
    out = step(s)
    assert {c.request.adapter_id for c in out.chunks} == {"ns/warm", None, "ns/cold"}
    assert [a for _, a, _ in out.slot_loads] == ["ns/cold"]


def test_requests_queued_across_a_republish_run_on_the_new_version_in_its_own_slot():
    """A slot is named after the version of the weights in it. Requests that waited for v1 while
    v2 was published move to v2 (v1 is gone from every tier), so no slot named v1 ever holds v2's
    weights, and a rollback to v1 cannot be served from one."""
    adapters = FakeAdapters()
    s = make(adapters, slots=2)
    queued = [req("ns/a@v1") for _ in range(2)]
    for r in queued:
        s.add(r)
    step(s)  # v1 is loading
    adapters.republished["ns/a@v1"] = "ns/a@v2"
    adapters.ready.add("ns/a@v2")  # what the store holds now
    loads = [load for _ in range(2) for load in step(s).slot_loads]
    assert [(a, w) for _, a, w in loads] == [("ns/a@v2", "weights of ns/a@v2")]
    assert {r.adapter_id for r in queued} == {"ns/a@v2"} and all(r.output_token_ids for r in queued)
    assert s.slots.slot_of("ns/a@v1") is None


def test_a_failed_load_fails_only_its_own_requests():
    adapters = FakeAdapters({"ns/good"})
    s = make(adapters, slots=2)
    bad = [req("ns/bad") for _ in range(3)]
    good = [req("ns/good") for _ in range(3)]
    for r in bad + good:
        s.add(r)
    step(s)
    adapters.failed["ns/bad"] = AdapterFailure("corrupted safetensors", retryable=False)
    failed = []
    while s.has_work():
        failed += step(s).failed
    assert sorted(r.request_id for r, _ in failed) == sorted(r.request_id for r in bad)
    assert all(f == AdapterFailure("corrupted safetensors", retryable=False) for _, f in failed)
    assert all(r.finish_reason is FinishReason.ERROR for r in bad)
    assert all(r.finish_reason is FinishReason.LENGTH and len(r.output_token_ids) == 8 for r in good)
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_retryable_failures_fail_the_queue_only_once_they_outlast_the_bound(monkeypatch):
    """S3 down: the queue waits while loads are retried (a blip fails nobody), and fails, saying
    why and that it may be retried, once the failures have lasted ADAPTER_RETRY_S."""
    clock = [0.0]
    monkeypatch.setattr("lorafleet.engine.scheduler.time.monotonic", lambda: clock[0])
    adapters = FakeAdapters()
    s = make(adapters, slots=2)
    down = AdapterFailure("adapter ns/far (version v1): cannot reach S3; retry when S3 is back", True)
    blip, first = req("ns/blip"), req("ns/far")
    s.add(blip)
    s.add(first)
    adapters.failed = {"ns/blip": down, "ns/far": down}
    step(s)
    clock[0] = 10.0
    second = req("ns/far")
    s.add(second)
    adapters.failed = {}  # retries are loading: still the same outage
    step(s)
    adapters.finish_load("ns/blip")
    clock[0] = ADAPTER_RETRY_S - 1
    adapters.failed["ns/far"] = down
    assert not step(s).failed and blip.output_token_ids and s.num_waiting == 2
    clock[0] = ADAPTER_RETRY_S
    failed = step(s).failed
    assert [r for r, _ in failed] == [first, second] and first.finish_reason is FinishReason.ERROR
    assert failed[0][1] == AdapterFailure(f"{down.message} (still failing after 30 s; retry later)", True)
    third = req("ns/far")  # a new wait: it gets its own ADAPTER_RETRY_S of retries
    s.add(third)
    clock[0] += 1
    assert not step(s).failed and s.num_waiting == 1


def test_prefetch_starts_loads_before_an_adapters_turn():
    adapters = FakeAdapters()
    s = make(adapters, slots=1, max_seqs=1)
    names = [f"ns/p{i}" for i in range(PREFETCH_DEPTH + 2)]
    for name in names:
        s.add(req(name))
    s.schedule()
    assert all(adapters.loads[n] >= 1 for n in names[:PREFETCH_DEPTH])
    assert all(adapters.loads[n] == 0 for n in names[PREFETCH_DEPTH + 1 :])


def test_a_flood_for_one_adapter_does_not_starve_a_trickle_for_another():
    s = make(FakeAdapters({"ns/flood", "ns/trickle"}), slots=2, max_seqs=4)
    for _ in range(400):
        s.add(req("ns/flood"))
    waits = []
    trickle: list[tuple[int, Request]] = []
    for t in range(300):
        if t % 20 == 0:
            r = req("ns/trickle")
            s.add(r)
            trickle.append((t, r))
        step(s)
        for arrived, r in list(trickle):
            if r.output_token_ids:
                waits.append(t - arrived)
                trickle.remove((arrived, r))
    # Round-robin admission: a trickle request waits at most for one running request to finish.
    assert len(waits) == 15 and max(waits) <= 10, waits


def test_more_adapters_than_slots_each_get_their_share_in_every_window():
    k, slots, window = 6, 2, 200
    names = [f"ns/k{i}" for i in range(k)]
    s = make(FakeAdapters(set(names)), slots=slots, max_seqs=8, budget=64)
    tokens: list[Counter[str]] = []
    for t in range(2000):
        for name in names:  # saturating: every adapter always has work queued
            if len(s.queues.get(name, ())) < 4:
                s.add(req(name, max_tokens=8))
        if t % window == 0:
            tokens.append(Counter())
        out = step(s)
        for c in out.chunks:
            if c.samples:
                tokens[-1][c.request.adapter_id] += 1
    for i, counts in enumerate(tokens[1:], start=1):  # the first window is warm-up
        fair = sum(counts.values()) / k
        assert min(counts[n] for n in names) >= fair / 2, f"window {i}: {dict(counts)}"
