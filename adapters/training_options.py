"""Flags of `loraserve train` (no torch import: the CLI parser is built for every command).

Without --target the adapter trains here, into --adapters-dir, on --model. With --target
HOST:PORT the data go to that server as a training job (loraserve.v1.Training) and the command
follows it: the flags left unset are then not sent, so the server applies its own defaults (the
same values, see TrainingOptions in the proto), and the flags of local training alone are refused.
The option flags therefore default to None; check_train_args fills in LOCAL_DEFAULTS for local
training, so that it sees exactly the values it always had.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# The defaults of local training (TrainConfig's), applied by check_train_args without --target.
LOCAL_DEFAULTS = {
    "eval_fraction": 0.1,
    "rank": 8,
    "alpha": 16.0,
    "dropout": 0.0,
    "target_modules": "all-linear",
    "lr": 2e-3,
    "epochs": 3.0,
    "batch_size": 16,
    "max_length": 256,
    "seed": 0,
    "quantization": "nf4",
    "eval_max_new_tokens": 48,
}
# Flags of local training alone, and why a server job has no use for them.
LOCAL_ONLY = {
    "model": ("--model", "the server trains on the base model it serves"),
    "adapters_dir": ("--adapters-dir", "the server writes into its own adapter store"),
    "epochs": ("--epochs", "a server job trains 3 epochs, or --steps optimizer steps"),
    "quantization": ("--quantization", "the server trains on its base model as it serves it"),
    "rslora": ("--rslora", "a server job has no such option"),
    "dropout": ("--dropout", "a server job has no such option"),
    "eval_max_new_tokens": ("--eval-max-new-tokens", "a server job has no such option"),
}


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="base model directory (Hugging Face format); required without --target"
    )
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
        "--eval-fraction", type=float, default=None, help="share of --data held out when no --eval-data (0.1)"
    )
    parser.add_argument(
        "--adapters-dir",
        type=Path,
        default=None,
        help="adapter store to write into; required without --target",
    )
    parser.add_argument(
        "--adapter-id", required=True, help="id (folder) of the new adapter: name or org/name"
    )
    parser.add_argument("--rank", "-r", type=int, default=None, help="LoRA rank (8)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (16)")
    parser.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) (rank-stabilised LoRA)")
    parser.add_argument("--dropout", type=float, default=None, help="LoRA dropout (0)")
    parser.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated module names, or all-linear (default: all-linear here; on a server, "
        "the modules it adapts)",
    )
    parser.add_argument("--lr", type=float, default=None, help="learning rate (AdamW; 2e-3)")
    parser.add_argument(
        "--epochs", type=float, default=None, help="passes over the data (3; ignored with --steps)"
    )
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (16)")
    parser.add_argument(
        "--max-length", type=int, default=None, help="longest example in tokens (256; longer ones are cut)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the init, split and batch order (0)")
    parser.add_argument(
        "--quantization",
        choices=["nf4", "fp4", "int8", "none"],
        default=None,
        help="base weights during training (QLoRA: nf4, the default)",
    )
    parser.add_argument(
        "--eval-max-new-tokens", type=int, default=None, help="longest held-out answer generated (48)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing adapter folder (with --target: replace the server's adapter "
        "of that id when the job succeeds)",
    )


def check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse alone cannot say: the flags each mode needs or refuses (parser.error, exit 2).

    Without --target: --model and --adapters-dir are required and the unset options take
    LOCAL_DEFAULTS. With --target: the flags of local training alone are refused unless they
    are at their default.
    """
    if args.target is None:
        missing = [LOCAL_ONLY[name][0] for name in ("model", "adapters_dir") if getattr(args, name) is None]
        if missing:
            parser.error(
                f"the following arguments are required: {', '.join(missing)} "
                "(or --target HOST:PORT to train on a server)"
            )
        for name, value in LOCAL_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        return
    if not args.target.strip():
        parser.error("--target: give the server's address, HOST:PORT")
    for name, (flag, why) in LOCAL_ONLY.items():
        value = getattr(args, name)
        if value is not None and value is not False and value != LOCAL_DEFAULTS.get(name):
            parser.error(f"{flag} is for local training, not with --target: {why}")
