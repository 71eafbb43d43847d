"""LaTeX spelling of user and run strings (pure): escapes, common symbols and accented Latin letters, and an
error naming any other character and where it is, rather than a file that does not compile."""

from __future__ import annotations

import re
import unicodedata
from typing import List

from harness.grid import Experiment, ExperimentError


class LatexError(ValueError):
    """A character that has no LaTeX spelling here."""


_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "|": r"$|$",
    "<": r"$<$",
    ">": r"$>$",
}
# Symbols users put in cells and captions, spelled with LaTeX's own commands (the kernel's, and amssymb's
# \checkmark).
_SYMBOLS = {
    "✓": r"\checkmark{}",
    "✔": r"\checkmark{}",
    "☑": r"\checkmark{}",
    "✗": r"$\times$",
    "✘": r"$\times$",
    "×": r"$\times$",
    "±": r"$\pm$",
    "≈": r"$\approx$",
    "≤": r"$\leq$",
    "≥": r"$\geq$",
    "≠": r"$\neq$",
    "→": r"$\rightarrow$",
    "←": r"$\leftarrow$",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "–": "--",
    "—": "---",
    "−": r"$-$",
    "‘": "`",
    "’": "'",
    "“": "``",
    "”": "''",
    "…": r"\ldots{}",
    "•": r"\textbullet{}",
    "·": r"$\cdot$",
    "°": r"$^\circ$",
    "µ": r"$\mu$",
    "μ": r"$\mu$",
    "Δ": r"$\Delta$",
    "α": r"$\alpha$",
    "β": r"$\beta$",
    "γ": r"$\gamma$",
    "λ": r"$\lambda$",
    "σ": r"$\sigma$",
    "²": r"$^2$",
    "³": r"$^3$",
    "√": r"$\surd$",
    "®": r"\textregistered{}",
    "™": r"\texttrademark{}",
    "©": r"\copyright{}",
    "£": r"\pounds{}",
    "§": r"\S{}",
    "¶": r"\P{}",
    "\u00a0": "~",
    "ß": r"\ss{}",
    "æ": r"\ae{}",
    "Æ": r"\AE{}",
    "ø": r"\o{}",
    "Ø": r"\O{}",
    "œ": r"\oe{}",
    "Œ": r"\OE{}",
    "ł": r"\l{}",
    "Ł": r"\L{}",
    "ı": r"\i{}",
}
# Combining accents (after NFD decomposition) -> LaTeX accent commands: é -> \'{e}.
_ACCENTS = {
    "\u0301": "'",
    "\u0300": "`",
    "\u0302": "^",
    "\u0308": '"',
    "\u0303": "~",
    "\u0327": "c",
    "\u030c": "v",
    "\u030a": "r",
    "\u0304": "=",
    "\u0306": "u",
    "\u0307": ".",
    "\u030b": "H",
    "\u0328": "k",
}


def tex_escape(text: str) -> str:
    """``text`` as LaTeX that typesets it; :class:`LatexError` for a character without a spelling here."""
    out: List[str] = []
    for char in unicodedata.normalize("NFC", text):
        if char in _SPECIAL:
            out.append(_SPECIAL[char])
        elif char in _SYMBOLS:
            out.append(_SYMBOLS[char])
        elif char == "\n" or char == "\t":
            out.append(" ")
        elif char.isascii():
            out.append(char)
        else:
            out.append(_accented(char))
    return "".join(out)


def _accented(char: str) -> str:
    base, *marks = unicodedata.normalize("NFD", char)
    if base.isascii() and base.isalpha() and marks and all(m in _ACCENTS for m in marks):
        spelled = base
        for mark in marks:
            spelled = f"\\{_ACCENTS[mark]}{{{spelled}}}"
        return spelled
    name = unicodedata.name(char, "unnamed")
    raise LatexError(
        f"cannot write {char!r} (U+{ord(char):04X} {name}) in LaTeX; use ASCII, accented Latin "
        f"letters or one of {' '.join(sorted(set(_SYMBOLS) - {chr(0xA0)}))}"
    )


def tex_text(text: str) -> str:
    """Escaped prose with "quoted" words as LaTeX quotes."""
    return re.sub(r'"([^"]*)"', r"``\1''", tex_escape(text))


def check_experiment_strings(experiment: Experiment) -> None:
    """Every user string of the experiment has a LaTeX spelling; else an :class:`ExperimentError` naming the
    file, the row and the key (before a report is written)."""
    fields = [(None, "table", experiment.table), (None, "caption", experiment.caption)]
    for row in experiment.rows:
        fields.append((row.label, "label", row.label))
        fields += [(row.label, f"cells.{k}", str(v)) for k, v in row.cells.items() if v is not None]
    for row, key, text in fields:
        try:
            tex_escape(text)
        except LatexError as err:
            raise ExperimentError(experiment.path, row, key, str(err)) from None
