"""KV block bookkeeping: which request owns which cache blocks. Pure Python: no torch.

The model runner owns the tensors; this module only hands out block ids. Every block is
either free or owned by exactly one request, and `free()` is the only way back.
"""

from __future__ import annotations

from collections import deque


def bytes_per_block(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype_bytes: int
) -> int:
    """Bytes of keys and values that one block of `block_size` tokens holds across all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * block_size * dtype_bytes


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise kv_cache_bytes")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by requests, 0.0 to 1.0."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def can_allocate(self, request_id: str, num_tokens: int, reserve_blocks: int = 0) -> bool:
        extra = self.blocks_for(num_tokens) - len(self.block_table(request_id))
        return extra <= len(self._free) - reserve_blocks

    def allocate(self, request_id: str, num_tokens: int, reserve_blocks: int = 0) -> bool:
        """Grow the request's table to hold `num_tokens` tokens. All or nothing."""
        if not self.can_allocate(request_id, num_tokens, reserve_blocks):
            return False
        table = self._tables.setdefault(request_id, [])
        for _ in range(self.blocks_for(num_tokens) - len(table)):
            table.append(self._free.popleft())
        return True

    def free(self, request_id: str) -> None:
        # Freed blocks go to the front so that the hottest memory is reused first.
        for block in reversed(self._tables.pop(request_id, [])):
            self._free.appendleft(block)
