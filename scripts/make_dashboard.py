"""Writes deploy/grafana/loraserve-dashboard.json (the Grafana dashboard) from the panel list below.

Usage: python scripts/make_dashboard.py. tests/test_dashboard.py checks that every metric it
queries exists in server/metrics.py.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "loraserve-dashboard.json"


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
                    {"expr": expr, "legendFormat": legend, "refId": chr(65 + j)}
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
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")
