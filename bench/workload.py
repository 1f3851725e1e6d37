"""The standard benchmark workload: the first N chat requests of shared/bench/prompts.jsonl.

Taking a prefix (never a sample) keeps figures comparable from one change to the next.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]


SHIPPED_PROMPTS = Path(__file__).resolve().parent / "prompts.jsonl"  # a copy, for clones without ../shared


def default_prompts_path() -> Path:
    """`<repo root>/../shared/bench/prompts.jsonl`, the file every benchmark shares, when it is there;
    else the copy shipped in the package (tests check the two are identical)."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "prompts.jsonl"
    return shared if shared.is_file() else SHIPPED_PROMPTS


def load_messages(n: int, path: Path | None = None) -> list[Messages]:
    """The `messages` of the first `n` requests of the workload file."""
    if n < 1:
        raise ValueError(f"the number of requests must be at least 1, got {n}")
    path = path or default_prompts_path()
    if not path.is_file():
        raise FileNotFoundError(f"workload file {path} not found; pass --prompts PATH")
    conversations: list[Messages] = []
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if len(conversations) == n:
                break
            if line.strip():
                row = json.loads(line)
                if "messages" not in row:
                    raise ValueError(f"{path}:{line_no}: no 'messages' field")
                conversations.append(row["messages"])
    if len(conversations) < n:
        raise ValueError(f"{path} holds {len(conversations)} requests, fewer than the {n} asked for")
    return conversations


def chat_prompts(tokenizer: Any, conversations: Sequence[Messages]) -> list[list[int]]:
    """Prompt token ids: each conversation through the tokenizer's chat template, ready for a reply."""
    return [
        list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
        for messages in conversations
    ]
