"""collect -> DataFrame -> Markdown/LaTeX/figures: golden files, every paper row, both references and the
noise marker, differences only between like and like (no smoke differences, FPS only on the references' device
class, COCOeval's -1 as "–"), rows of one's own, titles of a copied experiment, results as data, LaTeX structure
(tests/test_latex.py compiles it and renders it to PNG), figures."""

import math
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from harness.grid import ExperimentError, expand, load_experiment
from harness.report import noise
from harness.report.collect import aggregate, collect, export
from harness.report.devices import classes, comparable, device_class
from harness.report.figures import ablation_deltas, convergence_curves, reference_points
from harness.report.markdown import command_path, render_latex, render_latex_compact, render_markdown, write_report
from harness.store import ResultsError, ResultsStore

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
    on_disk = set(ResultsStore(RESULTS).run_ids())
    expected = {s.run_id for scale in ("full", "smoke") for s in expand(small, scale)}
    assert on_disk <= expected, (
        "the run ids of tests/fixtures/results_small changed (a config field was "
        "added or changed): run python3 tests/fixtures/results_small/make_fixture.py"
    )


def test_collect_has_one_row_per_run(small, small_df):
    n_specs = sum(len(expand(small, scale)) for scale in ("full", "smoke"))
    assert len(small_df) == n_specs
    states = {(r.label, r.scale, r.seed): r.state for r in small_df.itertuples()}
    assert states[("base", "full", 1)] == "done" and states[("base", "full", 2)] == "done"
    assert states[("failed row", "full", 42)] == "failed"
    assert states[("not run", "full", 42)] == "new"  # a measurement alone does not train a run
    spec = [s for s in expand(small, "full") if s.label == "not run"][0]
    assert ResultsStore(RESULTS).plan([spec])[0].action == "run"
    k1 = small_df[(small_df.label == "K=1") & (small_df.scale == "smoke")].iloc[0]
    assert k1.AP == 0.75 and math.isnan(k1.AP75)  # a missing field is NaN
    assert math.isnan(k1.APl) and k1.undefined == "APl"  # COCOeval's -1 is no number, and says so


def test_aggregate_over_seeds(small_df):
    agg = aggregate(small_df)
    base = agg[(agg.label == "base") & (agg.scale == "full")].iloc[0]
    assert base.n_runs == 2 and base.seeds == "1,2"
    assert base.AP == pytest.approx(44.2)
    assert base.AP_seed_std == pytest.approx(math.sqrt(0.08))
    smoke = agg[(agg.label == "base") & (agg.scale == "smoke")].iloc[0]
    assert smoke.n_runs == 1 and math.isnan(smoke.AP_seed_std)
    assert set(agg.label) == {"base", "K=1", "not run", "2 levels"}  # rows without any numbers are absent


def test_collect_reports_a_corrupt_metrics_file(tmp_path, small):
    shutil.copytree(RESULTS, tmp_path / "results")
    spec = [s for s in expand(small, "smoke") if s.label == "K=1"][0]
    (tmp_path / "results" / "runs" / spec.run_id / "metrics.json").write_text('{"AP": 0.')
    df = collect(tmp_path / "results", small)
    row = df[df.run_id == spec.run_id].iloc[0]
    assert row.state == "corrupt" and "metrics.json" in row.error and math.isnan(row.AP)


@pytest.mark.parametrize(
    "suffix,render", [(".md", render_markdown), (".tex", render_latex), ("_compact.tex", render_latex_compact)]
)
def test_golden_report(small, small_df, suffix, render, monkeypatch):
    monkeypatch.chdir(ROOT)  # the regenerate hint names the file relative to here
    text = render(small, small_df)
    golden = GOLDEN / f"small{suffix}"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"rendered output differs from {golden} (UPDATE_GOLDEN=1 to accept)"


def test_report_lines(small, small_df):
    md = render_markdown(small, small_df)
    assert "| base | Deformable DETR | 4 | paper | 43.8 | 62.6 | 58.0 | 40 | 173 | 19 |" in md
    assert "|  |  |  | official code | 44.5 |  | 59.6 | 40 |  | 15 |" in md
    # mean±std over 2 seeds, (Δ paper / Δ official), and within the seeds' spread of the official 44.5
    assert "ours (full), 2 seeds | 44.2±0.3 (+0.4 / -0.3) ≈ | 62.7±0.3 (+0.1 / –) ≈ |" in md
    assert "40.07±0.00 (+0.07 / +0.07)" in md  # params in M beside 40 and 40
    # smoke: another model on another dataset, so no difference to the paper (nor a noise marker) in any column
    assert "| ours (smoke) | 1.2 | 19.8 | 15.2 | 1.23 | 0.6 | 14.2 [CPU] | smoke |" in md
    assert "paper; ours: full failed" in md and "not run | DETR |  | paper; ours" not in md
    # complexity measured alone: params/FLOPs/FPS without AP, and the run is still to be trained; its FPS was
    # measured on a V100 like the paper's, so it has its difference
    assert "|  |  |  | ours (full) |  |  |  | 41.52 (+0.52) | 89.6 (+3.6) | 27.0 [V100] (-1.0) | full | coco |  |" in md
    assert "| cited | FCOS (Tian et al., 2019) |  | paper (cited) | 44.7 | 64.1 |" in md
    assert "cpu; FPS: NVIDIA H100 80GB HBM3" in md
    assert "A_row & 50% of a \\| pipe, café" in md
    # a row of one's own: no paper line, the label tells it from base (same cells), no noise marker
    assert (
        "| 2 levels | Deformable DETR | 4 | ours (full) | 43.1 | 61.6 | – | 40.07 | 185.6 | 14.2 [H100] | full |" in md
    )
    # an axes row that has not run: one line, its label, nothing else
    assert "| enc_n_points=8 |  | 8/4 | ours: not run |  |" in md  # K derived from its config
    assert md.count("enc_n_points=8") == 1
    # the legend says which reference a reproduction is held to, and the band
    assert "held to the official code's numbers" in md and "±0.3 AP" in md
    assert "regenerate with `python run_experiment.py tests/fixtures/results_small/experiment.yaml --report`" in md


def test_ablation_deltas_say_whether_they_exceed_the_noise(small, small_df):
    md = render_markdown(small, small_df)
    section = md.split("## Ablation deltas", 1)[1]
    assert "| K=1 | -2.4 ↓ (±0.42) |  | -0.5 |" in section  # paper: two single runs; smoke: no band
    assert "| 2 levels |  | -1.1 ↓ (±0.41) |  |" in section  # one run against base's two seeds
    assert "enc_n_points=8" not in section  # no line without a number
    fig = ablation_deltas(small, aggregate(small_df))
    assert len(fig.axes) == 1  # paper, full and smoke on one shared axis
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "paper",
        "ours, full scale",
        "ours, smoke scale (synthetic)",
    ]


def test_noise_verdicts():
    assert noise.held_reference({"AP": 43.8}, {"AP": 44.5}, "AP") == ("official", 44.5)
    assert noise.held_reference({"AP": 43.8}, {}, "AP") == ("paper", 43.8)
    assert noise.held_reference({}, {}, "AP") == (None, None)
    assert noise.band("AP", math.nan, 1, "full") == 0.3  # one run: the stated band
    assert noise.band("AP", 0.12, 3, "full") == 0.12  # seeds: their spread
    assert noise.band("AP", math.nan, 1, "smoke") is None  # the COCO band says nothing about smoke runs
    assert noise.band("params", math.nan, 1, "full") is None  # no marker for complexity columns
    assert noise.verdict("AP", -0.3, 0.3) == noise.WITHIN  # compared as printed
    assert noise.verdict("AP", 0.36, 0.3) == noise.ABOVE
    assert noise.verdict("AP", -0.5, 0.3) == noise.BELOW
    assert noise.combined(0.3, 0.4) == pytest.approx(0.5) and noise.combined(0.3, None) is None


def test_report_is_deterministic(tmp_path, small):
    a, b = tmp_path / "a", tmp_path / "b"
    write_report(small, RESULTS, a, figures=False)
    write_report(small, RESULTS, b, figures=False)
    for name in ("small.md", "small.tex", "small_compact.tex"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_figures_are_written_and_deterministic(tmp_path, small):
    first = write_report(small, RESULTS, tmp_path / "a")
    second = write_report(small, RESULTS, tmp_path / "b")
    figures = sorted(p.name for p in first if p.parent.name == "figures")
    assert figures == sorted(
        f"small_{n}.{e}"
        for n in ("convergence", "ap_vs_gflops", "ap_vs_fps", "ablation_deltas")
        for e in ("png", "pdf")
    )
    for p, q in zip(first, second):
        assert p.read_bytes() == q.read_bytes(), p.name
    pdf = (tmp_path / "a" / "figures" / "small_convergence.pdf").read_bytes()
    assert b"CreationDate" not in pdf
    assert b"/FontFile2" in pdf and b"STIX" in pdf  # vector, serif TrueType fonts embedded (not Type 3)


# ------------------------------------------------------------------------------------ the paper tables


@pytest.mark.parametrize("name", ["table1", "table2", "table3"])
def test_every_paper_row_is_in_the_report(tmp_path, name):
    exp = load_experiment(ROOT / "experiments" / f"{name}.yaml", check_data=False)
    df = collect(tmp_path, exp)  # an empty results folder: nothing has run
    md = render_markdown(exp, df)
    tex = render_latex(exp, df) + render_latex_compact(exp, df)
    table = md.split("## Ablation deltas")[0].splitlines()
    paper_lines = [text for text in table if "| paper" in text]
    assert len(paper_lines) == len(exp.rows)
    official_lines = [text for text in table if "| official code" in text]
    assert len(official_lines) == sum(any(v is not None for v in r.official.values()) for r in exp.rows)
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
    assert "Smoke lines" not in tex  # no smoke sentence without smoke lines


def _tabular_rows(tex):
    body = tex.split(r"\midrule", 1)[1].split(r"\bottomrule", 1)[0]
    return [text for text in body.splitlines() if text.strip().endswith(r"\\")]


@pytest.mark.parametrize("render", [render_latex, render_latex_compact])
@pytest.mark.parametrize("name", ["table1", "table2", "table3", "small"])
def test_latex_structure(tmp_path, small, small_df, name, render):
    if name == "small":
        exp, df = small, small_df
    else:
        exp = load_experiment(ROOT / "experiments" / f"{name}.yaml", check_data=False)
        df = collect(ROOT / "results", exp)
    tex = render(exp, df)
    for env in ("table*", "tabular"):
        assert tex.count(rf"\begin{{{env}}}") == tex.count(rf"\end{{{env}}}") == 1
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    assert r"\hline" not in tex
    spec = re.search(r"\\begin\{tabular\}\{([lcr@{}\\,]+)\}\n", tex).group(1)
    n_columns = len(re.findall(r"[lcr]", re.sub(r"@\{[^}]*\}", "", spec)))
    for line in _tabular_rows(tex):
        unescaped = line.replace(r"\&", "")
        assert unescaped.count("&") == n_columns - 1, line
    # as a paper sets it: caption above, a check mark (amssymb), true minus signs (math) in every number
    assert tex.index(r"\caption{") < tex.index(r"\begin{tabular}")
    assert r"\surd" not in tex and (r"\checkmark" in tex or name in ("table1", "table3"))
    body = tex.split(r"\midrule", 1)[1].split(r"\bottomrule", 1)[0]
    assert re.search(r"(?<![$\w-])-\d", re.sub(r"\$[^$]*\$", "", body)) is None, "a hyphen as a minus sign"
    # braces balance and specials are escaped
    assert tex.count("{") - tex.count(r"\{") == tex.count("}") - tex.count(r"\}")
    text = re.sub(r"(?<!\\)\$[^$]*\$", "", tex.split("\n", 1)[1])  # math is allowed its _
    text = text.replace("{%\n", "{\n")  # the resizebox line ends in a comment
    assert re.search(r"(?<!\\)[%#_&$]", text.replace(" & ", " ")) is None
    assert re.search(r"\\label\{tab:" + re.escape(exp.name) + r"(-compact)?\}", tex)
    assert ("Commit" in tex) == (render is render_latex)  # the provenance columns: the full record only
    assert len(re.search(r"\\caption\{(.*)\}\n", tex).group(1)) < 600  # short: the notes go under the table
    assert all(ord(c) < 128 for c in tex), "non-ASCII left in the LaTeX"


def test_latex_escapes_symbols_and_rejects_what_it_cannot_spell(tmp_path, small_df):
    tex = render_latex_compact(load_experiment(FIXTURE / "experiment.yaml", check_data=False), small_df)
    assert r"-- \checkmark{} marks a switch" in tex and r"caf\'{e}" in tex
    text = (FIXTURE / "experiment.yaml").read_text().replace("Deformable DETR, K: 1}", "Deformable DETR ☃, K: 1}")
    (tmp_path / "snow.yaml").write_text(text)
    exp = load_experiment(tmp_path / "snow.yaml", check_data=False)
    with pytest.raises(ExperimentError, match=r"row 'K=1'.*cells\.method.*U\+2603 SNOWMAN"):
        render_latex(exp, small_df)


# ------------------------------------------------------------------------------------ rows of one's own

SWEEP = """
name: sweep
caption: K swept.
columns: [method, enc_n_points]
base: {data: {dataset: coco, root: /nonexistent}}
rows:
  - label: mine
    cells: {method: mine, enc_n_points: 4}
axes: {model.enc_n_points: [1, 2]}
"""


def test_axes_rows_fill_their_cells_from_the_swept_values(tmp_path):
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    (tmp_path / "results").mkdir()
    exp = load_experiment(tmp_path / "sweep.yaml", check_data=False)
    md = render_markdown(exp, collect(tmp_path / "results", exp))
    assert "| Method | enc_n_points | source |" in md  # cells tell rows apart: no label column
    assert "|  | 1 | ours: not run |" in md and "|  | 2 | ours: not run |" in md
    assert "| paper" not in md  # no paper numbers, no paper line


def test_regenerate_hint_names_the_file_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert command_path(str(tmp_path / "sub" / "x.yaml")) == "sub/x.yaml"
    assert command_path("experiments/./table2.yaml") == "experiments/table2.yaml"
    assert command_path("/elsewhere/x.yaml") == "/elsewhere/x.yaml"


# ------------------------------------------------------------------------------------ results as data


def test_collect_takes_paths_and_returns_cells_config_and_references(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    df = collect("results", "experiments/table2.yaml")  # str paths, the YAML instead of an experiment
    exp = load_experiment(ROOT / "experiments" / "table2.yaml", check_data=False)
    assert len(df) == sum(len(expand(exp, s)) for s in ("full", "smoke"))
    for column in (
        "cell.ms_inputs",
        "cell.K",
        "model.enc_n_points",
        "model.neck",
        "paper_AP",
        "official_AP",
        "device",
        "commit",
        "date",
        "state",
        "AP",
    ):
        assert column in df.columns, column
    assert "model.hidden_dim" not in df.columns  # the same in every run of a scale
    base = df[(df.label == exp.reference_row) & (df.scale == "full")].iloc[0]
    assert base.paper_AP == 43.8 and base.official_AP == 44.5 and base["cell.K"] == 4
    assert df.groupby("model.enc_n_points").size().to_dict() == {1: 4, 4: 8}
    with pytest.raises(ResultsError, match="no such results folder"):
        collect(Path("no-such-results"), exp)


def test_export_csv_and_parquet(tmp_path, small_df):
    path = export(small_df, tmp_path / "out" / "small.csv")
    back = pd.read_csv(path)
    assert list(back.columns) == list(small_df.columns) and len(back) == len(small_df)
    assert back["paper_AP"].iloc[0] == 43.8
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs pyarrow"):
            export(small_df, tmp_path / "small.parquet")
    else:
        assert len(pd.read_parquet(export(small_df, tmp_path / "small.parquet"))) == len(small_df)
    with pytest.raises(ValueError, match="expected .csv or .parquet"):
        export(small_df, tmp_path / "small.xlsx")


def test_backbone_weights_in_the_notes(small, small_df):
    """Which ImageNet weights the runs started from is shown, since it moves AP by more than the noise."""
    assert "Backbone weights" not in render_markdown(small, small_df)  # no run recorded any
    df = small_df.copy()
    first = df.index[df["state"] == "done"][0]
    df.loc[first, "backbone_weights"] = "ResNet50_Weights.IMAGENET1K_V1 (76.13% ImageNet top-1)"
    text = render_markdown(small, df)
    assert (
        f"Backbone weights the runs started from: ResNet50_Weights.IMAGENET1K_V1 (76.13% ImageNet top-1): "
        f"{df.loc[first, 'label']} ({df.loc[first, 'scale']})"
    ) in text


# ------------------------------------------------------------------------------------ like with like


def test_device_classes():
    assert device_class("NVIDIA H100 80GB HBM3") == "H100" and device_class("Tesla V100-SXM2-32GB") == "V100"
    assert device_class("CPU (AMD EPYC, 2 threads)") == "CPU" == device_class("cpu")
    assert device_class("NVIDIA GeForce RTX 4090") == "RTX 4090" and device_class("") == ""
    assert classes("CPU (AMD EPYC, 2 threads), NVIDIA H100 80GB HBM3") == ["CPU", "H100"]  # seeds on two machines
    assert comparable("fps", "Tesla V100-PCIE-16GB") and not comparable("fps", "NVIDIA A100-SXM4-80GB")
    assert not comparable("fps", "Tesla V100-SXM2-32GB, NVIDIA H100 80GB HBM3")  # one seed elsewhere
    assert comparable("AP", "cpu") and not comparable("gpu_hours", "")  # AP: any machine


def test_fps_carries_its_device_and_is_compared_only_on_the_references_class(small, small_df):
    md = render_markdown(small, small_df)
    assert "| 14.7±0.7 [H100] | full |" in md  # H100: no difference to the paper's V100 19
    assert "| 27.0 [V100] (-1.0) | full |" in md  # V100: the paper's class, compared
    tex = render_latex_compact(small, small_df)
    assert r"27.0 & {\scriptsize $-1.0$}\textsuperscript{c}" in tex
    assert r"14.7$\pm$0.7 & \textsuperscript{a}" in tex
    assert (
        r"\textsuperscript{a}Measured on NVIDIA H100 80GB HBM3; not set against the paper's (NVIDIA Tesla V100)." in tex
    )
    assert r"\textsuperscript{c}Measured on Tesla V100-SXM2-32GB." in tex


def test_smoke_lines_are_not_set_against_the_paper(tmp_path, monkeypatch):
    """Table 1's smoke line: smoke-scale params, FLOPs, FPS (and AP) have no difference to the paper's."""
    monkeypatch.chdir(ROOT)
    exp = load_experiment(ROOT / "experiments" / "table1.yaml", check_data=False)
    md = render_markdown(exp, collect(ROOT / "results", exp))
    smoke = next(line for line in md.splitlines() if "| ours (smoke)" in line)
    assert "(" not in smoke.split("| ours (smoke) |")[1].split("| smoke |")[0] and "[CPU]" in smoke, smoke
    assert "25.07 (-14.93" not in md and "(-8.6" not in md


def test_a_coco_number_the_evaluation_could_not_compute_is_a_dash(small, small_df):
    """A split without large objects: COCOeval's -1 (-100 in percent) or a null reads "–", never 0.0 (-58.1)."""
    md = render_markdown(small, small_df)
    assert "| ours (smoke) | 0.8 | 19.2 | – | 1.20 |" in md  # APl -100 in the record
    assert "| 43.1 | 61.6 | – | 40.07 |" in md  # APl null in the record
    assert "COCOeval's -1" in md
    tex = render_latex_compact(small, small_df)
    assert "& 19.2 &  & -- &  & 1.20" in tex and "COCOeval's $-1$" in tex
    agg = aggregate(small_df)
    assert agg[(agg.label == "2 levels")].iloc[0].undefined == "APl"


# ------------------------------------------------------------------------------------ titles of a copy


def test_a_copied_experiment_titles_its_report_and_figures_with_its_own_name(tmp_path, monkeypatch):
    """A copy of table2.yaml keeps `table: "2"`; its report and figures are titled with its own name and
    caption, and its files and LaTeX label are its own."""
    monkeypatch.chdir(ROOT)
    text = (ROOT / "experiments" / "table2.yaml").read_text()
    text = text.replace("name: table2", "name: my_ablation").replace(
        "caption: >-\n  Ablations for deformable attention", "caption: >-\n  My ablations of deformable attention"
    )
    assert 'table: "2"' in text
    (tmp_path / "my_ablation.yaml").write_text(text)
    exp = load_experiment(tmp_path / "my_ablation.yaml", check_data=False)
    paths = write_report(exp, ROOT / "results", tmp_path / "reports")
    md = (tmp_path / "reports" / "my_ablation.md").read_text()
    assert md.startswith("# my_ablation: My ablations of deformable attention on COCO 2017 val set\n")
    assert "Table 2" not in md.splitlines()[0]
    assert "the paper's Table 2" in md  # where its paper numbers come from, as a fact
    original = render_markdown(
        load_experiment(ROOT / "experiments" / "table2.yaml", check_data=False),
        collect(ROOT / "results", ROOT / "experiments" / "table2.yaml"),
    )
    assert md.split("| MS inputs |", 1)[1].split("\n\n")[0] == original.split("| MS inputs |", 1)[1].split("\n\n")[0]
    tex = (tmp_path / "reports" / "my_ablation_compact.tex").read_text()
    assert r"\label{tab:my-ablation-compact}" in tex and tex.startswith("% my_ablation:")
    assert r"\caption{My ablations" in tex
    figures = sorted(p.name for p in paths if p.parent.name == "figures" and p.suffix == ".png")
    assert figures == [
        "my_ablation_ablation_deltas.png",
        "my_ablation_ap_vs_fps.png",
        "my_ablation_ap_vs_gflops.png",
        "my_ablation_convergence.png",
    ]
    from harness.report.figures import ablation_deltas as deltas_figure

    fig = deltas_figure(exp, aggregate(collect(ROOT / "results", exp)))
    assert fig.get_suptitle().startswith("my_ablation: My ablations") and "Table 2" not in fig.get_suptitle()


# ------------------------------------------------------------------------------------ convergence


def test_convergence_curves_are_one_based_with_seed_bands_and_reference_points(small, small_df):
    store = ResultsStore(RESULTS)
    curves = {(tuple(c.labels), c.scale): c for c in convergence_curves(small, small_df, store)}
    base = curves[(("base",), "full")]
    assert base.epochs == [1, 2, 3] and base.ap == pytest.approx([30.5, 40.5, 44.2])  # mean of the two seeds
    assert base.ap_std[0] == pytest.approx(math.sqrt(0.5)) and len(base.runs) == 2  # the band: their std
    assert base.loss == [10.0, 9.0, 8.0] and base.lr == [2e-4] * 3
    assert curves[(("base",), "smoke")].epochs == [1, 2]
    # paper's final AP at the epochs the row's recipe trains (50), the official code's beside it
    assert ("base", "paper", 50.0, 43.8) in reference_points(small)
    assert ("base", "official code", 50.0, 44.5) in reference_points(small)
    # rows that are one training are one curve, labelled with both
    twin = small_df[small_df.label == "base"].assign(label="base again")
    merged = convergence_curves(small, pd.concat([small_df, twin]), store)
    assert [c.name for c in merged if c.scale == "full"][0] == "base = base again"


def test_test_dev_rows_give_no_reference_point():
    exp = load_experiment(ROOT / "experiments" / "table3.yaml", check_data=False)
    assert all(label != "Deformable DETR, ResNet-50" for label, *_ in reference_points(exp))
