"""`lorafleet` command line: `engine`, `dev`, `bench` and `operator` subcommands.

Flags become config dataclasses here and nowhere else; the subcommands' modules are imported
only when chosen, so `lorafleet --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .config import DTYPES, QUANTIZATIONS, CacheConfig, EngineConfig, SchedulerConfig

MiB = 1 << 20


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that starts an engine."""
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model", help="HF model directory or s3://bucket/prefix (default: built-in SmolLM2-135M-Instruct)"
    )
    g.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="weight and KV cache dtype (default float32)"
    )
    g.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        help="weight-only quantization of the base model; LoRA deltas stay in --dtype (default: none). "
        "Quantized weights are cached under $LORAFLEET_CACHE_DIR/quantized",
    )
    g.add_argument(
        "--max-model-len", type=int, help="context length in tokens (default: the model's, at most 8192)"
    )
    g.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache budget in MiB (default 512)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt in full, even when earlier requests began with the same blocks of tokens",
    )
    g.add_argument(
        "--max-num-batched-tokens", type=int, default=512, help="token budget of one step (default 512)"
    )
    g.add_argument("--max-num-seqs", type=int, default=128, help="running requests at once (default 128)")
    g.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=0,
        help="speculative decoding: guess up to this many next tokens of each request (not of seeded ones) "
        "from n-grams of its own context and verify them in one pass; outputs keep their distribution; "
        "lowers latency at small batches (default 0: off)",
    )
    g.add_argument(
        "--speculative-max-seqs",
        type=int,
        default=4,
        help="guess only while at most this many requests run; wider steps are bound by compute (default 4)",
    )
    g.add_argument(
        "--no-small-step-weights",
        dest="small_step_weights",
        action="store_false",
        help="float32 on AVX-512 CPUs: keep no second copy of the weights for steps of at most 8 tokens "
        "(saves the linear weights' size in memory; batch-1 decoding is then ~1.5x slower)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for requests without their own (default 0)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    quantized_cache_dir = None
    if args.quantization:
        from .model_source import default_cache_dir

        quantized_cache_dir = str(default_cache_dir() / "quantized")
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        quantized_cache_dir=quantized_cache_dir,
        max_model_len=args.max_model_len,
        small_step_weights=args.small_step_weights,
        seed=args.seed,
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_bytes=args.kv_cache_mib * MiB,
            prefix_caching=args.prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            num_speculative_tokens=args.num_speculative_tokens,
            speculative_max_seqs=args.speculative_max_seqs,
        ),
    )


def _engine(args: argparse.Namespace) -> int:
    from .server import run_server

    return run_server(args, engine_config(args))


def _dev(args: argparse.Namespace) -> int:
    from .dev import run_dev

    return run_dev(args, engine_config(args))


def _operator(args: argparse.Namespace) -> int:
    from lorafleet.operator.main import run_operator

    return run_operator(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafleet",
        description="Serve many LoRA adapters over shared base models: engine, local stack, benchmarks, operator.",
    )
    parser.add_argument(
        "--log-level", default=os.environ.get("LORAFLEET_LOG_LEVEL", "INFO"), help="default INFO"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    eng = sub.add_parser(
        "engine",
        help="run the HTTP serving engine (OpenAI API and /generate)",
        description="Serve the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models) and LoRAX-style "
        "/generate over one base model, with /health, /ready and /metrics.",
    )
    add_engine_options(eng)
    from .server import add_server_options

    add_server_options(eng)
    eng.set_defaults(func=_engine)

    dev = sub.add_parser(
        "dev",
        help="start the local stack: embedded S3, demo adapters and the engine",
        description="Start an embedded S3 server, publish demo adapters for the built-in model into it, and serve "
        "them with the engine on localhost. Ctrl-C stops everything.",
    )
    add_engine_options(dev)
    from .dev import add_dev_options

    add_dev_options(dev)
    dev.set_defaults(func=_dev)

    from lorafleet.bench.cli import add_bench_parser

    add_bench_parser(sub)

    op = sub.add_parser(
        "operator",
        help="run the Kubernetes operator",
        description="Reconcile BaseModel and LoRAAdapter resources into engine Deployments, Services and registries.",
    )
    op.set_defaults(func=_operator)
    try:
        from lorafleet.operator.main import add_operator_options
    except ImportError:
        pass
    else:
        add_operator_options(op)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:  # configuration a user can fix
        print(f"lorafleet: error: {e}", file=sys.stderr)
        return 2
