"""The HTTP server: OpenAI and LoRAX routes over an `AsyncEngine`, with validation, streaming,
backpressure, per-request timeouts, API keys, Prometheus metrics and a graceful drain.

It does no math and knows no tensors: requests become token ids and `SamplingParams`, the engine
streams `RequestOutput` deltas back, and `protocol` shapes them for the wire. Importing this module
stays light (no torch); `run_server` imports the engine only when it starts one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from aiohttp.typedefs import Handler

from . import protocol
from .auth import ApiKeys, AuthError, Forbidden, KeyScope
from .metrics import CONTENT_TYPE, EngineSnapshot, Metrics
from .protocol import AdapterCatalog, ApiError, GenerationRequest, StaticCatalog, bad
from .request import InvalidRequest, SamplingParams, split_adapter_key

if TYPE_CHECKING:
    from .async_engine import AsyncEngine
    from .config import EngineConfig
    from .llm_engine import RequestOutput

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"  # the built-in model's served name
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes never need a key


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = DEFAULT_MODEL_NAME  # the `model` value meaning "no adapter"
    max_body_bytes: int = 1 << 20  # request bodies; 1 MiB of text is far past any context length
    # Requests that may wait beyond the engine's running batch (max_num_seqs); past that, 429.
    max_queue: int = 256
    request_timeout_s: float = 600.0  # arrival to last token; then the request is cancelled (504)
    max_tokens_cap: int = 4096  # largest max_tokens accepted, and the default where the API has none
    drain_grace_s: float = 30.0  # after SIGTERM, how long in-flight requests may take to finish
    retry_after_s: int = 1  # the Retry-After of a 429, and of a 503 for an adapter whose source is down
    api_keys: ApiKeys = field(default_factory=ApiKeys)  # empty: authentication is off
    # Where adapters come from; stored here for the adapter registry, which wires them.
    registry_path: str | None = None
    adapter_dir: str | None = None
    adapter_s3_prefix: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if self.max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        if self.request_timeout_s <= 0 or self.drain_grace_s < 0:
            raise ValueError("request_timeout_s must be positive and drain_grace_s not negative")
        if self.max_tokens_cap < 1:
            raise ValueError("max_tokens_cap must be at least 1")


@dataclass
class ServerState:
    inflight: int = 0  # requests admitted and not finished: the backpressure count
    draining: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while inflight == 0
    started: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.idle.set()


ENGINE: web.AppKey[AsyncEngine] = web.AppKey("engine")
CONFIG = web.AppKey("config", ServerConfig)
ADAPTERS: web.AppKey[AdapterCatalog] = web.AppKey("adapters")
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", ServerState)
SCOPE = web.RequestKey("scope", KeyScope)  # the caller's key, when authentication is on


@dataclass(frozen=True)
class Vocab:
    eos: frozenset[int]  # tells LoRAX's "eos_token" from "stop_sequence"
    special: frozenset[int]  # LoRAX's token.special


VOCAB = web.AppKey("vocab", Vocab)


def create_app(
    engine: AsyncEngine, config: ServerConfig, adapters: AdapterCatalog | None = None
) -> web.Application:
    """The application. It starts `engine` on startup and stops it on cleanup, unless it was
    already running (then whoever started it stops it)."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[_errors, _auth])
    app[ENGINE] = engine
    app[CONFIG] = config
    app[ADAPTERS] = adapters if adapters is not None else StaticCatalog()
    app[METRICS] = Metrics()
    app[STATE] = ServerState()
    llm = engine.engine
    app[METRICS].adapters.max_lora = llm.config.lora.max_loras if llm.config.lora else 0
    app[VOCAB] = Vocab(frozenset(llm.eos_token_ids), frozenset(llm.tokenizer.all_special_ids))
    app.add_routes(routes)
    app.cleanup_ctx.append(_engine_lifecycle)
    return app


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    engine = app[ENGINE]
    owned = not engine.alive
    if owned:
        await engine.start()
    yield
    if owned:
        await engine.stop()


def error_response(e: ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers)


def _http_error(request: web.Request, e: web.HTTPException) -> ApiError:
    if e.status == 404:
        return ApiError(404, f"no such route: {request.method} {request.path}", type="not_found_error")
    if e.status == 405:
        return ApiError(405, f"{request.method} is not allowed on {request.path}")
    return ApiError(e.status, e.reason, type="invalid_request_error" if e.status < 500 else "server_error")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as OpenAI's error JSON; every response is counted by route and status."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    counter = request.app[METRICS].requests
    try:
        resp = await handler(request)
    except ApiError as e:
        resp = error_response(e)
    except web.HTTPException as e:  # aiohttp's own refusals: unknown path, wrong method, ...
        if e.status < 400:
            raise
        resp = error_response(_http_error(request, e))
    except asyncio.CancelledError:
        counter.labels(route, "499").inc()  # the client went away
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        resp = error_response(ApiError(500, "internal server error", type="server_error"))
    counter.labels(route, str(resp.status)).inc()
    return resp


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    keys = request.app[CONFIG].api_keys
    if keys.enabled and request.path not in OPEN_PATHS:
        try:
            request[SCOPE] = keys.authenticate(request.headers.get("Authorization"))
        except AuthError as e:
            log.info("refused %s %s from %s: %s", request.method, request.path, request.remote, e)
            raise ApiError(
                401, str(e), type="authentication_error", code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            ) from None  # fmt: skip
    return await handler(request)


def authorize(request: web.Request, adapter_id: str) -> None:
    scope = request.get(SCOPE)
    if scope is None:
        return
    try:
        scope.authorize(adapter_id)
    except Forbidden as e:
        log.info("forbidden: %s asked for %r", scope.label, adapter_id)
        raise ApiError(403, str(e), type="permission_error", code="forbidden") from None


def cache_salt(request: web.Request, req: GenerationRequest) -> str | None:
    """The salt the prefix cache keys this request's KV under. With API keys on, requests share
    cached blocks only within one tenant (the namespaces its key may use), whatever salt they
    bring: others cannot learn from `cached_tokens` or timings that a tenant sent a prompt."""
    scope = request.get(SCOPE)
    if scope is None:
        return req.cache_salt
    tenant = "*" if scope.namespaces is None else ",".join(sorted(scope.namespaces))
    return f"{tenant}\0{req.cache_salt or ''}"  # namespaces hold no NUL: the pair stays unambiguous


def refuse_if_unavailable(app: web.Application) -> None:
    """503 while draining, 429 when the queue is full."""
    state, config = app[STATE], app[CONFIG]
    if state.draining:
        raise ApiError(
            503, "the server is shutting down; retry on another replica", type="service_unavailable"
        )
    limit = app[ENGINE].engine.config.scheduler.max_num_seqs + config.max_queue
    if state.inflight >= limit:
        raise ApiError(
            429, f"the server is at capacity ({limit} requests in flight); retry later",
            type="rate_limit_error", code="queue_full", headers={"Retry-After": str(config.retry_after_s)},
        )  # fmt: skip


@contextlib.asynccontextmanager
async def admitted(app: web.Application) -> AsyncIterator[None]:
    """Count a request in flight for its whole life; refuse it (429) when the queue is full."""
    refuse_if_unavailable(app)
    state = app[STATE]
    state.inflight += 1
    state.idle.clear()
    app[METRICS].inflight.set(state.inflight)
    try:
        yield
    finally:
        state.inflight -= 1
        app[METRICS].inflight.set(state.inflight)
        if state.inflight == 0:
            state.idle.set()


# -- routes ---------------------------------------------------------------------------------------

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers and the engine thread lives."""
    alive = request.app[ENGINE].alive
    return web.json_response({"status": "ok" if alive else "engine stopped"}, status=200 if alive else 503)


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    """Readiness: the model is loaded and the server is not draining."""
    if request.app[STATE].draining:
        return web.json_response({"status": "draining"}, status=503)
    if not request.app[ENGINE].alive:
        return web.json_response({"status": "engine stopped"}, status=503)
    return web.json_response({"status": "ready"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    m, llm = request.app[METRICS], request.app[ENGINE].engine
    snapshot = engine_snapshot(request.app[ENGINE])
    m.observe_engine(snapshot)
    store = getattr(request.app[ADAPTERS], "store", None)  # a ServedAdapters' AdapterStore
    if store is not None:
        running, waiting = snapshot.running_adapters, snapshot.waiting_adapters
        m.adapters.observe(
            store.stats(), llm.scheduler.slots.num_resident, len(running), len(waiting - running)
        )
    return web.Response(body=m.exposition(), headers={"Content-Type": CONTENT_TYPE})


def engine_snapshot(engine: AsyncEngine) -> EngineSnapshot:
    """The engine thread's published load. Read only: the scheduler is never touched from here."""
    llm = engine.engine
    waiting = llm.scheduler.waiting  # a queue, or (per-adapter queues) a method iterating them
    return EngineSnapshot(
        num_waiting=engine.num_waiting,
        num_running=engine.num_running,
        kv_usage=llm.kv.usage,
        running_adapters=_adapter_ids(lambda: llm.scheduler.running),
        waiting_adapters=_adapter_ids(waiting if callable(waiting) else lambda: waiting),
        num_draft_tokens=llm.scheduler.num_draft_tokens,
        num_accepted_tokens=llm.scheduler.num_accepted_tokens,
        num_queried_tokens=llm.scheduler.num_queried_tokens,
        num_cached_tokens=llm.scheduler.num_cached_tokens,
    )


def _adapter_ids(requests: Callable[[], Iterable[Any]]) -> frozenset[str]:
    # The engine thread may change the containers while we copy them (which then raises); retry.
    for _ in range(5):
        with contextlib.suppress(RuntimeError):
            # The endpoint picker matches served names, not the engine's versioned keys.
            return frozenset(split_adapter_key(r.adapter_id)[0] for r in tuple(requests()) if r.adapter_id)
    return frozenset()


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    app = request.app
    base, created, scope = app[CONFIG].served_model_name, app[STATE].started, request.get(SCOPE)
    data: list[dict[str, Any]] = [
        {"id": base, "object": "model", "created": created, "owned_by": "lorafleet", "root": base,
         "parent": None, "max_model_len": app[ENGINE].engine.max_model_len},
    ]  # fmt: skip
    for a in app[ADAPTERS].list():
        if scope is not None:
            try:
                scope.authorize(a.id)
            except Forbidden:
                continue
        owner = a.id.split("/", 1)[0]
        data.append({"id": a.id, "object": "model", "created": created, "owned_by": owner, "root": a.id,
                     "parent": a.parent or base})  # fmt: skip
    return web.json_response({"object": "list", "data": data})


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await generation(request, "completions")


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await generation(request, "chat")


@routes.post("/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    return await generation(request, "generate")


@routes.post("/generate_stream")
async def generate_stream(request: web.Request) -> web.StreamResponse:
    return await generation(request, "generate", stream=True)


# (parameter naming the model, parameter naming max_tokens, parameter holding the prompt) per API
_PARAMS = {
    "completions": ("model", "max_tokens", "prompt"),
    "chat": ("model", "max_tokens", "messages"),
    "generate": ("parameters.adapter_id", "parameters.max_new_tokens", "inputs"),
}


async def generation(request: web.Request, api: str, stream: bool = False) -> web.StreamResponse:
    """Validate, resolve, tokenize, admit, run: every generation route goes through here."""
    arrival = time.monotonic()
    app = request.app
    refuse_if_unavailable(app)  # before the body is read and tokenized; admitted() checks again
    body = protocol.parse_json_object(await read_body(request))
    if api == "completions":
        req = protocol.parse_completion(body)
    elif api == "chat":
        req = protocol.parse_chat(body)
    else:
        req = protocol.parse_generate(body, stream)
    adapter_id = resolve_model(request, req)
    prompt_ids = await tokenize(app, req)
    params = sampling_params(app, req, len(prompt_ids))
    async with admitted(app):
        run = Run(app, req, prompt_ids, params, adapter_id, cache_salt(request, req), arrival)
        try:
            return await (stream_response(request, run) if req.stream else full_response(run))
        finally:
            await run.close()


async def read_body(request: web.Request) -> bytes:
    limit = request.app[CONFIG].max_body_bytes
    too_big = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_big from None


def resolve_model(request: web.Request, req: GenerationRequest) -> str | None:
    """The adapter id a request names, or None for the base model; checks the key's namespaces."""
    name, base = req.model, request.app[CONFIG].served_model_name
    if name is None or name == base:
        return None
    param = _PARAMS[req.api][0]
    if "/" in name:
        authorize(request, name)  # before the lookup, so other namespaces' adapters cannot be probed
    try:
        adapter_id = request.app[ADAPTERS].resolve(name)
    except protocol.UnknownAdapter as e:
        message = f"{e}; this server serves {base!r} and its adapters (see /v1/models)"
        raise ApiError(404, message, param=param, code="model_not_found") from None
    except protocol.InvalidAdapterName as e:
        raise bad(str(e), param) from None
    authorize(request, adapter_id)
    return adapter_id


async def tokenize(app: web.Application, req: GenerationRequest) -> list[int]:
    llm, param = app[ENGINE].engine, _PARAMS[req.api][2]
    try:
        if req.messages is not None:
            ids = await asyncio.to_thread(llm.encode_chat, req.messages)
        elif isinstance(req.prompt, str):
            ids = await asyncio.to_thread(llm.tokenizer.encode, req.prompt)
        else:
            ids = list(req.prompt)
            if any(not 0 <= t < llm.vocab_size for t in ids):
                raise bad(f"prompt token ids must be in [0, {llm.vocab_size})", param)
    except InvalidRequest as e:
        raise bad(str(e), param) from None
    if not ids:
        raise bad("the prompt is empty", param)
    return ids


def sampling_params(app: web.Application, req: GenerationRequest, num_prompt: int) -> SamplingParams:
    context, cap = app[ENGINE].engine.max_model_len, app[CONFIG].max_tokens_cap
    room = context - num_prompt
    if room < 1:
        raise ApiError(
            400, f"this model's maximum context length is {context} tokens, but the prompt has {num_prompt} "
            f"tokens: shorten it to at most {context - 1}", param=_PARAMS[req.api][2], code="context_length_exceeded",
        )  # fmt: skip
    param = _PARAMS[req.api][1]
    if req.max_tokens is None:  # OpenAI's completions default to 16 tokens; the others to the cap
        max_tokens = min(16 if req.api == "completions" else cap, room)
    elif req.max_tokens > room:
        raise bad(
            f"`{param}` is {req.max_tokens}, but the prompt has {num_prompt} tokens and the context length is "
            f"{context}: at most {room} tokens can be generated",
            param,
        )
    elif req.max_tokens > cap:
        raise bad(f"`{param}` may be at most {cap} on this server", param)
    else:
        max_tokens = req.max_tokens
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
            stop=req.stop, ignore_eos=req.ignore_eos,
        )  # fmt: skip
    except InvalidRequest as e:
        raise bad(str(e)) from None


class Run:
    """One admitted request: its engine stream, deadline, accumulated result and latency stamps."""

    def __init__(
        self, app: web.Application, req: GenerationRequest, prompt_ids: list[int], params: SamplingParams,
        adapter_id: str | None, salt: str | None, arrival: float,
    ) -> None:  # fmt: skip
        self.app, self.req, self.arrival = app, req, arrival
        prefix = {"completions": "cmpl", "chat": "chatcmpl", "generate": "gen"}[req.api]
        model = req.model or app[CONFIG].served_model_name
        seed = None if params.greedy else params.seed
        self.result = protocol.Result(
            f"{prefix}-{uuid.uuid4().hex}", req.api, model, int(time.time()), len(prompt_ids), seed
        )
        self.tokens: list[dict[str, Any]] = []  # LoRAX details.tokens
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finished = False
        self.refused = False  # by the engine (invalid, or not running): not measured, it never ran
        timeout = app[CONFIG].request_timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout - (time.monotonic() - arrival)
        stream = app[ENGINE].generate(prompt_ids, params, adapter_id, self.result.id, salt)
        self._stream = cast("AsyncGenerator[RequestOutput, None]", stream)  # an async generator

    async def next(self) -> RequestOutput:
        from .async_engine import EngineDead  # loaded by now: the engine exists

        try:
            async with asyncio.timeout_at(self.deadline):
                out = await anext(self._stream)
        except TimeoutError:
            timeout = self.app[CONFIG].request_timeout_s
            raise ApiError(504, f"the request did not finish within {timeout:g} s", type="timeout",
                           code="request_timeout") from None  # fmt: skip
        except InvalidRequest as e:
            self.refused = True
            raise bad(str(e)) from None
        except (EngineDead, StopAsyncIteration) as e:
            self.refused = True  # (or it crashed mid-request: then the server exits)
            raise ApiError(503, f"the engine is not running: {e}", type="service_unavailable") from None
        if out.error is not None and out.adapter_error:  # a published adapter that cannot be served
            if out.retryable:  # for now: its source (S3) is down
                retry_after = str(self.app[CONFIG].retry_after_s)
                raise ApiError(503, out.error, type="service_unavailable", code="adapter_unavailable",
                               headers={"Retry-After": retry_after})  # fmt: skip
            raise ApiError(422, out.error, type="invalid_request_error", code="adapter_unavailable")
        if out.error is not None:
            raise ApiError(500, f"generation failed: {out.error}", type="server_error")
        r, special = self.result, self.app[VOCAB].special
        r.cached_tokens = out.num_cached_tokens
        if out.token_ids:
            self.last_token_at = time.monotonic()
            if self.first_token_at is None:
                self.first_token_at = self.last_token_at
            self.app[METRICS].generated_tokens.inc(len(out.token_ids))
        r.token_ids += out.token_ids
        r.text += out.text
        for i, t in enumerate(out.token_ids):  # the delta's text goes with its last token
            self.tokens.append(
                protocol.lorax_token(t, out.text if i == len(out.token_ids) - 1 else "", t in special)
            )
        if out.finished:
            self.finished, r.finish_reason = True, out.finish_reason
            self._observe()
        return out

    async def close(self) -> None:
        """Cancel the request in the engine if it is still running. One that ran and did not finish
        (timed out, failed, its client gone) is measured here, so the slowest requests count too."""
        if not self.finished and not self.refused:
            self._observe()
        await self._stream.aclose()

    def _observe(self) -> None:
        m, r = self.app[METRICS], self.result
        m.prompt_tokens.inc(r.prompt_tokens)
        m.observe_request(
            self.arrival, self.first_token_at, self.last_token_at, time.monotonic(), len(r.token_ids)
        )

    def events(self, out: RequestOutput, first: bool) -> list[bytes]:
        """The SSE events for one engine delta."""
        r, req, vocab = self.result, self.req, self.app[VOCAB]
        if req.api == "generate":
            events = []
            for i, token in enumerate(self.tokens[len(self.tokens) - len(out.token_ids) :]):
                last = out.finished and i == len(out.token_ids) - 1
                details = protocol.lorax_details(r, vocab.eos, None) if last and req.details else None
                events.append(
                    protocol.sse(
                        {"token": token, "generated_text": r.text if last else None, "details": details}
                    )
                )
            return events
        chunks = (
            [protocol.openai_chunk(r, None, None, req.include_usage)] if first and req.api == "chat" else []
        )
        if out.text or out.finished:
            finish = out.finish_reason if out.finished else None
            chunks.append(protocol.openai_chunk(r, out.text, finish, req.include_usage))
        if out.finished and req.include_usage:
            chunks.append(protocol.openai_usage_chunk(r))
        return [protocol.sse(c) for c in chunks] + ([protocol.SSE_DONE] if out.finished else [])


async def full_response(run: Run) -> web.Response:
    while not run.finished:
        await run.next()
    r = run.result
    if run.req.api != "generate":
        return web.json_response(protocol.openai_body(r))
    details = protocol.lorax_details(r, run.app[VOCAB].eos, run.tokens) if run.req.details else None
    return web.json_response({"generated_text": r.text, "details": details})


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def stream_response(request: web.Request, run: Run) -> web.StreamResponse:
    out = await run.next()  # refusals and timeouts before the first token still get a JSON error
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    try:
        first = True
        while True:
            for event in run.events(out, first):
                await resp.write(event)
            first = False
            if out.finished:
                break
            out = await run.next()
    except ApiError as e:  # a timeout or a failed step after the headers: end with an error event
        log.info("%s ended with %d: %s", run.result.id, e.status, e.message)
        with contextlib.suppress(ConnectionError):
            await resp.write(
                protocol.sse(e.body()) + (protocol.SSE_DONE if run.req.api != "generate" else b"")
            )
    except ConnectionError:
        log.info("%s: the client went away; cancelling", run.result.id)
        return resp
    await resp.write_eof()
    return resp


# -- lifecycle ------------------------------------------------------------------------------------


async def drain(app: web.Application, grace_s: float, force: asyncio.Event | None = None) -> bool:
    """Stop taking work (/ready and new requests answer 503) and wait up to `grace_s` for the
    requests in flight. True when they all finished."""
    state = app[STATE]
    state.draining = True
    log.info("draining: %d requests in flight, grace %.0f s", state.inflight, grace_s)
    waits = [asyncio.ensure_future(state.idle.wait())]
    if force is not None:
        waits.append(asyncio.ensure_future(force.wait()))
    try:
        await asyncio.wait(waits, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    if state.inflight:
        log.warning("drain grace over: cancelling %d requests", state.inflight)
    return state.inflight == 0


# -- command line ---------------------------------------------------------------------------------


def add_server_options(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig
    g = parser.add_argument_group("HTTP server")
    g.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    g.add_argument("--port", type=int, default=d.port, help=f"TCP port (default {d.port})")
    g.add_argument(
        "--served-model-name",
        help=f"the `model` name of the base model (default: {DEFAULT_MODEL_NAME} for the built-in model, "
        "else the model directory's name)",
    )
    g.add_argument(
        "--max-queue", type=int, default=d.max_queue,
        help=f"requests that may wait beyond the running batch before new ones get 429 (default {d.max_queue})",
    )  # fmt: skip
    g.add_argument(
        "--request-timeout-s", type=float, default=d.request_timeout_s,
        help=f"cancel a request still running after this many seconds (default {d.request_timeout_s:g})",
    )  # fmt: skip
    g.add_argument(
        "--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (default 1 MiB)"
    )
    g.add_argument(
        "--max-tokens-cap", type=int, default=d.max_tokens_cap,
        help=f"largest max_tokens a request may ask for (default {d.max_tokens_cap})",
    )  # fmt: skip
    g.add_argument(
        "--api-keys-file", type=Path,
        help="require API keys: one 'KEY' or 'KEY ns1,ns2' per line (also read from $LORAFLEET_API_KEYS)",
    )  # fmt: skip
    g.add_argument(
        "--drain-grace-s", type=float, default=d.drain_grace_s,
        help=f"on SIGTERM, wait this long for requests in flight (default {d.drain_grace_s:g})",
    )  # fmt: skip
    a = parser.add_argument_group("adapters")
    a.add_argument("--registry", help="adapter registry file (id -> S3 URI, version, ...)")
    a.add_argument("--adapter-dir", help="serve the PEFT adapters found in this directory")
    a.add_argument("--adapter-s3-prefix", help="serve the adapters under this s3://bucket/prefix")
    # Defaults are AdapterStoreConfig's and LoRAConfig's (not imported here: they pull in torch).
    a.add_argument(
        "--max-loras", type=int, default=8, help="adapter slots: distinct adapters per step (default 8)"
    )
    a.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank (default 64)")
    a.add_argument(
        "--base-model-name",
        help="the base model adapters must name in base_model_name_or_path, compared by its last path "
        "component, case-insensitively (default: the model directory's name)",
    )
    a.add_argument(
        "--adapter-cpu-mib",
        type=int,
        default=2048,
        help="CPU tier budget, MiB of float32 weights (default 2048)",
    )
    a.add_argument("--adapter-cache-dir", type=Path, help="disk tier directory (default: no disk tier)")
    a.add_argument(
        "--adapter-disk-mib", type=int, default=10240, help="disk tier budget in MiB (default 10240)"
    )
    a.add_argument(
        "--s3-endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        help="for S3-compatible stores (default $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL; credentials: boto3's chain)",
    )  # fmt: skip


def default_served_model_name(model: str | None) -> str:
    if model is None or model == "builtin":
        return DEFAULT_MODEL_NAME
    return model.rstrip("/").rsplit("/", 1)[-1] or DEFAULT_MODEL_NAME


def server_config(args: argparse.Namespace, model: str | None) -> ServerConfig:
    keys = ApiKeys()
    if args.api_keys_file is not None:
        try:
            keys = ApiKeys.parse(args.api_keys_file.read_text(), str(args.api_keys_file))
        except OSError as e:
            raise ValueError(f"cannot read the API keys file: {e}") from None
    if os.environ.get("LORAFLEET_API_KEYS"):
        keys = keys.merged(ApiKeys.parse(os.environ["LORAFLEET_API_KEYS"], "LORAFLEET_API_KEYS"))
    return ServerConfig(
        host=args.host, port=args.port,
        served_model_name=args.served_model_name or default_served_model_name(model),
        max_body_bytes=args.max_body_bytes, max_queue=args.max_queue, request_timeout_s=args.request_timeout_s,
        max_tokens_cap=args.max_tokens_cap, drain_grace_s=args.drain_grace_s, api_keys=keys,
        registry_path=args.registry, adapter_dir=args.adapter_dir, adapter_s3_prefix=args.adapter_s3_prefix,
    )  # fmt: skip


def run_server(args: argparse.Namespace, engine_config: EngineConfig) -> int:
    """`lorafleet engine`: load the model, serve until SIGTERM or SIGINT, drain, exit 0."""
    config = server_config(args, engine_config.model)
    from .adapter_store import AdapterStoreConfig
    from .adapters import open_adapters
    from .async_engine import AsyncEngine
    from .config import LoRAConfig
    from .llm_engine import LLMEngine
    from .model_source import default_cache_dir, resolve_model

    model_dir = resolve_model(engine_config.model, default_cache_dir())
    store_config = AdapterStoreConfig(
        cpu_bytes=args.adapter_cpu_mib << 20, disk_dir=args.adapter_cache_dir,
        disk_bytes=args.adapter_disk_mib << 20, max_rank=args.max_lora_rank, s3_endpoint_url=args.s3_endpoint_url,
    )  # fmt: skip
    adapters = open_adapters(
        model_dir, store_config, config.served_model_name, args.base_model_name,
        config.registry_path, config.adapter_dir, config.adapter_s3_prefix,
    )  # fmt: skip
    if adapters is not None:
        engine_config = dataclasses.replace(
            engine_config, lora=LoRAConfig(args.max_loras, args.max_lora_rank)
        )
        adapters.start()
    try:
        engine = AsyncEngine(LLMEngine(engine_config, model_dir, adapters))
        return asyncio.run(serve(engine, config, adapters))
    finally:
        if adapters is not None:
            adapters.close()


def _on_signal(app: web.Application, stop: asyncio.Event, force: asyncio.Event) -> None:
    """The first signal starts the drain (readiness fails at once); a second one cuts it short."""
    if stop.is_set():
        force.set()
    app[STATE].draining = True
    stop.set()


async def serve(engine: AsyncEngine, config: ServerConfig, adapters: AdapterCatalog | None = None) -> int:
    """Serve until a signal, then drain. A second signal cuts the drain short. 1 if the engine died."""
    app = create_app(engine, config, adapters)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, app, stop, force)
    code = 0
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        auth = f"{len(config.api_keys)} API keys" if config.api_keys.enabled else "no authentication"
        log.info("serving %s on http://%s:%d (%s)", config.served_model_name, config.host, config.port, auth)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            if not engine.alive:
                log.error("the engine thread died; exiting")
                code = 1
                break
        if code == 0:
            await drain(app, config.drain_grace_s, force)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    log.info("stopped")
    return code
