"""An adapter whose source (S3) is down: its requests wait while its loads are retried, then end
with a 503 that names the cause and carries a Retry-After, instead of waiting out their timeout
for a bare 504. An adapter that can never load keeps its 422 (see test_server.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import aiohttp
import boto3
import pytest

from lorafleet.engine.adapter_store import AdapterLoadError, AdapterStatus, AdapterStore, AdapterStoreConfig
from lorafleet.engine.adapters import ServedAdapters, base_spec
from lorafleet.engine.registry import Registry, RegistryEntry
from lorafleet.engine.s3 import make_s3_client
from lorafleet.engine.scheduler import AdapterFailure
from lorafleet.engine.server import ServerConfig
from tests.plugins.server import MODEL_NAME


class StubStore:
    """The slice of AdapterStore that ServedAdapters.error() reads: one adapter's status."""

    def __init__(self) -> None:
        self.status_now = AdapterStatus("loading", "v1")
        self.registry = Registry(MODEL_NAME)

    def status(self, adapter_id: str) -> AdapterStatus:
        return self.status_now


def load_error(reason: str, message: str, retryable: bool) -> AdapterLoadError:
    return AdapterLoadError("ns/a", "v1", reason, message, retryable)


def test_served_adapters_tell_retryable_failures_from_final_ones():
    store = StubStore()
    served = ServedAdapters(store)  # type: ignore[arg-type]
    assert served.error("ns/a@v1") is None
    down = load_error(
        "S3Unavailable", "cannot reach S3 for s3://ads/ns/a/: refused; retry when S3 is back", True
    )
    store.status_now = AdapterStatus("failed", "v1", down)
    assert served.error("ns/a@v1") == AdapterFailure(str(down), retryable=True)
    broken = load_error("InvalidSafetensors", "refused (InvalidSafetensors): not safetensors", False)
    store.status_now = AdapterStatus("failed", "v1", broken)
    assert served.error("ns/a@v1") == AdapterFailure(str(broken), retryable=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_down(tiny_llama_dir) -> Iterator[ServedAdapters]:
    """Adapters whose S3 endpoint refuses connections, as a stopped S3 server does."""
    session = boto3.Session(aws_access_key_id="test", aws_secret_access_key="test")
    client = make_s3_client(f"http://127.0.0.1:{closed_port()}", "us-east-1", 1, 1, 1, session=session)
    registry = Registry(
        MODEL_NAME, {"acme/far": RegistryEntry("s3://ads/acme/far/", "v1", rank=4, bytes=1000)}
    )
    store = AdapterStore(
        AdapterStoreConfig(max_rank=16), base_spec(tiny_llama_dir, 16), registry, s3_client=client
    )
    adapters = ServedAdapters(store, served_base=MODEL_NAME)
    yield adapters
    adapters.close()


async def test_requests_for_an_adapter_whose_s3_is_down_get_503_with_retry_after(
    s3_down, tiny_llm, monkeypatch, start_server
):
    monkeypatch.setattr("lorafleet.engine.scheduler.ADAPTER_RETRY_S", 0.3)
    monkeypatch.setattr(tiny_llm, "adapters", s3_down)
    monkeypatch.setattr(tiny_llm.scheduler, "adapters", s3_down)
    srv = await start_server(ServerConfig(served_model_name=MODEL_NAME, request_timeout_s=10), s3_down)
    body = {"model": "acme/far", "prompt": "a", "max_tokens": 2}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{srv.url}/v1/completions", json=body) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1"
            err = (await r.json())["error"]
        async with s.post(f"{srv.url}/v1/completions", json=body | {"model": MODEL_NAME}) as r:
            assert r.status == 200  # the base model is served meanwhile
    assert err["type"] == "service_unavailable" and err["code"] == "adapter_unavailable"
    assert "cannot reach S3 for s3://ads/acme/far/" in err["message"] and "retry later" in err["message"]
    assert s3_down.store.stats().load_failures["s3"] >= 1
