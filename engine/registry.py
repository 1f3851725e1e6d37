"""The adapter registry: which adapters a base model's engines serve, and where each one lives.

Written by the operator (one per BaseModel, in ConfigMaps mounted into the engine pods) or by
hand for standalone use; read by the engine, which reloads it when it changes. Pure: json, gzip
and the file system only.

Format (version 1), a JSON object:

    {
      "version": 1,
      "base_model": "smollm2",                      # the served name of the base model
      "adapters": {
        "team-a/support-bot": {                     # "<namespace>/<name>", Kubernetes name rules
          "uri": "s3://bucket/prefix/",             # s3://... or file:///abs/dir
          "version": "9b2cf535f27731c974343645a3985328+5d41402abc4b2a76b9719d911017c592",  # weights+config ETags, or sha256
          "rank": 16,
          "bytes": 12345,                           # size of adapter_model.safetensors
          "pinned": false,                          # preload and never evict from CPU memory
          "target_modules": ["q_proj", "v_proj"]
        }
      }
    }

Sharding: a ConfigMap holds at most 1 MiB, so the operator stores the registry as gzip-compressed
shards, each a complete document of the format above holding a subset of the adapters, with keys
`registry-000.json.gz`, `registry-001.json.gz`, ... An adapter's shard is chosen by a stable hash
of its id, so publishing one adapter rewrites one shard. An entry compresses to 30-60 bytes, so
one shard holds 15,000 adapters or more; shards are added only when one would pass `max_bytes`.

`load_registry(path)` reads a `.json` file, a `.json.gz` file or a directory of shards (a mounted
ConfigMap or projected volume: it reads through the `..data` link, so all shards come from one
atomic update).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
SHARD_MAX_BYTES = 900_000  # ConfigMap limit is 1 MiB (1,048,576) for all keys; keep room for metadata
_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
# namespace: a DNS-1123 label (max 63); name: a DNS-1123 subdomain (max 253, dot-separated labels).
_ID_RE = re.compile(rf"(?P<ns>{_LABEL})/(?P<name>{_LABEL}(?:\.{_LABEL})*)")
_SHARD_RE = re.compile(r"registry(-\d{3,})?\.json(\.gz)?")


class RegistryError(ValueError):
    """A registry file or entry that cannot be used; the message says which and why."""


def validate_adapter_id(adapter_id: str) -> str:
    """Return `adapter_id` if it is `<namespace>/<name>` by Kubernetes rules, else raise ValueError.

    Anything else (path tricks like `..`, a second `/`, backslashes, NUL, %-encoding, upper case)
    is refused, so an id can be used as a path component and a metric label as it is.
    """
    m = _ID_RE.fullmatch(adapter_id) if isinstance(adapter_id, str) else None
    if m is None or len(m["ns"]) > 63 or len(m["name"]) > 253:
        raise ValueError(
            f"invalid adapter id {adapter_id!r}: expected '<namespace>/<name>' in lower case letters, "
            "digits and '-' (the name may also contain single '.'), as Kubernetes names are"
        )
    return adapter_id


@dataclass(frozen=True)
class RegistryEntry:
    uri: str  # where the adapter directory is: s3://bucket/prefix/ or file:///abs/dir
    version: str  # content version (both files' S3 ETags, or sha256): a republished adapter gets a new one
    rank: int
    bytes: int  # adapter_model.safetensors size; the stores budget with it before downloading
    pinned: bool = False  # preloaded, never evicted from CPU memory
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (self.uri.startswith("s3://") or self.uri.startswith("file:///")):
            raise RegistryError(f"adapter uri must start with s3:// or file:///, got {self.uri!r}")
        if not isinstance(self.version, str) or not self.version:
            raise RegistryError("adapter version must be a non-empty string")
        for name in ("rank", "bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "rank" else 0):
                raise RegistryError(
                    f"adapter {name} must be a {'positive' if name == 'rank' else 'non-negative'} integer"
                )
        if not isinstance(self.pinned, bool):
            raise RegistryError("adapter pinned must be true or false")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def from_json(cls, data: Any) -> RegistryEntry:
        if not isinstance(data, dict):
            raise RegistryError("an adapter entry must be a JSON object")
        unknown = set(data) - {"uri", "version", "rank", "bytes", "pinned", "target_modules"}
        if unknown:
            raise RegistryError(f"unknown adapter entry fields: {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except TypeError as e:  # missing required fields
            raise RegistryError(f"adapter entry: {e}") from e

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"target_modules": list(self.target_modules)}


@dataclass(frozen=True)
class Registry:
    base_model: str | None  # served name; None only for an empty directory (nothing published yet)
    adapters: dict[str, RegistryEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "base_model": self.base_model,
            "adapters": {k: self.adapters[k].to_json() for k in sorted(self.adapters)},
        }

    @classmethod
    def from_json(cls, data: Any) -> Registry:
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise RegistryError(f"not a version {FORMAT_VERSION} registry (expected {{'version': 1, ...}})")
        base_model, adapters = data.get("base_model"), data.get("adapters", {})
        if not isinstance(base_model, str) or not isinstance(adapters, dict):
            raise RegistryError("registry needs a string 'base_model' and an object 'adapters'")
        entries = {}
        for adapter_id, entry in adapters.items():
            try:
                entries[validate_adapter_id(adapter_id)] = RegistryEntry.from_json(entry)
            except ValueError as e:
                raise RegistryError(f"adapter {adapter_id!r}: {e}") from e
        return cls(base_model, entries)


def render_shards(registry: Registry, max_bytes: int = SHARD_MAX_BYTES) -> dict[str, bytes]:
    """The registry as gzip shards `registry-NNN.json.gz` -> bytes, each at most `max_bytes`.

    Deterministic: the same registry always gives the same bytes (so unchanged shards need no
    write). Always at least one shard, so an empty registry still names its base model.
    """
    if registry.base_model is None:
        raise RegistryError("a registry to publish needs its base model's served name")
    ids = sorted(registry.adapters)
    count = 1
    while True:
        buckets: list[list[str]] = [[] for _ in range(count)]
        for adapter_id in ids:
            buckets[_shard_of(adapter_id, count)].append(adapter_id)
        shards = {
            f"registry-{i:03d}.json.gz": _compress(
                Registry(registry.base_model, {k: registry.adapters[k] for k in b})
            )
            for i, b in enumerate(buckets)
        }
        largest = max(len(data) for data in shards.values())
        if largest <= max_bytes:
            return shards
        if count >= max(len(ids), 1):
            raise RegistryError(f"a single adapter entry does not fit in {max_bytes} bytes")
        # Grow by the overshoot (plus slack for uneven hashing) rather than one at a time.
        count = max(count + 1, int(count * largest / max_bytes * 1.25) + 1)


def _shard_of(adapter_id: str, count: int) -> int:
    return int.from_bytes(hashlib.sha256(adapter_id.encode()).digest()[:8], "big") % count


def _compress(registry: Registry) -> bytes:
    raw = json.dumps(registry.to_json(), separators=(",", ":"), sort_keys=True).encode()
    return gzip.compress(raw, compresslevel=6, mtime=0)  # mtime=0: identical input, identical bytes


def parse_registry_bytes(data: bytes, name: str = "registry") -> Registry:
    """One document, gzip-compressed or not (told apart by the gzip magic bytes)."""
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        return Registry.from_json(json.loads(data))
    except RegistryError as e:
        raise RegistryError(f"{name}: {e}") from e
    except (OSError, EOFError, ValueError) as e:
        raise RegistryError(f"{name}: not a readable registry: {e}") from e


def load_registry(path: str | os.PathLike[str]) -> Registry:
    """Read a registry file (`.json` or `.json.gz`) or a directory of shards, merging them."""
    return _merge(_read_snapshot(Path(path)))


def _snapshot_files(path: Path) -> list[Path]:
    """The files that make up the registry at `path`, all from one ConfigMap update."""
    if not path.is_dir():
        return [path]
    # A mounted ConfigMap is `..data -> ..<timestamp>/` plus top-level links into `..data`; the
    # kubelet swaps `..data` atomically. Resolving it once reads every shard of the same update.
    root = (path / "..data").resolve() if (path / "..data").is_dir() else path
    return sorted(p for p in root.iterdir() if _SHARD_RE.fullmatch(p.name) and p.is_file())


def _read_snapshot(path: Path) -> list[tuple[str, bytes]]:
    try:
        return [(p.name, p.read_bytes()) for p in _snapshot_files(path)]
    except OSError as e:
        raise RegistryError(f"cannot read registry {path}: {e}") from e


def _merge(parts: list[tuple[str, bytes]]) -> Registry:
    base_model: str | None = None
    adapters: dict[str, RegistryEntry] = {}
    for name, data in parts:
        shard = parse_registry_bytes(data, name)
        if base_model is not None and shard.base_model != base_model:
            raise RegistryError(
                f"{name}: base_model {shard.base_model!r} differs from {base_model!r} in other shards"
            )
        base_model = shard.base_model
        duplicates = adapters.keys() & shard.adapters.keys()
        if duplicates:
            raise RegistryError(f"{name}: adapter {sorted(duplicates)[0]!r} is also in another shard")
        adapters.update(shard.adapters)
    return Registry(base_model, adapters)


class RegistryWatcher:
    """Reload a registry when its content changes: `poll()` returns the new one, else None.

    A cheap stat fingerprint (the `..data` target, names, sizes, mtimes, inodes) is checked on
    every poll; only when it changes are the files read, and the content hash decides whether the
    registry really changed. A change to content that does not parse raises RegistryError once;
    polls after that return None until the content changes again (keep serving the old one).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fingerprint: object = None
        self._digest: str | None = None

    def poll(self, *, force: bool = False) -> Registry | None:
        """`force` re-reads even if the fingerprint is unchanged (for writes within one mtime tick)."""
        try:
            fingerprint = self._stat_fingerprint()
        except OSError:
            fingerprint = None  # missing for now (a ConfigMap not yet mounted): try again later
        if fingerprint is None or (fingerprint == self._fingerprint and not force):
            return None
        parts = _read_snapshot(self.path)
        digest = hashlib.sha256(b"".join(name.encode() + b"\0" + data for name, data in parts)).hexdigest()
        self._fingerprint = fingerprint
        if digest == self._digest:
            return None
        self._digest = digest
        return _merge(parts)

    def _stat_fingerprint(self) -> object:
        link = self.path / "..data"
        target = os.readlink(link) if link.is_symlink() else None
        stats = [
            (p.name, s.st_size, s.st_mtime_ns, s.st_ino)
            for p in _snapshot_files(self.path)
            for s in [p.stat()]
        ]
        return (target, tuple(stats))
