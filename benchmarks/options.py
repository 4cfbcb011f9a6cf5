"""Flags of `loraserve bench` / `python -m loraserve.benchmarks.run` (no torch import)."""

from __future__ import annotations

import argparse
from pathlib import Path

SYSTEMS = ("engine", "engine-base", "peft-batch", "peft-serial", "bare-loop")
SCENARIOS = (
    "custom",
    "decode-distinct",
    "poisson",
    "overhead",
    "adapter-load",
    "sweep",
    "chat",
    "training",
    "all",
)


def length_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    lo, hi = int(low), int(high or low)
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def add_bench_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="custom",
        help="decode-distinct, poisson, overhead, adapter-load, sweep, chat, training: fixed presets "
        "(benchmarks/README.md); all: every preset; custom: the workload flags below",
    )
    parser.add_argument(
        "--model-size",
        choices=["bench", "1b", "tiny"],
        default="bench",
        help="bench: the bench model (Llama, hidden 768, 8 layers); 1b: a Llama of ~1.1B parameters "
        "(hidden 2048, 16 layers; for a GPU, scripts/gpu_check.sh); tiny: a toy model for smoke tests",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the model and adapters are built/reused (default: cache dir)",
    )
    parser.add_argument("--adapters", type=int, default=8, help="number of synthetic adapters N")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    parser.add_argument(
        "--slots",
        type=int,
        default=0,
        help="device slots (0: min(adapters, 32); sweep: the server's auto sizing)",
    )
    parser.add_argument("--workload", choices=["closed", "poisson"], default="closed")
    parser.add_argument("--concurrency", type=int, default=8, help="closed loop: concurrent clients")
    parser.add_argument("--rate", type=float, default=4.0, help="poisson: arrivals per second")
    parser.add_argument("--requests", type=int, default=32, help="requests per system")
    parser.add_argument("--popularity", choices=["uniform", "powerlaw", "distinct"], default="powerlaw")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity")
    parser.add_argument("--prompt-len", type=length_range, default=(16, 64), help="LOW:HIGH tokens")
    parser.add_argument("--output-len", type=length_range, default=(16, 64), help="LOW:HIGH tokens")
    parser.add_argument(
        "--systems",
        default="engine,engine-base,peft-batch",
        help=f"comma-separated, from {', '.join(SYSTEMS)}",
    )
    parser.add_argument("--target", default=None, help="also drive a running server over gRPC at HOST:PORT")
    parser.add_argument(
        "--sweep",
        default="1,8,32,128,1024",
        help="adapter counts for --scenario sweep (4096 needs ~1.3 GB of disk)",
    )
    parser.add_argument("--quantization", choices=["nf4", "fp4", "int8", "none"], default="nf4")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results/report.json"), help="JSON report path"
    )
    parser.add_argument("--plot", action="store_true", help="also write PNG charts next to the report")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
