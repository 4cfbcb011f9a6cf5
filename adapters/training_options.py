"""Flags of `loraserve train` (no torch import: the CLI parser is built for every command)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model directory (Hugging Face format)")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help='JSONL training set: {"prompt", "completion"} or {"messages": [...]} per line',
    )
    parser.add_argument(
        "--eval-data", type=Path, default=None, help="JSONL held-out set (default: --eval-fraction of --data)"
    )
    parser.add_argument(
        "--eval-fraction", type=float, default=0.1, help="share of --data held out when no --eval-data"
    )
    parser.add_argument("--adapters-dir", type=Path, required=True, help="adapter store to write into")
    parser.add_argument(
        "--adapter-id", required=True, help="id (folder) of the new adapter: name or org/name"
    )
    parser.add_argument("--rank", "-r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) (rank-stabilised LoRA)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument(
        "--target-modules", default="all-linear", help="comma-separated module names, or all-linear (default)"
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (AdamW)")
    parser.add_argument(
        "--epochs", type=float, default=3.0, help="passes over the data (ignored with --steps)"
    )
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--max-length", type=int, default=256, help="longest example in tokens (longer ones are cut)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quantization",
        choices=["nf4", "fp4", "int8", "none"],
        default="nf4",
        help="base weights during training (QLoRA: nf4)",
    )
    parser.add_argument("--eval-max-new-tokens", type=int, default=48)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true", help="overwrite an existing adapter folder")
