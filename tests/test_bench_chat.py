"""Smoke test of the multi-turn chat benchmark (prefix cache on vs off) on the tiny model."""

from __future__ import annotations

import argparse
from pathlib import Path

from loraserve.benchmarks.options import add_bench_flags
from loraserve.benchmarks.run import run


def test_chat_scenario_runs_both_engines_and_the_cache_serves_the_history(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_flags(parser)
    args = parser.parse_args(
        [
            *("--scenario", "chat", "--model-size", "tiny", "--quiet"),
            *("--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "report.json")),
        ]
    )
    scenario = run(args)["scenarios"]["chat"]
    on, off = scenario["systems"]["engine-cache-on"], scenario["systems"]["engine-cache-off"]
    requests = scenario["workload"]["requests"]
    for summary in (on, off):
        assert summary["requests"] == summary["completed"] == requests and summary["errors"] == 0
    # Greedy with EOS ignored: the same answer lengths, so the same histories and token counts.
    assert on["generated_tokens"] == off["generated_tokens"] == on["wanted_tokens"]
    assert on["prompt_tokens"] == off["prompt_tokens"]
    assert off["cached_prompt_tokens"] == 0
    # Every turn after a tenant's first shares at least the system prompt's full blocks.
    assert on["cached_prompt_tokens"] >= (requests - scenario["workload"]["tenants"]) * 64
    assert set(scenario["ratios"]) == {"ttft_p50_off/on", "ttft_p99_off/on", "throughput_on/off"}
    assert scenario["goal"]["target"] == 3.0
