"""`lorafleet bench lora` end to end on the tiny model, with adapters served from a real S3 server.

Benchmarks are never timing assertions: this checks the JSON's shape, counts and sane values only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lorafleet.bench.cli import main
from lorafleet.bench.lora import LoRABenchConfig
from lorafleet.bench.lora_adapters import zipf_choices
from lorafleet.bench.lora_fairness import FairnessResult
from lorafleet.bench.stats import RequestTiming, SystemRun, median_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SYSTEMS = ["base", "lorafleet_1", "lorafleet_3", "peft_mixed"]


def test_zipf_choices_favour_the_first_adapters() -> None:
    draws = zipf_choices(2000, 8, 1.0, seed=0)
    assert draws == zipf_choices(2000, 8, 1.0, seed=0)
    assert set(draws) <= set(range(8))
    assert draws.count(0) > draws.count(1) > draws.count(7)


def test_fairness_is_the_smallest_share_of_any_adapter_in_any_window() -> None:
    windows = [{"a": 50, "b": 50}, {"a": 80, "b": 20}, {"a": 60}]  # b starved in the last one
    result = FairnessResult(["a", "b"], "a", 10.0, windows)
    assert result.min_share_vs_fair() == 0.0
    assert FairnessResult(["a", "b"], "a", 10.0, windows[:2]).min_share_vs_fair() == pytest.approx(0.4)
    assert result.as_payload()["windows"] == windows


def test_each_system_reports_its_median_round() -> None:
    def run(seconds: float) -> SystemRun:
        return SystemRun([[1] * 10], [RequestTiming(10, 0.1, seconds)], seconds)

    rounds = [run(2.0), run(1.0), run(4.0)]  # 5, 10 and 2.5 tok/s
    assert median_run(rounds) is rounds[0]
    assert median_run(rounds[1:]) is rounds[2]  # of two, the slower: never the flattering one
    assert median_run([rounds[1]]) is rounds[1]
    with pytest.raises(ValueError, match="--rounds"):
        LoRABenchConfig(model_dir=Path("."), rounds=0)


@pytest.mark.parametrize(
    "flags", [["--fairness-seconds", "-1"], ["--fairness-window", "0"], ["--rounds", "0"]]
)
def test_bad_lora_bench_options_are_refused_before_anything_runs(
    flags, tiny_llama_dir, tmp_path, capsys
) -> None:
    json_path = tmp_path / "lora.json"
    assert main(["lora", *flags, "--model", str(tiny_llama_dir), "--json", str(json_path)]) == 2
    assert flags[0] in capsys.readouterr().err
    assert not json_path.exists()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls on two OpenMP threads spin against other processes on a shared 2-core
    machine (10x slower under load); one thread keeps the test short."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_torch_thread")
def test_lora_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    json_path, png_path = tmp_path / "lora.json", tmp_path / "lora.png"
    argv = ["lora", "--adapters", "3", "--requests", "6", "--max-new-tokens", "4", "--rank", "4"]
    argv += ["--max-loras", "4", "--cold-samples", "2", "--kv-cache-mib", "4", "--model", str(tiny_llama_dir)]
    argv += ["--json", str(json_path), "--plot", str(png_path), "--matmul-seconds", "0.05", "--rounds", "2"]
    argv += ["--fairness-seconds", "2", "--fairness-window", "0.5"]
    assert main(argv) == 0

    report = json.loads(json_path.read_text())
    assert list(report["results"]) == SYSTEMS
    for name, result in report["results"].items():
        assert set(result) == {"tok_s", "ttft_p50_s", "tpot_p50_s", "tokens", "seconds"}, name
        assert result["tokens"] == 6 * 4, name  # EOS is ignored: exactly M tokens per request
        assert result["tok_s"] > 0 and result["seconds"] > 0, name
    by_round = report["tok_s_by_round"]
    assert {name: len(r) for name, r in by_round.items()} == {
        s: 1 if s == "peft_mixed" else 2 for s in SYSTEMS
    }
    for name in SYSTEMS[:-1]:  # each engine system reports its median round (the lower of two)
        assert report["results"][name]["tok_s"] == min(by_round[name]), name
    assert report["config"]["rounds"] == 2
    fair = report["fairness"]
    assert fair["adapters"] >= 2 and fair["window_s"] == 0.5
    assert len(fair["windows"]) == 3  # 4 windows of 0.5 s, less the warm-up one
    for window in fair["windows"]:  # nobody starves, the flood included
        assert len(window) == fair["adapters"] and min(window.values()) > 0, window
    assert 0 < fair["min_share_vs_fair"] <= 1
    assert set(report["cold_load_s"]) == {"s3", "disk", "cpu"}
    for tier, p in report["cold_load_s"].items():
        assert 0 < p["p50"] <= p["p99"], tier
    assert math.isfinite(report["cold_ttft_penalty_s"])
    assert report["tpot_during_load_ratio"] > 0
    assert report["load_details"]["loading_steps"] > 0
    assert set(report["ratios"]) == {f"{s}_vs_base" for s in SYSTEMS[1:]} | {"lorafleet_3_vs_peft_mixed"}
    c = report["config"]
    assert c["peft_adapters"] == 3 and c["rank"] == 4 and c["requests"] == 6
    assert c["distinct_adapters"]["base"] == 0 and c["distinct_adapters"]["lorafleet_1"] == 1
    assert 1 <= c["distinct_adapters"]["lorafleet_3"] <= 3
    assert len(c["target_modules"]) == 7
    assert png_path.read_bytes()[:8] == PNG_SIGNATURE
