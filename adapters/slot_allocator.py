"""Device-slot allocation: which adapter entry owns each slot, and which slot to give next.

A free slot first; else the least recently used slot whose adapter has no sequence in the
running batch and no admin pin. The allocator only chooses and records; copying weights into a
slot is `SlotTable.set_slot`'s job, on the engine thread.
"""

from __future__ import annotations

from loraserve.adapters.registry import AdapterEntry


class SlotAllocator:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._owners: list[AdapterEntry | None] = [None] * num_slots

    @property
    def used(self) -> int:
        return sum(1 for owner in self._owners if owner is not None)

    @property
    def admin_pinned(self) -> int:
        return sum(1 for owner in self._owners if owner is not None and owner.admin_pinned)

    def owners(self) -> list[AdapterEntry]:
        return [owner for owner in self._owners if owner is not None]

    def free_slot(self) -> int | None:
        for slot, owner in enumerate(self._owners):
            if owner is None:
                return slot
        return None

    def victim(self) -> AdapterEntry | None:
        """The entry to evict for a new one: least recently used, not running, not admin-pinned."""
        idle = [e for e in self._owners if e is not None and e.running == 0 and not e.admin_pinned]
        return min(idle, key=lambda e: e.lru_tick) if idle else None

    def assign(self, slot: int, entry: AdapterEntry) -> None:
        self._owners[slot] = entry

    def release(self, slot: int) -> None:
        self._owners[slot] = None
