"""Hypothesis throws malformed and hostile requests at a live server: never a 5xx, always OpenAI's
error shape on a 4xx, no leaked KV block, and a normal request still works afterwards.

Hypothesis runs in a worker thread and hands each request to the event loop that serves, so one
server (and one engine) takes every example.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import json
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.engine.server import ServerConfig
from tests.plugins.server import MODEL_NAME

MAX_BODY = 4096
VALID: dict[str, dict[str, Any]] = {
    "/v1/completions": {"model": MODEL_NAME, "prompt": "The quick", "max_tokens": 4},
    "/v1/chat/completions": {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    },
    "/generate": {"inputs": "The quick", "parameters": {"max_new_tokens": 4}},
    "/generate_stream": {"inputs": "The quick", "parameters": {"max_new_tokens": 4, "details": True}},
}
KEYS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "seed", "stop", "stream", "stream_options", "n", "logprobs", "echo", "best_of", "tools", "response_format",
    "ignore_eos", "inputs", "parameters", "parameters.max_new_tokens", "parameters.temperature",
    "parameters.adapter_id", "parameters.stop", "parameters.top_k", "parameters.do_sample", "messages.0.content",
    "messages.0.role", "stream_options.include_usage", "prompt.0",
]  # fmt: skip
HOSTILE = [
    True, False, None, -1, 0, 1, 2**31, 2**63, -(2**63), 10**40, 1e308, -1e-308, 0.5, "", "\x00", "\ud800",
    "日本語 🚀", "x" * 3000, [], {}, [0], [-1], [10**6], ["a", "b"], [[1, 2]], {"type": "json_object"},
    "tiny-llama", "acme/none", "../../etc/passwd", "a/b/c", "NaN",
]  # fmt: skip
RAW = [
    b"", b" ", b"null", b"[]", b'"x"', b"1e999", b"{", b'{"model": NaN}', b'{"model": Infinity}',
    b'{"max_tokens": 1' + b"0" * 5000 + b"}", b"[" * 50_000, b"\xff\xfe\x00", b'{"prompt": "\xc3\x28"}',
    b'{"model": "tiny-llama", "prompt": "' + b"x" * 2 * MAX_BODY + b'"}',
]  # fmt: skip

leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30), st.sampled_from(HOSTILE),
)  # fmt: skip
json_values = st.recursive(
    leaves,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=10,
)


def put(body: Any, dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for part in path:
        body = body[int(part)] if isinstance(body, list) else body.setdefault(part, {})
        if not isinstance(body, dict | list):
            return
    if isinstance(body, list):
        if body:
            body[0] = value
    else:
        body[last] = value


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(sorted(VALID)))
    body = copy.deepcopy(VALID[path])
    for _ in range(draw(st.integers(1, 3))):
        key, value = draw(st.sampled_from(KEYS)), draw(json_values)
        with contextlib.suppress(IndexError, ValueError, TypeError):  # through a value replaced earlier
            put(body, key, value)
    return path, json.dumps(body).encode()


cases = st.one_of(
    mutated(),
    st.tuples(st.sampled_from(sorted(VALID)), st.sampled_from(RAW) | st.binary(max_size=64)),
    st.tuples(st.sampled_from(sorted(VALID)), json_values.map(lambda v: json.dumps(v).encode())),
)


async def send(session: aiohttp.ClientSession, url: str, path: str, raw: bytes) -> tuple[int, bytes]:
    async with session.post(url + path, data=io.BytesIO(raw)) as resp:
        return resp.status, await resp.read()


def check_response(status: int, body: bytes) -> None:
    assert status < 500, body[:300]
    if status >= 400:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif body.startswith(b"data: "):
        assert body.endswith(b"\n\n")
    else:
        json.loads(body)


async def test_fuzzed_requests_never_cause_a_5xx_or_a_leak(start_server):
    config = ServerConfig(served_model_name=MODEL_NAME, max_body_bytes=MAX_BODY, max_tokens_cap=8)
    srv = await start_server(config)
    loop = asyncio.get_running_loop()
    statuses: dict[int, int] = {}

    async with aiohttp.ClientSession() as session:

        @settings(
            max_examples=200, deadline=None, database=None, derandomize=True,  # the same cases in every CI run
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )  # fmt: skip
        @given(case=cases)
        def fuzz(case: tuple[str, bytes]) -> None:
            status, body = asyncio.run_coroutine_threadsafe(send(session, srv.url, *case), loop).result(60)
            statuses[status] = statuses.get(status, 0) + 1
            check_response(status, body)

        await asyncio.to_thread(fuzz)
        assert statuses.get(400, 0) > 0, statuses
        # Whatever the fuzz did, the server still serves a valid request.
        status, body = await send(
            session, srv.url, "/v1/completions", json.dumps(VALID["/v1/completions"]).encode()
        )
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] >= 1
    for _ in range(200):  # the last aborts reach the engine thread asynchronously
        if srv.llm.kv.num_free_blocks == srv.llm.kv.num_blocks and not srv.llm.requests:
            break
        await asyncio.sleep(0.01)
    assert srv.llm.kv.num_free_blocks == srv.llm.kv.num_blocks and not srv.llm.requests
