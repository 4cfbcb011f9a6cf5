"""The job table: every training job's public record, persisted in one small JSON file.

The file is rewritten atomically (temp file + rename) at each state change, not at each step,
so a crash loses at most the progress figures of a running job. When the server starts again,
jobs that were queued or running are reported FAILED, "interrupted by restart": their data
lived only in memory, and nothing of them reached the store (it is written only at the end).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from pathlib import Path

log = logging.getLogger(__name__)
KEEP_FINISHED = 500  # finished jobs kept in the table (oldest dropped first)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class JobRecord:
    """What a client sees of a job (the manager changes records on the event loop; front ends
    get copies)."""

    job_id: str
    adapter_id: str
    tenant: str
    state: JobState = JobState.QUEUED
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    eval_exact_match: float | None = None
    eval_examples: int = 0
    train_examples: int = 0
    error: str = ""
    created: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    tokens_trained: int = 0

    def copy(self) -> JobRecord:
        return JobRecord(**{f.name: getattr(self, f.name) for f in fields(self)})

    def to_json(self) -> dict:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_json(cls, raw: dict) -> JobRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["state"] = JobState(values.get("state", "failed"))
        return cls(**values)


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:12]


class JobTable:
    """Records by job id, newest last, saved to `path` (None: memory only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: dict[str, JobRecord] = {}
        if path is not None and path.exists():
            self._recover()

    def _recover(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            records = [JobRecord.from_json(item) for item in raw.get("jobs", [])]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error(
                "training job table %s is unreadable (%s): moved to %s, starting anew",
                self.path,
                error,
                aside,
            )
            return
        interrupted = 0
        for record in records:
            if not record.state.done:
                record.state = JobState.FAILED
                record.error = "interrupted by restart: the server stopped while the job was " + (
                    "queued" if record.started == 0 else "training"
                )
                record.finished = time.time()
                interrupted += 1
            self.records[record.job_id] = record
        if interrupted:
            log.warning("%d training job(s) were interrupted by the restart: marked failed", interrupted)
            self.save()

    def add(self, record: JobRecord) -> None:
        self.records[record.job_id] = record
        finished = [r for r in self.records.values() if r.state.done]
        for old in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.records[old.job_id]
        self.save()

    def save(self) -> None:
        """Writes the table atomically (temp file, fsync, rename); a failure is logged, never
        raised: the table is a record of the jobs, not the jobs."""
        if self.path is None:
            return
        data = json.dumps({"jobs": [r.to_json() for r in self.records.values()]}, indent=1)
        temp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=".jobs-", dir=self.path.parent)
            with os.fdopen(fd, "w") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except OSError as error:
            log.error("cannot save the training job table to %s: %s", self.path, error)
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
