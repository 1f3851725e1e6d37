"""The benchmark harness: its pure helpers, and the throughput benchmark end to end on a tiny model.

Benchmarks are never timing assertions: these tests check shapes, counts and files only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lorafleet.bench.cli import main
from lorafleet.bench.stats import RequestTiming, percentile, summarize
from lorafleet.bench.throughput import SYSTEMS, ThroughputConfig
from lorafleet.bench.workload import SHIPPED_PROMPTS, default_prompts_path, load_messages

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_counts_tokens_and_skips_single_token_tpot() -> None:
    timings = [
        RequestTiming(num_tokens=5, first_token_s=1.0, finish_s=3.0),  # 4 gaps of 0.5 s
        RequestTiming(num_tokens=3, first_token_s=2.0, finish_s=2.2),  # 2 gaps of 0.1 s
        RequestTiming(num_tokens=1, first_token_s=4.0, finish_s=4.0),  # no TPOT
    ]
    summary = summarize(timings, seconds=4.5)
    assert summary.tokens == 9
    assert summary.tok_s == pytest.approx(2.0)
    assert summary.ttft_p50_s == 2.0
    assert summary.tpot_p50_s == pytest.approx(0.3)
    assert summarize(timings[2:], seconds=1.0).tpot_p50_s is None


def test_workload_is_a_prefix_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": i, "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_messages(2, path) == [rows[0]["messages"], rows[1]["messages"]]
    with pytest.raises(ValueError, match="fewer than the 4"):
        load_messages(4, path)
    assert default_prompts_path().name == "prompts.jsonl" and default_prompts_path().is_file()


def test_shipped_workload_is_the_shared_one() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "bench" / "prompts.jsonl"
    if shared.is_file():  # in a checkout beside shared/; a clean clone elsewhere has only the copy
        assert SHIPPED_PROMPTS.read_bytes() == shared.read_bytes()
    assert len(SHIPPED_PROMPTS.read_text().splitlines()) >= 128


def test_throughput_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    json_path, png_path = tmp_path / "tp.json", tmp_path / "tp.png"
    # One system prompt for all, as chat templates often add: the engine shares its KV blocks.
    system = {"role": "system", "content": "You are a terse assistant. Answer in as few words as you can."}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [system, {"role": "user", "content": q}]}) + "\n"
                               for q in ("hi", "Name a color.", "What is 2+2?", "Say yes.")))  # fmt: skip
    argv = ["throughput", "--requests", "4", "--max-new-tokens", "8", "--model", str(tiny_llama_dir)]
    argv += ["--json", str(json_path), "--plot", str(png_path), "--matmul-seconds", "0.05"]
    argv += ["--prompts", str(prompts)]
    argv += ["--systems", ",".join(SYSTEMS)]
    assert main(argv) == 0

    report = json.loads(json_path.read_text())
    assert set(report) >= {"results", "roofline_fraction", "machine", "config"}
    assert list(report["results"]) == list(SYSTEMS)
    for name, result in report["results"].items():
        assert set(result) == {"tok_s", "ttft_p50_s", "tpot_p50_s", "tokens", "seconds"}, name
        assert result["tok_s"] > 0 and result["seconds"] > 0, name
        assert 4 <= result["tokens"] <= 4 * 8, name
    # Greedy decoding of the same model: every system generates the same number of tokens.
    tokens = {name: result["tokens"] for name, result in report["results"].items()}
    assert len(set(tokens.values())) == 1, tokens
    assert math.isfinite(report["roofline_fraction"]) and report["roofline_fraction"] > 0
    machine = report["machine"]
    # The roofline is the faster of the kernels the engine could use, never the slower one.
    assert (
        machine["matmul_flops_model_shaped"]
        == max(machine["matmul_flops_model_shaped_by_kernel"].values())
        > 0
    )
    assert (
        machine["matmul_flops_model_shaped_by_kernel"][machine["matmul_kernel"]]
        == machine["matmul_flops_model_shaped"]
    )
    assert report["machine"]["roofline_matmul"] == "model_shaped"
    assert report["config"]["requests"] == 4 and report["config"]["max_new_tokens"] == 8
    cached = report["cached_prompt_tokens"]
    assert set(cached) == {s for s in SYSTEMS if s.startswith("lorafleet")}
    assert cached["lorafleet_no_prefix_cache"] == 0 and cached["lorafleet"] > 0, cached

    assert png_path.read_bytes()[:8] == PNG_SIGNATURE


def test_throughput_rounds_report_the_median_round(tiny_llama_dir: Path, tmp_path: Path) -> None:
    json_path = tmp_path / "rounds.json"
    argv = ["throughput", "--requests", "1", "--max-new-tokens", "8", "--model", str(tiny_llama_dir)]
    argv += ["--json", str(json_path), "--matmul-seconds", "0.05", "--rounds", "3"]
    argv += ["--systems", "lorafleet,lorafleet_ngram"]
    assert main(argv) == 0

    report = json.loads(json_path.read_text())
    assert report["config"]["rounds"] == 3
    # One prompt, run by the warm-up and by every round: each round still computes all of it.
    assert report["cached_prompt_tokens"] == {"lorafleet": 0, "lorafleet_ngram": 0}
    for name in ("lorafleet", "lorafleet_ngram"):
        rounds = report["rounds"][name]
        assert len(rounds) == 3 and all(r["tok_s"] > 0 for r in rounds)
        median = sorted(rounds, key=lambda r: r["tok_s"])[1]
        assert report["results"][name]["tok_s"] == median["tok_s"]
        assert report["results"][name]["tpot_p50_s"] == median["tpot_p50_s"]


def test_throughput_refuses_zero_rounds(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="--rounds"):
        ThroughputConfig(model_dir=tiny_llama_dir, rounds=0)


def test_machine_matmul_rate_is_its_fastest_window() -> None:
    # A VM's other tenants slow some windows; the roofline is what the machine can do. A fake
    # clock makes the five windows of three calls take 15, 3, 6, 12 and 9 ms.
    from lorafleet.bench import machine

    ticks = iter(
        t + 10.0 * w
        for w, step in enumerate([0.005, 0.001, 0.002, 0.004, 0.003])
        for t in (0, step, 2 * step, 3 * step)
    )
    rate = machine.matmul_flops(4, 8, 16, torch.float32, min_seconds=0.001, clock=lambda: next(ticks))
    assert rate == pytest.approx(3 * 2 * 4 * 8 * 16 / 0.003)
    assert next(ticks, None) is None  # every window was timed
