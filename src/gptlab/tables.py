"""Markdown tables (readable as plain text too): the one helper every report and CLI table goes through.

It lives at the package root and imports nothing from gptlab, so that every layer may use it: the
low layers (`quant/`, `calc.py`) as well as `report/` and `recipes/`.
"""

from __future__ import annotations

_RULES = {"l": "---", "r": "---:", "c": ":---:"}


def _row(cells) -> str:
    # an empty cell is written `| |`, not `|  |`
    return "|" + "".join(f" {c} |" if c != "" else " |" for c in map(str, cells))


def markdown_table(header: list, rows: list[list], align: str | None = None) -> str:
    """A Markdown table: `header` names the columns, each row gives its cells (`str()` of each; the
    caller formats numbers). `align` gives one letter per column, 'l' (default), 'r' or 'c'."""
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - set(_RULES):
        raise ValueError(f"align needs one of l/r/c per column ({len(header)}), got {align!r}")
    lines = [_row(header), "|" + "".join(_RULES[a] + "|" for a in align)]
    lines += [_row(row) for row in rows]
    return "\n".join(lines)
