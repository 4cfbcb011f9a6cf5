"""Where loraserve keeps what it builds once and reuses: converted GGUF models, demo builds,
benchmark assets. Bottom floor: imports nothing of loraserve."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_cache_dir() -> Path:
    """$LORASERVE_CACHE_DIR, else $XDG_CACHE_HOME/loraserve, else ~/.cache/loraserve."""
    if os.environ.get("LORASERVE_CACHE_DIR"):
        return Path(os.environ["LORASERVE_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "loraserve"


@dataclass(frozen=True)
class BuildFolder:
    """A cached build under the cache dir: its adapter store and its training data."""

    root: Path

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"
