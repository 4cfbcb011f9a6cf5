"""Prints the README's configuration table from ServerConfig (the one source of truth).

Usage: python scripts/config_table.py [--write]   (--write replaces the table in README.md)
tests/test_readme.py fails when README.md and ServerConfig disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BEGIN, END = "<!-- config-table:begin -->", "<!-- config-table:end -->"


def table() -> str:
    from loraserve.config import ServerConfig

    rows = ["| flag | env var | default | what it does |", "|---|---|---|---|"]
    for name, field in ServerConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else ("`{}`" if default == {} else f"`{default}`")
        rows.append(
            f"| `--{name.replace('_', '-')}` | `LORASERVE_{name.upper()}` | {shown} | {field.description} |"
        )
    return "\n".join(rows)


def replace_in(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        readme = ROOT / "README.md"
        readme.write_text(replace_in(readme.read_text()))
    else:
        print(table())
