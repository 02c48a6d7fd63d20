"""Text output: aligned tables and wrapped prose, every line within ``WIDTH`` (100) columns.

Used by ``demand-paging`` and ``compare`` (and open to ``report``)::

    from tdpmmu import render
    cols = [render.Column("item", right=False, key=True), render.Column(("modeled", "µs"))]
    lines = render.table(cols, [["tdx fault", "6.70"], ["snp fault", "6.10"]])
    lines += render.wrap("A long note that is wrapped at 100 columns ...")

A table wider than ``width`` is split into several tables, each repeating the ``key`` columns
(the row labels), so no line is longer than ``width`` unless one column on its own is.
"""

import dataclasses
import textwrap
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "WIDTH",
    "Column",
    "fmt_float",
    "fmt_int",
    "table",
    "wrap",
]

#: Maximum line length of every text output.
WIDTH: Final[int] = 100

_GAP = "  "


@dataclasses.dataclass(frozen=True, slots=True)
class Column:
    """A table column: its header (one string, or one string per header line), alignment, and
    whether it labels the rows (``key`` columns are repeated when a wide table is split)."""

    header: str | tuple[str, ...]
    right: bool = True
    key: bool = False

    @property
    def lines(self) -> tuple[str, ...]:
        """The header as a tuple of lines (one line when ``header`` is a str)."""
        return (self.header,) if isinstance(self.header, str) else self.header


def fmt_int(n: int | None) -> str:
    """An int with thousands separators: ``1234567 -> "1,234,567"``; ``None -> "-"``.

    Args:
        n: the number, or None for a missing value.

    Returns:
        str: the text. Never raises for an int or None.
    """
    return "-" if n is None else f"{n:,}"


def fmt_float(x: float | None, digits: int) -> str:
    """Fixed point with thousands separators: ``fmt_float(1234.5, 1) -> "1,234.5"``.

    Args:
        x: the number, or None for a missing value (``"-"``).
        digits: digits after the decimal point, >= 0.

    Returns:
        str: the text.

    Raises:
        ValueError: ``digits`` is negative.
    """
    return "-" if x is None else f"{x:,.{digits}f}"


def _render(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> list[str]:
    depth = max(len(c.lines) for c in columns)
    # Header lines are bottom-aligned: a one-line header sits on the last header line.
    headers = [("",) * (depth - len(c.lines)) + c.lines for c in columns]
    widths = [
        max([*(len(h) for h in hdr), *(len(row[i]) for row in rows)])
        for i, hdr in enumerate(headers)
    ]

    def line(values: Sequence[str]) -> str:
        return _GAP.join(
            v.rjust(w) if c.right else v.ljust(w)
            for v, w, c in zip(values, widths, columns, strict=True)
        ).rstrip()

    out = [line([hdr[i] for hdr in headers]) for i in range(depth)]
    out.append(_GAP.join("-" * w for w in widths))
    out.extend(line(row) for row in rows)
    return out


def _width(columns: Sequence[Column], rows: Sequence[Sequence[str]], idx: Sequence[int]) -> int:
    w = [max([*(len(h) for h in columns[i].lines), *(len(r[i]) for r in rows)]) for i in idx]
    return sum(w) + len(_GAP) * (len(w) - 1)


def table(
    columns: Sequence[Column], rows: Iterable[Sequence[str]], *, width: int = WIDTH
) -> list[str]:
    """The lines of an aligned table (headers, a rule, one line per row).

    When it would be wider than ``width``, the non-key columns are split over several tables
    (separated by a blank line), each starting with the key columns.

    Args:
        columns: the columns, left to right.
        rows: each row's cells as already formatted strings, one per column.
        width: the widest a line may be, in characters (default ``WIDTH``, 100).

    Returns:
        list[str]: the lines (no trailing spaces).

    Raises:
        ValueError: a row's cell count differs from the column count.
    """
    rows = [list(r) for r in rows]
    for r in rows:
        if len(r) != len(columns):
            raise ValueError(f"table: a row has {len(r)} cells for {len(columns)} columns")
    every = list(range(len(columns)))
    if _width(columns, rows, every) <= width:
        return _render(columns, rows)
    keys = [i for i in every if columns[i].key]
    groups: list[list[int]] = []
    current: list[int] = []
    for i in every:
        if i in keys:
            continue
        if current and _width(columns, rows, keys + current + [i]) > width:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    out: list[str] = []
    for group in groups:
        idx = keys + group
        if out:
            out.append("")
        out += _render([columns[i] for i in idx], [[r[i] for i in idx] for r in rows])
    return out


def wrap(text: str, *, width: int = WIDTH, indent: str = "", subsequent: str = "  ") -> list[str]:
    """``text`` wrapped at ``width`` columns (continuation lines indented by ``subsequent``);
    an empty text is one empty line.

    Args:
        text: the prose (words are never broken at hyphens).
        width: the widest a line may be (default ``WIDTH``, 100).
        indent: prefix of the first line (default none).
        subsequent: prefix of every further line (default two spaces).

    Returns:
        list[str]: the lines. Never raises for a str.
    """
    if not text:
        return [""]
    return textwrap.wrap(
        text,
        width=width,
        initial_indent=indent,
        subsequent_indent=subsequent,
        break_on_hyphens=False,
    )
