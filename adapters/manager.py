"""Adapter tiers: device slots <- host-memory LRU <- disk (the store), with pins and drains.

Who calls what:
- request path (any thread, no I/O): `acquire(id)` when a request
  arrives (an unloading adapter fails here), `release(entry)` when it ends;
- engine thread, between steps: `plan_queue(entries)` tells it what the queued requests need,
  in the order the scheduler would admit them; `try_place(entry)` puts an adapter in a device
  slot (evicting an idle slot by what the queue needs next, `slot_allocator`; unknown or broken
  adapters fail here, with a fresh error each time); `stage(entry)` prefetches a queued request's
  adapter into a slot ahead of its admission, never evicting one the queue needs; `pin`/`unpin`
  around a sequence's time in the running batch, `housekeeping()` for admin loads waiting on a slot;
- admin: `load(id, pin)` (a future of a LoadResult, resolved once on the device),
  `unload(id)`, `describe()` / `describe_one(id)` (frozen AdapterInfo rows).

The parts, each in its own module: `registry` (entries, their explicit AdapterState, failures
kept as data), `reader` (every disk access, on worker threads), `host_cache` (the host LRU) and
`slot_allocator` (who owns which device slot). This module is the one lock around them and the
state transitions. An adapter used by a running sequence is never evicted from its slot; one
used by any queued or running request is never dropped from host memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

from loraserve.adapters.host_cache import HostCache
from loraserve.adapters.layer import SlotTable
from loraserve.adapters.reader import AdapterReader, ReadOutcome
from loraserve.adapters.registry import (
    AdapterEntry,
    AdapterInfo,
    AdapterState,
    Failure,
    LoadResult,
    Registry,
)
from loraserve.adapters.slot_allocator import SlotAllocator
from loraserve.adapters.store import AdapterStore, OpenedAdapter
from loraserve.adapters.weights import ReadLimits, max_abs_weight_for
from loraserve.errors import NotFound, ResourceExhausted, ServeError, Unavailable

log = logging.getLogger(__name__)

__all__ = ["AdapterEntry", "AdapterInfo", "AdapterManager", "AdapterState", "LoadResult"]


class AdapterManager:
    """Owns the adapter entries, the host LRU and the assignment of device slots."""

    def __init__(
        self,
        store: AdapterStore | None,
        slots: SlotTable,
        max_host_bytes: int,
        workers: int = 2,
        base_model_name: str = "",
        metrics: object | None = None,
        wake: Callable[[], None] | None = None,
        max_adapter_bytes: int = 0,
        on_retire: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.slots = slots
        self.base_model_name = base_model_name
        self.metrics = metrics
        self.wake = wake or (lambda: None)
        # Told the id of an adapter unloaded or replaced by a reload (any thread, lock held): the
        # engine then drops the KV blocks cached under that version.
        self.on_retire = on_retire or (lambda adapter_id: None)
        self.limits = ReadLimits(
            dict(slots.shapes), slots.max_rank, max_adapter_bytes, max_abs_weight_for(slots.dtype)
        )
        self.reader = AdapterReader(store, self.limits, workers) if store is not None else None
        self._lock = threading.RLock()
        self._registry = Registry()
        self._host = HostCache(max_host_bytes)
        self._slots = SlotAllocator(slots.num_slots)
        self._pending: list[AdapterEntry] = []  # admin loads waiting for a device slot
        # Adapter -> position of its first queued request in admission order (plan_queue).
        self._need_rank: dict[AdapterEntry, int] = {}
        self._tick = 0
        self._report()

    @property
    def max_adapter_bytes(self) -> int:
        """The per-adapter file size limit in force (configured, or derived from the base and max rank)."""
        return self.limits.file_limit

    # ---------------------------------------------------------------- request path
    def acquire(self, adapter_id: str) -> AdapterEntry:
        """Counts a request on the adapter (an id checked at the edge), starting its load if needed."""
        if self.reader is None:
            raise NotFound(f"adapter {adapter_id!r} not found: the server has no adapter store")
        with self._lock:
            entry = self._registry.get(adapter_id)
            if entry is not None and entry.draining:
                raise NotFound(f"adapter {adapter_id!r} is being unloaded")
            if entry is None:
                entry = self._registry.add(adapter_id)
            entry.in_flight += 1
            self._touch(entry)
            if self.metrics is not None:
                hit = entry.state is AdapterState.DEVICE
                self.metrics.adapter_lookups.labels("hit" if hit else "miss").inc()
            self._ensure_reading(entry)
            return entry

    def release(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.in_flight -= 1
            if entry.draining and entry.in_flight == 0:
                self._retire(entry)
            elif entry.state is AdapterState.DISK and entry.in_flight == 0 and not entry.placed:
                self._registry.drop(entry)  # nothing in memory and nobody waiting: forget it

    # ---------------------------------------------------------------- engine thread
    def plan_queue(self, entries: list[AdapterEntry]) -> None:
        """The adapters of the queued requests, in the order they would be admitted (repeats
        allowed): evictions then spare those needed soonest."""
        rank: dict[AdapterEntry, int] = {}
        for position, entry in enumerate(entries):
            rank.setdefault(entry, position)
        with self._lock:
            self._need_rank = rank

    def stage(self, entry: AdapterEntry) -> bool:
        """Prefetch: puts a queued request's adapter in a slot if its weights are in host memory and
        that evicts nothing the queue needs. True when it is on the device. A refused adapter is
        only recorded here (its requests get the error when the scheduler next tries them)."""
        try:
            return self.try_place(entry, allow_needed=False) is not None
        except ServeError:
            return False

    def try_place(self, entry: AdapterEntry, allow_needed: bool = True) -> int | None:
        """The adapter's device slot, placing it now if its weights are in host memory and a
        slot is free or evictable (with allow_needed=False, only a slot that no queued request
        needs); None while it loads or every slot is busy. Raises the adapter's error (a fresh
        one) if it was refused or unloaded."""
        with self._lock:
            state = entry.state
            if state is AdapterState.FAILED:
                raise entry.failure.error()
            if state is AdapterState.RETIRED:
                raise NotFound(f"adapter {entry.adapter_id!r} was unloaded")
            if state is AdapterState.DEVICE:
                self._touch(entry)
                return entry.slot
            if state is not AdapterState.HOST:
                self._ensure_reading(entry)
                return None
            slot = self._take_slot(allow_needed)
            if slot is None:
                return None
            try:
                self.slots.set_slot(slot, entry.weights)
            except ServeError as error:  # e.g. non-finite weights, found while copying
                self._fail(entry, Failure.of(error))
                raise entry.failure.error() from None
            entry.slot = slot
            entry.state = AdapterState.DEVICE
            self._slots.assign(slot, entry)
            self._touch(entry)
            if self.metrics is not None:
                self.metrics.adapter_loads.labels("host").inc()
            self._report()
            return slot

    def pin(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.running += 1

    def unpin(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.running -= 1

    def running_pins(self) -> int:
        """Sequences of the running batch holding a slot, over all adapters (0 when idle)."""
        with self._lock:
            return sum(entry.running for entry in self._slots.owners())

    def housekeeping(self) -> None:
        """Places adapters that admin loads are waiting for (engine thread, between steps)."""
        with self._lock:
            for entry in list(self._pending):
                if entry.state not in (AdapterState.HOST, AdapterState.DEVICE, AdapterState.FAILED):
                    continue
                try:
                    slot = self.try_place(entry)
                except ServeError as error:
                    self._resolve(entry, Failure.of(error))
                    continue
                if slot is not None:
                    self._resolve(entry, None)

    # ---------------------------------------------------------------- admin
    def load(self, adapter_id: str, pin: bool = False) -> Future:
        """Starts loading (or reloading, if its files changed) onto the device.

        Returns a future of a LoadResult, resolved once the adapter is in a device slot. The
        files are opened and compared on a reader thread: nothing here touches the disk.
        """
        if self.reader is None:
            raise NotFound(f"adapter {adapter_id!r} not found: the server has no adapter store")
        future: Future = Future()
        self.reader.submit(self._admin_load, adapter_id, pin, future)
        return future

    def unload(self, adapter_id: str) -> AdapterInfo:
        """Retires the adapter once its in-flight requests finish; new requests get NOT_FOUND."""
        with self._lock:
            entry = self._registry.get(adapter_id)
            if entry is None or entry.draining:
                raise NotFound(f"adapter {adapter_id!r} is not loaded")
            entry.draining = True
            entry.admin_pinned = False
            self._registry.next_generation(adapter_id)
            self.on_retire(adapter_id)
            if entry.in_flight == 0:
                self._retire(entry)
            return entry.info()

    def describe(self, include_disk: bool = False) -> list[AdapterInfo]:
        """One row per adapter (entries in memory, plus disk-only ones when asked), sorted by id.

        With include_disk this lists the store's folders: call it off the event loop."""
        with self._lock:
            rows = {e.adapter_id: e.info() for e in self._registry.entries()}
        if include_disk and self.store is not None:
            for adapter_id in self.store.list_ids():
                rows.setdefault(adapter_id, AdapterInfo(adapter_id, "disk"))
        return [rows[k] for k in sorted(rows)]

    def describe_one(self, adapter_id: str) -> AdapterInfo:
        """The row of one adapter: in memory, else as a disk-only adapter."""
        with self._lock:
            entry = self._registry.get(adapter_id)
            return entry.info() if entry is not None else AdapterInfo(adapter_id, "disk")

    def shutdown(self) -> None:
        if self.reader is not None:
            self.reader.shutdown()

    # ---------------------------------------------------------------- reader threads
    def _read_job(self, entry: AdapterEntry) -> None:
        try:
            opened = self.reader.open(entry.adapter_id)
        except (ServeError, OSError) as error:  # a request waits on this entry: it must leave READING
            self._publish(entry, ReadOutcome(entry.adapter_id, None, failure=_open_failure(error)))
            return
        with opened:
            self._read_opened(entry, opened)

    def _read_opened(self, entry: AdapterEntry, opened: OpenedAdapter) -> None:
        with self._lock:
            remembered = self._registry.failure_for(entry.adapter_id, opened.fingerprint)
        outcome = self.reader.read(opened, entry.fingerprint, remembered)
        self._publish(entry, outcome)

    def _admin_load(self, adapter_id: str, pin: bool, future: Future) -> None:
        """Reader thread: opens the files, replaces a stale entry, then reads or waits for a slot."""
        try:
            opened = self.reader.open(adapter_id)
        except (ServeError, OSError) as error:
            _settle(future, error=_open_failure(error).error())
            return
        with opened:
            try:
                entry, read_now = self._admin_entry(adapter_id, opened, pin, future)
            except ServeError as error:
                _settle(future, error=Failure.of(error).error())
                return
            if read_now:
                self._read_opened(entry, opened)
        self.wake()

    def _admin_entry(
        self, adapter_id: str, opened: OpenedAdapter, pin: bool, future: Future
    ) -> tuple[AdapterEntry, bool]:
        with self._lock:
            entry = self._registry.get(adapter_id)
            if entry is not None and entry.draining:
                raise NotFound(f"adapter {adapter_id!r} is being unloaded")
            reloaded = False
            if entry is not None and entry.fingerprint not in (None, opened.fingerprint):
                self._supersede(entry)
                entry, reloaded = None, True
            if entry is None:
                entry = self._registry.add(adapter_id)
            if pin and not entry.admin_pinned:
                pinned = self._slots.admin_pinned
                if pinned >= self._slots.num_slots - 1:
                    raise ResourceExhausted(
                        f"cannot pin {adapter_id!r}: {pinned} of {self._slots.num_slots} device slots are "
                        "pinned and one must stay free for other adapters"
                    )
                entry.admin_pinned = True
            self._touch(entry)
            if entry.state is AdapterState.DEVICE:
                _settle(future, LoadResult(entry.info(), reloaded))
                return entry, False
            entry.placed.append((future, reloaded))
            if entry not in self._pending:
                self._pending.append(entry)
            read_now = entry.state is AdapterState.DISK
            if read_now:
                entry.state = AdapterState.READING
            return entry, read_now

    # ---------------------------------------------------------------- internals (lock held)
    def _touch(self, entry: AdapterEntry) -> None:
        self._tick += 1
        entry.lru_tick = self._tick
        entry.last_used = time.time()
        self._host.touch(entry)

    def _ensure_reading(self, entry: AdapterEntry) -> None:
        # A draining entry still reads: the requests it already has must finish.
        if entry.state is AdapterState.DISK:
            entry.state = AdapterState.READING
            self.reader.submit(self._read_job, entry)

    def _publish(self, entry: AdapterEntry, outcome: ReadOutcome) -> None:
        """Reader thread: makes a read's outcome visible, then wakes the engine."""
        with self._lock:
            if entry.state is AdapterState.RETIRED:
                pass
            elif outcome.failure is not None:
                if outcome.of_files and outcome.fingerprint is not None:
                    self._registry.remember_failure(entry.adapter_id, outcome.fingerprint, outcome.failure)
                self._fail(entry, outcome.failure)
            else:
                self._store_weights(entry, outcome)
            self._report()
        self.wake()

    def _store_weights(self, entry: AdapterEntry, outcome: ReadOutcome) -> None:
        weights = outcome.weights
        first = entry.fingerprint is None
        entry.fingerprint = outcome.fingerprint
        entry.weights = weights
        entry.rank = weights.max_rank
        entry.targets = tuple(weights.target_leaves)
        entry.nbytes = weights.nbytes
        entry.state = AdapterState.HOST
        self._registry.forget_failure(entry.adapter_id)
        self._host.add(entry)
        self._evict_host()
        if first:
            self._check_base(entry)
        if self.metrics is not None:
            self.metrics.adapter_load_seconds.observe(outcome.seconds)
            self.metrics.adapter_loads.labels("disk").inc()
        log.info(
            "adapter %s read in %.1f ms (rank %d, %d modules, %.1f MiB)",
            entry.adapter_id,
            outcome.seconds * 1e3,
            entry.rank,
            len(weights.modules),
            entry.nbytes / 2**20,
        )

    def _fail(self, entry: AdapterEntry, failure: Failure) -> None:
        """An adapter refused: its requests and admin loads fail; a new request reads its files again
        (refused at once, from the remembered failure, while they are unchanged)."""
        log.warning("adapter %s refused: %s", entry.adapter_id, failure.message)
        entry.state = AdapterState.FAILED
        entry.failure = failure
        self._host.remove(entry)
        entry.weights = None
        if entry.slot is not None:
            self._slots.release(entry.slot)
            entry.slot = None
        self._registry.drop(entry)
        self._resolve(entry, failure)

    def _check_base(self, entry: AdapterEntry) -> None:
        declared = entry.weights.config.base_model_name_or_path
        if declared and self.base_model_name and declared != self.base_model_name:
            log.warning(
                "adapter %s was trained on %s, serving it on %s",
                entry.adapter_id,
                declared,
                self.base_model_name,
            )

    def _take_slot(self, allow_needed: bool = True) -> int | None:
        slot = self._slots.free_slot()
        if slot is not None:
            return slot
        victim = self._slots.victim(self._need_rank, allow_needed)
        if victim is None:
            return None
        slot = victim.slot
        self._slots.release(slot)
        victim.slot = None
        victim.state = AdapterState.HOST if victim.weights is not None else AdapterState.DISK
        if self.metrics is not None:
            self.metrics.adapter_evictions.labels("device").inc()
        if victim.state is AdapterState.DISK and victim.in_flight == 0 and not victim.placed:
            self._registry.drop(victim)
        return slot

    def _evict_host(self) -> None:
        def can_drop(entry: AdapterEntry) -> bool:
            return entry.in_flight == 0 and not entry.placed

        for entry in list(self._host.over_budget(can_drop)):
            self._host.remove(entry)
            entry.weights = None
            if self.metrics is not None:
                self.metrics.adapter_evictions.labels("host").inc()
            if entry.state is AdapterState.HOST:
                entry.state = AdapterState.DISK
                self._registry.drop(entry)  # back on disk only: it reloads lazily

    def _supersede(self, entry: AdapterEntry) -> None:
        """A reload replaces this entry; it drains like an unload but its id stays usable."""
        self._registry.drop(entry)
        entry.draining = True
        entry.admin_pinned = False
        self._registry.next_generation(entry.adapter_id)
        self.on_retire(entry.adapter_id)
        failure = Failure.of(Unavailable(f"adapter {entry.adapter_id!r} was reloaded while loading; retry"))
        self._resolve(entry, failure)
        if entry.in_flight == 0:
            self._retire(entry)

    def _retire(self, entry: AdapterEntry) -> None:
        if entry.slot is not None:
            self._slots.release(entry.slot)
            entry.slot = None
        self._host.remove(entry)
        entry.weights = None
        entry.state = AdapterState.RETIRED
        self._registry.drop(entry)
        self._resolve(entry, Failure.of(NotFound(f"adapter {entry.adapter_id!r} was unloaded")))
        self._report()

    def _resolve(self, entry: AdapterEntry, failure: Failure | None) -> None:
        for future, reloaded in entry.placed:
            if failure is None:
                _settle(future, LoadResult(entry.info(), reloaded))
            else:
                _settle(future, error=failure.error())
        entry.placed.clear()
        if entry in self._pending:
            self._pending.remove(entry)

    def _report(self) -> None:
        if self.metrics is None:
            return
        used = self._slots.used
        self.metrics.adapter_slots_used.set(used)
        self.metrics.adapter_slots_total.set(self._slots.num_slots)
        self.metrics.adapters_loaded.labels("device").set(used)
        self.metrics.adapters_loaded.labels("host").set(len(self._host))


def _settle(future: Future, result: LoadResult | None = None, error: ServeError | None = None) -> None:
    """Resolves an admin load's future unless its caller gave up on it (timed out, cancelled)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def _open_failure(error: ServeError | OSError) -> Failure:
    if isinstance(error, ServeError):
        return Failure.of(error)
    log.exception("adapter files could not be opened", exc_info=error)
    return Failure.of(Unavailable(f"the adapter store could not be read ({error}); retry"))
