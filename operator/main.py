"""`lorafleet operator`: command-line options and the kopf entry point.

Namespace scoping: `--namespace` (repeatable, kopf glob patterns allowed) or `--all-namespaces`
(the default). With named namespaces only, kopf's scanning is off: it needs no cluster-wide
Namespace or CRD list/watch permission. Liveness: kopf's probe endpoint on `--liveness-port`
(`/healthz`), for the pod's livenessProbe. Peering (`--peering NAME`, the KopfPeering or
ClusterKopfPeering object from the chart) is not leader election: every operator on the object
posts a keep-alive, an operator seeing a live peer of higher `--priority` pauses, and peers of
the same priority *all* pause until only one is left. So run one replica (or give each a distinct
priority). `--standalone` skips peering: then make sure exactly one operator runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import kopf

from .config import OperatorConfig
from .handlers import build_registry
from .registry_writer import WriterSettings


def add_operator_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("operator")
    scope = g.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeatable; globs allowed)",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    g.add_argument(
        "--liveness-port", type=int, default=8080, help="serve /healthz on this port (default 8080; 0: off)"
    )
    peer = g.add_mutually_exclusive_group()
    peer.add_argument(
        "--standalone", action="store_true", help="no peering: this must be the only operator running"
    )
    peer.add_argument("--peering", default=None, help="kopf peering object name (default: kopf's default)")
    g.add_argument(
        "--priority", type=int, default=0, help="peering priority; the highest is active (default 0)"
    )
    g.add_argument(
        "--registry-debounce-s",
        type=float,
        default=WriterSettings.debounce_s,
        help=f"quiet time before a registry write, batching adapter changes (default {WriterSettings.debounce_s})",
    )
    g.add_argument(
        "--revalidate-interval-s",
        type=float,
        default=OperatorConfig.revalidate_interval_s,
        help=f"recheck every adapter in S3 this often (default {OperatorConfig.revalidate_interval_s:g})",
    )


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        namespaces=tuple(args.namespace),
        writer=WriterSettings(debounce_s=args.registry_debounce_s),
        revalidate_interval_s=args.revalidate_interval_s,
    )


async def serve(
    config: OperatorConfig, args: argparse.Namespace, stop_flag: asyncio.Event | None = None
) -> None:
    """Run the operator until `stop_flag` is set (or forever)."""
    await kopf.operator(
        registry=build_registry(config),
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        standalone=args.standalone,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
        stop_flag=stop_flag,
    )


def run_operator(args: argparse.Namespace) -> int:
    config = operator_config(args)
    logging.getLogger("kopf.objects").setLevel(logging.INFO)
    asyncio.run(serve(config, args))
    return 0
