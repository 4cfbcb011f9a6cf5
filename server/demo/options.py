"""Flags of `loraserve demo` (no torch import: the CLI parser is built for every command)."""

from __future__ import annotations

import argparse
from pathlib import Path

from loraserve.paths import default_cache_dir

__all__ = ["add_demo_flags", "default_cache_dir"]


def add_demo_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the demo is built (default $LORASERVE_CACHE_DIR or ~/.cache/loraserve)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    parser.add_argument("--json", action="store_true", help="print the build's paths and scores as JSON")
    parser.add_argument(
        "--toy",
        action="store_true",
        help="build the small from-scratch demo model and its adapters instead (used by the tests)",
    )
    parser.add_argument(
        "--background",
        action="store_true",
        help="train as the server's child on a first run: progress lines, lower CPU priority",
    )
