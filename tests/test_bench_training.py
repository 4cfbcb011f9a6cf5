"""The training scenario of `loraserve bench` on the tiny model: every phase serves every request,
the job trains while serving and alone, and the report has the ITL ratios."""

from __future__ import annotations

import argparse
from pathlib import Path

from loraserve.benchmarks.options import add_bench_flags
from loraserve.benchmarks.run import run


def test_training_scenario_serves_every_phase_and_the_job_trains(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_flags(parser)
    args = parser.parse_args(
        [
            *("--scenario", "training", "--model-size", "tiny", "--quiet"),
            *("--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "report.json")),
        ]
    )
    scenario = run(args)["scenarios"]["training"]
    requests = scenario["workload"]["requests"]
    assert set(scenario["systems"]) == {"idle-as-loaded", "idle", "training-256", "idle-after"}
    for summary in scenario["systems"].values():
        assert summary["completed"] == requests and summary["errors"] == 0
    job = scenario["training"]["training-256"]
    assert job["steps_per_s_alone"] > 0
    assert 0 < job["engine_time_share_measured"] <= 1
    assert scenario["ratios"]["itl_p99_training-256/idle"] is not None
    assert scenario["goal"]["measured"] == scenario["ratios"]["itl_p99_training-256/idle"]
