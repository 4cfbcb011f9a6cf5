"""The adapter reader: opens, reads and validates adapter files on worker threads.

Everything that touches the disk happens here, never on the event loop or under the engine's
lock: opening the folder and files (`AdapterStore.open`, without following links), comparing
their fingerprint with the one recorded at first load, refusing files whose failure is already
known, and parsing and checking the weights (`weights.read_adapter`). The outcome is plain data
handed back to the adapter manager, which publishes it under its lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from loraserve.adapters.registry import Failure
from loraserve.adapters.store import AdapterStore, Fingerprint, OpenedAdapter
from loraserve.adapters.weights import AdapterWeights, ReadLimits, read_adapter
from loraserve.errors import FailedPrecondition, ServeError, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadOutcome:
    """What one read produced: weights, or a failure (remembered by fingerprint when `of_files`)."""

    adapter_id: str
    fingerprint: Fingerprint | None
    weights: AdapterWeights | None = None
    failure: Failure | None = None
    of_files: bool = False  # the failure is a property of these exact files (remember it)
    seconds: float = 0.0


class AdapterReader:
    """A small thread pool that turns adapter ids into validated weights."""

    def __init__(self, store: AdapterStore, limits: ReadLimits, workers: int = 2) -> None:
        self.store = store
        self.limits = limits
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load")
        # Test hook, called on the reader thread right before an adapter's files are opened.
        self.before_open: Callable[[str], None] | None = None

    def submit(self, job: Callable[..., Any], *args: Any) -> Future:
        return self._executor.submit(job, *args)

    def open(self, adapter_id: str) -> OpenedAdapter:
        if self.before_open is not None:
            self.before_open(adapter_id)
        return self.store.open(adapter_id)

    def read(
        self, opened: OpenedAdapter, expected: Fingerprint | None, remembered: Failure | None
    ) -> ReadOutcome:
        """Reads opened files; `expected` is the fingerprint of the first load of this entry."""
        adapter_id, fingerprint = opened.adapter_id, opened.fingerprint
        if expected is not None and fingerprint != expected:
            # A re-read (after the host copy was dropped) must serve the files first validated.
            failure = Failure.of(
                Unavailable(
                    f"adapter {adapter_id!r} changed on disk since it was loaded; retry to load the new files"
                )
            )
            return ReadOutcome(adapter_id, fingerprint, failure=failure)
        if remembered is not None:
            return ReadOutcome(adapter_id, fingerprint, failure=remembered, of_files=True)
        started = time.perf_counter()
        try:
            weights = read_adapter(opened, self.limits)
        except ServeError as error:
            return ReadOutcome(adapter_id, fingerprint, failure=Failure.of(error), of_files=True)
        except Exception as error:  # any surprise in hostile files is a refusal
            log.exception("adapter %s failed to load", adapter_id)
            failure = Failure.of(FailedPrecondition(f"adapter {adapter_id!r} failed to load: {error}"))
            return ReadOutcome(adapter_id, fingerprint, failure=failure, of_files=True)
        return ReadOutcome(adapter_id, fingerprint, weights=weights, seconds=time.perf_counter() - started)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
