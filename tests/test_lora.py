"""Mixed-adapter batches against PEFT run adapter by adapter, on a tiny seeded model."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorafleet.engine.adapter_store import AdapterStoreConfig
from lorafleet.engine.adapters import RETRY_MAX_S, ServedAdapters, open_adapters
from lorafleet.engine.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lorafleet.engine.llm_engine import LLMEngine
from lorafleet.engine.registry import Registry
from lorafleet.engine.request import SamplingParams
from tests.plugins.tiny_models import ALL, make_peft_adapter

# (rank, alpha, rsLoRA, targets): mixed ranks, scalings and target sets.
ADAPTERS = [
    (1, 2, False, ALL),
    (2, 4, False, ["q_proj", "v_proj"]),
    (4, 8, True, ALL),
    (8, 16, False, ["gate_proj", "up_proj", "down_proj"]),
    (16, 8, False, ALL),
    (3, 3, False, ["o_proj", "k_proj"]),
    (8, 32, True, ["q_proj", "down_proj"]),
    (5, 10, False, ALL),
]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
TEXTS = ["The quick brown", "Serving many adapters", "a", "Continuous batching lets requests join"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")  # laid out as --adapter-dir: <namespace>/<name>/
    return {
        f"tenant/a{i}": make_peft_adapter(tiny_llama_dir, root / "tenant" / f"a{i}", *spec, seed=i)
        for i, spec in enumerate(ADAPTERS)
    }


def served(model_dir: Path, adapter_root: Path) -> ServedAdapters:
    adapters = open_adapters(
        model_dir, AdapterStoreConfig(max_rank=16), "tiny", adapter_dir=str(adapter_root)
    )
    assert adapters is not None
    return adapters


def peft_reference(base_dir: Path, adapter_dir: Path | None, prompts: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    outs = []
    for p in prompts:
        ids = model.generate(input_ids=torch.tensor([p]), max_new_tokens=GREEDY.max_tokens, do_sample=False)
        outs.append(ids[0, len(p) :].tolist())
    return outs


def lora_engine(model_dir: Path, adapter_dirs: dict[str, Path], slots: int = 8) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(model_dir),
            max_model_len=128,
            cache=CacheConfig(block_size=4, kv_cache_bytes=2 << 20),
            scheduler=SchedulerConfig(max_num_batched_tokens=48, max_num_seqs=16),
            lora=LoRAConfig(max_loras=slots, max_rank=16),
        ),
        model_dir=model_dir,
        adapters=served(model_dir, next(iter(adapter_dirs.values())).parent.parent),
    )


@pytest.mark.parametrize("slots", [8, 3])
def test_mixed_adapter_batch_matches_peft_adapter_by_adapter(tiny_llama_dir, adapter_dirs, slots):
    eng = lora_engine(tiny_llama_dir, adapter_dirs, slots)
    prompts = [eng.tokenizer.encode(t) for t in TEXTS]
    names: list[str | None] = [*adapter_dirs, None]
    reqs = []
    for i, name in enumerate(names * 2):  # every adapter twice, interleaved, plus base requests
        reqs.append(
            (name, i % len(prompts), eng.add_request(prompts[i % len(prompts)], GREEDY, adapter_id=name))
        )
    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.token_ids)
            assert o.error is None
    expected = {
        name: peft_reference(tiny_llama_dir, adapter_dirs[name] if name else None, prompts) for name in names
    }
    for name, p, req in reqs:
        assert got[req.request_id] == expected[name][p], f"adapter {name}, prompt {TEXTS[p]!r}"
    base = expected[None]
    assert sum(expected[n] != base for n in adapter_dirs) >= 6, "the adapters barely change the output"
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_prefix_cache_shares_kv_only_within_one_adapter(tiny_llama_dir, adapter_dirs):
    """The same prompt under every adapter and the base model, twice: the second round reuses
    each adapter's own blocks (LoRA on q/k/v/o changes them) and still matches PEFT."""
    eng = lora_engine(tiny_llama_dir, adapter_dirs)
    prompt = eng.tokenizer.encode(" ".join(TEXTS))
    names: list[str | None] = [*adapter_dirs, None]
    for round in range(2):
        reqs = {name: eng.add_request(prompt, GREEDY, adapter_id=name) for name in names}
        got: dict[str, list[int]] = {}
        while eng.has_unfinished():
            for o in eng.step():
                got.setdefault(o.request_id, []).extend(o.token_ids)
        for name, req in reqs.items():
            want = peft_reference(tiny_llama_dir, adapter_dirs[name] if name else None, [prompt])[0]
            assert got[req.request_id] == want, f"adapter {name}, round {round}"
            assert req.num_cached_tokens == (0 if round == 0 else len(prompt) - 1)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_base_model_name_overrides_the_model_directorys_name(tiny_llama_dir, adapter_dirs, tmp_path):
    """In a pod the model directory is an S3 cache entry or a PVC path whose name is not the one
    adapters record; the operator passes the name it validated them against."""
    pvc = tmp_path / "models"
    pvc.symlink_to(tiny_llama_dir)
    root = adapter_dirs["tenant/a0"].parent.parent
    for name, state in [(None, "failed"), (tiny_llama_dir.name.upper(), "ready")]:
        adapters = open_adapters(pvc, AdapterStoreConfig(max_rank=16), "tiny", name, adapter_dir=str(root))
        assert adapters is not None
        try:
            adapters.store.request("tenant/a0")
            status = adapters.store.wait("tenant/a0", 30)
            assert status.state == state, status.error
            if state == "failed":
                assert "BaseModelMismatch" in repr(status.error), status.error
        finally:
            adapters.close()


class StubStore:
    """The slice of AdapterStore that ServedAdapters reads: one adapter, its state and version."""

    def __init__(self) -> None:
        self.state, self.version, self.loads = "absent", "v1", 0
        self.registry = Registry("tiny")

    def status(self, adapter_id: str) -> Any:
        return SimpleNamespace(state=self.state, version=self.version, error=None, retryable=True)

    def request(self, adapter_id: str) -> None:
        if self.state in ("absent", "failed"):  # single-flight: nothing new while one loads
            self.state, self.loads = "loading", self.loads + 1

    def get(self, adapter_id: str) -> Any:
        return SimpleNamespace(version=self.version) if self.state == "ready" else None


def test_served_adapters_hand_out_only_the_keys_version():
    store = StubStore()
    served = ServedAdapters(store)  # type: ignore[arg-type]
    store.state = "ready"
    assert served.get("ns/a@v1") is not None and served.current("ns/a@v1") == "ns/a@v1"
    store.version = "v2@2026"  # republished (a version may hold "@"; an adapter id may not)
    assert served.get("ns/a@v1") is None
    assert served.current("ns/a@v1") == "ns/a@v2@2026" and served.get("ns/a@v2@2026") is not None


def test_loads_of_a_failing_adapter_back_off(monkeypatch):
    """A retry that is still loading must not reset the backoff: each failure waits longer."""
    clock = [0.0]
    monkeypatch.setattr("lorafleet.engine.adapters.time.monotonic", lambda: clock[0])
    store = StubStore()
    served = ServedAdapters(store)  # type: ignore[arg-type]
    starts = []
    for _ in range(200):  # 20 s of scheduler steps; every load fails 0.2 s after it starts
        served.load("ns/a@v1")
        if store.state == "loading" and (not starts or starts[-1][1] != store.loads):
            starts.append((clock[0], store.loads))
        if store.state == "loading" and clock[0] - starts[-1][0] >= 0.2:
            store.state = "failed"
        clock[0] += 0.1
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(starts)]
    # Doubling from RETRY_MIN_S up to RETRY_MAX_S (each gap also holds the 0.2 s of the failed load).
    assert len(starts) <= 9 and all(b >= a - 0.15 for a, b in itertools.pairwise(gaps)), starts
    assert RETRY_MAX_S - 1 <= gaps[-1] <= RETRY_MAX_S + 0.5, starts
