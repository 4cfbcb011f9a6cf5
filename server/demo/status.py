"""The demo trainer's status file: which tenant adapters are queued, training or ready, and when.

The trainer (`loraserve demo`, run by the server in a child process on first start) rewrites
it atomically after each change; the server reads it to answer requests for adapters that do
not exist yet (UNAVAILABLE, with an estimate) and to hot-load each adapter once it is written.
No torch here: the server's event loop reads it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

QUEUED, TRAINING, READY, FAILED = "queued", "training", "ready", "failed"


@dataclass
class AdapterProgress:
    """One adapter's place in the build."""

    state: str = QUEUED
    step: int = 0
    steps: int = 0
    eta_seconds: float = 0.0  # until it is written into the store, as of TrainingStatus.updated
    error: str = ""


@dataclass
class TrainingStatus:
    """The whole build: adapters in training order, the trainer's process id and clock."""

    pid: int = 0
    updated: float = 0.0  # time.time() of the last write
    adapters: dict[str, AdapterProgress] = field(default_factory=dict)

    def pending(self) -> list[str]:
        return [a for a, p in self.adapters.items() if p.state in (QUEUED, TRAINING)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainingStatus:
        raw = json.loads(text)
        adapters = {k: AdapterProgress(**v) for k, v in raw.get("adapters", {}).items()}
        return cls(int(raw.get("pid", 0)), float(raw.get("updated", 0.0)), adapters)


def write_status(path: Path, status: TrainingStatus) -> None:
    """Replaces the file in one rename, so a reader never sees half of it."""
    status.updated = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".status-", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        out.write(status.to_json())
    os.chmod(staging, 0o644)
    os.replace(staging, path)


def read_status(path: Path) -> TrainingStatus | None:
    """The last status written, or None when there is none (or it cannot be read)."""
    try:
        return TrainingStatus.from_json(path.read_text())
    except (OSError, ValueError, TypeError):
        return None


def about(seconds: float) -> str:
    """A rough duration for people: 'less than a minute', 'about 1 min', 'about 7 min'."""
    if seconds < 45:
        return "less than a minute"
    return f"about {max(1, round(seconds / 60))} min"
