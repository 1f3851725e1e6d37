"""The disk tier of the adapter store: verified adapter files in a directory under a byte budget.

Entries are keyed by (adapter id, version) and survive restarts: `index.json` records for each
its directory, the sha256 of each file and when it was last used (by this tier's own clock, not
the file system's atime, which mounts often disable). Files are checked against the recorded
sha256 every time they are read; a mismatch deletes the entry and the caller fetches again.

Thread-safe; one process per directory. Knows nothing about S3 or tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from .adapter_format import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (adapter id, version)
FILE_NAMES = (CONFIG_NAME, WEIGHTS_NAME)
INDEX_NAME = "index.json"
_INDEX_VERSION = 1
_DIR_RE = re.compile(r"[0-9a-f]{32}")  # what `put` names entry directories


@dataclass
class DiskEntry:
    adapter_id: str
    version: str
    dir: str  # directory name below <root>/adapters
    bytes: int  # both files
    sha256: dict[str, str]  # file name -> hex digest, checked on every read
    last_used: float  # unix seconds of the last read or write: the LRU order, across restarts


class DiskTier:
    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.evictions = 0  # entries removed to stay under the budget
        self.corrupt = 0  # entries removed because their files no longer matched their sha256
        self._adapters = self.root / "adapters"
        self._staging = self.root / ".staging"
        self._lock = threading.Lock()  # guards the fields below; never held during I/O
        self._index_lock = threading.Lock()  # serializes index file writes (fetch threads only)
        self._entries: dict[Key, DiskEntry] = {}
        self._reading: Counter[Key] = Counter()  # entries being read are not evicted
        self._clock = 0.0
        self._recover()

    def staging_dir(self) -> Path:
        """A fresh directory on the same file system, for a download that `put` may adopt."""
        path = self._staging / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) resident."""
        with self._lock:
            return len(self._entries), sum(e.bytes for e in self._entries.values())

    def read(self, key: Key) -> dict[str, bytes] | None:
        """The entry's files, verified against their recorded sha256; None if absent or corrupt."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._reading[key] += 1
        try:
            files = {name: (self._adapters / entry.dir / name).read_bytes() for name in FILE_NAMES}
            intact = all(_sha256(data) == entry.sha256.get(name) for name, data in files.items())
        except OSError:
            intact = False
        finally:
            with self._lock:
                self._reading[key] -= 1
        if not intact:
            log.warning("disk cache entry %s@%s failed its checksum; deleting it", *key)
            self._remove([key], evicted=False)
            return None
        with self._lock:
            entry.last_used = self._tick()
        self._save_index()
        return files

    def put(self, key: Key, src_dir: Path, files: Mapping[str, bytes]) -> None:
        """Adopt `src_dir`, which holds `files` (already verified), then evict LRU entries over budget.

        An adapter larger than the whole budget is not cached.
        """
        size = sum(len(files[name]) for name in FILE_NAMES)
        if size > self.budget_bytes:
            return
        name = hashlib.sha256(f"{key[0]}\0{key[1]}".encode()).hexdigest()[:32]
        dest = self._adapters / name
        self._adapters.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)  # a leftover that the index did not know
        os.rename(src_dir, dest)
        digests = {n: _sha256(files[n]) for n in FILE_NAMES}
        with self._lock:
            self._entries[key] = DiskEntry(key[0], key[1], name, size, digests, self._tick())
            victims = self._over_budget(keep=key)
        self._remove(victims)

    def _over_budget(self, keep: Key | None) -> list[Key]:
        total = sum(e.bytes for e in self._entries.values())
        victims = []
        for key, entry in sorted(self._entries.items(), key=lambda kv: kv[1].last_used):
            if total <= self.budget_bytes:
                break
            if key != keep and self._reading[key] == 0:
                victims.append(key)
                total -= entry.bytes
        return victims

    def _remove(self, keys: list[Key], *, evicted: bool = True) -> None:
        with self._lock:
            gone = [self._entries.pop(k) for k in keys if k in self._entries]
            self.evictions += len(gone) if evicted else 0
            self.corrupt += 0 if evicted else len(gone)
        for entry in gone:
            shutil.rmtree(self._adapters / entry.dir, ignore_errors=True)
        self._save_index()

    def _tick(self) -> float:
        # Strictly increasing, so two uses within one clock tick still have an order.
        self._clock = max(time.time(), self._clock + 1e-6)
        return self._clock

    def _save_index(self) -> None:
        with self._index_lock:
            with self._lock:  # the snapshot is taken in write order: the last write is the newest
                data = {"version": _INDEX_VERSION, "entries": [asdict(e) for e in self._entries.values()]}
            tmp = self.root / f".{INDEX_NAME}.tmp"
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.root / INDEX_NAME)

    def _recover(self) -> None:
        """Load the index; drop entries whose files are gone and files no entry owns."""
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._staging, ignore_errors=True)  # downloads interrupted by a restart
        try:
            data = json.loads((self.root / INDEX_NAME).read_text())
            if data.get("version") != _INDEX_VERSION:
                raise ValueError(f"unknown index version {data.get('version')!r}")
            entries = [DiskEntry(**e) for e in data["entries"]]
        except FileNotFoundError:
            entries = []
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("adapter disk cache index %s is unreadable (%s); starting empty", self.root, e)
            entries = []
        for entry in entries:
            if not _DIR_RE.fullmatch(str(entry.dir)):  # never let the index point outside the tier
                log.warning("adapter disk cache index names directory %r; ignoring it", entry.dir)
                continue
            if all((self._adapters / entry.dir / name).is_file() for name in FILE_NAMES):
                self._entries[(entry.adapter_id, entry.version)] = entry
                self._clock = max(self._clock, entry.last_used)
        owned = {entry.dir for entry in self._entries.values()}
        if self._adapters.is_dir():
            for path in self._adapters.iterdir():
                if path.name not in owned:
                    shutil.rmtree(path, ignore_errors=True)
        with self._lock:
            victims = self._over_budget(keep=None)  # the budget may have shrunk since the last run
        self._remove(victims)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
