"""Prints the metrics table of docs/api.md from loraserve.metrics (the one source of truth).

Usage: python scripts/metrics_table.py [--write]   (--write replaces the table in docs/api.md)
tests/test_readme.py fails when docs/api.md, README.md and the metrics registry disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "api.md"
BEGIN, END = "<!-- metrics-table:begin -->", "<!-- metrics-table:end -->"


def metrics() -> list[tuple[str, str, tuple[str, ...], str]]:
    """(exposed name, type, labels, help) of every metric, in the order metrics.py defines them."""
    from prometheus_client.metrics import MetricWrapperBase

    from loraserve.metrics import Metrics

    rows = []
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            # prometheus_client adds `_total` to a counter's name when it exposes it.
            name = metric._name + ("_total" if metric._type == "counter" else "")
            rows.append((name, metric._type, tuple(metric._labelnames), metric._documentation))
    return rows


def table() -> str:
    rows = ["| metric | type | labels | what it measures |", "|---|---|---|---|"]
    for name, kind, labels, help_text in metrics():
        shown = ", ".join(f"`{label}`" for label in labels) or "-"
        rows.append(f"| `{name}` | {kind} | {shown} | {help_text} |")
    return "\n".join(rows)


def replace_in(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        DOC.write_text(replace_in(DOC.read_text()))
    else:
        print(table())
