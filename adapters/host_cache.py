"""Host-memory tier: validated adapter weights kept in RAM under a byte budget, least recently used first out.

The cache only orders and counts; the adapter manager decides what may be dropped (an adapter
with queued or running requests, or an admin load waiting for a slot, is never dropped) and
what a drop means for the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from loraserve.adapters.registry import AdapterEntry


class HostCache:
    """Entries holding a host copy of their weights, in LRU order (insertion order of a dict)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: dict[AdapterEntry, None] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: AdapterEntry) -> bool:
        return entry in self._entries

    @property
    def bytes(self) -> int:
        return self._bytes

    def add(self, entry: AdapterEntry) -> None:
        if entry not in self._entries:
            self._bytes += entry.nbytes
        self._entries.pop(entry, None)
        self._entries[entry] = None

    def touch(self, entry: AdapterEntry) -> None:
        if entry in self._entries:
            self._entries.pop(entry)
            self._entries[entry] = None

    def remove(self, entry: AdapterEntry) -> None:
        if entry in self._entries:
            del self._entries[entry]
            self._bytes -= entry.nbytes

    def over_budget(self, can_drop: Callable[[AdapterEntry], bool]) -> Iterator[AdapterEntry]:
        """Entries to drop, oldest first, until the cache fits its budget (skipping those it may not)."""
        total = self._bytes
        for entry in list(self._entries):
            if total <= self.max_bytes:
                return
            if can_drop(entry):
                total -= entry.nbytes
                yield entry
