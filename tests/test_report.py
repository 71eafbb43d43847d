"""collect -> DataFrame -> Markdown/LaTeX/figures: golden files, every paper row, LaTeX structure."""
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.report.collect import aggregate, collect
from harness.grid import expand, load_experiment
from harness.report.tables import render_latex, render_markdown, write_report
from harness.store import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "results_small"
GOLDEN = ROOT / "tests" / "fixtures" / "golden_reports"
RESULTS = FIXTURE / "results"


@pytest.fixture(scope="module")
def small():
    return load_experiment(FIXTURE / "experiment.yaml", check_data=False)


@pytest.fixture(scope="module")
def small_df(small):
    return collect(RESULTS, small)


def test_fixture_run_ids_are_current(small):
    on_disk = set(ResultsStore(RESULTS).run_ids("small"))
    expected = {s.run_id for scale in ("full", "smoke") for s in expand(small, scale)}
    assert on_disk <= expected, ("the run ids of tests/fixtures/results_small changed (a config field was "
                                 "added or changed): run python3 tests/fixtures/results_small/make_fixture.py")


def test_collect_has_one_row_per_run(small, small_df):
    n_specs = sum(len(expand(small, scale)) for scale in ("full", "smoke"))
    assert len(small_df) == n_specs
    states = {(r.label, r.scale, r.seed): r.state for r in small_df.itertuples()}
    assert states[("base", "full", 1)] == "done" and states[("base", "full", 2)] == "done"
    assert states[("failed row", "full", 42)] == "failed"
    assert states[("not run", "full", 42)] == "new"           # benchmark.json alone does not finish a run
    spec = [s for s in expand(small, "full") if s.label == "not run"][0]
    assert ResultsStore(RESULTS).plan([spec])[0].action == "run"
    k1 = small_df[(small_df.label == "K=1") & (small_df.scale == "smoke")].iloc[0]
    assert k1.AP == 0.75 and math.isnan(k1.AP75)                   # a missing field is NaN


def test_aggregate_over_seeds(small_df):
    agg = aggregate(small_df)
    base = agg[(agg.label == "base") & (agg.scale == "full")].iloc[0]
    assert base.n_runs == 2 and base.seeds == "1,2"
    assert base.AP == pytest.approx(44.2)
    assert base.AP_seed_std == pytest.approx(math.sqrt(0.08))
    smoke = agg[(agg.label == "base") & (agg.scale == "smoke")].iloc[0]
    assert smoke.n_runs == 1 and math.isnan(smoke.AP_seed_std)
    assert set(agg.label) == {"base", "K=1", "not run"}             # rows without any numbers are absent


def test_collect_reports_a_corrupt_metrics_file(tmp_path, small):
    shutil.copytree(RESULTS, tmp_path / "results")
    spec = [s for s in expand(small, "smoke") if s.label == "K=1"][0]
    (tmp_path / "results" / "small" / spec.run_id / "metrics.json").write_text('{"AP": 0.')
    df = collect(tmp_path / "results", small)
    row = df[df.run_id == spec.run_id].iloc[0]
    assert row.state == "corrupt" and "metrics.json" in row.error and math.isnan(row.AP)


@pytest.mark.parametrize("suffix,render", [(".md", render_markdown), (".tex", render_latex)])
def test_golden_report(small, small_df, suffix, render):
    text = render(small, small_df)
    golden = GOLDEN / f"small{suffix}"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"rendered output differs from {golden} (UPDATE_GOLDEN=1 to accept)"


def test_report_lines(small, small_df):
    md = render_markdown(small, small_df)
    assert "| Deformable DETR | 4 | paper | 43.8 | 62.6 | 40 | 173 | 19 |" in md
    assert "ours (full), 2 seeds | 44.2±0.3 (+0.4)" in md
    assert "40.07±0.00 (+0.07)" in md                                # params in M beside the paper's 40
    assert "ours: full failed" in md and "ours: not run" not in md
    # complexity measured alone: params/FLOPs/FPS without AP, and the run is still to be trained
    assert "|  |  | ours (full) |  |  | 41.52 (+0.52) | 89.6 (+3.6) | 27.0 (-1.0) | full | coco |  |" in md
    assert "| FCOS (Tian et al., 2019) |  | paper (cited) | 44.7 | 64.1 |" in md
    assert "cpu; FPS: NVIDIA H100 80GB HBM3" in md
    assert "A_row & 50% of a \\| pipe" in md


def test_report_is_deterministic(tmp_path, small):
    a, b = tmp_path / "a", tmp_path / "b"
    write_report(small, RESULTS, a, figures=False)
    write_report(small, RESULTS, b, figures=False)
    for name in ("small.md", "small.tex"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "small.md").read_text() == (GOLDEN / "small.md").read_text()


def test_figures_are_written_and_deterministic(tmp_path, small):
    first = write_report(small, RESULTS, tmp_path / "a")
    second = write_report(small, RESULTS, tmp_path / "b")
    figures = sorted(p.name for p in first if p.parent.name == "figures")
    assert figures == sorted(f"small_{n}.{e}" for n in ("ap_per_epoch", "ap_vs_gflops", "ap_vs_fps",
                                                         "ablation_deltas") for e in ("png", "pdf"))
    for p, q in zip(first, second):
        assert p.read_bytes() == q.read_bytes(), p.name
    pdf = (tmp_path / "a" / "figures" / "small_ap_per_epoch.pdf").read_bytes()
    assert b"CreationDate" not in pdf


# ------------------------------------------------------------------------------------ the paper tables

@pytest.mark.parametrize("name", ["table1", "table2", "table3"])
def test_every_paper_row_is_in_the_report(tmp_path, name):
    exp = load_experiment(ROOT / "experiments" / f"{name}.yaml", check_data=False)
    df = collect(tmp_path / "empty-results", exp)
    md = render_markdown(exp, df)
    tex = render_latex(exp, df)
    paper_lines = [l for l in md.splitlines() if "| paper" in l]
    assert len(paper_lines) == len(exp.rows)
    for row, line in zip(exp.rows, paper_lines):
        cells = [c.strip() for c in line.strip("|").split("|")]
        for metric, value in row.paper.items():
            if value is not None:
                expected = f"{value:g}" if metric in ("params", "flops", "gpu_hours", "fps") else f"{value:.1f}"
                assert expected in cells, (row.label, metric)
        for key in exp.columns:
            if isinstance(row.cells.get(key), str):
                assert row.cells[key] in line
    # nothing is made up: without results, no reproduced value appears
    assert "ours (full)" not in md + tex and "ours (smoke)" not in md + tex
    assert md.count("ours: not run") == sum(not r.cited for r in exp.rows)
    assert tex.count(r"\\") - tex.count(r"\\usepackage") >= len(exp.rows)


def _tabular_rows(tex):
    body = tex.split(r"\midrule", 1)[1].split(r"\bottomrule", 1)[0]
    return [l for l in body.splitlines() if l.strip().endswith(r"\\")]


@pytest.mark.parametrize("name", ["table1", "table2", "table3", "small"])
def test_latex_structure(tmp_path, small, small_df, name):
    if name == "small":
        exp, df = small, small_df
    else:
        exp = load_experiment(ROOT / "experiments" / f"{name}.yaml", check_data=False)
        df = collect(tmp_path, exp)
    tex = render_latex(exp, df)
    for env in ("table", "tabular"):
        assert tex.count(rf"\begin{{{env}}}") == tex.count(rf"\end{{{env}}}") == 1
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    assert r"\hline" not in tex
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", tex).group(1)
    for line in _tabular_rows(tex):
        unescaped = line.replace(r"\&", "")
        assert unescaped.count("&") == len(spec) - 1, line
    # braces balance and specials are escaped
    assert tex.count("{") - tex.count(r"\{") == tex.count("}") - tex.count(r"\}")
    text = re.sub(r"(?<!\\)\$[^$]*\$", "", tex.split("\n", 1)[1])        # math is allowed its _
    assert re.search(r"(?<!\\)[%#_&$]", text.replace(" & ", " ")) is None
    assert rf"\label{{tab:{exp.name}}}" in tex


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
@pytest.mark.parametrize("name", ["table1", "table2", "table3"])
def test_latex_compiles(tmp_path, name):
    exp = load_experiment(ROOT / "experiments" / f"{name}.yaml", check_data=False)
    (tmp_path / "t.tex").write_text(render_latex(exp, collect(tmp_path / "none", exp)))
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n"
                                      "\\begin{document}\n\\input{t}\n\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
