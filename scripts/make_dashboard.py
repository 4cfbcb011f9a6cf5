"""Writes deploy/grafana/loraserve-dashboard.json (the Grafana dashboard) from the panel list below.

Usage: python scripts/make_dashboard.py [--check] [--out FILE]. tests/test_dashboard.py checks
that the checked-in file is current and that every metric it queries exists in server/metrics.py.

Every query is filtered by the dashboard's `job` and `instance` variables (multi-select, "All"
by default): with several servers or Ray Serve replicas scraped, one can look at a single
replica instead of their sum.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "loraserve-dashboard.json"
# Added to every loraserve_* series selector: the variables below pick the scraped targets.
SELECTOR = 'job=~"$job", instance=~"$instance"'


def quantiles(metric: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le) (rate(loraserve_{metric}_bucket[$__rate_interval])))",
            f"p{int(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    ]


# (title, unit, [(expr, legend)])
PANELS = [
    (
        "Generated tokens / s",
        "short",
        [
            ("sum(rate(loraserve_generation_tokens_total[$__rate_interval]))", "all"),
            ("sum by (adapter) (rate(loraserve_generation_tokens_total[$__rate_interval]))", "{{adapter}}"),
        ],
    ),
    (
        "Finished requests / s",
        "reqps",
        [
            (
                "sum by (finish_reason) (rate(loraserve_requests_total[$__rate_interval]))",
                "{{finish_reason}}",
            ),
        ],
    ),
    ("Time to first token", "s", quantiles("time_to_first_token_seconds")),
    ("Inter-token latency", "s", quantiles("inter_token_latency_seconds")),
    ("Request duration", "s", quantiles("request_duration_seconds")),
    ("Queue time", "s", quantiles("request_queue_time_seconds")),
    (
        "Running and waiting requests",
        "short",
        [
            ("loraserve_requests_running", "running"),
            ("loraserve_requests_waiting", "waiting"),
        ],
    ),
    ("KV cache usage", "percentunit", [("loraserve_kv_cache_usage_ratio", "used")]),
    (
        "Batch: requests and adapters per step",
        "short",
        [
            (
                "rate(loraserve_batch_size_sum[$__rate_interval])"
                " / rate(loraserve_batch_size_count[$__rate_interval])",
                "requests",
            ),
            (
                "rate(loraserve_batch_adapters_sum[$__rate_interval])"
                " / rate(loraserve_batch_adapters_count[$__rate_interval])",
                "adapters",
            ),
        ],
    ),
    (
        "Adapters by tier",
        "short",
        [
            ("loraserve_adapters_loaded", "{{tier}}"),
            ("loraserve_adapter_slots_used", "slots used"),
            ("loraserve_adapter_slots_total", "slots"),
        ],
    ),
    (
        "Adapter loads and evictions / s",
        "short",
        [
            (
                "sum by (source_tier) (rate(loraserve_adapter_loads_total[$__rate_interval]))",
                "load from {{source_tier}}",
            ),
            (
                "sum by (tier) (rate(loraserve_adapter_evictions_total[$__rate_interval]))",
                "evicted from {{tier}}",
            ),
        ],
    ),
    (
        "Adapter device hit ratio",
        "percentunit",
        [
            (
                'sum(rate(loraserve_adapter_lookups_total{result="hit"}[$__rate_interval])) / '
                "sum(rate(loraserve_adapter_lookups_total[$__rate_interval]))",
                "hit ratio",
            ),
        ],
    ),
    ("Adapter load time", "s", quantiles("adapter_load_seconds")),
    (
        "Errors / s by status code",
        "short",
        [
            ("sum by (code) (rate(loraserve_request_errors_total[$__rate_interval]))", "{{code}}"),
        ],
    ),
    ("Preemptions / s", "short", [("rate(loraserve_preemptions_total[$__rate_interval])", "preemptions")]),
    ("Engine step duration", "s", quantiles("engine_step_seconds")),
]


def filtered(expr: str) -> str:
    """`expr` with every loraserve_* selector restricted to the chosen job and instance."""

    def add(match: re.Match) -> str:
        name, labels = match.group(1), match.group(2)
        if labels is None:
            return f"{name}{{{SELECTOR}}}"
        return f"{name}{{{labels[1:-1]}, {SELECTOR}}}"

    return re.sub(r"(loraserve_[a-z_]+)(\{[^}]*\})?", add, expr)


def variable(name: str, query: str) -> dict:
    return {
        "name": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
    }


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"expr": filtered(expr), "legendFormat": legend, "refId": chr(65 + j)}
                    for j, (expr, legend) in enumerate(targets)
                ],
            }
        )
    return {
        "title": "loraserve",
        "uid": "loraserve",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                variable("job", "label_values(loraserve_requests_running, job)"),
                variable("instance", 'label_values(loraserve_requests_running{job=~"$job"}, instance)'),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the Grafana dashboard of loraserve's metrics.")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write it (default {OUT})")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the file is not current"
    )
    args = parser.parse_args(argv)
    if args.check:
        current = args.out.is_file() and args.out.read_text() == render()
        print(f"{args.out} is {'current' if current else 'stale: run scripts/make_dashboard.py'}")
        return 0 if current else 1
    args.out.write_text(render())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
