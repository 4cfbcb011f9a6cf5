"""The Grafana dashboard: current with its generator, queries only metrics that server/metrics.py
defines, and lets one pick a job and an instance (one Ray Serve replica) instead of their sum."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from loraserve.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "loraserve-dashboard.json"
SCRIPT = ROOT / "scripts" / "make_dashboard.py"


def _queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_metrics_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    metrics = Metrics()
    known = set()
    for family in metrics.registry.collect():
        known.update(sample.name for sample in family.samples)
        known.update(
            {
                f"{family.name}_total",
                f"{family.name}_bucket",
                f"{family.name}_sum",
                f"{family.name}_count",
                family.name,
            }
        )
    queried = {name for expr in _queries() for name in re.findall(r"loraserve_[a-z_]+", expr)}
    assert len(dashboard["panels"]) >= 10
    assert queried and queried <= known, queried - known


def test_every_series_is_filtered_by_job_and_instance() -> None:
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= set(variables)
    for name in ("job", "instance"):
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert "label_values(loraserve_" in variables[name]["query"]["query"]
    for expr in _queries():
        selectors = re.findall(r"loraserve_[a-z_]+(\{[^}]*\})?", expr)
        assert selectors, expr
        for labels in selectors:
            assert 'job=~"$job"' in labels and 'instance=~"$instance"' in labels, expr


def test_generator_is_current_and_help_writes_nothing(tmp_path) -> None:
    out = tmp_path / "dashboard.json"
    check = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    before = DASHBOARD.stat().st_mtime_ns
    run = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("usage:")
    assert DASHBOARD.stat().st_mtime_ns == before
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0 and out.read_text() == DASHBOARD.read_text()
