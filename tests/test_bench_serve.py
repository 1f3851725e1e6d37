"""`lorafleet bench serve`: its pure parts, then end to end on the tiny model, against a server it
starts per setting and against a running one (`--url`).

Benchmarks are never timing assertions: these tests check the JSON's shape, counts and sane values.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from lorafleet.bench.cli import main
from lorafleet.bench.serve import RESULT_KEYS, Outcome, ServeBenchConfig, poisson_schedule, summarize_outcomes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONVERSATIONS = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]


def test_poisson_schedule_is_seeded_ordered_and_bounded() -> None:
    config = ServeBenchConfig(duration_s=10.0, rate=20.0, adapters=4)
    schedule = poisson_schedule(config, CONVERSATIONS)
    assert schedule == poisson_schedule(config, CONVERSATIONS)
    times = [a.at_s for a in schedule]
    assert times == sorted(times) and times[0] > 0 and times[-1] < 10.0
    assert 100 < len(schedule) < 300  # 200 expected
    assert {a.adapter for a in schedule} <= set(range(4))
    base_only = poisson_schedule(ServeBenchConfig(duration_s=10.0, rate=20.0, adapters=0), CONVERSATIONS)
    assert {a.adapter for a in base_only} == {None}


def test_summary_counts_errors_and_measures_from_arrival() -> None:
    outcomes = [
        Outcome(at_s=0.0, first_token_s=0.5, end_s=1.5, tokens=11),  # TTFT 0.5, TPOT 0.1
        Outcome(at_s=1.0, first_token_s=1.2, end_s=1.2, tokens=1),  # TTFT 0.2, no TPOT
        Outcome(at_s=2.0, first_token_s=None, end_s=2.1, tokens=0, error="http-429"),
    ]
    summary = summarize_outcomes(outcomes, seconds=4.0)
    assert set(summary) == set(RESULT_KEYS)
    assert summary["tok_s"] == 3.0 and summary["errors"] == 1 and summary["requests"] == 3
    assert summary["ttft_p50_s"] == 0.35 and summary["tpot_p50_s"] == 0.1
    empty = summarize_outcomes(outcomes[2:], seconds=1.0)
    assert empty["ttft_p50_s"] is None and empty["tok_s"] == 0.0


def check_results(report: dict, settings: list[str], max_tokens: int) -> None:
    assert list(report["results"]) == settings
    for name, r in report["results"].items():
        assert set(r) == set(RESULT_KEYS), name
        assert r["requests"] >= 1 and r["errors"] == 0, (name, report["details"][name])
        assert r["tok_s"] > 0, name
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"], name
        assert r["tpot_p50_s"] is None or 0 < r["tpot_p50_s"] <= r["tpot_p99_s"], name
        assert r["requests"] <= report["details"][name]["tokens"] <= r["requests"] * max_tokens, name


def test_serve_starts_a_server_per_setting(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server's tiny matmuls: see test_bench_lora
    json_path, png_path = tmp_path / "serve.json", tmp_path / "serve.png"
    argv = ["serve", "--concurrency", "4", "--duration", "1.5", "--rate", "6", "--adapters", "2"]
    argv += ["--max-tokens", "4", "--values", "16", "--max-loras", "2", "--model", str(tiny_llama_dir)]
    argv += ["--json", str(json_path), "--plot", str(png_path)]
    assert main(argv) == 0

    report = json.loads(json_path.read_text())
    # One setting keeps the test short: each one is a server process that imports torch.
    check_results(report, ["max_num_batched_tokens=16"], 4)
    assert report["config"]["sweep"] == "max-num-batched-tokens" and report["config"]["values"] == [16]
    assert all(1 <= d["distinct_adapters"] <= 2 for d in report["details"].values())
    assert png_path.read_bytes()[:8] == PNG_SIGNATURE


async def test_serve_drives_a_running_server(server, tmp_path: Path) -> None:
    json_path = tmp_path / "serve.json"
    argv = ["serve", "--url", server.url, "--concurrency", "3", "--duration", "1", "--rate", "8"]
    argv += ["--adapters", "2", "--max-tokens", "3", "--json", str(json_path)]
    assert await asyncio.to_thread(main, argv) == 0  # its own event loop, in a thread

    report = json.loads(json_path.read_text())
    check_results(report, ["target"], 3)
    assert report["config"]["url"] == server.url and report["config"]["sweep"] is None
    # Adapters the server lists but cannot serve are skipped before timing, not counted as errors.
    assert isinstance(report["details"]["target"]["skipped_adapters"], list)
