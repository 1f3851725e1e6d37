"""Multi-LoRA serving: the base model alone, LoRAFleet with 1 to K adapters, and PEFT's mixed batches.

Random rank-R adapters on all 7 projections (lora_adapters) are uploaded to a local S3 server
(`weed mini` on loopback) and served through a registry of s3:// URIs, with a CPU tier and a
disk tier, as in production. Each request's adapter is drawn with Zipf popularity. Every
request generates exactly M tokens (EOS ignored), so that adapters, which change what the model
says, never change how much work a system does. Systems run one after another in this process
on the same prompt token ids; model loading, engine construction and the loading of the
workload's adapters into memory are not timed, and every system first runs an untimed warm-up.
The engine systems run in `rounds` interleaved rounds (base, lorafleet_1, ..., base, ...) and
each reports its median round, so that the machine's drift over minutes (base alone has moved by
±7% between runs here) lands on every system alike instead of on whichever ran at a bad moment;
peft_mixed, the slowest by far, runs once. Cold loads (lora_cold) and fairness under a
saturating load with one adapter flooding (lora_fairness) are measured apart.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from lorafleet.engine.adapter_store import AdapterStore, AdapterStoreConfig
from lorafleet.engine.adapters import ServedAdapters, base_spec
from lorafleet.engine.config import DTYPES, CacheConfig, EngineConfig, LoRAConfig
from lorafleet.engine.llm_engine import LLMEngine
from lorafleet.engine.registry import RegistryWatcher
from lorafleet.engine.request import SamplingParams
from lorafleet.engine.weed import WeedS3

from .hf_baselines import STATIC_BATCH_SIZE, load_hf_model, run_hf_static
from .lora_adapters import PublishedAdapters, adapter_id, publish_adapters, zipf_choices
from .lora_cold import LOAD_TIMEOUT_S, cold_adapter_names, measure_cold_loads
from .lora_fairness import FAIRNESS_ADAPTERS, FairnessResult, measure_fairness
from .report import THROUGHPUT_PANELS, plot_bars, write_json
from .stats import RequestTiming, SystemRun, median_run
from .throughput import prepare_workload

log = logging.getLogger(__name__)

ADAPTER_COUNTS = (8, 64, 512)
SERVED_BASE = "base"


@dataclass(frozen=True)
class LoRABenchConfig:
    model_dir: Path  # local Hugging Face directory
    adapter_counts: tuple[int, ...] = ADAPTER_COUNTS  # one lorafleet_K system per K
    requests: int = 128
    max_new_tokens: int = 128
    rank: int = 16
    zipf_exponent: float = 1.0  # adapter k is drawn with probability ~ 1 / (k + 1)^s
    max_loras: int = 32  # the engine's adapter slots
    peft_adapters: int | None = None  # peft_mixed runs the lorafleet_K workload of this K; default 64
    # or the largest K below it
    systems: tuple[str, ...] = ()  # a subset of the system names; empty: all
    cold_samples: int = 16  # adapters per cold-load measurement
    kv_cache_mib: int = 512  # per engine, as `lorafleet engine --kv-cache-mib`
    dtype: str = "float32"
    prompts_path: Path | None = None
    seed: int = 0
    matmul_seconds: float = 1.0
    rounds: int = 3  # runs of each engine system, interleaved; each reports its median round
    fairness_seconds: float = 60.0  # the saturating fairness run (lora_fairness); 0: skip it
    fairness_window_s: float = 10.0

    def __post_init__(self) -> None:
        if min(self.requests, self.max_new_tokens, self.rank, self.max_loras, self.rounds) < 1:
            raise ValueError(
                "--requests, --max-new-tokens, --rank, --max-loras and --rounds must be at least 1"
            )
        if not self.adapter_counts or min(self.adapter_counts) < 1 or (self.peft_adapters or 1) < 1:
            raise ValueError("adapter counts must be at least 1")
        if self.peft_adapters is None:
            small = [k for k in self.adapter_counts if k <= 64]
            object.__setattr__(self, "peft_adapters", max(small) if small else min(self.adapter_counts))
        unknown = set(self.systems) - set(self.system_names())
        if unknown:
            raise ValueError(
                f"unknown systems {sorted(unknown)}; choose among {', '.join(self.system_names())}"
            )
        if self.fairness_seconds < 0 or self.fairness_window_s <= 0:
            raise ValueError("--fairness-seconds must not be negative and --fairness-window positive")
        if self.kv_cache_mib < 1:
            raise ValueError("--kv-cache-mib must be at least 1")
        if self.cold_samples < 1 or self.zipf_exponent < 0:
            raise ValueError("--cold-samples must be at least 1 and --zipf-exponent not negative")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def system_names(self) -> list[str]:
        return ["base", *(f"lorafleet_{k}" for k in sorted({1, *self.adapter_counts})), "peft_mixed"]

    def workloads(self) -> dict[str, list[int | None]]:
        """System name -> adapter index per request (None: the base model), for the chosen systems."""
        assert self.peft_adapters is not None

        def draw(k: int) -> list[int | None]:
            return list(zipf_choices(self.requests, k, self.zipf_exponent, self.seed))

        work: dict[str, list[int | None]] = {"base": [None] * self.requests}
        work |= {f"lorafleet_{k}": draw(k) for k in sorted({1, *self.adapter_counts})}
        work["peft_mixed"] = draw(self.peft_adapters)
        return {name: w for name, w in work.items() if not self.systems or name in self.systems}


def run_engine(
    engine: LLMEngine, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None], m: int
) -> SystemRun:
    """Every prompt submitted at once, greedy, exactly `m` tokens each; times from submission."""
    params = SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
    start = time.monotonic()  # the engine stamps requests with time.monotonic()
    reqs = [engine.add_request(list(p), params, adapter_id=a) for p, a in zip(prompts, adapters)]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    while engine.has_unfinished():
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed in the engine: {out.error}")
            tokens[out.request_id] += out.token_ids
    seconds = time.monotonic() - start
    timings = [
        RequestTiming(len(tokens[r.request_id]), r.first_token_time - start, r.finish_time - start)  # type: ignore[operator]
        for r in reqs
    ]
    return SystemRun([tokens[r.request_id] for r in reqs], timings, seconds)


class _MixedBatches:
    """Stands in for the model in `run_hf_static`, giving each consecutive batch its adapter names:
    PEFT's mixed-adapter inference, `generate(adapter_names=...)`."""

    def __init__(self, peft: Any, names: Sequence[str]) -> None:
        self.peft, self.names, self.done = peft, names, 0

    def generate(self, **kwargs: Any) -> torch.Tensor:
        n = kwargs["input_ids"].shape[0]
        names = list(self.names[self.done : self.done + n])
        self.done += n
        return self.peft.generate(**kwargs, adapter_names=names)


def _peft_name(adapter: str) -> str:
    return adapter.replace("/", "--")  # PEFT adapter names become module attribute keys


class Bench:
    """The S3 server, the published adapters and the disk tier shared by every system's store."""

    def __init__(
        self, config: LoRABenchConfig, work_dir: Path, s3: WeedS3, published: PublishedAdapters
    ) -> None:
        self.config, self.work_dir, self.s3, self.published = config, work_dir, s3, published
        self.base = base_spec(config.model_dir, config.rank)

    def store(self, disk_dir: Path) -> AdapterStore:
        store_config = AdapterStoreConfig(
            disk_dir=disk_dir, max_rank=self.config.rank, s3_endpoint_url=self.s3.endpoint_url
        )
        registry = self.published.registry
        return AdapterStore(store_config, self.base, registry, s3_client=self.s3.client())

    def engine(self, adapters: ServedAdapters | None) -> LLMEngine:
        c = self.config
        lora = LoRAConfig(max_loras=c.max_loras, max_rank=c.rank) if adapters is not None else None
        cache = CacheConfig(kv_cache_bytes=c.kv_cache_mib << 20)
        config = EngineConfig(model=str(c.model_dir), dtype=c.dtype, cache=cache, lora=lora)
        return LLMEngine(config, c.model_dir, adapters)

    def served(self, disk_dir: Path) -> ServedAdapters:
        return ServedAdapters(
            self.store(disk_dir), RegistryWatcher(self.published.registry_path), SERVED_BASE
        )


def run_systems(bench: Bench, prompts: list[list[int]], pad: int) -> dict[str, list[SystemRun]]:
    """Every run of every system, in the workloads' order: the engine systems once per round,
    interleaved, then peft_mixed once."""
    c = bench.config
    work = {
        name: [None if i is None else adapter_id(i) for i in indices]
        for name, indices in c.workloads().items()
    }
    runs: dict[str, list[SystemRun]] = {name: [] for name in work}
    order = [name for name in work if name != "peft_mixed"] * c.rounds
    order += ["peft_mixed"] if "peft_mixed" in work else []
    for name in order:
        adapters = work[name]
        log.info("%s: %d requests, %d new tokens each", name, len(prompts), c.max_new_tokens)
        if name == "peft_mixed":
            run = run_peft(bench, prompts, [a for a in adapters if a is not None], pad)
        else:
            run = run_lorafleet(bench, prompts, adapters)
        runs[name].append(run)
        log.info("%s: %s", name, run.summary())
        gc.collect()  # the previous system's engine, KV cache and adapters go before the next one
    return runs


def run_lorafleet(bench: Bench, prompts: list[list[int]], adapters: list[str | None]) -> SystemRun:
    served = bench.served(bench.work_dir / "disk-tier") if any(adapters) else None
    try:
        engine = bench.engine(served)
        if served is not None:
            # Least popular first, so the most popular end up last in the CPU tier's LRU order.
            named = [a for a in adapters if a is not None]
            preload(served, sorted(set(named), key=named.count))
        run_engine(engine, prompts[:2], adapters[:2], 2)
        return run_engine(engine, prompts, adapters, bench.config.max_new_tokens)
    finally:
        if served is not None:
            served.close()


def preload(served: ServedAdapters, names: Sequence[str]) -> None:
    """Load `names` into the CPU tier, in this order, before anything is timed."""
    for a in names:
        served.store.request(a)
        if served.store.wait(a, LOAD_TIMEOUT_S).state != "ready":
            raise RuntimeError(f"adapter {a} did not load: {served.store.status(a).error}")


def run_fairness(bench: Bench, prompts: list[list[int]], names: list[str]) -> FairnessResult:
    served = bench.served(bench.work_dir / "disk-tier")
    try:
        engine = bench.engine(served)
        preload(served, names)
        c = bench.config
        log.info("fairness: %d adapters, %s flooding, %.0f s", len(names), names[0], c.fairness_seconds)
        return measure_fairness(engine, prompts, names, c.fairness_seconds, c.fairness_window_s)
    finally:
        served.close()


def run_peft(bench: Bench, prompts: list[list[int]], adapters: list[str], pad: int) -> SystemRun:
    c = bench.config
    model = load_hf_model(c.model_dir, getattr(torch, c.dtype))
    distinct = list(dict.fromkeys(adapters))
    dirs = bench.published.local_dirs
    peft = PeftModel.from_pretrained(model, dirs[distinct[0]], adapter_name=_peft_name(distinct[0]))
    for a in distinct[1:]:
        peft.load_adapter(dirs[a], adapter_name=_peft_name(a))
    peft.eval()
    names = [_peft_name(a) for a in adapters]

    def run(n: int, m: int) -> SystemRun:
        # No EOS ids: every request generates exactly m tokens, as in the engine runs.
        return run_hf_static(
            _MixedBatches(peft, names[:n]), prompts[:n], m, eos_token_ids=(), pad_token_id=pad
        )

    run(2, 2)
    return run(len(prompts), c.max_new_tokens)


def run_lora(config: LoRABenchConfig) -> dict[str, Any]:
    """Run the benchmark and return its JSON payload."""
    w = prepare_workload(
        config.model_dir, config.requests, config.prompts_path, config.dtype, config.matmul_seconds
    )
    prompts_path, prompts, pad, machine = w.prompts_path, w.prompts, w.pad, w.machine

    workloads = config.workloads()
    used = sorted({adapter_id(i) for w in workloads.values() for i in w if i is not None})
    cold_names = cold_adapter_names(config.cold_samples)
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-lora-") as tmp, WeedS3(Path(tmp) / "s3") as s3:
        work_dir = Path(tmp)
        base = base_spec(config.model_dir, config.rank)
        all_names = used + [n for names in cold_names.values() for n in names]
        log.info("publishing %d random rank-%d adapters to %s", len(all_names), config.rank, s3.endpoint_url)
        published = publish_adapters(all_names, base, config.rank, s3.client(), work_dir, SERVED_BASE)
        bench = Bench(config, work_dir, s3, published)
        runs = run_systems(bench, prompts, pad)
        fair_names = used[:FAIRNESS_ADAPTERS]
        fairness = (
            run_fairness(bench, prompts, fair_names)
            if config.fairness_seconds > 0 and len(fair_names) > 1
            else None
        )
        log.info("cold loads: %d adapters per measurement", config.cold_samples)
        served = bench.served(work_dir / "disk-cold")
        try:
            engine = bench.engine(served)
            cold = measure_cold_loads(
                engine, served.store, lambda: bench.store(work_dir / "disk-cold"), cold_names, prompts
            )
        finally:
            served.close()
        bytes_per_adapter = published.bytes_per_adapter

    results = {name: median_run(rs).summary().as_dict() for name, rs in runs.items()}
    return {
        "results": results,
        "tok_s_by_round": {name: [r.summary().tok_s for r in rs] for name, rs in runs.items()},
        **cold.as_payload(),
        "fairness": fairness.as_payload() if fairness is not None else None,
        "ratios": ratios(results, config.peft_adapters or 0),
        "machine": machine,
        "config": {
            "benchmark": "lora",
            "requests": config.requests,
            "max_new_tokens": config.max_new_tokens,
            "ignore_eos": True,
            "dtype": config.dtype,
            "model": str(config.model_dir),
            "rank": config.rank,
            "target_modules": list(base.projection_shapes()),
            "adapter_bytes": bytes_per_adapter,
            "adapter_counts": list(config.adapter_counts),
            "distinct_adapters": {
                name: len({i for i in w if i is not None}) for name, w in workloads.items()
            },
            "zipf_exponent": config.zipf_exponent,
            "max_loras": config.max_loras,
            "rounds": config.rounds,
            "peft_adapters": config.peft_adapters,
            "peft_batch_size": STATIC_BATCH_SIZE,
            "cold_samples": config.cold_samples,
            "kv_cache_mib": config.kv_cache_mib,
            "prompts": str(prompts_path),
            "prompt_tokens": sum(len(p) for p in prompts),
            "seed": config.seed,
            "adapters_preloaded": "each lorafleet system loads its workload's adapters into the CPU tier "
            "(the most popular last) before timing; adapters beyond the CPU budget come back from disk",
        },
    }


def ratios(results: dict[str, dict[str, Any]], peft_adapters: int) -> dict[str, float]:
    """Throughput ratios the issue's targets are stated in, for the systems that ran."""
    out: dict[str, float] = {}
    base = results.get("base", {}).get("tok_s")
    for name, r in results.items():
        if base and name != "base":
            out[f"{name}_vs_base"] = r["tok_s"] / base
    peft = results.get("peft_mixed", {}).get("tok_s")
    same = results.get(f"lorafleet_{peft_adapters}", {}).get("tok_s")
    if peft and same:
        out[f"lorafleet_{peft_adapters}_vs_peft_mixed"] = same / peft
    return out


def save_lora(payload: dict[str, Any], json_path: Path, plot_path: Path | None) -> None:
    write_json(json_path, payload)
    if plot_path is not None:
        c = payload["config"]
        title = (
            f"Multi-LoRA: N={c['requests']} requests x {c['max_new_tokens']} tokens, rank {c['rank']}, "
            f"{c['dtype']}; cold S3 load adds {payload['cold_ttft_penalty_s'] * 1000:.0f} ms to TTFT, "
            f"TPOT x{payload['tpot_during_load_ratio']:.2f} during loads"
        )
        plot_bars(plot_path, payload["results"], THROUGHPUT_PANELS, title)
