"""The built-in SmolLM2-135M-Instruct, converted once into the git-ignored cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorafleet.bench.workload import default_prompts_path
from lorafleet.engine.model_source import default_cache_dir, resolve_model

PROMPTS = default_prompts_path()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    cache = (
        Path(os.environ["LORAFLEET_CACHE_DIR"])
        if "LORAFLEET_CACHE_DIR" in os.environ
        else default_cache_dir()
    )
    return resolve_model(None, cache, progress=False)


@pytest.fixture(scope="session")
def bench_messages() -> list[list[dict[str, str]]]:
    """The standard workload's chat requests (shared/bench/prompts.jsonl)."""
    with PROMPTS.open() as f:
        return [json.loads(line)["messages"] for line in f]
