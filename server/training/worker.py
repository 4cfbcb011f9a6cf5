"""The engine's side of training: a queue of jobs, one running, advanced a slice at a time.

The engine's loop calls `run_slice` on its own thread whenever its time share allows
(loraserve.engine.timeshare): all tensor work of the process stays on that one thread. The
worker owns no public record; it reports what happened through `report(job_id, event)`, which
the manager (loraserve.training.manager) applies on the event loop. `submit` and `cancel` are
called from the event loop and only touch the queue and the cancel flags, under a lock.

A job that fails (diverged loss, out of memory, ran past its time limit, any error) or is
cancelled ends with nothing in the store: the adapter is written only after its last slice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraserve.training.run import Progress, TrainingFailed, TrainingRun
from loraserve.training.spec import TrainingSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """What happened to a job on the engine's thread."""

    kind: str  # started | progress | written | failed | cancelled
    progress: Progress | None = None
    error: str = ""
    seconds: float = 0.0
    step_seconds: float = 0.0  # time of the optimizer step this progress completes (0: none)
    tokens: int = 0  # tokens trained by this slice


@dataclass
class _Running:
    job_id: str
    run: TrainingRun
    started: float = field(default_factory=time.monotonic)
    step_started: float = field(default_factory=time.perf_counter)


class TrainingWorker:
    """Jobs for one engine; `run_slice` only on the engine's thread."""

    def __init__(
        self,
        make_run: Callable[[TrainingSpec], TrainingRun],
        store: Path,
        base_model: str,
        report: Callable[[str, Event], None],
        max_seconds: float,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.make_run = make_run
        self.store = store
        self.base_model = base_model
        self.report = report
        self.max_seconds = max_seconds
        self.on_idle = on_idle  # called on the engine's thread when the last queued job has ended
        self._lock = threading.Lock()
        self._queue: deque[tuple[str, TrainingSpec]] = deque()
        self._cancelled: set[str] = set()
        self._current: _Running | None = None

    # ------------------------------------------------------------------ any thread
    def submit(self, job_id: str, spec: TrainingSpec) -> None:
        with self._lock:
            self._queue.append((job_id, spec))

    def cancel(self, job_id: str) -> bool:
        """Drops a queued job (True) or flags the running one, which ends at its next slice."""
        with self._lock:
            for item in self._queue:
                if item[0] == job_id:
                    self._queue.remove(item)
                    return True
            self._cancelled.add(job_id)
            return False

    def has_work(self) -> bool:
        with self._lock:
            return self._current is not None or bool(self._queue)

    # ------------------------------------------------------------------ engine thread
    def run_slice(self) -> None:
        """Starts the next job if none runs, else advances the running one by a slice."""
        current = self._current
        if current is None:
            self._start_next()
            return
        if self._take_cancel(current.job_id):
            self._end(Event("cancelled"))
            return
        if time.monotonic() - current.started > self.max_seconds:
            self._end(
                Event(
                    "failed",
                    error=f"ran past the training time limit of {self.max_seconds:g} s "
                    "(--training-max-seconds)",
                )
            )
            return
        step_before = current.run.step
        tokens_before = current.run.tokens
        try:
            progress = current.run.run_slice()
            if current.run.done:
                if self._take_cancel(current.job_id):  # cancelled during its last slice: not written
                    self._end(Event("cancelled"))
                    return
                seconds = time.monotonic() - current.started
                current.run.write(self.store, self.base_model, seconds)
                self._end(Event("written", progress=progress, seconds=seconds))
                return
        except TrainingFailed as error:
            self._end(Event("failed", error=str(error)))
            return
        except torch.OutOfMemoryError:
            self._end(
                Event("failed", error="out of memory while training: try a smaller batch_size or max_length")
            )
            return
        except Exception as error:
            log.exception("training job %s failed", current.job_id)
            self._end(
                Event("failed", error=f"internal error while training ({type(error).__name__}: {error})")
            )
            return
        step_seconds = 0.0
        if progress.step != step_before:
            now = time.perf_counter()
            step_seconds, current.step_started = now - current.step_started, now
        self.report(
            current.job_id,
            Event(
                "progress",
                progress=progress,
                step_seconds=step_seconds,
                tokens=current.run.tokens - tokens_before,
            ),
        )

    def _take_cancel(self, job_id: str) -> bool:
        with self._lock:
            cancelled = job_id in self._cancelled
            self._cancelled.discard(job_id)
        return cancelled

    def _start_next(self) -> None:
        with self._lock:
            if not self._queue:
                return
            job_id, spec = self._queue.popleft()
            self._cancelled.discard(job_id)
        try:
            run = self.make_run(spec)
        except Exception as error:
            log.exception("training job %s could not start", job_id)
            self.report(
                job_id, Event("failed", error=f"could not start training ({type(error).__name__}: {error})")
            )
            self._idle_check()
            return
        self._current = _Running(job_id, run)
        self.report(job_id, Event("started"))

    def _end(self, event: Event) -> None:
        current, self._current = self._current, None
        if current is None:
            return
        current.run.optimizer.zero_grad(set_to_none=True)
        with self._lock:
            self._cancelled.discard(current.job_id)
        self.report(current.job_id, event)
        self._idle_check()

    def _idle_check(self) -> None:
        """After a job: when none is queued, `on_idle` (serving's weight layout back)."""
        with self._lock:
            idle = not self._queue
        if idle and self.on_idle is not None:
            self.on_idle()
