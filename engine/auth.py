"""API keys: who may call the server, and which adapter namespaces each key may use.

Keys come from a file (`--api-keys-file`) or `LORAFLEET_API_KEYS`, in the same format: one
entry per line (or `;`-separated in the variable), `KEY` for every namespace or
`KEY ns1,ns2` for only those. Only SHA-256 digests of the keys are kept, and no message or
log line ever contains a key: errors name the line number instead.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

_NAMESPACE_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class AuthError(Exception):
    """401: no key, or a key that is not known."""


class Forbidden(Exception):
    """403: a known key asking for an adapter outside its namespaces."""


@dataclass(frozen=True)
class KeyScope:
    label: str  # "<source> line N": how logs refer to the key
    namespaces: frozenset[str] | None  # None: every namespace

    def authorize(self, adapter_id: str | None) -> None:
        """Raise Forbidden unless this key may use `adapter_id` (None is the base model: always allowed)."""
        if adapter_id is None or self.namespaces is None:
            return
        namespace = adapter_id.split("/", 1)[0] if "/" in adapter_id else ""
        if namespace not in self.namespaces:
            raise Forbidden(
                f"this API key may not use adapters in namespace {namespace!r}; "
                f"it is limited to {', '.join(sorted(self.namespaces))}"
            )


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """A table of key digests and their scopes. Empty means authentication is off."""

    def __init__(self, entries: Iterable[tuple[str, KeyScope]] = ()) -> None:
        self._scopes = {_digest(key): scope for key, scope in entries}

    @classmethod
    def parse(cls, text: str, source: str) -> ApiKeys:
        """Parse the key-file format; ValueError names the line, never the key."""
        entries = []
        for lineno, line in enumerate(re.split(r"[\n;]", text), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) > 2:
                raise ValueError(f"{source} entry {lineno}: expected 'KEY' or 'KEY ns1,ns2'")
            namespaces = None
            if len(fields) == 2:
                namespaces = frozenset(n for n in fields[1].split(",") if n)
                bad = sorted(n for n in namespaces if not _NAMESPACE_RE.fullmatch(n))
                if bad or not namespaces:
                    raise ValueError(f"{source} entry {lineno}: invalid namespaces {bad}")
            if len(fields[0]) < 8:
                raise ValueError(f"{source} entry {lineno}: API keys must be at least 8 characters")
            entries.append((fields[0], KeyScope(f"{source} entry {lineno}", namespaces)))
        return cls(entries)

    def merged(self, other: ApiKeys) -> ApiKeys:
        merged = ApiKeys()
        merged._scopes = self._scopes | other._scopes
        return merged

    @property
    def enabled(self) -> bool:
        return bool(self._scopes)

    def __len__(self) -> int:
        return len(self._scopes)

    def authenticate(self, authorization: str | None) -> KeyScope:
        """The scope of the bearer token in an `Authorization` header; AuthError if there is none."""
        if not authorization:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
        digest = _digest(token)
        # Compare against every digest so timing says nothing about which keys exist.
        found = None
        for known, scope in self._scopes.items():
            if hmac.compare_digest(known, digest):
                found = scope
        if found is None:
            raise AuthError("invalid API key")
        return found
