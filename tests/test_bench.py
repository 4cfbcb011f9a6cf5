"""Smoke test of the benchmark: a tiny model, 3 adapters, a few requests on every system."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loraserve.benchmarks.options import add_bench_flags
from loraserve.benchmarks.report import SCHEMA
from loraserve.benchmarks.run import run

SYSTEMS = ["engine", "engine-base", "grpc", "peft-batch", "peft-serial", "bare-loop"]


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_flags(parser)
    return parser.parse_args(
        [
            "--model-size",
            "tiny",
            "--work-dir",
            str(tmp_path / "work"),
            "--quiet",
            "--out",
            str(tmp_path / "out" / "report.json"),
            *extra,
        ]
    )


def test_custom_workload_on_every_system(tmp_path: Path) -> None:
    args = _args(
        tmp_path,
        "--adapters",
        "3",
        "--requests",
        "6",
        "--concurrency",
        "3",
        "--prompt-len",
        "4:12",
        "--output-len",
        "3:9",
        "--systems",
        ",".join(SYSTEMS),
        "--workload",
        "poisson",
        "--rate",
        "50",
        "--plot",
    )
    report = run(args)
    on_disk = json.loads(args.out.read_text())
    assert on_disk["schema"] == SCHEMA == report["schema"]
    assert {"platform", "torch", "cpu_count"} <= set(on_disk["machine"])
    scenario = on_disk["scenarios"]["custom"]
    assert set(scenario["systems"]) == set(SYSTEMS)
    wanted = scenario["workload"]["wanted_tokens"]
    for name, summary in scenario["systems"].items():
        assert summary["errors"] == 0, (name, summary["error_samples"])
        assert summary["completed"] == summary["requests"] == 6, name
        assert summary["generated_tokens"] == summary["wanted_tokens"] == wanted, name
        assert summary["throughput_tokens_per_s"] > 0
        for key in ("ttft_seconds", "inter_token_latency_seconds"):
            assert set(summary[key]) == {"p50", "p90", "p99", "mean"}
            assert summary[key]["p50"] <= summary[key]["p99"]
    assert "engine/peft-batch" in scenario["ratios"] and "engine/bare-loop" in scenario["ratios"]
    assert (args.out.parent / "custom.png").is_file()


def test_adapter_load_preset(tmp_path: Path) -> None:
    report = run(_args(tmp_path, "--scenario", "adapter-load"))
    load = report["scenarios"]["adapter-load"]
    assert len(load["loraserve_seconds"]["all"]) == len(load["peft_load_adapter_seconds"]["all"]) == 9
    assert load["goal"]["measured"] > 0


def test_sweep_preset(tmp_path: Path) -> None:
    report = run(
        _args(tmp_path, "--scenario", "sweep", "--sweep", "1,8", "--slots", "2", "--systems", "engine")
    )
    sweep = report["scenarios"]["sweep"]
    points = sweep["sweep"]
    assert [p["adapters"] for p in points] == [1, 8]
    assert all(p["engine"]["errors"] == 0 and p["engine"]["completed"] == 64 for p in points)
    assert all(p["slots"] == 2 and p["ratio_to_8"] > 0 for p in points) and points[1]["ratio_to_8"] == 1.0
    assert all("peft-batch" not in p for p in points)  # not asked for
    assert all(0 <= p["max_passed_over"] <= 8 for p in points)
    assert sweep["goal"]["measured"] is None  # no 1,024-adapter point in this run
