"""Canonical reports come only from the experiment as written: an invocation with overrides or --rows leaves
reports/<name>.* byte for byte, overrides report as reports/<name>+<tag>.* headed by them; each record's
config.yaml names its overrides, and --status --all lists every record with them. Records are written with the
store (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import cli
from harness.grid import expand, load_experiment
from harness.report.variant import report_variant
from harness.store import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_experiment.yaml"


def _argv(tmp_path, *extra):
    return [str(TINY), "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"), *extra]


def _done(store, spec, ap: float) -> None:
    """A row whose training (one logged epoch), evaluation and measurement are done."""
    store.prepare(spec)
    (store.record_dir(spec.run_id) / "checkpoint.pth").write_bytes(b"weights")
    store.append_log(spec.run_id, {"epoch": 0, "AP": ap})
    for key, metrics in (
        (spec.eval_key, {"AP": ap, "AP50": ap + 20}),
        (spec.measure_key, {"params": 10}),
        (spec.run_id, {"epochs_trained": spec.config.train.epochs}),
    ):
        store.prepare(spec, key)
        store.complete(key, {"checkpoint_sha256": "c0ffee", **metrics})


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def store_with_variant(tmp_path):
    """Both rows of the tiny experiment done as written (AP 30, 31) and row K=1 done with train.epochs=2 (AP 7)."""
    store = ResultsStore(tmp_path / "results")
    for spec, ap in zip(expand(load_experiment(str(TINY))), (30.0, 31.0)):
        _done(store, spec, ap)
    variant = expand(load_experiment(str(TINY), rows=["K=1"], overrides=["train.epochs=2"]))[0]
    _done(store, variant, 7.0)
    return store, variant


def test_config_yaml_records_the_overrides(store_with_variant):
    store, variant = store_with_variant
    assert variant.overrides == ("train.epochs=2",)
    for key in (variant.run_id, variant.eval_key, variant.measure_key):  # evaluation, measurement too
        doc = store.read_config(key)
        assert doc["overrides"] == ["train.epochs=2"] and doc["config"]["train"]["epochs"] == 2
    plain = expand(load_experiment(str(TINY)))[0]
    assert plain.overrides == () and store.read_config(plain.run_id)["overrides"] == []


def test_overrides_and_rows_leave_the_canonical_report_byte_identical(store_with_variant, tmp_path, capsys):
    store, variant = store_with_variant
    reports = tmp_path / "reports"
    assert cli.main(_argv(tmp_path, "--report")) == 0
    canonical = _snapshot(reports)
    assert "tiny.md" in canonical and "figures/tiny_convergence.png" in canonical
    assert "31.0" in canonical["tiny.md"].decode() and "7.0" not in canonical["tiny.md"].decode()
    capsys.readouterr()

    assert cli.main(_argv(tmp_path, "train.epochs=2", "--rows", "K=1", "--report")) == 0
    out = capsys.readouterr().out
    name = report_variant(load_experiment(str(TINY), rows=["K=1"], overrides=["train.epochs=2"], check_data=False)).name
    assert name.startswith("tiny+epochs2-") and len(name) == len("tiny+epochs2-") + 6
    assert f"reporting as {name}" in out
    now = _snapshot(reports)
    assert {k: v for k, v in now.items() if k in canonical} == canonical  # not a byte changed
    assert set(now) - set(canonical) == {
        f"{name}.md",
        f"{name}.tex",
        f"{name}_compact.tex",
        f"figures/{name}_convergence.png",
        f"figures/{name}_convergence.pdf",
    }
    md = now[f"{name}.md"].decode()
    assert md.startswith(f"# {name}: End-to-end test grid")  # its own name, not the table: it copies
    assert "**Not the experiment as written:** command-line overrides, `train.epochs=2` on row `K=1`" in md
    assert "7.0" in md and "30.0" in md and "31.0" not in md  # K=1 with 2 epochs beside K=2 as written
    assert "train.epochs=2 --rows K=1 --report`" in md
    for suffix in (".tex", "_compact.tex"):
        tex = now[f"{name}{suffix}"].decode()
        assert f"% Variant {name}: not the experiment as written" in tex and "%   train.epochs=2 on row K=1" in tex
        assert "command-line overrides \\texttt{train.epochs=2} on row \\texttt{K=1}" in tex
        assert "\\label{tab:tiny-epochs2-" in tex

    for argv in (["--rows", "K=1", "--report"], ["--rows", "0", "--partition", "gpu", "--report"]):
        assert cli.main(_argv(tmp_path, *argv)) == 0
        assert "a report covers every row" in capsys.readouterr().out
        assert _snapshot(reports) == now  # the canonical report of every row: the same bytes


def test_a_submission_of_some_rows_does_not_rewrite_the_canonical_report(store_with_variant, tmp_path, capsys):
    store, _ = store_with_variant
    assert cli.main(_argv(tmp_path, "--report")) == 0
    before = _snapshot(tmp_path / "reports")
    store.mark_queued(expand(load_experiment(str(TINY)))[0].run_id, job_id="9")  # another row: queued again
    args = cli.parse_args(_argv(tmp_path, "--rows", "K=1"))
    experiment = load_experiment(str(TINY), rows=["K=1"], check_data=False)
    assert cli._report(experiment, args, submitted=True) == 0  # the end-of-submission report
    assert "not rewritten" in capsys.readouterr().out
    assert _snapshot(tmp_path / "reports") == before


def test_what_makes_a_variant():
    def variant(rows=None, overrides=()):
        return report_variant(load_experiment(str(TINY), rows=rows, overrides=list(overrides), check_data=False))

    assert variant() is None and variant(["K=1"]) is None
    assert variant(overrides=["launcher.partition=gpu", "train.print_freq=5"]) is None  # no number changes
    every = variant(overrides=["train.epochs=2", "model.dropout=0.1"])
    assert every.every_row and every == variant(overrides=["model.dropout=0.1", "train.epochs=2"])  # order
    assert every.name != variant(["K=1"], ["train.epochs=2", "model.dropout=0.1"]).name  # which rows: another
    assert every.description() == ["model.dropout=0.1 train.epochs=2 on every row that runs"]
    swept = variant(["K=1"], ["model.enc_n_points=3,4"])
    assert swept.swept == ("K=1, enc_n_points=3", "K=1, enc_n_points=4")
    assert swept.tag.startswith("enc_n_points3.4-")


def test_status_all_lists_canonical_runs_and_override_variants(store_with_variant, tmp_path, capsys):
    store, variant = store_with_variant
    plain = {s.label: s for s in expand(load_experiment(str(TINY)))}
    assert cli.main(_argv(tmp_path, "--status", "--all")) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "9 record(s) of 2 row(s)" in lines[0]
    line = next(text for text in lines if text.strip().startswith(("K=1", "training")) and plain["K=1"].run_id in text)
    assert line.split()[-2:] == ["done", "canonical"] and " - " in line
    line = next(text for text in lines if variant.run_id in text and "training" in text)
    assert "train.epochs=2" in line and line.split()[-2:] == ["done", "variant"]
    assert sum(variant.run_id in text for text in lines) == 3  # its training, evaluation, measurement
    with pytest.raises(SystemExit):
        cli.main(_argv(tmp_path, "--all"))  # only with --status
