"""The fixed set of LoRA slots the forward pass reads: which adapter holds which. Pure Python.

A slot whose adapter has running requests is pinned; an idle one is reused least recently
used first, so a hot adapter that pauses briefly keeps its slot and needs no reload.
"""

from __future__ import annotations

from collections import OrderedDict


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slot: dict[str, int] = {}
        self._users: dict[str, int] = {}  # running requests per slotted adapter
        self._idle: OrderedDict[str, None] = OrderedDict()  # slotted adapters without users, LRU first
        self._free = list(range(num_slots - 1, -1, -1))

    def slot_of(self, adapter: str) -> int | None:
        return self._slot.get(adapter)

    @property
    def num_resident(self) -> int:
        """Slots holding an adapter (one len(): safe to read from another thread)."""
        return len(self._slot)

    def active(self) -> list[str]:
        """Adapters that running requests use."""
        return [a for a, n in self._users.items() if n]

    def assign(self, adapter: str) -> tuple[int | None, str | None]:
        """Give `adapter` a slot, evicting the least recently used idle adapter if needed.
        Returns (slot, evicted adapter); slot is None when every slot serves running requests."""
        evicted = None
        if adapter in self._slot:
            return self._slot[adapter], None
        if self._free:
            slot = self._free.pop()
        elif self._idle:
            evicted, _ = self._idle.popitem(last=False)
            slot = self._slot.pop(evicted)
            self._users.pop(evicted, None)
        else:
            return None, None
        self._slot[adapter] = slot
        self._idle[adapter] = None
        return slot, evicted

    def forget(self, slot: int) -> None:
        """Drop whatever adapter `slot` holds (its load failed), keeping its users' accounting."""
        for adapter, s in list(self._slot.items()):
            if s == slot:
                del self._slot[adapter]
                self._idle.pop(adapter, None)
                self._users.pop(adapter, None)
                self._free.append(slot)

    def acquire(self, adapter: str | None) -> None:
        if adapter is None:
            return
        self._users[adapter] = self._users.get(adapter, 0) + 1
        self._idle.pop(adapter, None)

    def release(self, adapter: str | None) -> None:
        if adapter is None or adapter not in self._users:
            return
        self._users[adapter] -= 1
        if self._users[adapter] == 0:
            self._idle[adapter] = None
