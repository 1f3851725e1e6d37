"""Graceful shutdown: the real `lorafleet engine` process drains on SIGTERM and exits 0; in
process, a drain whose grace runs out reports the requests it had to leave."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.engine.server import drain
from tests.plugins.server import MODEL_NAME

CLI = "import sys; from lorafleet.engine.cli import main; sys.exit(main())"
TOKENS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(session: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process) -> None:
    for _ in range(1200):
        if proc.returncode is not None:
            raise AssertionError(f"the server exited early with {proc.returncode}")
        try:
            async with session.get(f"{url}/ready") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the server never became ready")


async def inflight(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics") as r:
        families = text_string_to_metric_families(await r.text())
        return next(f.samples[0].value for f in families if f.name == "lorafleet_server_requests_inflight")


async def read_stream(resp: aiohttp.ClientResponse) -> list[str]:
    async with resp:
        assert resp.status == 200
        return [e.removeprefix("data: ") for e in (await resp.text()).strip().split("\n\n")]


async def test_sigterm_drains_in_flight_streams_then_exits_0(tiny_llama_dir, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = ["engine", "--model", str(tiny_llama_dir), "--port", str(port), "--served-model-name", MODEL_NAME,
            "--max-model-len", "512", "--kv-cache-mib", "4", "--max-num-seqs", "1", "--drain-grace-s", "120"]  # fmt: skip
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLI, *args, stdout=out, stderr=out, env=env
        )
    body = {"model": MODEL_NAME, "prompt": "a", "max_tokens": TOKENS, "ignore_eos": True, "temperature": 0,
            "stream": True}  # fmt: skip
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, url, proc)
            first = await s.post(f"{url}/v1/completions", json=body)
            await first.content.readuntil(b"\n\n")  # streaming has begun
            # With one running sequence the second request waits in the queue: in flight, no token yet.
            second = asyncio.ensure_future(s.post(f"{url}/v1/completions", json=body))
            while await inflight(s, url) < 2:
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            for _ in range(100):  # the signal and this probe race in the server's event loop
                async with s.get(f"{url}/ready") as r:
                    if r.status == 503:
                        assert (await r.json())["status"] == "draining"
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("/ready never reported draining after SIGTERM")
            async with s.post(f"{url}/v1/completions", json=body | {"stream": False}) as r:
                assert r.status == 503
            for events in (await read_stream(first), await read_stream(await second)):
                assert events[-1] == "[DONE]"
                chunks = [json.loads(e) for e in events[:-1]]
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log.read_text()
    assert "draining: 2 requests in flight" in text and "Traceback" not in text, text[-3000:]


async def test_drain_grace_running_out_cancels_the_rest(start_server):
    srv = await start_server(gated=True)
    body = {"model": MODEL_NAME, "prompt": "a", "max_tokens": 50, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as s:
        srv.gate.allow(1)
        resp = await s.post(f"{srv.url}/v1/completions", json=body)
        assert resp.status == 200
        assert await drain(srv.app, grace_s=0.05) is False
        resp.close()
