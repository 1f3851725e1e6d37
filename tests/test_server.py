"""The HTTP server on loopback over the tiny model: the OpenAI client, raw SSE, LoRAX routes,
validation, backpressure, timeouts, disconnects, drain, auth and metrics."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import uuid

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.engine.auth import ApiKeys
from lorafleet.engine.request import SamplingParams
from lorafleet.engine.server import STATE, ServerConfig, add_server_options, drain, server_config
from tests.plugins.server import MAX_NUM_SEQS, MODEL_NAME

LONG = {"max_tokens": 60, "ignore_eos": True, "temperature": 0}
GREEDY_8 = SamplingParams(max_tokens=8, temperature=0.0)


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing is exactly `data: ...\\n\\n`."""
    body = (await resp.read()).decode()
    assert body.endswith("\n\n")
    frames = body[:-2].split("\n\n")
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), body[:500]
    return [f[len("data: ") :] for f in frames]


async def post(session: aiohttp.ClientSession, url: str, body: object) -> tuple[int, dict]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json()


# -- the OpenAI client --------------------------------------------------------------------------


async def test_openai_client_completions_chat_stream_and_models(start_server, tiny_llm):
    expected = tiny_llm.generate([tiny_llm.tokenizer.encode("The quick brown")], GREEDY_8)[0]
    srv = await start_server()
    async with openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as client:
        done = await client.completions.create(
            model=MODEL_NAME, prompt="The quick brown", max_tokens=8, temperature=0
        )
        assert done.object == "text_completion" and done.model == MODEL_NAME
        assert done.choices[0].text == expected.text
        assert done.choices[0].finish_reason == str(expected.finish_reason)
        assert done.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert done.usage.completion_tokens == len(expected.token_ids)

        chat = await client.chat.completions.create(
            model="acme/support",
            messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=6,
            seed=3,
        )
        assert chat.choices[0].message.role == "assistant" and chat.model == "acme/support"
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        full = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=0
        )
        assert streamed == full.choices[0].message.content

        text_stream = await client.completions.create(
            model=MODEL_NAME, prompt="a", max_tokens=5, temperature=0, stream=True
        )
        assert [c.choices[0].finish_reason async for c in text_stream][-1] in ("stop", "length")

        listed = await client.models.list()
        by_id = {m.id: m for m in listed.data}
        assert set(by_id) == {MODEL_NAME, "acme/support", "acme/broken", "globex/legal"}
        assert by_id["acme/support"].model_extra["parent"] == MODEL_NAME
        assert by_id["globex/legal"].owned_by == "globex"

        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await client.completions.create(model="acme/missing", prompt="x", max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError, match="`n`"):
            await client.completions.create(model=MODEL_NAME, prompt="x", n=2)
        # A published adapter whose weights are corrupt: a clear 422, and everyone else is served.
        with pytest.raises(openai.UnprocessableEntityError, match="safetensors") as e:
            await client.completions.create(model="acme/broken", prompt="x", max_tokens=2)
        assert e.value.code == "adapter_unavailable"
        ok = await client.completions.create(model="acme/support", prompt="x", max_tokens=2)
        assert ok.usage.completion_tokens >= 1


# -- raw wire format ----------------------------------------------------------------------------


async def test_chat_stream_is_exact_openai_sse(server):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "stream": True,
            "stream_options": {"include_usage": True}} | LONG | {"max_tokens": 5}  # fmt: skip
    async with aiohttp.ClientSession() as s, s.post(f"{server.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["usage"] is None for c in chunks[:-1])
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


async def test_lorax_generate_and_generate_stream(server):
    params = {"max_new_tokens": 6, "details": True, "decoder_input_details": False, "ignore_eos_token": True}
    async with aiohttp.ClientSession() as s:
        status, body = await post(s, f"{server.url}/generate", {"inputs": "The quick", "parameters": params})
        assert status == 200
        details = body["details"]
        assert details["finish_reason"] == "length" and details["generated_tokens"] == 6
        assert len(details["tokens"]) == 6 and details["seed"] is None
        assert set(details["tokens"][0]) == {"id", "text", "logprob", "special", "skipped"}
        assert "".join(t["text"] for t in details["tokens"]) == body["generated_text"]

        async with s.post(
            f"{server.url}/generate_stream", json={"inputs": "The quick", "parameters": params}
        ) as r:
            events = [json.loads(e) for e in await sse_events(r)]
        assert len(events) == 6 and all(isinstance(e["token"]["id"], int) for e in events)
        assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
        assert events[-1]["generated_text"] == body["generated_text"]  # greedy: same text both ways
        assert events[-1]["details"]["finish_reason"] == "length"

        status, body = await post(
            s, f"{server.url}/generate", {"inputs": "x", "parameters": {"adapter_id": "a/b"}}
        )
        assert status == 404 and body["error"]["param"] == "parameters.adapter_id"
        status, body = await post(
            s, f"{server.url}/generate", {"inputs": "x", "parameters": {"decoder_input_details": True}}
        )
        assert status == 400 and "decoder_input_details" in body["error"]["message"]


# -- validation ---------------------------------------------------------------------------------

M = {"model": MODEL_NAME}
BAD_REQUESTS = [
    ("/v1/completions", M | {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", M | {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", M | {"prompt": "x", "max_tokens": 10**30}, "max_tokens"),
    ("/v1/completions", M | {"prompt": "x", "max_tokens": 160}, "max_tokens"),  # over the context left
    ("/v1/completions", M | {"prompt": "x", "temperature": "1"}, "temperature"),
    ("/v1/completions", M | {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", M | {"prompt": "x", "seed": -1}, "seed"),
    ("/v1/completions", M | {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", M | {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", M | {"prompt": [1, 10**9]}, "prompt"),
    ("/v1/completions", M | {"prompt": ""}, "prompt"),
    ("/v1/completions", M | {"prompt": "x " * 400}, "prompt"),  # longer than the context
    ("/v1/completions", M | {"prompt": "x", "logprobs": 2}, "logprobs"),
    ("/v1/completions", M | {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", M | {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", M | {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", M | {"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/completions", M | {"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ("/v1/completions", {"prompt": "x"}, "model"),
    ("/v1/completions", M | {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", M | {"messages": []}, "messages"),
    ("/v1/chat/completions", M | {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", M | {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", M | {"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
    ("/v1/chat/completions", M | {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    (
        "/v1/chat/completions",
        M | {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
        "response_format",
    ),
    ("/v1/completions", M | {"prompt": "x", "cache_salt": 7}, "cache_salt"),
    ("/v1/completions", M | {"prompt": "x", "cache_salt": ""}, "cache_salt"),
    ("/generate", {"inputs": 5}, "inputs"),
    ("/generate", {"inputs": "x", "parameters": {"top_k": 1.5}}, "parameters.top_k"),
    ("/generate", {"inputs": "x", "parameters": {"best_of": 2}}, "parameters.best_of"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS, ids=[p for _, _, p in BAD_REQUESTS])
async def test_bad_requests_get_400_naming_the_parameter(server, path, body, param):
    async with aiohttp.ClientSession() as s:
        status, err = await post(s, server.url + path, body)
    assert status == 400, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("raw", "status", "words"),
    [
        (b"", 400, "empty"),
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"model": "\xff\xfe"}', 400, "UTF-8"),
        (b'{"model": "tiny-llama", "prompt": "x", "temperature": NaN}', 400, "NaN"),
        (b'{"model": "tiny-llama", "prompt": "x", "temperature": 1e999}', 400, "out of range"),
        (b'{"model": "tiny-llama", "prompt": "\\ud800"}', 400, "surrogate"),
        (b"[" * 100_000, 400, "JSON"),
        (b'{"prompt": "' + b"x" * (2 << 20) + b'"}', 413, "larger than"),
    ],
    ids=["empty", "syntax", "array", "utf8", "nan", "inf", "surrogate", "deep", "big"],
)
async def test_hostile_bodies(server, raw, status, words):
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{server.url}/v1/completions", data=io.BytesIO(raw)) as resp,
    ):
        assert resp.status == status
        assert words in (await resp.json())["error"]["message"]


async def test_unknown_route_and_method_are_json_errors(server):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{server.url}/v2/nothing") as resp:
            assert resp.status == 404 and "error" in await resp.json()
        async with s.get(f"{server.url}/v1/completions") as resp:
            assert resp.status == 405 and "error" in await resp.json()


# -- load, time and disconnects -----------------------------------------------------------------


async def test_full_queue_gets_429_with_retry_after(start_server):
    srv = await start_server(ServerConfig(served_model_name=MODEL_NAME, max_queue=1), gated=True)
    body = M | {"prompt": "The quick brown"} | LONG | {"stream": True}
    async with aiohttp.ClientSession() as s:

        async def open_stream() -> aiohttp.ClientResponse:
            return await s.post(f"{srv.url}/v1/completions", json=body)

        streams = [asyncio.create_task(open_stream()) for _ in range(MAX_NUM_SEQS + 1)]
        while srv.app[STATE].inflight < MAX_NUM_SEQS + 1:
            await asyncio.sleep(0.01)
        async with s.post(f"{srv.url}/v1/completions", json=body) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "queue_full"
        # Refused before its body is read or tokenized: overload must not cost a tokenization.
        async with s.post(f"{srv.url}/v1/completions", data=b"not even json") as resp:
            assert resp.status == 429
        srv.gate.open()
        for task in streams:
            async with await task as resp:
                assert (await sse_events(resp))[-1] == "[DONE]"


async def test_timeout_gives_504_or_ends_the_stream_with_an_error(start_server):
    srv = await start_server(ServerConfig(served_model_name=MODEL_NAME, request_timeout_s=0.5), gated=True)
    async with aiohttp.ClientSession() as s:
        status, err = await post(s, f"{srv.url}/v1/completions", M | {"prompt": "a"} | LONG)
        assert status == 504 and err["error"]["code"] == "request_timeout"
        srv.gate.allow(1)  # the step the timed-out request was waiting for; then its abort lands
        while srv.llm.requests:
            await asyncio.sleep(0.01)
        srv.gate.allow(1)  # one step: the first token comes, then the clock runs out
        async with s.post(
            f"{srv.url}/generate_stream", json={"inputs": "a", "parameters": {"max_new_tokens": 50}}
        ) as r:
            assert r.status == 200
            events = [json.loads(e) for e in await sse_events(r)]
    assert "token" in events[0] and events[-1]["error"]["code"] == "request_timeout"


async def test_client_disconnect_mid_stream_frees_every_kv_block(server):
    body = M | {"prompt": "The quick brown", "stream": True} | LONG | {"max_tokens": 140}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(f"{server.url}/v1/completions", json=body)
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        await resp.content.readuntil(b"\n\n")
        assert server.llm.kv.num_free_blocks < server.llm.kv.num_blocks
        resp.close()  # drop the connection mid-stream
    for _ in range(500):
        if server.llm.kv.num_free_blocks == server.llm.kv.num_blocks and not server.llm.requests:
            break
        await asyncio.sleep(0.01)
    assert server.llm.kv.num_free_blocks == server.llm.kv.num_blocks and not server.llm.requests
    async with aiohttp.ClientSession() as s:
        assert (await post(s, f"{server.url}/v1/completions", M | {"prompt": "a", "max_tokens": 2}))[0] == 200


async def test_an_engine_crash_fails_queued_requests_at_once(start_server, tiny_llm, monkeypatch):
    """A request still queued for the engine thread when it crashes gets a 503 now, not a 504 when
    its timeout runs out."""
    in_step, crash = threading.Event(), threading.Event()

    def crashing_step() -> None:
        in_step.set()
        crash.wait(10)
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_llm, "step", crashing_step)
    srv = await start_server()
    body = M | {"prompt": "a", "max_tokens": 2}
    async with aiohttp.ClientSession() as s:
        running = asyncio.create_task(post(s, f"{srv.url}/v1/completions", body))
        assert await asyncio.to_thread(in_step.wait, 10)
        queued = asyncio.create_task(post(s, f"{srv.url}/v1/completions", body))
        while srv.app[STATE].inflight < 2:  # then its submit waits in the queue behind the step
            await asyncio.sleep(0.01)
        crash.set()
        for task in (running, queued):
            status, err = await asyncio.wait_for(task, 10)
            assert status == 503 and "engine loop crashed: RuntimeError('boom')" in err["error"]["message"]
        assert (await post(s, f"{srv.url}/v1/completions", body))[0] == 503


async def test_drain_refuses_new_work_and_lets_streams_finish(start_server):
    srv = await start_server(gated=True)
    body = M | {"prompt": "The quick brown", "stream": True} | LONG | {"max_tokens": 8}
    async with aiohttp.ClientSession() as s:
        srv.gate.allow(1)
        resp = await s.post(f"{srv.url}/v1/completions", json=body)
        assert resp.status == 200
        draining = asyncio.create_task(drain(srv.app, grace_s=30))
        async with s.get(f"{srv.url}/ready") as ready:
            assert ready.status == 503
        async with s.get(f"{srv.url}/health") as health:
            assert health.status == 200
        status, err = await post(s, f"{srv.url}/v1/completions", M | {"prompt": "a"})
        assert status == 503 and "shutting down" in err["error"]["message"]
        srv.gate.open()
        events = await sse_events(resp)
        resp.release()
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert await draining is True


# -- auth ---------------------------------------------------------------------------------------

FULL_KEY, ACME_KEY = "sk-full-0123456789", "sk-acme-9876543210"


async def test_api_keys_and_namespaces(start_server, caplog):
    keys = ApiKeys.parse(f"{FULL_KEY}\n# a comment\n{ACME_KEY} acme\n", "keys.txt")
    srv = await start_server(ServerConfig(served_model_name=MODEL_NAME, api_keys=keys))
    caplog.set_level(logging.DEBUG)
    chat = M | {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}

    async def call(key: str | None, body: dict, path: str = "/v1/chat/completions") -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with aiohttp.ClientSession(headers=headers) as s, s.post(srv.url + path, json=body) as r:
            return r.status, await r.json()

    assert (await call(None, chat))[0] == 401
    status, err = await call("sk-wrong-key-123456", chat)
    assert status == 401 and err["error"]["type"] == "authentication_error"
    assert (await call(FULL_KEY, chat | {"model": "globex/legal"}))[0] == 200
    assert (await call(ACME_KEY, chat | {"model": "acme/support"}))[0] == 200
    assert (await call(ACME_KEY, chat))[0] == 200  # the base model belongs to no namespace
    status, err = await call(ACME_KEY, chat | {"model": "globex/legal"})
    assert status == 403 and "globex" in err["error"]["message"]
    assert (await call(ACME_KEY, chat | {"model": "globex/unknown"}))[0] == 403  # no probing
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ACME_KEY}"}) as s,
        s.get(f"{srv.url}/v1/models") as r,
    ):
        assert {m["id"] for m in (await r.json())["data"]} == {MODEL_NAME, "acme/support", "acme/broken"}
    async with aiohttp.ClientSession() as s:
        for path in ("/health", "/ready", "/metrics"):
            async with s.get(srv.url + path) as r:
                assert r.status == 200
    assert "401" in caplog.text or "refused" in caplog.text
    for key in (FULL_KEY, ACME_KEY, "sk-wrong-key-123456"):
        assert key not in caplog.text


async def test_tenants_do_not_share_cached_kv_of_the_base_model(start_server):
    keys = ApiKeys.parse(f"{FULL_KEY}\n{ACME_KEY} acme\nsk-acme-second-key-42 acme\n", "keys.txt")
    srv = await start_server(ServerConfig(served_model_name=MODEL_NAME, api_keys=keys))
    prompt = f"{uuid.uuid4().hex} is a prompt only these requests send, long enough for some blocks."
    body = M | {"prompt": prompt, "max_tokens": 2}

    async def cached(key: str, extra: dict | None = None) -> int:
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s,
            s.post(f"{srv.url}/v1/completions", json=body | (extra or {})) as r,
        ):
            assert r.status == 200
            return (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert await cached(ACME_KEY) == 0
    assert await cached(FULL_KEY) == 0  # another tenant: no hit, so no sign that acme sent it
    assert await cached("sk-acme-second-key-42") > 0  # the same tenant's other key shares
    assert await cached(ACME_KEY, {"cache_salt": "mine"}) == 0  # a salt narrows it further


def test_cli_options_and_env_keys(monkeypatch, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_server_options(parser)
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"{FULL_KEY}\n")
    monkeypatch.setenv("LORAFLEET_API_KEYS", f"{ACME_KEY} acme;sk-other-key-000 a,b")
    args = parser.parse_args(["--port", "0", "--api-keys-file", str(keyfile), "--max-queue", "3",
                              "--registry", "/r.json", "--adapter-s3-prefix", "s3://b/p"])  # fmt: skip
    config = server_config(args, "/models/my-model/")
    assert config.served_model_name == "my-model" and config.max_queue == 3 and len(config.api_keys) == 3
    assert config.registry_path == "/r.json" and config.adapter_s3_prefix == "s3://b/p"
    assert config.api_keys.authenticate(f"Bearer {ACME_KEY}").namespaces == {"acme"}
    assert server_config(parser.parse_args([]), None).served_model_name == "smollm2-135m-instruct"
    keyfile.write_text("short\n")
    with pytest.raises(ValueError, match="entry 1") as e:
        server_config(args, None)
    assert "short" not in str(e.value)


# -- metrics ------------------------------------------------------------------------------------


def value(families, name, **labels):
    samples = [s for f in families.values() for s in f.samples if s.name == name]
    return next(s.value for s in samples if labels.items() <= s.labels.items())


async def scrape_until(
    session: aiohttp.ClientSession, url: str, expected: float, name: str = "vllm:num_requests_running"
) -> dict:
    """Scrape until `name` shows `expected`: the engine thread publishes its counts just after it
    hands out a step's tokens, so a scrape can briefly see the step before."""
    for _ in range(200):
        async with session.get(f"{url}/metrics") as r:
            families = {f.name: f for f in text_string_to_metric_families(await r.text())}
        if value(families, name) == expected:
            return families
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never reached {expected}")


async def test_metrics_expose_the_inference_gateway_gauges(start_server):
    srv = await start_server(gated=True)
    body = {"model": "acme/support", "prompt": "a", "stream": True} | LONG
    async with aiohttp.ClientSession() as s:
        srv.gate.allow(1)
        resp = await s.post(f"{srv.url}/v1/completions", json=body)
        assert resp.status == 200
        busy = await scrape_until(s, srv.url, 1)
        srv.gate.open()
        await sse_events(resp)
        resp.release()
        await post(s, f"{srv.url}/v1/completions", M | {"prompt": "a", "max_tokens": 3})
        idle = await scrape_until(s, srv.url, 0)

    assert value(busy, "vllm:num_requests_waiting") == 0
    assert 0 < value(busy, "vllm:kv_cache_usage_perc") <= 1
    (info,) = busy["vllm:lora_requests_info"].samples
    assert info.labels["running_lora_adapters"] == "acme/support" and info.value > 1e9
    assert value(idle, "vllm:kv_cache_usage_perc") == 0 and value(idle, "vllm:num_requests_waiting") == 0
    (info,) = idle["vllm:lora_requests_info"].samples
    assert info.labels["running_lora_adapters"] == "" and info.labels["max_lora"] == "2"
    assert value(idle, "lorafleet_http_requests_total", route="/v1/completions", status="200") == 2
    assert value(idle, "lorafleet_e2e_request_latency_seconds_count") == 2
    assert value(idle, "lorafleet_time_to_first_token_seconds_count") == 2
    assert value(idle, "lorafleet_time_per_output_token_seconds_count") == 2
    assert "lorafleet_adapter_load_seconds" in idle and "lorafleet_adapters_resident" in idle
    # acme/support ran, and stays in its slot when idle.
    assert (value(busy, "lorafleet_adapters_active"), value(idle, "lorafleet_adapters_active")) == (1, 0)
    assert value(idle, "lorafleet_adapters_resident", tier="gpu") >= 1
    assert value(busy, "lorafleet_adapters_waiting") == value(idle, "lorafleet_adapters_waiting") == 0
    # The tiny engine drafts speculative tokens (tests/plugins/server.py); the model keeps some.
    drafted = value(idle, "lorafleet_spec_decode_draft_tokens_total")
    assert 0 < value(idle, "lorafleet_spec_decode_accepted_tokens_total") <= drafted


async def test_repeated_prompts_report_cached_tokens_and_salts_keep_them_apart(server, tiny_llm):
    prompt = "Serving many adapters over one base model keeps the matmuls wide."
    # All but the last token (the step samples from it): full blocks of 4, and the start of the
    # block the first request filled with its prompt's end and its first outputs.
    cacheable = len(tiny_llm.tokenizer.encode(prompt)) - 1
    url = f"{server.url}/v1/completions"
    salt = f"tenant-{uuid.uuid4().hex}"  # the engine is shared by every server test: start from a fresh key
    async with aiohttp.ClientSession() as s:
        before = await scrape_until(s, server.url, 0)
        cached, prompt_tokens = [], 0
        for body in ({"cache_salt": salt}, {"cache_salt": salt}, {"cache_salt": salt + "-other"}):
            status, out = await post(
                s, url, M | {"prompt": prompt, "max_tokens": 6, "ignore_eos": True} | body
            )
            assert status == 200, out
            cached.append(out["usage"]["prompt_tokens_details"]["cached_tokens"])
            prompt_tokens += out["usage"]["prompt_tokens"]
        after = await scrape_until(s, server.url, 0)
    assert cached == [0, cacheable, 0] and cacheable >= 12
    hits = value(after, "lorafleet_prefix_cache_hits_total") - value(
        before, "lorafleet_prefix_cache_hits_total"
    )
    queries = value(after, "lorafleet_prefix_cache_queries_total") - value(
        before, "lorafleet_prefix_cache_queries_total"
    )
    assert hits == cacheable and queries == prompt_tokens


async def test_metrics_count_requests_that_time_out_fail_or_lose_their_client(start_server, tiny_llm):
    """Tokens are counted as they come and prompts once per request, and a request that ends
    without finishing is in the latency histograms once: throughput and tail latency include the
    slowest requests."""
    srv = await start_server(ServerConfig(served_model_name=MODEL_NAME, request_timeout_s=2.0), gated=True)
    stream = {"inputs": "a", "parameters": {"max_new_tokens": 50}}
    async with aiohttp.ClientSession() as s:
        assert (await post(s, f"{srv.url}/v1/completions", M | {"prompt": "a"} | LONG))[0] == 504
        srv.gate.allow(1)  # the step it waited for; then its abort lands
        while srv.llm.requests:
            await asyncio.sleep(0.01)
        srv.gate.allow(1)  # one token, then the clock runs out
        async with s.post(f"{srv.url}/generate_stream", json=stream) as r:
            token, error = [json.loads(e) for e in await sse_events(r)]
        assert "token" in token and error["error"]["code"] == "request_timeout"
        srv.gate.allow(1)
        while srv.llm.requests:
            await asyncio.sleep(0.01)
        srv.gate.allow(2)  # two tokens, then the client goes away
        resp = await s.post(f"{srv.url}/generate_stream", json=stream)
        await resp.content.readuntil(b"\n\n")
        await resp.content.readuntil(b"\n\n")
        resp.close()
        e2e = "lorafleet_e2e_request_latency_seconds_count"
        await scrape_until(s, srv.url, 3, e2e)  # measured when its handler is cancelled
        srv.gate.open()
        assert (await post(s, f"{srv.url}/v1/completions", {"model": "acme/broken", "prompt": "x"}))[0] == 422
        families = await scrape_until(s, srv.url, 4, e2e)
    prompts = 3 * len(tiny_llm.tokenizer.encode("a")) + len(tiny_llm.tokenizer.encode("x"))
    assert value(families, "lorafleet_prompt_tokens_total") == prompts
    assert value(families, "lorafleet_generation_tokens_total") == 3
    assert value(families, "lorafleet_time_to_first_token_seconds_count") == 2
    assert value(families, "lorafleet_time_per_output_token_seconds_count") == 1
