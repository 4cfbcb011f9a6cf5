"""The adapter registry: one entry per adapter version, its explicit state, and remembered failures.

An entry moves through `AdapterState` (as in LoRAX, the state is one field, not implied by
which of ten fields happen to be set):

    DISK --read--> READING --ok--> HOST --slot--> DEVICE --slot evicted--> HOST or DISK
                          \\--refused--> FAILED (dropped from the registry)
    any --unload, or replaced by a reload, once its requests finish--> RETIRED

`draining` is orthogonal: an unloaded or replaced entry keeps serving the requests it already
has, in whatever state it is, and takes no new ones.

A failure is kept as data (`Failure`: status code and message), never as an exception object:
re-raising one exception object grows its traceback by the frames of every request that hits
it, keeping them alive (issue 13: ~8.5 KB per request for a broken adapter). Each raise builds
a fresh error. Failures are remembered per file fingerprint, so unchanged broken files are
refused without being parsed again, and forgotten when the files change.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from loraserve.adapters.store import Fingerprint
from loraserve.adapters.weights import AdapterWeights
from loraserve.errors import ServeError

# Adapter ids with a remembered failure; beyond this the oldest are forgotten (re-read on use).
MAX_REMEMBERED_FAILURES = 1024


class AdapterState(enum.Enum):
    DISK = "disk"  # known, nothing in memory: not read yet, or its host copy was dropped
    READING = "reading"  # a reader thread is opening, reading and validating its files
    HOST = "host"  # validated weights in host memory, no device slot
    DEVICE = "device"  # in a device slot (its host copy may have been dropped)
    FAILED = "failed"  # refused; its requests fail with its failure
    RETIRED = "retired"  # unloaded or replaced; holds nothing and is never used again


@dataclass(frozen=True)
class Failure:
    """Why an adapter was refused, as data: raise `error()` (a fresh exception) each time."""

    code: str
    message: str

    @classmethod
    def of(cls, error: ServeError) -> Failure:
        return cls(error.code, error.message)

    def error(self) -> ServeError:
        return _ERROR_CLASSES.get(self.code, ServeError)(self.message)


def _error_classes() -> dict[str, type[ServeError]]:
    """Code -> class to raise. Breadth-first in definition order, so that loraserve.errors' own
    class of a code wins over a later subclass reusing it (HTTP's PayloadTooLarge is an
    INVALID_ARGUMENT answered 413): which modules were imported first must not matter."""
    classes: dict[str, type[ServeError]] = {}
    pending = deque(ServeError.__subclasses__())
    while pending:
        cls = pending.popleft()
        classes.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return classes


_ERROR_CLASSES = _error_classes()


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter as ListAdapters / LoadAdapter report it."""

    adapter_id: str
    tier: str  # "device", "host" or "disk" (the wire's AdapterState)
    rank: int = 0
    targets: tuple[str, ...] = ()
    bytes: int = 0
    in_flight: int = 0
    pinned: bool = False
    draining: bool = False
    last_used: float = 0.0  # unix seconds, 0 when never used
    slot: int = -1
    state: AdapterState = AdapterState.DISK


@dataclass(frozen=True)
class LoadResult:
    """What an admin load resolves to: the adapter once in its device slot."""

    adapter: AdapterInfo
    reloaded: bool


@dataclass(eq=False)
class AdapterEntry:
    """One version of one adapter (a reload with changed files makes a new entry)."""

    adapter_id: str
    state: AdapterState = AdapterState.DISK
    fingerprint: Fingerprint | None = None  # of the files first read; every re-read must match
    # Bumped for its id by every unload and reload: with the fingerprint, it keys the KV blocks
    # computed under this version (prefix caching), so no later version can reach them.
    load_generation: int = 0
    weights: AdapterWeights | None = None  # host copy
    slot: int | None = None  # device slot, in state DEVICE
    failure: Failure | None = None  # in state FAILED
    in_flight: int = 0  # requests queued or running on it
    running: int = 0  # sequences in the running batch: pins the slot
    admin_pinned: bool = False
    draining: bool = False
    rank: int = 0
    targets: tuple[str, ...] = ()
    nbytes: int = 0
    last_used: float = 0.0  # wall clock, for ListAdapters
    lru_tick: int = 0  # monotonic use counter, for eviction order
    placed: list[tuple[Future, bool]] = field(default_factory=list)  # admin loads: (future, reloaded)

    @property
    def tier(self) -> str:
        if self.state is AdapterState.DEVICE:
            return "device"
        return "host" if self.state is AdapterState.HOST else "disk"

    def info(self) -> AdapterInfo:
        return AdapterInfo(
            adapter_id=self.adapter_id,
            tier=self.tier,
            rank=self.rank,
            targets=self.targets,
            bytes=self.nbytes if self.tier != "disk" else 0,
            in_flight=self.in_flight,
            pinned=self.admin_pinned,
            draining=self.draining,
            last_used=self.last_used,
            slot=-1 if self.slot is None else self.slot,
            state=self.state,
        )


class Registry:
    """Current entry per adapter id, and failures remembered per (id, fingerprint).

    Not thread-safe on its own: the adapter manager holds its lock around every call.
    """

    def __init__(self) -> None:
        self._entries: dict[str, AdapterEntry] = {}
        self._failures: OrderedDict[str, tuple[Fingerprint, Failure]] = OrderedDict()
        self._generations: dict[str, int] = {}  # ids unloaded or reloaded at least once

    def get(self, adapter_id: str) -> AdapterEntry | None:
        return self._entries.get(adapter_id)

    def add(self, adapter_id: str) -> AdapterEntry:
        entry = AdapterEntry(adapter_id, load_generation=self._generations.get(adapter_id, 0))
        self._entries[adapter_id] = entry
        return entry

    def drop(self, entry: AdapterEntry) -> None:
        """Removes the entry if it is still the current one for its id."""
        if self._entries.get(entry.adapter_id) is entry:
            del self._entries[entry.adapter_id]

    def next_generation(self, adapter_id: str) -> None:
        """An unload or reload of the id: entries made from now on belong to a new load generation."""
        self._generations[adapter_id] = self._generations.get(adapter_id, 0) + 1

    def entries(self) -> list[AdapterEntry]:
        return list(self._entries.values())

    def remember_failure(self, adapter_id: str, fingerprint: Fingerprint, failure: Failure) -> None:
        self._failures[adapter_id] = (fingerprint, failure)
        self._failures.move_to_end(adapter_id)
        while len(self._failures) > MAX_REMEMBERED_FAILURES:
            self._failures.popitem(last=False)

    def failure_for(self, adapter_id: str, fingerprint: Fingerprint) -> Failure | None:
        """The remembered failure of these exact files; forgets one of files since changed."""
        remembered = self._failures.get(adapter_id)
        if remembered is None:
            return None
        if remembered[0] != fingerprint:
            del self._failures[adapter_id]
            return None
        return remembered[1]

    def forget_failure(self, adapter_id: str) -> None:
        self._failures.pop(adapter_id, None)
