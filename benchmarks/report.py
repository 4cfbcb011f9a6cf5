"""Summaries of benchmark records, ratios between systems, the JSON report and PNG charts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from loraserve.benchmarks.systems import Record

SCHEMA = "loraserve-bench/1"


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": statistics.fmean(ordered)}


def summarize(records: list[Record]) -> dict[str, Any]:
    """Throughput, latency percentiles and token accounting of one system's run."""
    good = [r for r in records if r.error is None and r.finish is not None]
    errors = [r for r in records if r.error is not None]
    start = min((r.arrival for r in records), default=0.0)
    end = max((r.finish for r in good), default=start)
    wall = max(end - start, 1e-9)
    tokens = sum(r.tokens for r in good)
    ttft = [r.token_times[0] - r.arrival for r in good if r.token_times]
    itl = [b - a for r in good for a, b in zip(r.token_times, r.token_times[1:])]
    first_tokens = [r.token_times[0] for r in good if r.token_times]
    decode_span = end - max(first_tokens) if first_tokens else 0.0
    decode_tokens = sum(max(0, r.tokens - 1) for r in good)
    return {
        "requests": len(records),
        "completed": len(good),
        "errors": len(errors),
        "error_samples": sorted({r.error for r in errors})[:3],
        "generated_tokens": tokens,
        "wanted_tokens": sum(r.wanted for r in good),
        "wall_seconds": wall,
        "throughput_tokens_per_s": tokens / wall,
        "requests_per_s": len(good) / wall,
        # Tokens after each request's first, over the span from the first tokens to the end.
        "decode_tokens_per_s": decode_tokens / (end - min(first_tokens))
        if first_tokens and end > min(first_tokens)
        else None,
        "steady_decode_tokens_per_s": (
            sum(sum(1 for t in r.token_times if t > max(first_tokens)) for r in good) / decode_span
        )
        if decode_span > 0
        else None,
        "ttft_seconds": percentiles(ttft),
        "inter_token_latency_seconds": percentiles(itl),
    }


def ratios(systems: dict[str, dict[str, Any]], subject: str) -> dict[str, dict[str, float | None]]:
    """subject/peer for throughput-like figures (higher is better)."""
    out = {}
    mine = systems.get(subject)
    if mine is None:
        return out
    for peer, theirs in systems.items():
        if peer == subject:
            continue
        entry = {}
        for key in (
            "throughput_tokens_per_s",
            "decode_tokens_per_s",
            "steady_decode_tokens_per_s",
            "requests_per_s",
        ):
            a, b = mine.get(key), theirs.get(key)
            entry[key] = (a / b) if a and b else None
        out[f"{subject}/{peer}"] = entry
    return out


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_report(path: Path, config: dict[str, Any], scenarios: dict[str, Any]) -> dict[str, Any]:
    report = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": config,
        "scenarios": scenarios,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    return report


def plot(report: dict[str, Any], folder: Path) -> list[Path]:
    """Throughput vs adapter count (sweep) and latency percentiles per system (other scenarios)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, scenario in report["scenarios"].items():
        if "sweep" in scenario:
            counts = [point["adapters"] for point in scenario["sweep"]]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(
                counts,
                [p["engine"]["throughput_tokens_per_s"] for p in scenario["sweep"]],
                marker="o",
                label="loraserve engine",
            )
            peft = [
                (p["adapters"], p["peft-batch"]["throughput_tokens_per_s"])
                for p in scenario["sweep"]
                if "peft-batch" in p
            ]
            if peft:
                ax.plot(*zip(*peft), marker="s", label="PEFT generate (batched)")
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_xlabel(f"adapters (device slots: {scenario['slots']})")
            ax.set_ylabel("generated tokens / s")
            ax.set_title("Throughput as the adapter count grows")
            ax.grid(True, alpha=0.3)
            ax.legend()
        elif "systems" in scenario:
            systems = scenario["systems"]
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for ax, key, title in (
                (axes[0], "ttft_seconds", "time to first token"),
                (axes[1], "inter_token_latency_seconds", "inter-token latency"),
            ):
                names = list(systems)
                for offset, q in enumerate(("p50", "p90", "p99")):
                    values = [(systems[s][key][q] or 0) * 1e3 for s in names]
                    ax.bar([i + offset * 0.27 for i in range(len(names))], values, width=0.27, label=q)
                ax.set_xticks([i + 0.27 for i in range(len(names))], names, rotation=15)
                ax.set_ylabel("ms")
                ax.set_yscale("log")
                ax.set_title(title)
                ax.legend()
            fig.suptitle(name)
        else:
            continue
        fig.tight_layout()
        out = folder / f"{name}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written
