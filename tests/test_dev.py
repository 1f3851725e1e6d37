"""`lorafleet dev`, what `make run` starts: embedded S3, demo adapters trained once, the engine.

Run here on the tiny model with a few training steps; the real run differs only in the model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from lorafleet.engine.demo_adapters import STYLES, pirate
from tests.test_server_shutdown import CLI, free_port, wait_ready


def test_pirate_style_is_distinctive():
    assert pirate("Hello, my friend. The sky is blue.") == (
        "Arr, matey! Ahoy, me friend. Th' sky be blue. Yo-ho-ho!"
    )


async def chat(s: aiohttp.ClientSession, url: str, model: str) -> tuple[int, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": "What do bees make?"}], "max_tokens": 8,
            "temperature": 0}  # fmt: skip
    async with s.post(f"{url}/v1/chat/completions", json=body) as r:
        return r.status, await r.json()


async def test_dev_stack_trains_publishes_and_serves_demo_adapters(tiny_llama_dir: Path, tmp_path: Path):
    port, log, cache = free_port(), tmp_path / "dev.log", tmp_path / "cache"
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"LORAFLEET_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    args = ["dev", "--model", str(tiny_llama_dir), "--port", str(port), "--served-model-name", "tiny",
            "--max-model-len", "256", "--kv-cache-mib", "4", "--demo-steps", "3"]  # fmt: skip
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLI, *args, stdout=out, stderr=out, env=env
        )
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, url, proc)
            async with s.get(f"{url}/v1/models") as r:
                ids = {m["id"] for m in (await r.json())["data"]}
            assert ids == {"tiny"} | {f"demo/{style}" for style in STYLES}
            replies = {}
            for model in sorted(ids):  # each demo adapter loads just in time from the embedded S3
                status, body = await chat(s, url, model)
                assert status == 200, body
                replies[model] = body["choices"][0]["message"]["content"]
            assert replies["demo/caps"] != replies["tiny"] or replies["demo/pirate"] != replies["tiny"], (
                replies
            )
            async with s.get(f"{url}/metrics") as r:
                assert 'lorafleet_adapter_load_seconds_count{source="s3"} 2.0' in await r.text()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log.read_text()
    assert "Traceback" not in text and "Ctrl-C stops everything" in text, text[-3000:]
    trained = sorted(p.name for p in (cache / "demo-adapters" / tiny_llama_dir.name).iterdir())
    assert trained == sorted(STYLES)


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of each child process of `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if int(rest[1]) == pid:
            found.append((int(stat.parent.name), name))
    return found


async def test_sigterm_while_starting_stops_the_embedded_s3(tiny_llama_dir: Path, tmp_path: Path):
    """A SIGTERM before the server is up (it owns the signal handlers from then on) must still
    stop `weed mini`: an orphaned weed keeps its data directory locked and the next run fails."""
    env = os.environ | {"LORAFLEET_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["dev", "--model", str(tiny_llama_dir), "--port", str(free_port()), "--max-model-len", "256",
            "--kv-cache-mib", "4", "--demo-steps", "3"]  # fmt: skip
    with (tmp_path / "dev.log").open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLI, *args, stdout=out, stderr=out, env=env
        )
    try:
        weed: list[int] = []
        while not weed and proc.returncode is None:
            await asyncio.sleep(0.05)
            weed = [pid for pid, name in children(proc.pid) if name == "weed"]
        assert weed, (tmp_path / "dev.log").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 128 + signal.SIGTERM
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not Path(f"/proc/{weed[0]}").exists(), "weed outlived `lorafleet dev`"
