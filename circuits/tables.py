"""Plain-text and markdown tables: the one place that lays rows out as text.

Low in the package (it imports nothing of it), so that the readers, the reports and the commands
can all print tables without importing one another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def text_table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """Rows as aligned plain-text columns (what the CLI prints).

    Examples
    --------
    >>> print(text_table([("edges", 12), ("faithfulness", "0.91")]))
    edges         12
    faithfulness  0.91
    >>> print(text_table([("a0.h1", 2)], header=("head", "n")))
    head   n
    -----  -
    a0.h1  2
    """
    cells = [[str(c) for c in row] for row in ([header] if header else []) + list(rows)]
    widths = [max(len(row[i]) for row in cells if i < len(row))
              for i in range(max(map(len, cells)))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
             for row in cells]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; ``|`` inside cells is escaped.

    Examples
    --------
    >>> print(markdown_table(["edge", "score"], [("input->m0", "1.5")]))
    | edge | score |
    | --- | --- |
    | input->m0 | 1.5 |
    """
    def row(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([row(header), row(["---"] * len(header)), *map(row, rows)])
