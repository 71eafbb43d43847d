"""Plain-text tables for the terminal (``--dry-run``, ``--status``): tabulate's ``simple`` layout, cells as given
(no number parsing: "0.2" and "-" align alike), no trailing spaces."""

from __future__ import annotations

from typing import List, Sequence

from tabulate import tabulate


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> List[str]:
    """The lines of a table: the header, a rule of dashes, one line per row."""
    text = tabulate([list(r) for r in rows], headers=list(header), tablefmt="simple", disable_numparse=True)
    return [indent + line.rstrip() for line in text.splitlines()]
