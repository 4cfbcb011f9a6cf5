"""Where loraserve keeps what it builds once and reuses: converted GGUF models, demo builds,
benchmark assets. Bottom floor: imports nothing of loraserve."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$LORASERVE_CACHE_DIR, else $XDG_CACHE_HOME/loraserve, else ~/.cache/loraserve."""
    if os.environ.get("LORASERVE_CACHE_DIR"):
        return Path(os.environ["LORASERVE_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "loraserve"
