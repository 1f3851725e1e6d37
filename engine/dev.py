"""`lorafleet dev`: the local stack on one machine — embedded S3, demo adapters, the engine.

Everything it starts is on 127.0.0.1 and stops on Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .config import EngineConfig

log = logging.getLogger(__name__)

BUCKET = "lorafleet-dev"


def add_dev_options(p: argparse.ArgumentParser) -> None:
    from .server import add_server_options

    add_server_options(p)
    p.add_argument(
        "--data-dir", type=Path, help="where the embedded S3 keeps its data (default: in the cache)"
    )


def examples(base_url: str, model: str) -> str:
    return f"""
LoRAFleet is starting on {base_url} (the model loads in a few seconds). Try:

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
    from .model_source import default_cache_dir
    from .server import run_server
    from .weed import WeedS3

    data_dir = args.data_dir or default_cache_dir() / "dev-s3"
    data_dir.mkdir(parents=True, exist_ok=True)
    with WeedS3(data_dir) as s3:
        client = s3.client()
        if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=BUCKET)
        log.info("embedded S3 at %s, bucket %s", s3.endpoint_url, BUCKET)
        model = args.served_model_name or "smollm2-135m-instruct"
        print(examples(f"http://{args.host}:{args.port}", model), flush=True)
        return run_server(args, config)
