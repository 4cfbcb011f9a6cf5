"""Admission control: the engine's queue limits, counted from a request's arrival to its end.

A request enters when it is submitted (refused at once with RESOURCE_EXHAUSTED when the
server's queue or its tenant's share is full) and leaves exactly once, when the engine ends
it. The counts are read from other threads (the service's health and drain, metrics), so
they sit behind their own lock, apart from the engine's inbox.
"""

from __future__ import annotations

import threading

from loraserve.errors import ResourceExhausted


class Admission:
    """Requests in flight (queued or running), in all and per tenant, against their limits."""

    def __init__(self, max_queue_size: int, max_queue_per_tenant: int) -> None:
        self.max_queue_size = max_queue_size
        self.max_queue_per_tenant = max_queue_per_tenant
        self._lock = threading.Lock()
        self._per_tenant: dict[str, int] = {}
        self._total = 0

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._total

    def of(self, tenant: str) -> int:
        with self._lock:
            return self._per_tenant.get(tenant, 0)

    def enter(self, tenant: str, running: int) -> None:
        """Counts a new request of `tenant`, or raises ResourceExhausted naming the full limit.

        `running` requests are in the batch, so they do not count against the queue.
        """
        with self._lock:
            if self._total - running >= self.max_queue_size:
                raise ResourceExhausted(f"server queue is full ({self.max_queue_size} requests waiting)")
            if self._per_tenant.get(tenant, 0) >= self.max_queue_per_tenant:
                raise ResourceExhausted(
                    f"tenant {tenant!r} has {self.max_queue_per_tenant} requests in flight (its limit)"
                )
            self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
            self._total += 1

    def leave(self, tenant: str) -> None:
        """Uncounts a request that `enter` admitted (once per request)."""
        with self._lock:
            left = self._per_tenant[tenant] - 1
            if left:
                self._per_tenant[tenant] = left
            else:
                del self._per_tenant[tenant]
            self._total -= 1
