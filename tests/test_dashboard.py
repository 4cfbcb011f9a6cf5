"""The Grafana dashboard queries only metrics that server/metrics.py defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

from loraserve.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


def test_dashboard_metrics_exist() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "loraserve-dashboard.json").read_text())
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
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"loraserve_[a-z_]+", target["expr"])
    }
    assert len(dashboard["panels"]) >= 10
    assert queried and queried <= known, queried - known
