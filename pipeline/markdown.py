"""Markdown for the stages' ``summary.md`` files."""
from __future__ import annotations

from typing import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """A pipe table, one line per row, each cell as ``str(cell)``; ``align``: one letter per column, ``l`` (left,
    ``---``) or ``r`` (right, ``---:``); default all left. No trailing newline."""
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r}: one of l / r per column ({len(header)})")
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
