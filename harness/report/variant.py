"""Which report an invocation writes: the canonical ``reports/<name>.*`` or a tagged variant (pure, no pandas).

The canonical report (``reports/<name>.md``, ``.tex``, ``_compact.tex`` and ``figures/<name>_*``) comes only
from the experiment as written: it is rendered from the file reloaded without command-line overrides and
without ``--rows`` (a report always covers every row). An invocation whose overrides change a number (a field
that enters a run, evaluation or measurement id), or that sweeps rows in, is a variant: it is reported under
``<name>+<tag>`` (:class:`Variant`), the tag a readable slug of the overrides and a short hash of which rows
got which, so the same overrides always name the same files and other overrides never overwrite them.
Overrides of fields that enter no id (``launcher.*``, ``train.print_freq``, ...) change no number: the report
is the canonical one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from harness.grid import Experiment, load_experiment
from harness.grid.identity import roles_of
from harness.grid.specs import override_strings

SLUG_CHARS = 32  # the readable part of a tag; the hash tells tags apart


@dataclass(frozen=True)
class Variant:
    """A report of the experiment with command-line overrides: ``name`` (``table2+epochs3-1a2b3c``) is its
    files' stem; ``rows`` the (label, overrides) of every row of ours that has overrides, in table order."""

    experiment: str
    tag: str
    rows: Tuple[Tuple[str, Tuple[str, ...]], ...]
    every_row: bool  # the same overrides on every row that runs (no --rows)
    swept: Tuple[str, ...] = ()  # the labels of rows a command-line sweep added

    @property
    def name(self) -> str:
        return f"{self.experiment}+{self.tag}"

    def groups(self) -> List[Tuple[Tuple[str, ...], List[str]]]:
        """(overrides, the labels of the rows that got them), in table order."""
        out: Dict[Tuple[str, ...], List[str]] = {}
        for label, overrides in self.rows:
            out.setdefault(overrides, []).append(label)
        return list(out.items())

    def description(self, code=lambda text: text) -> List[str]:
        """One sentence per set of overrides: ``train.epochs=3 on every row`` / ``... on rows 'A', 'B'``;
        ``code`` marks up a literal (Markdown backquotes, LaTeX escaping)."""
        out = []
        for overrides, labels in self.groups():
            where = (
                "every row that runs"
                if self.every_row
                else ("row " if len(labels) == 1 else "rows ") + ", ".join(code(label) for label in labels)
            )
            out.append(" ".join(code(o) for o in overrides) + " on " + where)
        if self.swept:
            out.append("rows added by a command-line sweep: " + ", ".join(code(label) for label in self.swept))
        return out


def id_overrides(command_line) -> Tuple[str, ...]:
    """The overrides of a row (:attr:`Row.command_line`) that change a number: those of fields that enter an id."""
    kept = {
        section: {field: value for field, value in (values or {}).items() if roles_of(section, field)}
        for section, values in (command_line or {}).items()
    }
    return override_strings(kept)


def as_written(experiment: Experiment) -> Experiment:
    """The experiment reloaded from its file without command-line overrides and without a row selection."""
    return load_experiment(experiment.path, smoke=experiment.smoke, check_data=False)


def report_variant(experiment: Experiment, written: Optional[Experiment] = None) -> Optional[Variant]:
    """The variant an experiment loaded with command-line overrides reports as, or None where its report is the
    canonical one (no override that changes a number, no row added by a sweep). ``written``: the experiment
    as written, if already loaded."""
    rows = tuple(
        (row.label, tuple(sorted(id_overrides(row.command_line)))) for row in experiment.rows if not row.cited
    )  # sorted: the order they were given in names the same report
    rows = tuple((label, overrides) for label, overrides in rows if overrides)
    written = written or as_written(experiment)
    swept = tuple(row.label for row in experiment.rows if row.label not in {r.label for r in written.rows})
    if not rows and not swept:
        return None
    run_rows = [row.label for row in experiment.rows if not row.cited]
    every_row = len(rows) == len(run_rows) and len({overrides for _, overrides in rows}) == 1 and not swept
    digest = hashlib.sha1(
        json.dumps([[label, list(o)] for label, o in rows] + [["swept", list(swept)]], sort_keys=True).encode()
    ).hexdigest()[:6]
    return Variant(experiment.name, f"{_slug(rows) or 'rows'}-{digest}", rows, every_row, swept)


def _slug(rows) -> str:
    """``train.epochs=3`` -> ``epochs3``; the values of one field over rows joined (``enc_n_points1.2.4``)."""
    values: Dict[str, List[str]] = {}
    for _, overrides in rows:
        for item in overrides:
            key, _, value = item.partition("=")
            text = re.sub(r"[^A-Za-z0-9]+", ".", value).strip(".")
            if text not in values.setdefault(key.split(".", 1)[1], []):
                values[key.split(".", 1)[1]].append(text)
    parts = [re.sub(r"[^A-Za-z0-9_]", "", field) + ".".join(v) for field, v in values.items()]
    slug = ""
    for part in parts:
        if slug and len(slug) + 1 + len(part) > SLUG_CHARS:
            break
        slug = f"{slug}-{part}" if slug else part
    return slug[:SLUG_CHARS]
