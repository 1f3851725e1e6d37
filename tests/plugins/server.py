"""Live HTTP servers on loopback ports over the tiny model, and an engine whose steps a test gates.

`start_server(config, adapters, gated=False)` builds a real app around a fresh `AsyncEngine` and
serves it on a free 127.0.0.1 port; teardown closes it and checks that no KV block leaked.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from lorafleet.engine.adapter_store import AdapterStoreConfig
from lorafleet.engine.adapters import ServedAdapters, open_adapters
from lorafleet.engine.async_engine import AsyncEngine
from lorafleet.engine.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from lorafleet.engine.llm_engine import LLMEngine
from lorafleet.engine.protocol import AdapterCatalog
from lorafleet.engine.server import ServerConfig, create_app
from tests.plugins.tiny_models import make_peft_adapter

MODEL_NAME = "tiny-llama"
MAX_NUM_SEQS = 4


class GatedEngine:
    """An `LLMEngine` whose steps wait for permits, so a test decides when tokens come out.

    Everything else is the real engine; `open()` lets every step through from then on."""

    def __init__(self, llm: LLMEngine) -> None:
        self._llm = llm
        self._cond = threading.Condition()
        self._permits = 0
        self._open = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def step(self) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: self._open or self._permits > 0)
            if not self._open:
                self._permits -= 1
        return self._llm.step()

    def allow(self, steps: int = 1) -> None:
        with self._cond:
            self._permits += steps
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()


@dataclass
class LiveServer:
    url: str
    app: web.Application
    engine: AsyncEngine
    llm: LLMEngine
    gate: GatedEngine | None


StartServer = Callable[..., Awaitable[LiveServer]]


SERVED_ADAPTERS = ("acme/support", "globex/legal")
BROKEN_ADAPTER = "acme/broken"


@pytest.fixture(scope="session")
def served_adapters(tiny_llama_dir, tmp_path_factory) -> Iterator[ServedAdapters]:
    """Two real PEFT adapters of the tiny model, served from an --adapter-dir through the store."""
    root = tmp_path_factory.mktemp("served-adapters")
    for seed, adapter_id in enumerate(SERVED_ADAPTERS):
        make_peft_adapter(tiny_llama_dir, root / adapter_id, rank=4, alpha=8, seed=seed)
    # Published but unservable: its weights are not safetensors.
    broken = make_peft_adapter(tiny_llama_dir, root / BROKEN_ADAPTER, rank=4, alpha=8)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    adapters = open_adapters(
        tiny_llama_dir, AdapterStoreConfig(max_rank=16), MODEL_NAME, adapter_dir=str(root)
    )
    assert adapters is not None
    # Warm, so that tests which gate engine steps do not spend their steps on a cold load
    # (cold loads through a server are tested in test_dev.py and test_tenant_docs.py).
    for adapter_id in SERVED_ADAPTERS:
        adapters.store.request(adapter_id)
        assert adapters.store.wait(adapter_id, timeout_s=60).state == "ready"
    yield adapters
    adapters.close()


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir, served_adapters) -> LLMEngine:
    """One tiny engine for every server test: each server wraps it in its own AsyncEngine."""
    config = EngineConfig(
        model=str(tiny_llama_dir),
        max_model_len=160,
        cache=CacheConfig(block_size=4, kv_cache_bytes=1 << 20),
        # Speculative decoding on: every server test also covers multi-token steps.
        scheduler=SchedulerConfig(
            max_num_batched_tokens=256, max_num_seqs=MAX_NUM_SEQS, num_speculative_tokens=3
        ),
        lora=LoRAConfig(max_loras=2, max_rank=16),
    )
    return LLMEngine(config, model_dir=tiny_llama_dir, adapters=served_adapters)


@pytest.fixture
async def start_server(tiny_llm, served_adapters) -> AsyncIterator[StartServer]:
    servers: list[tuple[TestServer, GatedEngine | None]] = []

    async def start(
        config: ServerConfig | None = None, adapters: AdapterCatalog | None = None, gated: bool = False
    ) -> LiveServer:
        gate = GatedEngine(tiny_llm) if gated else None
        engine = AsyncEngine(gate or tiny_llm)  # type: ignore[arg-type]  # a stand-in with the same surface
        app = create_app(
            engine, config or ServerConfig(served_model_name=MODEL_NAME), adapters or served_adapters
        )
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()  # handler_cancellation=True, as run_server uses
        servers.append((server, gate))
        return LiveServer(str(server.make_url("")).rstrip("/"), app, engine, tiny_llm, gate)

    yield start
    for server, gate in servers:
        if gate is not None:
            gate.open()  # a step waiting for a permit would block the engine thread's exit
        await server.close()
    assert not tiny_llm.requests and not tiny_llm.has_unfinished()
    assert tiny_llm.kv.num_free_blocks == tiny_llm.kv.num_blocks, "KV blocks leaked"


@pytest.fixture
async def server(start_server) -> LiveServer:
    return await start_server()
