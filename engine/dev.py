"""`lorafleet dev`: the local stack on one machine — embedded S3, demo adapters, the engine.

Everything it starts is on 127.0.0.1 and stops on Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .adapter_format import CONFIG_NAME, WEIGHTS_NAME
from .adapter_sources import put_s3_adapter
from .config import EngineConfig
from .demo_adapters import demo_adapter_dirs
from .registry import Registry, RegistryEntry
from .server import default_served_model_name

log = logging.getLogger(__name__)

BUCKET = "lorafleet-dev"


def add_dev_options(p: argparse.ArgumentParser) -> None:
    from .server import add_server_options

    add_server_options(p)
    p.add_argument(
        "--data-dir", type=Path, help="where the embedded S3 keeps its data (default: in the cache)"
    )
    p.add_argument(
        "--demo-steps",
        type=int,
        default=40,
        help="training steps of each demo adapter, on first run (default 40)",
    )


def examples(base_url: str, model: str, adapters: list[str]) -> str:
    adapter = adapters[0] if adapters else model
    return f"""
LoRAFleet is starting on {base_url} (the model loads in a few seconds), serving {model}
and the demo adapters {", ".join(adapters)}. Try (then swap the model name):

  curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{adapter}", "messages": [{{"role": "user", "content": "What do bees make?"}}], "max_tokens": 32}}'

  curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Say hello in French."}}], "max_tokens": 32}}'

  curl -sN {base_url}/v1/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "prompt": "The capital of France is", "max_tokens": 16, "stream": true}}'

  .venv/bin/python -c "from openai import OpenAI; c = OpenAI(base_url='{base_url}/v1', api_key='none'); \\
print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hi!'}}], max_tokens=32).choices[0].message.content)"

  curl -s {base_url}/v1/models    curl -s {base_url}/metrics

Ctrl-C stops everything.
"""


def run_dev(args: argparse.Namespace, config: EngineConfig) -> int:
    from .model_source import default_cache_dir, resolve_model
    from .server import run_server
    from .weed import REGION, WeedS3

    # Until the server takes over the signal handlers, SIGTERM unwinds like Ctrl-C, so that the
    # `with WeedS3` below stops weed: killed outright, this process would leave weed running with
    # its data directory locked, and the next `make run` would fail.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    cache = default_cache_dir()
    model_dir = resolve_model(config.model, cache)
    adapters = demo_adapter_dirs(model_dir, cache, steps=args.demo_steps)
    data_dir = args.data_dir or cache / "dev-s3"
    data_dir.mkdir(parents=True, exist_ok=True)
    with WeedS3(data_dir) as s3:
        registry = publish(
            s3.client(), adapters, args.served_model_name or default_served_model_name(config.model)
        )
        path = data_dir / "registry.json"
        path.write_text(json.dumps(registry.to_json(), indent=2))
        log.info("embedded S3 at %s; %d demo adapters in s3://%s/", s3.endpoint_url, len(adapters), BUCKET)
        # The engine reads the adapters through boto3's standard credential chain, like in a pod.
        os.environ.update(
            AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key, AWS_DEFAULT_REGION=REGION
        )
        args.registry, args.s3_endpoint_url = str(path), s3.endpoint_url
        model = args.served_model_name or default_served_model_name(config.model)
        print(examples(f"http://{args.host}:{args.port}", model, sorted(adapters)), flush=True)
        return run_server(args, config)


def _exit_on_signal(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def publish(client: Any, adapters: dict[str, Path], base_model: str) -> Registry:
    """Upload each adapter directory to the dev bucket; the registry of what was uploaded."""
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)
    entries = {}
    for adapter_id, local in adapters.items():
        prefix = f"adapters/{adapter_id}/"
        version = put_s3_adapter(client, BUCKET, prefix, local)  # what the store verifies downloads against
        cfg = json.loads((local / CONFIG_NAME).read_text())
        entries[adapter_id] = RegistryEntry(
            uri=f"s3://{BUCKET}/{prefix}", version=version, rank=int(cfg["r"]),
            bytes=(local / WEIGHTS_NAME).stat().st_size,
        )  # fmt: skip
    return Registry(base_model, entries)
