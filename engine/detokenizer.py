"""Incremental detokenization and stop strings, per request.

Decoding the whole output every step is quadratic; instead each new token is decoded together
with a few tokens before it, and only the text past what was already emitted is new. A piece
ending in U+FFFD is an incomplete multi-byte character and waits for the next token.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-4:])  # context so the first token decodes with its leading space
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0  # characters of `text` already returned
        self.stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; return the new text and whether a stop string ended the output."""
        self.ids.append(token)
        piece = self._pending()
        if not piece or piece.endswith("\ufffd"):
            return "", False
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += piece
        safe = len(self.text)
        if self.stop:
            if self._cut_at_stop():
                return self.flush(), True
            # Hold back a tail that may still grow into a stop string.
            safe -= self._max_stop - 1
        if safe <= self.emitted:
            return "", False
        new, self.emitted = self.text[self.emitted : safe], safe
        return new, False

    def flush(self) -> str:
        """The text not yet returned: held back for stop strings, or the tokens of a character
        still incomplete when the output ended (decoded with U+FFFD, as decoding the whole output
        would; complete characters in the same tokens are kept). Call when the request ends."""
        if self.read_offset < len(self.ids):
            self.text += self._pending()
            self.prefix_offset = self.read_offset = len(self.ids)
            self._cut_at_stop()
        new, self.emitted = self.text[self.emitted :], len(self.text)
        return new

    def _pending(self) -> str:
        """The text of the tokens past `read_offset`, decoded after a few before them."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        return full[len(prefix) :]

    def _cut_at_stop(self) -> bool:
        """End `text` before the first stop string, which may straddle text already returned and
        the new piece; whether there was one."""
        start = max(0, self.emitted - self._max_stop)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)
