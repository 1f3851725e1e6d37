"""The wire protocol: request parsing and validation, OpenAI and LoRAX response shapes.

Pure Python, no aiohttp and no engine: bytes and dicts in, dataclasses and dicts out. Every way a
client can get a request wrong raises `ApiError`, which the server turns into a 4xx with
OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .request import FinishReason

Api = Literal["completions", "chat", "generate"]


class ApiError(Exception):
    """A request the server refuses; `status` is the HTTP status, the rest the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# -- the adapter catalog contract -----------------------------------------------------------------


@dataclass(frozen=True)
class AdapterInfo:
    id: str  # "<namespace>/<name>", what clients put in `model` or `adapter_id`
    parent: str | None = None  # the base model it was trained on; None means the served model


class UnknownAdapter(LookupError):
    """No adapter by that name (404)."""


class InvalidAdapterName(ValueError):
    """The name cannot be an adapter id at all (400)."""


class AdapterCatalog(Protocol):
    """Which adapters exist. The adapter registry implements it; the server only reads it."""

    def list(self) -> list[AdapterInfo]: ...

    def resolve(self, name: str) -> str:
        """The adapter id for `name`; raises UnknownAdapter or InvalidAdapterName."""
        ...


ADAPTER_ID_RE = re.compile(
    r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?"
)


def check_adapter_name(name: str) -> None:
    if not ADAPTER_ID_RE.fullmatch(name):
        raise InvalidAdapterName(
            f"{name!r} is not a valid adapter id: use '<namespace>/<name>' (lowercase namespace, "
            "letters, digits, '.', '_' and '-' in the name)"
        )


class StaticCatalog:
    """A fixed set of adapters: empty by default, so only the base model is served."""

    def __init__(self, adapters: list[AdapterInfo] | None = None) -> None:
        self._adapters = {a.id: a for a in adapters or []}

    def list(self) -> list[AdapterInfo]:
        return list(self._adapters.values())

    def resolve(self, name: str) -> str:
        if "/" in name:
            check_adapter_name(name)
        if name not in self._adapters:
            raise UnknownAdapter(f"the adapter {name!r} does not exist or you do not have access to it")
        return name


# -- body and field parsing -----------------------------------------------------------------------


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object: strict UTF-8, no NaN or Infinity, no overflowing numbers."""
    if not raw.strip():
        raise bad("the request body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise bad(
            f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except (ValueError, RecursionError) as e:  # huge integers, NaN, deep nesting
        raise bad(f"the request body is not acceptable JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, not {_kind(body)}")
    return body


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}.get(
        type(value), "an object"
    )


def text(value: Any, param: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise bad(f"`{param}` must be a string, not {_kind(value)}", param)
    if not value and not allow_empty:
        raise bad(f"`{param}` must not be empty", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"`{param}` contains an unpaired surrogate (\\ud800-\\udfff)", param) from None
    return value


def integer(
    body: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None, at: str = ""
) -> int | None:
    """`body[key]` as an int in [lo, hi]; `at` prefixes the name in errors ("parameters.")."""
    value, name = body.get(key), at + key
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"`{name}` must be an integer, not {_kind(value)}", name)
    if not lo <= value <= hi:
        raise bad(f"`{name}` must be between {lo} and {hi}, got {value}", name)
    return value


def number(body: dict[str, Any], key: str, lo: float, hi: float, default: float, at: str = "") -> float:
    value, name = body.get(key), at + key
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"`{name}` must be a number, not {_kind(value)}", name)
    if not lo <= value <= hi:
        raise bad(f"`{name}` must be between {lo} and {hi}, got {value}", name)
    return float(value)


def boolean(body: dict[str, Any], key: str, default: bool = False, at: str = "") -> bool:
    value, name = body.get(key), at + key
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"`{name}` must be true or false, not {_kind(value)}", name)
    return value


def stop_strings(value: Any, param: str = "stop") -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > 16:
        raise bad(f"`{param}` must be a string or an array of at most 16 strings", param)
    return tuple(text(s, param) for s in items)


# -- the requests ---------------------------------------------------------------------------------

MAX_SEED = 2**63 - 1
MAX_TOKENS_LIMIT = 2**31 - 1  # past any context length; the real bound is checked against the prompt


@dataclass(frozen=True)
class GenerationRequest:
    """One validated generation request, whichever route it came through."""

    api: Api
    model: str | None  # OpenAI `model` or LoRAX `adapter_id`; None: the base model
    prompt: str | list[int]  # text or token ids; empty for chat
    max_tokens: int | None  # None: the server's default for this API
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage
    details: bool = False  # LoRAX details
    messages: list[dict[str, str]] | None = None  # chat: rendered with the model's chat template
    # vLLM's `cache_salt`: only requests with the same salt share cached KV (see kv_cache.py)
    cache_salt: str | None = None


def _is_default(value: Any, *defaults: Any) -> bool:
    return value is None or any(value == d and type(value) is type(d) for d in defaults)


# Options we do not implement: accepted only at their default value, otherwise refused by name.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "tools": ([],),
    "tool_choice": ("none",), "functions": ([],), "function_call": ("none",), "response_format": ({"type": "text"},),
    "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (),
}  # fmt: skip
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
           "ignore_eos", "cache_salt"}  # fmt: skip
_KEYS = {"completions": _COMMON | {"prompt"}, "chat": _COMMON | {"messages", "max_completion_tokens"}}


def _check_keys(body: dict[str, Any], api: Literal["completions", "chat"]) -> None:
    for key, value in body.items():
        if key in _UNSUPPORTED:
            if not _is_default(value, *_UNSUPPORTED[key]):
                raise bad(f"`{key}` is not supported by this server; remove it or use its default", key)
        elif key not in _KEYS[api] and key not in _IGNORED:
            raise bad(f"unrecognized request argument `{key}`", key)


def _openai_common(body: dict[str, Any], api: Literal["completions", "chat"]) -> dict[str, Any]:
    _check_keys(body, api)
    model = text(body.get("model"), "model") if "model" in body else None
    if model is None:
        raise bad("`model` is required: the served model name or an adapter id", "model")
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("`stream_options` is only allowed when `stream` is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("`stream_options` must be an object with only `include_usage`", "stream_options")
        include_usage = boolean(options, "include_usage")
    top_k = integer(body, "top_k", -1, 2**31 - 1, 0)
    return dict(
        model=model,
        temperature=number(body, "temperature", 0.0, 100.0, 1.0),
        top_p=number(body, "top_p", 1e-9, 1.0, 1.0),
        top_k=max(top_k or 0, 0),  # vLLM's -1 also means "off"
        seed=integer(body, "seed", 0, MAX_SEED),
        stop=stop_strings(body.get("stop")),
        ignore_eos=boolean(body, "ignore_eos"),
        stream=stream,
        include_usage=include_usage,
        cache_salt=text(body["cache_salt"], "cache_salt") if "cache_salt" in body else None,
    )


def parse_completion(body: dict[str, Any]) -> GenerationRequest:
    common = _openai_common(body, "completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise bad(
                "`prompt` must be a string or one array of token ids; batched prompts are not "
                "supported: send one request per prompt",
                "prompt",
            )
    else:
        prompt = text(prompt, "prompt")
    max_tokens = integer(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    return GenerationRequest("completions", prompt=prompt, max_tokens=max_tokens, **common)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _message(m: Any, i: int) -> dict[str, str]:
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"`{param}` must be an object with `role` and `content`", param)
    if set(m) - {"role", "content", "name"}:
        raise bad(f"`{param}` has unsupported fields: {sorted(set(m) - {'role', 'content', 'name'})}", param)
    role = m.get("role")
    if role not in _ROLES:
        raise bad(f"`{param}.role` must be one of {', '.join(_ROLES)}", f"{param}.role")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or set(part) != {"type", "text"}:
                raise bad(
                    f"`{param}.content` parts must be {{'type': 'text', 'text': ...}}", f"{param}.content"
                )
            parts.append(text(part["text"], f"{param}.content", allow_empty=True))
        content = "".join(parts)
    return {"role": _ROLES[role], "content": text(content, f"{param}.content", allow_empty=True)}


def parse_chat(body: dict[str, Any]) -> GenerationRequest:
    common = _openai_common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("`messages` must be a non-empty array of {role, content} objects", "messages")
    if len(messages) > 4096:
        raise bad("`messages` has too many entries (at most 4096)", "messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    max_tokens = integer(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT)
    max_tokens = integer(body, "max_tokens", 1, MAX_TOKENS_LIMIT, max_tokens)
    return GenerationRequest("chat", prompt="", messages=parsed, max_tokens=max_tokens, **common)


# LoRAX's Python client sends every parameter, most at their default: accept those, refuse the rest.
_LORAX_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "adapter_source": (), "merged_adapters": (), "api_token": (), "repetition_penalty": (1, 1.0),
    "return_full_text": (False,), "truncate": (), "typical_p": (1, 1.0), "best_of": (1,), "watermark": (False,),
    "decoder_input_details": (False,), "return_k_alternatives": (), "response_format": (),
}  # fmt: skip
_LORAX_KEYS = {"adapter_id", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "do_sample",
               "details", "ignore_eos_token"}  # fmt: skip


def parse_generate(body: dict[str, Any], stream: bool) -> GenerationRequest:
    if set(body) - {"inputs", "parameters", "stream"}:
        raise bad(
            f"unrecognized request argument(s): {sorted(set(body) - {'inputs', 'parameters', 'stream'})}"
        )
    inputs = text(body.get("inputs"), "inputs")
    stream = boolean(body, "stream", stream)
    p = body.get("parameters") or {}
    if not isinstance(p, dict):
        raise bad("`parameters` must be an object", "parameters")
    for key, value in p.items():
        if key in _LORAX_DEFAULTS:
            if not _is_default(value, *_LORAX_DEFAULTS[key]):
                raise bad(f"`parameters.{key}` is not supported by this server", f"parameters.{key}")
        elif key not in _LORAX_KEYS:
            raise bad(f"unrecognized parameter `parameters.{key}`", f"parameters.{key}")
    adapter, at = p.get("adapter_id"), "parameters."
    temperature = number(p, "temperature", 0.0, 100.0, 1.0, at=at)
    top_p = number(p, "top_p", 1e-9, 1.0, 1.0, at=at)
    top_k = integer(p, "top_k", 0, 2**31 - 1, 0, at=at) or 0
    # As in TGI: greedy unless do_sample or a sampling parameter asks for sampling.
    sampling = boolean(p, "do_sample", at=at) or temperature != 1.0 or top_p < 1.0 or top_k > 0
    return GenerationRequest(
        "generate",
        model=text(adapter, "parameters.adapter_id") if adapter not in (None, "") else None,
        prompt=inputs,
        max_tokens=integer(p, "max_new_tokens", 1, MAX_TOKENS_LIMIT, at=at),
        temperature=temperature if sampling else 0.0,
        top_p=top_p,
        top_k=top_k,
        seed=integer(p, "seed", 0, MAX_SEED, at=at),
        stop=stop_strings(p.get("stop"), "parameters.stop"),
        ignore_eos=boolean(p, "ignore_eos_token", at=at),
        stream=stream,
        details=boolean(p, "details", at=at),
    )


# -- responses ------------------------------------------------------------------------------------


@dataclass
class Result:
    """What one request has produced so far; the response builders read it."""

    id: str
    api: Api
    model: str  # echoed back: the name the client asked for
    created: int  # unix seconds
    prompt_tokens: int
    seed: int | None = None
    cached_tokens: int = 0  # of the prompt's, found in the prefix cache
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None

    @property
    def usage(self) -> dict[str, Any]:
        n = len(self.token_ids)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def openai_finish_reason(reason: FinishReason | None) -> str | None:
    return None if reason is None else str(reason)  # "stop", "length" (and "abort"/"error" never reach here)


def _envelope(r: Result, chunk: bool) -> dict[str, Any]:
    obj = {"completions": "text_completion", "chat": "chat.completion.chunk" if chunk else "chat.completion"}
    return {"id": r.id, "object": obj[r.api], "created": r.created, "model": r.model}


def openai_body(r: Result) -> dict[str, Any]:
    finish = openai_finish_reason(r.finish_reason)
    if r.api == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": r.text}}
    else:
        choice = {"index": 0, "text": r.text}
    choice |= {"logprobs": None, "finish_reason": finish}
    return _envelope(r, False) | {"choices": [choice], "usage": r.usage}


def openai_chunk(
    r: Result, text: str | None, finish: FinishReason | None, include_usage: bool
) -> dict[str, Any]:
    """One stream chunk. For chat, `text=None` is the opening chunk that carries the role."""
    if r.api == "chat":
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice |= {"logprobs": None, "finish_reason": openai_finish_reason(finish)}
    chunk = _envelope(r, True) | {"choices": [choice]}
    return chunk | {"usage": None} if include_usage else chunk


def openai_usage_chunk(r: Result) -> dict[str, Any]:
    return _envelope(r, True) | {"choices": [], "usage": r.usage}


def lorax_finish_reason(r: Result, eos_token_ids: frozenset[int]) -> str:
    if r.finish_reason is FinishReason.LENGTH:
        return "length"
    return "eos_token" if r.token_ids and r.token_ids[-1] in eos_token_ids else "stop_sequence"


def lorax_token(token_id: int, text: str, special: bool) -> dict[str, Any]:
    # The engine does not return log probabilities yet: `logprob` is null rather than made up.
    return {"id": token_id, "text": text, "logprob": None, "special": special, "skipped": False}


def lorax_details(r: Result, eos: frozenset[int], tokens: list[dict[str, Any]] | None) -> dict[str, Any]:
    d = {
        "finish_reason": lorax_finish_reason(r, eos),
        "prompt_tokens": r.prompt_tokens,
        "generated_tokens": len(r.token_ids),
        "seed": r.seed,
    }
    if tokens is not None:  # /generate has them; stream events carry one token each instead
        d |= {"skipped_tokens": 0, "prefill": [], "tokens": tokens}
    return d


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
