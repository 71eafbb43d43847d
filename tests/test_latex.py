"""The generated LaTeX compiles with a real LaTeX (pdfTeX), fits the text width and renders to PNG
(harness.report.preview; ``python -m harness.report.preview reports/table2_compact.tex out.png`` renders one
to look at).

Debian's texlive-latex-base and texlive-latex-recommended (booktabs) and poppler-utils (pdftoppm) come from
tools/install_system_packages.sh; without them the tests skip, saying so (and fail in CI).
"""

import shutil
import subprocess

import pytest
from conftest import missing_system_package

from harness.grid import load_experiment
from harness.report.collect import collect
from harness.report.markdown import render_latex, render_latex_compact
from harness.report.preview import LatexBuildError, compile_table, render_png
from tests.test_report import FIXTURE, RESULTS, ROOT

pytestmark = pytest.mark.slow


def _have_latex() -> bool:
    if not (shutil.which("pdflatex") and shutil.which("pdftoppm") and shutil.which("kpsewhich")):
        return False
    found = subprocess.run(["kpsewhich", "booktabs.sty", "amssymb.sty"], capture_output=True, text=True)
    return found.returncode == 0 and len(found.stdout.split()) == 2


@pytest.fixture(scope="session")
def latex():
    """pdflatex with booktabs, graphicx and amssymb, and pdftoppm (tools/install_system_packages.sh)."""
    if not _have_latex():
        missing_system_package("LaTeX (pdflatex with booktabs and amssymb, pdftoppm)")


def _experiment(name):
    if name == "small":
        return load_experiment(FIXTURE / "experiment.yaml", check_data=False), RESULTS
    return load_experiment(ROOT / "experiments" / f"{name}.yaml", check_data=False), ROOT / "results"


@pytest.mark.parametrize("render", [render_latex, render_latex_compact], ids=["full", "compact"])
@pytest.mark.parametrize("name", ["table1", "table2", "table3", "small"])
def test_report_compiles_and_fits_the_text_width(latex, tmp_path, name, render):
    exp, results = _experiment(name)
    tex = tmp_path / "t.tex"
    tex.write_text(render(exp, collect(results, exp)))
    pdf = compile_table(tex, tmp_path / "build")  # raises on LaTeX errors and Overfull \hbox
    assert pdf.stat().st_size > 1000


@pytest.mark.parametrize("name", ["table1", "table2", "table3", "small"])
def test_compact_table_renders_to_png(latex, tmp_path, name):
    """The table to paste, as pdfTeX sets it: a PNG of the page cropped to the table (caption above it, notes
    under it). The small fixture holds a split without large objects (APl -1) and FPS of three devices."""
    exp, results = _experiment(name)
    tex = tmp_path / f"{name}_compact.tex"
    tex.write_text(render_latex_compact(exp, collect(results, exp)))
    png = render_png(compile_table(tex, tmp_path / "build"), tmp_path / f"{name}_compact.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    height, width = mpimg.imread(png).shape[:2]
    assert width > 600 and height > 200, (width, height)  # a table, not an empty page


def test_errors_and_overfull_tables_are_caught(latex, tmp_path):
    bad = tmp_path / "bad.tex"
    bad.write_text("\\begin{tabular}{l}\nA_b \\\\\n\\end{tabular}\n")  # an unescaped _ outside math
    with pytest.raises(LatexBuildError, match="pdflatex failed"):
        compile_table(bad, tmp_path / "a")
    wide = tmp_path / "wide.tex"
    wide.write_text("\\begin{tabular}{" + "l" * 40 + "}\n" + " & ".join(["column"] * 40) + " \\\\\n\\end{tabular}\n")
    with pytest.raises(LatexBuildError, match="wider than the text"):
        compile_table(wide, tmp_path / "b")
