"""What the server answers for a demo adapter that is still being trained.

The generation core consults a `TrainingSchedule` before it submits a request: an adapter
that the demo trainer has queued or is training, and that is therefore not in the store yet,
gets UNAVAILABLE (worth retrying, unlike NOT_FOUND) with a message saying how far its
training is and roughly when it will be ready. Everything else passes through untouched. The
schedule holds the trainer's last status in memory: `check` never touches the disk.
"""

from __future__ import annotations

import time

from loraserve.demo.status import TRAINING, TrainingStatus, about
from loraserve.errors import Unavailable


class TrainingSchedule:
    """The demo trainer's adapters that are not ready yet, and their estimates."""

    def __init__(self, status: TrainingStatus | None = None) -> None:
        self.status = status

    def update(self, status: TrainingStatus | None) -> None:
        self.status = status

    def pending(self) -> list[str]:
        return [] if self.status is None else self.status.pending()

    def check(self, adapter_id: str) -> None:
        """Raises Unavailable for an adapter still queued or in training; else returns."""
        status = self.status
        if status is None or adapter_id not in status.pending():
            return
        progress = status.adapters[adapter_id]
        left = progress.eta_seconds - (time.time() - status.updated)
        if progress.state == TRAINING and progress.step > 0:
            where = f"step {progress.step} of {progress.steps}"
        elif progress.state == TRAINING:
            where = "starting"
        else:
            pending = status.pending()
            ahead = pending[: pending.index(adapter_id)]
            where = f"queued after {', '.join(ahead)}" if ahead else "waiting for the trainer to start"
        raise Unavailable(
            f"adapter {adapter_id!r} is still training ({where}); ready in {about(left)}: retry then"
        )
