"""The step loop: schedule, run, update. Synchronous; `async_engine` drives it from a thread.

`LLMEngine.step()` is the only place where the scheduler, the model runner and the
detokenizers meet. A step that fails ends the requests it ran with an error and frees their
KV blocks; the loop itself carries on.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from transformers import AutoTokenizer, GenerationConfig

from .config import EngineConfig
from .detokenizer import Detokenizer
from .kv_cache import KVCacheManager
from .lora import LoRAWeights
from .model_runner import ModelRunner
from .request import FinishReason, InvalidRequest, Request, SamplingParams
from .scheduler import AdapterPort, Scheduler

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta), or, from `generate`, the whole result."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # new tokens (a delta) or all generated tokens
    text: str
    finished: bool
    finish_reason: FinishReason | None
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    error: str | None = None
    adapter_error: bool = False  # the error is the adapter's (it cannot be loaded), not the engine's
    retryable: bool = False  # an adapter error that may pass (its source is down): retry later
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class AdapterSource(AdapterPort, Protocol):
    """The adapter store as the engine sees it (see `adapters.ServedAdapters`)."""

    def key_of(self, name: str) -> str: ...  # adapter name -> versioned key; InvalidRequest if unknown

    def get(self, adapter: str) -> LoRAWeights | None: ...


def eos_token_ids(model_dir: Path, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class LLMEngine:
    def __init__(
        self, config: EngineConfig, model_dir: Path | None = None, adapters: AdapterSource | None = None
    ) -> None:
        if model_dir is None:
            from .model_source import default_cache_dir, resolve_model

            model_dir = resolve_model(config.model, default_cache_dir())
        self.config = config
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.runner = ModelRunner(self.model_dir, config)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.shape.vocab_size
        self.kv = KVCacheManager(self.runner.num_blocks, self.runner.block_size, config.cache.prefix_caching)
        self.eos_token_ids = eos_token_ids(self.model_dir, self.tokenizer)
        self.adapters = adapters
        slots = config.lora.max_loras if config.lora else 0
        self.scheduler = Scheduler(
            config.scheduler, self.kv, self.max_model_len, self.eos_token_ids, adapters, num_slots=slots
        )
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, Detokenizer] = {}
        self._ids = itertools.count()

    # -- intake ---------------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat conversation rendered with the model's chat template."""
        try:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # the template raises on malformed conversations
            raise InvalidRequest(f"cannot apply the chat template: {e}") from e
        ids: Any = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out  # type: ignore[call-overload,index]
        return list(ids)

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        adapter_id: str | None = None,
        cache_salt: str | None = None,
    ) -> Request:
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(prompt_token_ids)} tokens, but the context length is "
                f"{self.max_model_len}: shorten it to at most {self.max_model_len - 1} tokens"
            )
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {self.vocab_size})")
        if adapter_id is not None:
            if self.adapters is None or self.config.lora is None:
                raise InvalidRequest("this engine serves the base model only: it has no adapters")
            adapter_id = self.adapters.key_of(adapter_id)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        req = Request(
            request_id, list(prompt_token_ids), params, adapter_id=adapter_id, cache_salt=cache_salt
        )
        self.requests[request_id] = req
        self._detok[request_id] = Detokenizer(self.tokenizer, req.prompt_token_ids, params.stop)
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.scheduler.finish(req, FinishReason.ABORT)
        return self._output(req, [], "", finalize=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the loop -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        failed = [
            self._output(r, [], "", finalize=True, error=f.message, adapter_error=True, retryable=f.retryable)
            for r, f in out.failed
        ]
        if not out.chunks:
            return failed
        try:
            for slot, _, weights in out.slot_loads:
                self.runner.load_lora(slot, weights)
            sampled = self.runner.execute(out)
        except Exception as e:
            log.exception("step failed; ending its %d requests", len(out.chunks))
            self.scheduler.fail(out)
            return failed + [self._output(c.request, [], "", finalize=True, error=str(e)) for c in out.chunks]
        gained = self.scheduler.update(out, sampled)
        outputs = failed
        for chunk in out.chunks:
            req = chunk.request
            tokens = gained.get(req.request_id)
            if tokens is None:
                continue
            detok, text = self._detok[req.request_id], ""
            for i, token in enumerate(tokens):
                delta, hit_stop = detok.add(token)
                text += delta
                if hit_stop:
                    # Tokens after the stop string (from accepted draft tokens) were never produced.
                    del req.output_token_ids[len(req.output_token_ids) - len(tokens) + i + 1 :]
                    tokens = tokens[: i + 1]
                    if req.finished:  # the stop string came with the last allowed token
                        req.finish_reason = FinishReason.STOP
                    else:
                        self.scheduler.finish(req, FinishReason.STOP)
                    break
            outputs.append(self._output(req, tokens, text, finalize=req.finished))
        return outputs

    def _output(
        self,
        req: Request,
        tokens: list[int],
        text: str,
        *,
        finalize: bool,
        error: str | None = None,
        adapter_error: bool = False,
        retryable: bool = False,
    ) -> RequestOutput:
        if finalize:
            text += self._detok.pop(req.request_id).flush() if req.request_id in self._detok else ""
            self.requests.pop(req.request_id, None)
            self.runner.release(req)
        return RequestOutput(
            req.request_id, req.prompt_token_ids, tokens, text, req.finished, req.finish_reason,
            req.arrival_time, req.first_token_time, req.finish_time, error, adapter_error, retryable,
            req.num_cached_tokens,
        )  # fmt: skip

    # -- offline batch --------------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Run prompts to completion together; outputs in input order with all tokens and text."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        results = {r.request_id: RequestOutput(r.request_id, r.prompt_token_ids, [], "", False, None,
                                               r.arrival_time, None, None) for r in reqs}  # fmt: skip
        while self.has_unfinished():
            for o in self.step():
                res = results[o.request_id]
                res.token_ids += o.token_ids
                res.text += o.text
                res.finished, res.finish_reason, res.error = o.finished, o.finish_reason, o.error
                res.first_token_time, res.finish_time = o.first_token_time, o.finish_time
                res.num_cached_tokens = o.num_cached_tokens
        return [results[r.request_id] for r in reqs]
