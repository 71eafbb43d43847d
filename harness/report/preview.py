"""Compile a generated table with pdflatex in a minimal article and render it to PNG (poppler's pdftoppm):
the check that a report's LaTeX is ready to paste, and the picture of it in the README.

    python -m harness.report.preview reports/table2_compact.tex reports/figures/table2_compact.png

Needs Debian's texlive-latex-base (amssymb) and texlive-latex-recommended (booktabs) and poppler-utils; nothing else of
the project. A LaTeX error, or an overfull line (a table wider than the text), is a :class:`LatexBuildError`
with the log's lines around it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

# One-column A4 article with default margins: the narrowest text width a table is likely to meet.
WRAPPER = r"""\documentclass{article}
\usepackage{booktabs}
\usepackage{graphicx}
\usepackage{amssymb}
\pagestyle{empty}
\begin{document}
\input{table}
\end{document}
"""
OVERFULL = re.compile(r"^Overfull \\hbox.*$", re.MULTILINE)


class LatexBuildError(RuntimeError):
    """pdflatex failed, or the table does not fit the text width."""


def compile_table(tex: Path, out_dir: Path, timeout_s: float = 120) -> Path:
    """Compile ``tex`` (a file to ``\\input``) inside :data:`WRAPPER`; returns the PDF's path."""
    if shutil.which("pdflatex") is None:
        raise LatexBuildError(
            "pdflatex not found (Debian: apt-get install texlive-latex-base texlive-latex-recommended)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tex, out_dir / "table.tex")
    (out_dir / "doc.tex").write_text(WRAPPER)
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=out_dir,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    log = (out_dir / "doc.log").read_text(errors="replace") if (out_dir / "doc.log").exists() else proc.stdout
    if proc.returncode != 0:
        errors = [line for line in log.splitlines() if line.startswith("!")]
        raise LatexBuildError(f"{tex}: pdflatex failed: {'; '.join(errors) or 'see the log'}\n{log[-3000:]}")
    overfull = OVERFULL.findall(log)
    if overfull:
        raise LatexBuildError(f"{tex}: wider than the text: {'; '.join(overfull)}")
    return out_dir / "doc.pdf"


def render_png(pdf: Path, png: Path, dpi: int = 200) -> Path:
    """The PDF's first page, cropped to the table, as ``png`` (pdftoppm, then the margins trimmed)."""
    if shutil.which("pdftoppm") is None:
        raise LatexBuildError("pdftoppm not found (Debian: apt-get install poppler-utils)")
    stem = png.with_suffix("")
    subprocess.run(
        ["pdftoppm", "-png", "-r", str(dpi), "-singlefile", "-f", "1", "-l", "1", str(pdf), str(stem)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    _trim(png)
    return png


def _trim(png: Path, margin: int = 12) -> None:
    """Crop the white page around the table (matplotlib reads and writes the PNG; no other imaging library)."""
    import matplotlib.image as mpimg
    import numpy as np

    image = mpimg.imread(png)
    ink = np.argwhere(image[..., :3].min(axis=-1) < 0.98)
    if not len(ink):
        return
    (top, left), (bottom, right) = ink.min(axis=0), ink.max(axis=0)
    top, left = max(top - margin, 0), max(left - margin, 0)
    crop = image[top : bottom + margin + 1, left : right + margin + 1]
    mpimg.imsave(png, crop, metadata={"Software": None})


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tex", type=Path, help="a generated table, e.g. reports/table2_compact.tex")
    parser.add_argument("png", type=Path, nargs="?", help="write the rendered table here (optional)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            pdf = compile_table(args.tex, Path(tmp))
            if args.png is not None:
                args.png.parent.mkdir(parents=True, exist_ok=True)
                render_png(pdf, args.png)
        except LatexBuildError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    print(f"{args.tex}: compiles, fits the text width" + (f"; wrote {args.png}" if args.png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
