"""Device-slot allocation: which adapter entry owns each slot, and which slot to give next.

A free slot first (the lowest, so a small working set stays in low slots); else an idle slot
(no sequence in the running batch, no admin pin), chosen by what the queue needs next:

1. the least recently used idle adapter that no queued request needs;
2. only when `allow_needed`: the idle adapter whose first queued request is furthest back in
   the queue (Belady's choice over the known future), so a burst of cold adapters does not
   evict the one the next request in line is waiting for.

The allocator only chooses and records; copying weights into a slot is `SlotTable.set_slot`'s
job, on the engine thread; the queue's needs come from the scheduler (`AdapterManager.plan_queue`).
"""

from __future__ import annotations

from collections.abc import Mapping

from loraserve.adapters.registry import AdapterEntry


class SlotAllocator:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._owners: list[AdapterEntry | None] = [None] * num_slots
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    @property
    def admin_pinned(self) -> int:
        return sum(1 for owner in self._owners if owner is not None and owner.admin_pinned)

    def owners(self) -> list[AdapterEntry]:
        return [owner for owner in self._owners if owner is not None]

    def free_slot(self) -> int | None:
        if self._used == self.num_slots:
            return None
        for slot, owner in enumerate(self._owners):
            if owner is None:
                return slot
        return None

    def victim(
        self, need_rank: Mapping[AdapterEntry, int] | None = None, allow_needed: bool = True
    ) -> AdapterEntry | None:
        """The entry to evict for a new one, or None when no slot may be taken.

        need_rank: adapter -> position of its first queued request (absent: nobody queued needs it).
        """
        need_rank = need_rank or {}
        idle = [e for e in self._owners if e is not None and e.running == 0 and not e.admin_pinned]
        unneeded = [e for e in idle if e not in need_rank]
        if unneeded:
            return min(unneeded, key=lambda e: e.lru_tick)
        if allow_needed and idle:
            return max(idle, key=lambda e: (need_rank[e], -e.lru_tick))
        return None

    def assign(self, slot: int, entry: AdapterEntry) -> None:
        if self._owners[slot] is None:
            self._used += 1
        self._owners[slot] = entry

    def release(self, slot: int) -> None:
        if self._owners[slot] is not None:
            self._used -= 1
        self._owners[slot] = None
