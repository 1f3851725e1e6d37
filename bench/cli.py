"""`lorafleet bench ...`: argument parsing and dispatch for the benchmarks.

The main CLI calls `add_bench_parser(subparsers)` and then `run_bench(args)` (also set as the
`func` default); `python -m lorafleet.bench` runs the same commands without it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lorafleet.engine.config import DTYPES

DESCRIPTION = (
    "Benchmarks compare LoRAFleet with baselines in the same process and the same run, on the first N "
    "requests of the shared workload (shared/bench/prompts.jsonl), and write JSON and an optional PNG plot."
)


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bench` with one sub-command per benchmark to the main CLI's sub-parsers."""
    bench = subparsers.add_parser(
        "bench",
        help="run a benchmark (writes JSON and an optional PNG plot)",
        description=DESCRIPTION,
    )
    add_benchmarks(bench)
    bench.set_defaults(func=run_bench)
    return bench


def add_benchmarks(parser: argparse.ArgumentParser) -> None:
    """One sub-command per benchmark; `run_bench` dispatches on `args.benchmark`."""
    kinds = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    _add_throughput(kinds)


def _add_throughput(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "throughput",
        help="offline generation throughput: all requests at once, greedy",
        description="Submit N chat requests at once and generate greedily up to M new tokens each, stopping "
        "at EOS, with each system in turn: "
        "lorafleet (continuous batching), lorafleet_static (the engine in static mode), "
        "hf_static (transformers generate() on left-padded batches of 16) and "
        "hf_continuous (transformers generate_batch). Reports generated tok/s, median TTFT and TPOT, "
        "the machine's matmul FLOP/s and LoRAFleet's fraction of the matmul roofline.",
    )
    p.add_argument("--requests", type=int, default=128, metavar="N", help="first N prompts (default 128)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="M", help="per request (default 128)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    p.add_argument(
        "--systems",
        type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
        metavar="A,B,...",
        help="comma-separated subset of lorafleet,lorafleet_static,hf_static,hf_continuous (default: all)",
    )
    p.add_argument("--json", type=Path, required=True, metavar="PATH", help="where to write the results")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also draw tok/s, TTFT and TPOT per system")
    _add_model_options(p)
    p.add_argument(
        "--matmul-seconds",
        type=float,
        default=1.0,
        metavar="S",
        help="time budget of each machine matmul FLOP/s measurement (default 1.0)",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="local Hugging Face model directory (default: the built-in SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="where the built-in model is converted once ($LORAFLEET_CACHE_DIR or ~/.cache/lorafleet)",
    )
    p.add_argument(
        "--prompts",
        type=Path,
        metavar="JSONL",
        help="workload (default: <repo>/../shared/bench/prompts.jsonl)",
    )


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return args.model
    from lorafleet.engine.model_source import default_cache_dir, resolve_model

    return resolve_model(None, args.cache_dir or default_cache_dir())


def _run_throughput(args: argparse.Namespace) -> int:
    # Imported here: torch and the engine take seconds to import, and `--help` needs neither.
    from .throughput import SYSTEMS, ThroughputConfig, run_throughput, save_throughput

    config = ThroughputConfig(
        model_dir=_model_dir(args),
        requests=args.requests,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        systems=args.systems or SYSTEMS,
        prompts_path=args.prompts,
        matmul_seconds=args.matmul_seconds,
    )
    payload = run_throughput(config)
    save_throughput(payload, args.json, args.plot)
    for name, r in payload["results"].items():
        tpot = "n/a" if r["tpot_p50_s"] is None else f"{r['tpot_p50_s']:.4f} s"
        print(
            f"{name:>16}: {r['tok_s']:8.1f} tok/s  {r['tokens']:6d} tokens in {r['seconds']:7.1f} s  "
            f"TTFT p50 {r['ttft_p50_s']:.3f} s  TPOT p50 {tpot}"
        )
    if payload["roofline_fraction"] is not None:
        print(f"lorafleet reaches {payload['roofline_fraction']:.1%} of the model-shaped matmul roofline")
    return 0


BENCHMARKS = {"throughput": _run_throughput}


def run_bench(args: argparse.Namespace) -> int:
    """Dispatch a parsed `bench` command; a user error becomes a one-line message and exit status 2."""
    try:
        return BENCHMARKS[args.benchmark](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lorafleet bench {args.benchmark}: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lorafleet.bench BENCHMARK ...`: the same commands as `lorafleet bench`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m lorafleet.bench", description=DESCRIPTION)
    add_benchmarks(parser)
    return run_bench(parser.parse_args(argv))
