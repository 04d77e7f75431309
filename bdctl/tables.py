"""Result tables in the three forms a person reads them: rich on the terminal, Markdown, CSV.

A table is a header row and rows of cells; cells are strings or numbers. Numbers are formatted
by the caller (a table shows what a report would print, e.g. ``"24.31 ± 0.52"``), except in CSV,
where callers put raw numbers in separate columns so that a spreadsheet can compute with them.
Nothing here imports torch: the CLI prints tables without loading a model.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

Cell = str | int | float | None


def mean_std_cell(mean: float | None, std: float | None, digits: int = 2) -> str:
    """``"24.31 ± 0.52"``; ``"n/a"`` when there is no value."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _text(cell: Cell) -> str:
    if cell is None:
        return ""
    if isinstance(cell, float):
        return "n/a" if math.isnan(cell) else f"{cell:.4g}"
    return str(cell)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """A GitHub-flavoured Markdown table; the first column left-aligned, the others right."""

    def escape(cell: Cell) -> str:
        return _text(cell).replace("|", "\\|").replace("\n", " ")

    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = [
        "| " + " | ".join(escape(h) for h in headers) + " |",
        "| " + " | ".join(align) + " |",
    ]
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """CSV text (RFC 4180 quoting, ``\\n`` line ends); numbers written with full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow(["" if cell is None else (repr(cell) if isinstance(cell, float) else cell) for cell in row])
    return buffer.getvalue()


def rich_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], title: str | None = None) -> Any:
    """A ``rich.table.Table`` with the same cells as :func:`markdown_table`."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    # The first column names the row: never cut it short (rich squeezes columns to the terminal).
    first = max([len(str(headers[0]))] + [len(_text(row[0])) for row in rows]) if headers else 0
    for index, header in enumerate(headers):
        table.add_column(
            header, justify="left" if index == 0 else "right", no_wrap=True, min_width=first if index == 0 else None
        )
    for row in rows:
        table.add_row(*(_text(cell) for cell in row))
    return table


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], title: str | None = None) -> None:
    """Print a table on stdout (it is the command's result, unlike progress and errors on stderr)."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    table = rich_table(headers, rows)
    natural = console.measure(table, options=console.options.update_width(1_000_000)).maximum
    if natural > console.width:
        # Never cut a number to "…" to fit a width: a pipe or a file has none (rich assumed 80
        # columns), and on a narrow terminal a wrapped line loses nothing, a cut cell does.
        console = Console(highlight=False, width=natural)
    if title:
        # Above the table rather than as its title, which rich wraps to the table's width.
        console.print(f"[bold]{escape(title)}[/]")
    console.print(table)
