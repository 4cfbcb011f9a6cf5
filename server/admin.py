"""Adapter administration for any front end: load (and pin), unload, list.

Plain values in and out: adapter ids already checked at the edge (loraserve.guard), and the
adapter manager's typed rows (AdapterInfo) out, which front ends turn into their wire format.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from loraserve.adapters.registry import AdapterInfo
from loraserve.errors import ResourceExhausted

ADMIN_LOAD_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class LoadOutcome:
    """An adapter placed in a device slot by an admin load."""

    adapter: AdapterInfo
    reloaded: bool  # its files had changed: the old version was superseded
    load_seconds: float


class AdapterAdmin:
    """The admin verbs over one engine's adapter manager."""

    def __init__(self, engine: Any, load_timeout: float = ADMIN_LOAD_TIMEOUT_SECONDS) -> None:
        self.adapters = engine.adapters
        self.load_timeout = load_timeout

    async def load(self, adapter_id: str, pin: bool = False) -> LoadOutcome:
        """Loads the adapter into a device slot (reloading it if its files changed)."""
        started = time.perf_counter()
        future = self.adapters.load(adapter_id, pin)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), self.load_timeout)
        except TimeoutError:
            raise ResourceExhausted(
                f"adapter {adapter_id!r} is in host memory but no device slot became free within "
                f"{self.load_timeout:g} s (all slots busy or pinned)"
            ) from None
        return LoadOutcome(result.adapter, result.reloaded, time.perf_counter() - started)

    def unload(self, adapter_id: str) -> AdapterInfo:
        """Retires the adapter once its requests finish; returns its row as of now."""
        self.adapters.unload(adapter_id)
        return self.adapters.describe_one(adapter_id)

    def list(self, include_disk: bool = False) -> list[AdapterInfo]:
        return self.adapters.describe(include_disk=include_disk)
