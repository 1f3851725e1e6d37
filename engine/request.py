"""A request's lifecycle state and its sampling parameters. Pure Python: no torch."""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """A request the caller can fix: the message says what is wrong."""


GREEDY_BELOW = 1e-5  # temperatures under this sample greedily


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    # Per-request seed: the same tokens in any batch in float32 (bfloat16 logits round differently
    # with the batch's shape).
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; the matched text is not returned
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest(f"temperature must be between 0 and 100, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest(f"seed must be a non-negative 64-bit integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty strings")
        if len(self.stop) > 16:
            raise InvalidRequest("at most 16 stop strings are allowed")

    @property
    def greedy(self) -> bool:
        # Below this, dividing the logits by the temperature overflows float32 (1e-40 made every
        # logit inf and sampled token 0); it is greedy in all but name, as in vLLM.
        return self.temperature < GREEDY_BELOW


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the caller (e.g. client disconnected)
    ERROR = "error"  # the step that ran it failed


def split_adapter_key(key: str) -> tuple[str, str]:
    """(adapter id, version) of an engine adapter key, "<namespace>/<name>@<version>"."""
    adapter_id, _, version = key.partition("@")
    return adapter_id, version


@dataclass(eq=False)
class Request:
    """One generation request. `num_computed_tokens` catches up with `num_tokens` step by step:
    there are no prefill/decode phases, only tokens whose KV is not yet in the cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None  # an adapter key (split_adapter_key); None: the base model
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache when admitted
    # Requests share cached KV only under the same salt (and adapter): a tenant that salts its
    # requests cannot learn from timings whether someone else sent the same prompt.
    cache_salt: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def cache_key(self) -> str:
        """What the prefix cache keys this request's KV on besides its tokens: its adapter
        (LoRA changes the keys and values) and its salt."""
        return json.dumps([self.adapter_id, self.cache_salt])  # unambiguous, whatever the strings hold

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
