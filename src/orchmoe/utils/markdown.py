"""The one Markdown table writer of the recipe (metrics, reports, analyses, benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["markdown_table"]


def _cell(v: Any, digits: int) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if v is None:
        return "-"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None, digits: int = 2
) -> str:
    """A GitHub Markdown table. Floats are shown with ``digits`` decimals, None as "-"; columns of numbers
    (or None) are right-aligned unless ``align`` ("l"/"r" per column) says otherwise."""
    if align is None:
        align = [
            "r" if rows and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) else "l"
            for i in range(len(headers))
        ]
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_cell(v, digits) for v in r) + " |" for r in rows]
    return "\n".join(lines)
