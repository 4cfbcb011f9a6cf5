"""Adapter tiers: device slots <- host-memory LRU <- disk (the store), with pins and drains.

Who calls what:
- request path (any thread): `acquire(id)` when a request arrives (NOT_FOUND, bad id and
  known-broken files fail here), `release(entry)` when it ends;
- engine thread, between steps: `try_place(entry)` puts an adapter in a device slot
  (evicting the least recently used slot with no running request), `pin`/`unpin` around a
  sequence's time in the running batch, `housekeeping()` for admin loads waiting on a slot;
- admin: `load(id, pin)` (a future resolved once on the device), `unload(id)`, `describe()`.

Disk reads and validation run on worker threads, never on the engine's step loop. An
adapter used by a running sequence is never evicted from its slot; one used by any queued
or running request is never dropped from host memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from loraserve.adapters.layer import SlotTable
from loraserve.adapters.store import AdapterFiles, AdapterStore
from loraserve.adapters.weights import AdapterWeights, read_adapter_weights
from loraserve.errors import FailedPrecondition, NotFound, ResourceExhausted, ServeError, Unavailable
from loraserve.ids import validate_adapter_id

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AdapterEntry:
    """One version of one adapter in memory (a reload with changed files makes a new entry)."""

    adapter_id: str
    files: AdapterFiles
    fingerprint: tuple[int, ...]
    weights: AdapterWeights | None = None  # host copy
    slot: int | None = None  # device slot
    in_flight: int = 0  # requests queued or running on it
    running: int = 0  # sequences in the running batch: pins the slot
    admin_pinned: bool = False
    draining: bool = False
    retired: bool = False
    loading: Future | None = None
    error: ServeError | None = None
    rank: int = 0
    targets: list[str] = field(default_factory=list)
    nbytes: int = 0
    last_used: float = 0.0  # wall clock, for ListAdapters
    lru_tick: int = 0  # monotonic use counter, for eviction order
    placed: list[Future] = field(default_factory=list)  # admin loads waiting for a slot

    @property
    def tier(self) -> str:
        if self.slot is not None:
            return "device"
        return "host" if self.weights is not None else "disk"


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
    ) -> None:
        self.store = store
        self.slots = slots
        self.max_host_bytes = max_host_bytes
        self.base_model_name = base_model_name
        self.metrics = metrics
        self.wake = wake or (lambda: None)
        self._lock = threading.RLock()
        self._entries: dict[str, AdapterEntry] = {}
        self._owners: list[AdapterEntry | None] = [None] * slots.num_slots
        self._host: dict[AdapterEntry, None] = {}  # insertion order = LRU order
        self._failed: dict[str, tuple[tuple[int, ...], ServeError]] = {}
        self._pending: list[AdapterEntry] = []  # admin loads waiting for a device slot
        self._tick = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load")
        self._report()

    # ---------------------------------------------------------------- request path
    def acquire(self, adapter_id: str) -> AdapterEntry:
        """Counts a request on the adapter, starting its load if needed."""
        validate_adapter_id(adapter_id)
        if self.store is None:
            raise NotFound(f"adapter {adapter_id!r} not found: the server has no adapter store")
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is not None and entry.draining:
                raise NotFound(f"adapter {adapter_id!r} is being unloaded")
            if entry is None:
                entry = self._new_entry(adapter_id)
            entry.in_flight += 1
            self._touch(entry)
            if self.metrics is not None:
                self.metrics.adapter_lookups.labels("hit" if entry.slot is not None else "miss").inc()
            self._ensure_loading(entry)
            return entry

    def release(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.in_flight -= 1
            if entry.draining and entry.in_flight == 0:
                self._retire(entry)

    # ---------------------------------------------------------------- engine thread
    def try_place(self, entry: AdapterEntry) -> int | None:
        """The adapter's device slot, placing it now if its weights are in host memory and a
        slot is free or evictable; None while it loads or every slot is busy."""
        with self._lock:
            if entry.error is not None:
                raise entry.error
            if entry.slot is not None:
                self._touch(entry)
                return entry.slot
            if entry.weights is None:
                self._ensure_loading(entry)
                return None
            slot = self._free_slot()
            if slot is None:
                return None
            try:
                self.slots.set_slot(slot, entry.weights)
            except ServeError as error:  # e.g. non-finite weights, found while copying
                self._fail(entry, error)
                raise
            entry.slot = slot
            self._owners[slot] = entry
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

    def housekeeping(self) -> None:
        """Places adapters that admin loads are waiting for (engine thread, between steps)."""
        with self._lock:
            for entry in list(self._pending):
                try:
                    slot = self.try_place(entry) if entry.weights is not None or entry.error else None
                except ServeError as error:
                    self._resolve(entry, error)
                    continue
                if slot is not None:
                    self._resolve(entry, None)

    # ---------------------------------------------------------------- admin
    def load(self, adapter_id: str, pin: bool = False) -> tuple[Future, bool]:
        """Starts loading (or reloading, if its files changed) onto the device.

        Returns (future resolved with the entry once it is in a slot, whether it was a reload).
        """
        validate_adapter_id(adapter_id)
        if self.store is None:
            raise NotFound(f"adapter {adapter_id!r} not found: the server has no adapter store")
        files = self.store.files(adapter_id)
        reloaded = False
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is not None and entry.draining:
                raise NotFound(f"adapter {adapter_id!r} is being unloaded")
            if entry is not None and entry.fingerprint != files.fingerprint():
                self._supersede(entry)
                entry, reloaded = None, True
            if entry is None:
                self._failed.pop(adapter_id, None)
                entry = self._new_entry(adapter_id, files)
            if pin and not entry.admin_pinned:
                pinned = sum(1 for e in self._owners if e is not None and e.admin_pinned)
                if pinned >= self.slots.num_slots - 1:
                    raise ResourceExhausted(
                        f"cannot pin {adapter_id!r}: {pinned} of {self.slots.num_slots} device slots are "
                        "pinned and one must stay free for other adapters"
                    )
                entry.admin_pinned = True
            future: Future = Future()
            if entry.slot is not None:
                self._touch(entry)
                future.set_result(entry)
                return future, reloaded
            entry.placed.append(future)
            if entry not in self._pending:
                self._pending.append(entry)
            self._ensure_loading(entry)
        self.wake()
        return future, reloaded

    def unload(self, adapter_id: str) -> AdapterEntry:
        """Retires the adapter once its in-flight requests finish; new requests get NOT_FOUND."""
        validate_adapter_id(adapter_id)
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.draining:
                raise NotFound(f"adapter {adapter_id!r} is not loaded")
            entry.draining = True
            entry.admin_pinned = False
            if entry.in_flight == 0:
                self._retire(entry)
            return entry

    @staticmethod
    def _row(entry: AdapterEntry) -> dict:
        return {
            "adapter_id": entry.adapter_id,
            "tier": entry.tier,
            "rank": entry.rank,
            "targets": list(entry.targets),
            "bytes": entry.nbytes if entry.tier != "disk" else 0,
            "in_flight": entry.in_flight,
            "pinned": entry.admin_pinned,
            "draining": entry.draining,
            "last_used": entry.last_used,
            "slot": -1 if entry.slot is None else entry.slot,
        }

    @staticmethod
    def _disk_row(adapter_id: str) -> dict:
        return {
            "adapter_id": adapter_id,
            "tier": "disk",
            "rank": 0,
            "targets": [],
            "bytes": 0,
            "in_flight": 0,
            "pinned": False,
            "draining": False,
            "last_used": 0.0,
            "slot": -1,
        }

    def describe(self, include_disk: bool = False) -> list[dict]:
        """One dict per adapter (entries in memory, plus disk-only ones when asked), sorted by id."""
        with self._lock:
            rows = {e.adapter_id: self._row(e) for e in self._entries.values()}
        if include_disk and self.store is not None:
            for adapter_id in self.store.list_ids():
                rows.setdefault(adapter_id, self._disk_row(adapter_id))
        return [rows[k] for k in sorted(rows)]

    def describe_one(self, adapter_id: str) -> dict:
        """The row of one adapter: in memory, else as a disk-only adapter."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            return self._row(entry) if entry is not None else self._disk_row(adapter_id)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- internals (lock held)
    def _new_entry(self, adapter_id: str, files: AdapterFiles | None = None) -> AdapterEntry:
        files = files or self.store.files(adapter_id)
        fingerprint = files.fingerprint()
        failed = self._failed.get(adapter_id)
        if failed is not None:
            if failed[0] == fingerprint:
                raise failed[1]
            del self._failed[adapter_id]
        entry = AdapterEntry(adapter_id, files, fingerprint)
        self._entries[adapter_id] = entry
        return entry

    def _touch(self, entry: AdapterEntry) -> None:
        self._tick += 1
        entry.lru_tick = self._tick
        entry.last_used = time.time()
        if entry in self._host:
            self._host.pop(entry)
            self._host[entry] = None

    def _ensure_loading(self, entry: AdapterEntry) -> None:
        if entry.weights is None and entry.loading is None and entry.error is None and not entry.retired:
            entry.loading = self._executor.submit(self._read, entry)

    def _read(self, entry: AdapterEntry) -> None:
        """Worker thread: read and validate (no tensor arithmetic); then publish under the lock."""
        started = time.perf_counter()
        try:
            weights = read_adapter_weights(
                entry.files.config,
                entry.files.weights,
                self.slots.shapes,
                self.slots.max_rank,
            )
            if not weights.modules:
                raise FailedPrecondition(f"adapter {entry.adapter_id!r} adapts no module")
            error = None
        except ServeError as failure:
            weights, error = None, failure
        except Exception as failure:
            log.exception("adapter %s failed to load", entry.adapter_id)
            weights, error = (
                None,
                FailedPrecondition(f"adapter {entry.adapter_id!r} failed to load: {failure}"),
            )
        elapsed = time.perf_counter() - started
        with self._lock:
            entry.loading = None
            if error is not None:
                self._fail(entry, error)
            elif not entry.retired:
                self._check_base(entry, weights)
                entry.weights = weights
                entry.rank = weights.max_rank
                entry.targets = weights.target_leaves
                entry.nbytes = weights.nbytes
                self._host[entry] = None
                self._evict_host()
                if self.metrics is not None:
                    self.metrics.adapter_load_seconds.observe(elapsed)
                    self.metrics.adapter_loads.labels("disk").inc()
                log.info(
                    "adapter %s read in %.1f ms (rank %d, %d modules, %.1f MiB)",
                    entry.adapter_id,
                    elapsed * 1e3,
                    entry.rank,
                    len(weights.modules),
                    entry.nbytes / 2**20,
                )
            self._report()
        self.wake()

    def _fail(self, entry: AdapterEntry, error: ServeError) -> None:
        """An adapter refused: its requests fail, and so will new ones until its files change."""
        log.warning("adapter %s refused: %s", entry.adapter_id, error.message)
        entry.error = error
        self._failed[entry.adapter_id] = (entry.fingerprint, error)
        self._host.pop(entry, None)
        entry.weights = None
        if self._entries.get(entry.adapter_id) is entry:
            del self._entries[entry.adapter_id]

    def _check_base(self, entry: AdapterEntry, weights: AdapterWeights) -> None:
        declared = weights.config.base_model_name_or_path
        if declared and self.base_model_name and declared != self.base_model_name:
            log.warning(
                "adapter %s was trained on %s, serving it on %s",
                entry.adapter_id,
                declared,
                self.base_model_name,
            )

    def _free_slot(self) -> int | None:
        for slot, owner in enumerate(self._owners):
            if owner is None:
                return slot
        idle = [e for e in self._owners if e is not None and e.running == 0 and not e.admin_pinned]
        if not idle:
            return None
        victim = min(idle, key=lambda e: e.lru_tick)
        slot = victim.slot
        self._owners[slot] = None
        victim.slot = None
        if self.metrics is not None:
            self.metrics.adapter_evictions.labels("device").inc()
        if victim.weights is None and victim.in_flight == 0 and not victim.placed:
            self._forget(victim)
        return slot

    def _evict_host(self) -> None:
        total = sum(e.nbytes for e in self._host)
        for entry in list(self._host):
            if total <= self.max_host_bytes:
                break
            if entry.in_flight > 0 or entry.placed:
                continue
            total -= entry.nbytes
            self._host.pop(entry)
            entry.weights = None
            if self.metrics is not None:
                self.metrics.adapter_evictions.labels("host").inc()
            if entry.slot is None:
                self._forget(entry)

    def _forget(self, entry: AdapterEntry) -> None:
        """An entry back on disk only: drop it from the map (it reloads lazily)."""
        if self._entries.get(entry.adapter_id) is entry and entry.in_flight == 0:
            del self._entries[entry.adapter_id]

    def _supersede(self, entry: AdapterEntry) -> None:
        """A reload replaces this entry; it drains like an unload but its id stays usable."""
        del self._entries[entry.adapter_id]
        entry.draining = True
        entry.admin_pinned = False
        self._resolve(entry, Unavailable(f"adapter {entry.adapter_id!r} was reloaded while loading; retry"))
        if entry.in_flight == 0:
            self._retire(entry)

    def _retire(self, entry: AdapterEntry) -> None:
        entry.retired = True
        if entry.slot is not None:
            self._owners[entry.slot] = None
            entry.slot = None
        self._host.pop(entry, None)
        entry.weights = None
        if self._entries.get(entry.adapter_id) is entry:
            del self._entries[entry.adapter_id]
        self._resolve(entry, NotFound(f"adapter {entry.adapter_id!r} was unloaded"))
        self._report()

    def _resolve(self, entry: AdapterEntry, error: ServeError | None) -> None:
        for future in entry.placed:
            if not future.done():
                if error is None:
                    future.set_result(entry)
                else:
                    future.set_exception(error)
        entry.placed.clear()
        if entry in self._pending:
            self._pending.remove(entry)

    def _report(self) -> None:
        if self.metrics is None:
            return
        used = sum(1 for e in self._owners if e is not None)
        self.metrics.adapter_slots_used.set(used)
        self.metrics.adapter_slots_total.set(len(self._owners))
        self.metrics.adapters_loaded.labels("device").set(used)
        self.metrics.adapters_loaded.labels("host").set(len(self._host))
