"""KV block bookkeeping: which requests use which cache blocks. Pure Python: no torch.

The model runner owns the tensors; this module only hands out block ids. A block is free or
used by one or more requests (counted), and `free()` is the only way to stop using one.

With prefix caching on, every full block whose KV has been (or is being) computed is also named
by a hash of its tokens, of every token before it and of the request's cache key (its adapter:
LoRA changes the keys and values; and an optional salt). A new request whose prompt starts with
the same blocks under the same key shares them instead of computing them again: chat requests
with one system prompt, turns of one conversation, a preempted request coming back. Where its
prompt then parts from a cached block mid-way, it copies that block's first tokens into a block
of its own (the scheduler asks the runner for the copy), so sharing is by token, not by block.
A cached block whose last user is gone stays cached while it waits in the free list, and is
evicted (its hash forgotten) only when its memory is handed out again, least recently freed
first. Cached blocks are full and never written again: a request writes only at positions past
its cached prefix, into blocks of its own.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def bytes_per_block(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype_bytes: int
) -> int:
    """Bytes of keys and values that one block of `block_size` tokens holds across all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * block_size * dtype_bytes


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The name of a full block: SHA-256, so that no prompt can be crafted to collide with another
    request's block and read its KV (Python's hash() of ints is trivially invertible)."""
    return hashlib.sha256(parent + array("l", tokens).tobytes()).digest()


def root_hash(key: str) -> bytes:
    """The parent of a request's first block: requests share blocks only under the same key."""
    return hashlib.sha256(b"lorafleet-kv\0" + key.encode()).digest()


@dataclass
class CachedPrefix:
    """What of a token sequence's start is cached, found by `KVCacheManager.lookup`: leading full
    blocks to share, then maybe the first tokens of one more block, to copy."""

    key: str
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # one per block
    copy_from: int | None = None  # a cached block that starts with the tokens after `blocks`
    copy_tokens: int = 0  # ... how many of them (less than a block)
    num_tokens: int = 0  # tokens whose KV the request need not compute: blocks, then copy_tokens


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise kv_cache_bytes")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # Free blocks in the order they are handed out: blocks with nothing cached in front (the
        # most recently freed first, its memory is the warmest), cached blocks behind them, least
        # recently freed first.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self._keys: dict[str, str] = {}  # request -> its cache key
        self._hashes: dict[str, list[bytes]] = {}  # request -> hashes of its leading full blocks
        self._block_of: dict[bytes, int] = {}  # cached blocks by hash
        self._hash_of: dict[int, bytes] = {}  # ... and the other way round
        # The first 1 to block_size - 1 tokens of cached blocks, by hash (as a full block's, over
        # fewer tokens): a request whose prompt parts from a cached block mid-way copies its start.
        self._partial: dict[bytes, int] = {}
        self._partials_of: dict[int, list[bytes]] = {}  # block -> its entries in _partial
        self._in_flight: set[int] = set()  # blocks named for the running step, before their KV exists

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request uses, cached ones included: they are handed out when needed."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_of)

    @property
    def usage(self) -> float:
        """Fraction of blocks used by requests, 0.0 to 1.0."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def lookup(self, tokens: Sequence[int], key: str) -> CachedPrefix:
        """The longest cached start of `tokens` under `key`: a run of full blocks, then the most
        tokens that a cached block following them starts with (the caller copies their KV into
        a block of its own). It stops one token short of the end, so that a request always
        computes its last token (the step samples from it). Changes nothing: `allocate(...,
        prefix=)` takes the blocks."""
        prefix = CachedPrefix(key)
        if not self.prefix_caching:
            return prefix
        parent, bs, known = root_hash(key), self.block_size, len(tokens) - 1
        for i in range(known // bs):
            h = block_hash(parent, tokens[i * bs : (i + 1) * bs])
            block = self._block_of.get(h)
            if block is None:
                break
            prefix.blocks.append(block)
            prefix.hashes.append(h)
            parent = h
        start = len(prefix.blocks) * bs
        for n in range(min(bs - 1, known - start), 0, -1):
            block = self._partial.get(block_hash(parent, tokens[start : start + n]))
            if block is not None and block not in self._in_flight:  # its KV is written
                prefix.copy_from, prefix.copy_tokens = block, n
                break
        prefix.num_tokens = start + prefix.copy_tokens
        return prefix

    def can_allocate(
        self, request_id: str, num_tokens: int, reserve_blocks: int = 0, prefix: CachedPrefix | None = None
    ) -> bool:
        shared = prefix.blocks if prefix else []
        extra = self.blocks_for(num_tokens) - len(self.block_table(request_id)) - len(shared)
        # A cached block nobody uses sits in the free list: sharing it takes it out of there too.
        return extra + sum(self._refs[b] == 0 for b in shared) <= len(self._free) - reserve_blocks

    def allocate(
        self, request_id: str, num_tokens: int, reserve_blocks: int = 0, prefix: CachedPrefix | None = None
    ) -> bool:
        """Grow the request's table to hold `num_tokens` tokens. All or nothing. A new request may
        start its table with the cached blocks of `prefix` (from `lookup` of its tokens)."""
        if not self.can_allocate(request_id, num_tokens, reserve_blocks, prefix):
            return False
        if prefix is not None:
            if request_id in self._tables:
                raise RuntimeError(f"request {request_id} already has blocks: a prefix comes first")
            self._keys[request_id] = prefix.key
            self._hashes[request_id] = list(prefix.hashes)
            for block in prefix.blocks:
                if self._refs[block] == 0:
                    del self._free[block]
                self._refs[block] += 1
            self._tables[request_id] = list(prefix.blocks)
            if prefix.copy_from is not None and self._refs[prefix.copy_from] == 0:
                self._free.move_to_end(prefix.copy_from)  # just used (copied from): evict it last
        table = self._tables.setdefault(request_id, [])
        for _ in range(self.blocks_for(num_tokens) - len(table)):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._refs[block] = 1
            table.append(block)
        return True

    def commit(
        self,
        request_id: str,
        num_computed: int,
        tokens: Callable[[], Sequence[int]],
        in_flight: bool = False,
    ) -> None:
        """Name the request's full blocks up to `num_computed` tokens, so that later requests can
        share them. `tokens()`: the tokens whose KV those positions hold (called only when a block
        is to be named: most steps fill none). `in_flight`: the next step computes the
        last of them; a request scheduled after this one in the same step may share them already
        (every layer writes the whole step's keys and values before it attends), and `settle`
        forgets them if the step fails."""
        if not self.prefix_caching:
            return
        key = self._keys.get(request_id)
        if key is None:
            return  # allocated without a prefix lookup: its cache key is unknown
        hashes = self._hashes[request_id]
        table, bs = self._tables[request_id], self.block_size
        full = min(num_computed // bs, len(table))
        if full <= len(hashes):
            return
        known = tokens()
        parent = hashes[-1] if hashes else root_hash(key)
        for i in range(len(hashes), min(full, len(known) // bs)):
            block_tokens = known[i * bs : (i + 1) * bs]
            name = block_hash(parent, block_tokens)
            hashes.append(name)
            block = table[i]
            # A block computed twice (two requests with one prompt in one step) is cached once.
            if name not in self._block_of and block not in self._hash_of:
                self._name(block, name, parent, block_tokens)
                if in_flight:
                    self._in_flight.add(block)
            parent = name

    def settle(self, computed: bool) -> None:
        """The step ended. If it failed, the blocks named in flight hold no valid KV: forget them."""
        for block in self._in_flight if not computed else ():
            self._forget(block)
        self._in_flight.clear()

    def _name(self, block: int, name: bytes, parent: bytes, tokens: Sequence[int]) -> None:
        self._block_of[name] = block
        self._hash_of[block] = name
        partials = self._partials_of[block] = []
        for n in range(1, self.block_size):
            h = block_hash(parent, tokens[:n])
            if self._partial.setdefault(h, block) == block:
                partials.append(h)

    def _forget(self, block: int) -> None:
        name = self._hash_of.pop(block, None)
        if name is None:
            return
        del self._block_of[name]
        for h in self._partials_of.pop(block):  # only the entries it made (setdefault in _name)
            del self._partial[h]

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no request uses (a benchmark's rounds start cold)."""
        for block in list(self._hash_of):
            if self._refs[block] == 0:
                self._forget(block)

    def free(self, request_id: str) -> None:
        self._keys.pop(request_id, None)
        self._hashes.pop(request_id, None)
        # Tail blocks first: a request's first blocks, shared the most, are evicted last.
        for block in reversed(self._tables.pop(request_id, [])):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            self._free[block] = None
            if block not in self._hash_of:
                self._free.move_to_end(block, last=False)
