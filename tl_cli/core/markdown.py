"""Markdown for report.md files: tables with numbers formatted as the console shows them."""

from __future__ import annotations

from typing import Any

from tl_cli.core.console import fmt


def md_table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]

    def cell(v: Any) -> str:
        return (fmt(v) if isinstance(v, float) else str(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
