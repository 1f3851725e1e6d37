"""`lorafleet bench operator` at a tiny size: the JSON it writes and its plot, never its timings."""

from __future__ import annotations

import json

from lorafleet.bench.cli import run_bench
from lorafleet.bench.operator_bench import OperatorBenchConfig, run_operator_bench, save_operator_bench
from lorafleet.engine.cli import build_parser

ADAPTERS = 20


def test_operator_bench_reports_floor_time_to_ready_and_registry_writes(weed, tmp_path):
    payload = run_operator_bench(OperatorBenchConfig(adapters=ADAPTERS, bounded_log=10), weed)
    save_operator_bench(payload, tmp_path / "op.json", tmp_path / "op.png")

    saved = json.loads((tmp_path / "op.json").read_text())
    assert saved == payload
    issue_shape = {
        "adapters": int,
        "seconds_to_ready": float,
        "emulator_floor_s": float,
        "configmap_writes": int,
    }
    for key, kind in issue_shape.items():
        assert type(saved[key]) is kind, key
    assert saved["adapters"] == ADAPTERS
    assert saved["seconds_to_ready"] > 0 and saved["emulator_floor_s"] > 0
    assert saved["ratio_to_floor"] == saved["seconds_to_ready"] / saved["emulator_floor_s"]
    assert 0 < saved["creates_done_s"] <= saved["seconds_to_ready"]
    # Coalesced: the registry is written at least once, never once per adapter and more.
    assert 1 <= saved["configmap_writes"] <= ADAPTERS
    # Each adapter was created, and its status patched, by the operator under test.
    assert saved["api_writes"]["loraadapters"] >= 2 * ADAPTERS
    assert set(saved["meets_targets"]) == {"ratio_to_floor", "configmap_writes"}
    times = [t for t, _ in saved["timeline"]]
    assert times == sorted(times) and saved["timeline"][-1][1] == ADAPTERS
    # The same run on an emulator with a flat cost per request, to separate kmock's R^2 out.
    bounded = saved["bounded_request_log"]
    assert bounded["request_log_limit"] == 10  # trimmed many times over in this run
    assert bounded["ratio_to_floor"] == bounded["seconds_to_ready"] / bounded["emulator_floor_s"]
    assert bounded["timeline"][-1][1] == ADAPTERS and bounded["api_writes"]["loraadapters"] >= 2 * ADAPTERS
    assert (tmp_path / "op.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_has_the_operator_benchmark(tmp_path):
    args = build_parser().parse_args(
        ["bench", "operator", "--adapters", "7", "--json", str(tmp_path / "o.json")]
    )
    assert (args.func, args.benchmark, args.adapters, args.plot) == (run_bench, "operator", 7, None)
    # A user error is a one-line message and status 2, before any server starts.
    args.adapters = 0
    assert run_bench(args) == 2
    assert not (tmp_path / "o.json").exists()
