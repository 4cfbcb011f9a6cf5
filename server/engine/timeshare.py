"""How the engine's thread shares its time between serving and side work (training).

Serving steps and side-work slices (loraserve.training.worker) run on one thread, one after
another. While requests are waiting or running, a slice may run only while side work has had
less than `share` of the recent engine time; when nothing is being served, side work takes all
of it. Recent time is two exponentially decaying sums (half-life `HALF_LIFE_SECONDS`), so a
burst of serving after a quiet spell does not owe the trainer its whole idle past. A serving
step therefore waits at most one slice, and in a busy stretch slices take about `share` of the
time: a slice of s seconds is followed by about s·(1-share)/share seconds of serving.
"""

from __future__ import annotations

import math
import time

HALF_LIFE_SECONDS = 10.0


class TimeShare:
    """Decaying serving and side-work seconds, and the rule for when a slice may run."""

    def __init__(self, share: float, half_life: float = HALF_LIFE_SECONDS) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.share = share
        self.rate = math.log(2) / half_life
        self.serving = 0.0
        self.side = 0.0
        self._at = time.monotonic()

    def _decay(self) -> None:
        now = time.monotonic()
        factor = math.exp(-self.rate * (now - self._at))
        self.serving *= factor
        self.side *= factor
        self._at = now

    def add_serving(self, seconds: float) -> None:
        self._decay()
        self.serving += seconds

    def add_side(self, seconds: float) -> None:
        self._decay()
        self.side += seconds

    def side_due(self, serving_busy: bool) -> bool:
        """May a side-work slice run now? Always when nothing is served; else within the share."""
        if not serving_busy:
            return True
        self._decay()
        total = self.serving + self.side
        return total == 0 or self.side / total < self.share

    @property
    def side_fraction(self) -> float:
        total = self.serving + self.side
        return self.side / total if total else 0.0
