"""Command-line habits: overrides before or after --rows; a comma list sweeps one labelled row per value (a
product for several), a bracketed list stays one value; --export and --results checked before anything is
loaded (one line naming the path, no traceback); COCO's files checked before queueing, on a generated tree."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest
from test_experiment import fake_coco

from harness import cli
from harness.grid import ExperimentError, expand, load_experiment, validate

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_experiment.yaml"
TABLE2 = ROOT / "experiments" / "table2.yaml"


def _argv(tmp_path, *extra, experiment=TINY):
    return [str(experiment), "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports"), *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------ overrides


def test_overrides_before_or_after_rows():
    for argv in (
        ["t", "model.enc_n_points=3", "--rows", "0", "K=1"],
        ["t", "--rows", "0", "K=1", "model.enc_n_points=3"],
        ["t", "--rows", "0", "model.enc_n_points=3", "K=1", "--smoke"],
    ):
        args = cli.parse_args(argv)
        assert args.rows == ["0", "K=1"] and args.overrides == ["model.enc_n_points=3"], argv
    args = cli.parse_args(["t", "--rows", "MS inputs, K=1", "train.seed=[1, 2]", "eval.tta=true", "--status"])
    assert args.rows == ["MS inputs, K=1"] and args.overrides == ["train.seed=[1, 2]", "eval.tta=true"]
    with pytest.raises(SystemExit):
        cli.parse_args(["t", "--rows", "model.enc_n_points=3"])


def test_overrides_after_rows_reach_the_rows(tmp_path, capsys):
    overridden = expand(load_experiment(str(TINY), rows=["K=1"], overrides=["model.enc_n_points=3"]))[0]
    assert cli.main(_argv(tmp_path, "--smoke", "--rows", "1", "model.enc_n_points=3", "--dry-run")) == 0
    smoke = expand(load_experiment(str(TINY), smoke=True, rows=["K=1"], overrides=["model.enc_n_points=3"]))[0]
    out = capsys.readouterr().out
    assert smoke.run_id in out and overridden.config.model.enc_n_points == 3


def test_a_comma_list_sweeps_the_selected_rows():
    exp = load_experiment(str(TINY), rows=["K=1"], overrides=["model.enc_n_points=1,2,4", "train.lr=2e-3"])
    specs = expand(exp)
    assert [s.label for s in specs] == ["K=1, enc_n_points=1", "K=1, enc_n_points=2", "K=1, enc_n_points=4"]
    assert [s.config.model.enc_n_points for s in specs] == [1, 2, 4]
    assert all(s.config.train.lr == 2e-3 and s.config.model.dec_n_points == 1 for s in specs)
    assert not any(s.paper for s in specs)  # not the paper's row: no paper numbers
    # the row as written stays (for the report), unselected, followed by its sweep; other rows untouched
    assert [r.label for r in exp.rows] == [
        "K=2",
        "K=1",
        "K=1, enc_n_points=1",
        "K=1, enc_n_points=2",
        "K=1, enc_n_points=4",
    ]
    assert exp.row("K=1").configs["full"].model.enc_n_points == 1 and exp.row("K=1").paper
    assert exp.row("K=1, enc_n_points=2").cells == {"K": "2/1"}  # derived from the config
    assert exp.row("K=1, enc_n_points=2").command_line == {"model": {"enc_n_points": 2}, "train": {"lr": "2e-3"}}


def test_several_comma_lists_sweep_their_product_like_axes():
    exp = load_experiment(str(TINY), overrides=["model.enc_n_points=1,2", "model.num_feature_levels=1,2"])
    labels = [s.label for s in expand(exp)]
    assert len(labels) == 8 and labels[:4] == [
        "K=2, enc_n_points=1, num_feature_levels=1",
        "K=2, enc_n_points=1, num_feature_levels=2",
        "K=2, enc_n_points=2, num_feature_levels=1",
        "K=2, enc_n_points=2, num_feature_levels=2",
    ]
    # full keys where two swept fields share a name
    exp = load_experiment(str(TINY), rows=["K=2"], overrides=["model.enc_n_points=1,2", "train.epochs=1,2"])
    assert [s.label for s in expand(exp)][0] == "K=2, enc_n_points=1, epochs=1"


def test_a_bracketed_list_is_one_value():
    exp = load_experiment(str(TINY), rows=["K=1"], overrides=["train.seed=[1,2]"])
    specs = expand(exp)
    assert [s.label for s in specs] == ["K=1", "K=1"] and [s.seed for s in specs] == [1, 2]
    exp = load_experiment(str(TINY), rows=["K=1"], overrides=["train.seed=1,2"])  # a sweep: two rows
    assert [(s.label, s.seed) for s in expand(exp)] == [("K=1, seed=1", 1), ("K=1, seed=2", 2)]
    exp = load_experiment(str(TINY), rows=["K=1"], overrides=["data.synthetic_image_size=[32,32],[64,64]"])
    assert [s.config.data.synthetic_image_size for s in expand(exp)] == [(32, 32), (64, 64)]
    exp = load_experiment(str(TINY), rows=["K=1"], overrides=["launcher.constraint='a100,h100'"])
    assert [s.config.launcher.constraint for s in expand(exp)] == ["a100,h100"]  # quoted: one string


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.synthetic_image_size=32,64", "takes a list"),
        ("model.enc_n_points=1,1", "given twice"),
        ("model.enc_n_points=1,,2", "empty item"),
        ("model.enc_n_points=1,x", "got 'x'"),
    ],
)
def test_a_wrong_sweep_is_named(override, message):
    with pytest.raises(ExperimentError, match=message) as info:
        load_experiment(str(TINY), overrides=[override])
    assert "command line" in str(info.value) and override.split("=")[0] in str(info.value)


# ------------------------------------------------------------------------------------------ paths


def test_export_to_an_unknown_format_is_one_line_before_collecting(tmp_path, capsys, monkeypatch):
    (tmp_path / "results").mkdir()
    import harness.report.collect as collect

    monkeypatch.setattr(collect, "collect", lambda *a, **k: pytest.fail("collected before checking the path"))
    assert cli.main(_argv(tmp_path, "--export", str(tmp_path / "table.xlsx"))) == 2
    err = _one_line_error(capsys)
    assert str(tmp_path / "table.xlsx") in err and ".csv or .parquet" in err
    assert cli.main(_argv(tmp_path, "--export", str(tmp_path / "table"))) == 2
    assert "(no suffix)" in _one_line_error(capsys)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    assert cli.main(_argv(tmp_path, "--export", str(tmp_path / "table.parquet"))) == 2
    err = _one_line_error(capsys)
    assert str(tmp_path / "table.parquet") in err and "pyarrow" in err and ".csv" in err


@pytest.mark.parametrize(
    "command", [["--status"], ["--report"], ["--export", "out.csv"], ["--logs", "0"], ["--cancel"]]
)
def test_a_missing_results_folder_is_named_by_every_follower(tmp_path, capsys, command):
    missing = tmp_path / "no-such-results"
    assert cli.main([str(TINY), "--results", str(missing), *command]) == 2
    err = _one_line_error(capsys)
    assert f"--results {missing}: no such folder" in err
    assert not missing.exists()


def test_results_that_is_a_file_is_refused_by_every_command(tmp_path, capsys):
    results = tmp_path / "results.txt"
    results.write_text("not a store")
    for command in (["--status"], ["--dry-run", "--smoke"], ["--smoke"]):
        assert cli.main([str(TINY), "--results", str(results), *command]) == 2
        assert f"--results {results}: not a folder" in _one_line_error(capsys)


def test_a_dry_run_needs_no_results_folder_yet(tmp_path, capsys):
    assert cli.main(_argv(tmp_path, "--dry-run", "--smoke", "--rows", "0")) == 0
    assert "K=2" in capsys.readouterr().out and not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------------------ COCO files

COCO_EXP = """
name: coco_check
base:
  data: {dataset: coco, root: ROOT}
rows:
  - label: val
  - label: test-dev
    overrides: {data: {val_split: test-dev2017}}
  - label: evaluate only
    overrides: {eval: {eval_only: true, checkpoint: CKPT}}
"""


def _coco_experiment(tmp_path, root) -> Path:
    (tmp_path / "ckpt.pth").write_bytes(b"weights")
    path = tmp_path / "coco_check.yaml"
    path.write_text(textwrap.dedent(COCO_EXP).replace("ROOT", str(root)).replace("CKPT", str(tmp_path / "ckpt.pth")))
    return path


def _refused(path, rows, root) -> ExperimentError:
    with pytest.raises(ExperimentError) as info:
        load_experiment(str(path), rows=rows)
    message = str(info.value)
    assert str(path) in message and "data.root" in message and f"{root} lacks files the run reads" in message
    return info.value


def test_a_complete_coco_tree_is_accepted(tmp_path):
    root = fake_coco(tmp_path / "coco", ("train2017", "val2017", "test-dev2017"))
    exp = load_experiment(str(_coco_experiment(tmp_path, root)))
    assert len(expand(exp)) == 3


@pytest.mark.parametrize(
    "remove,fix",
    [
        ("annotations/instances_train2017.json", "annotations_trainval2017.zip"),
        ("annotations/instances_val2017.json", "annotations_trainval2017.zip"),
        ("train2017", "train2017.zip"),
        ("val2017", "val2017.zip"),
    ],
)
def test_each_missing_piece_is_named_with_what_to_put_where(tmp_path, remove, fix):
    root = fake_coco(tmp_path / "coco", ("train2017", "val2017", "test-dev2017"))
    target = root / remove
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()  # an empty image folder
    else:
        target.unlink()
    err = _refused(_coco_experiment(tmp_path, root), ["val"], root)
    assert str(root / remove) in str(err) and fix in str(err) and "cocodataset.org" in str(err)
    assert ("is empty" if target.is_dir() else "is missing") in str(err)


def test_test_dev_rows_need_the_image_info_and_test_images(tmp_path):
    root = fake_coco(tmp_path / "coco")  # train and val only
    path = _coco_experiment(tmp_path, root)
    assert len(expand(load_experiment(str(path), rows=["val"]))) == 1
    err = _refused(path, ["test-dev"], root)
    assert err.row == "test-dev"  # the row, not the base: the base has its files
    for piece in (
        "annotations/image_info_test-dev2017.json is missing",
        "test2017/ is missing",
        "image_info_test2017.zip",
        "test2017.zip",
    ):
        assert piece in str(err)
    assert "instances_val2017" not in str(err)  # a test-dev row does not read val2017


def test_an_evaluation_only_row_needs_no_training_split(tmp_path):
    root = fake_coco(tmp_path / "coco", ("val2017",))
    path = _coco_experiment(tmp_path, root)
    assert len(expand(load_experiment(str(path), rows=["evaluate only"]))) == 1
    assert "instances_train2017.json is missing" in str(_refused(path, ["val"], root))


@pytest.mark.parametrize(
    "content,problem",
    [
        ("", "is empty"),
        ("[1, 2]", "does not start with '{'"),
        ('{"images": [], "annotations": [', "does not end with '}'"),
        ('{"images": []}', "has no 'annotations' key"),
        ('{"images": [}', "is not valid JSON"),
    ],
)
def test_an_annotation_file_that_is_not_coco_is_named(tmp_path, content, problem):
    root = fake_coco(tmp_path / "coco")
    (root / "annotations" / "instances_val2017.json").write_text(content)
    err = _refused(_coco_experiment(tmp_path, root), ["val"], root)
    assert f"{root / 'annotations' / 'instances_val2017.json'} " in str(err) and problem in str(err)


def test_a_large_annotation_file_is_opened_not_parsed(tmp_path, monkeypatch):
    root = fake_coco(tmp_path / "coco")
    big = root / "annotations" / "instances_train2017.json"
    big.write_text('{"annotations": [' + ", ".join(["{}"] * 1000) + '], "im": "not checked beyond its braces"}')
    monkeypatch.setattr(validate, "PARSE_AT_MOST", 100)
    parsed, load = [], json.load
    monkeypatch.setattr(json, "load", lambda f, **k: parsed.append(f.name) or load(f, **k))
    assert len(expand(load_experiment(str(_coco_experiment(tmp_path, root)), rows=["val"]))) == 1
    assert str(big) not in parsed and str(root / "annotations" / "instances_val2017.json") in parsed


def test_the_dry_run_stops_on_a_missing_piece(tmp_path, capsys, monkeypatch):
    root = fake_coco(tmp_path / "coco")
    (root / "annotations" / "instances_train2017.json").unlink()
    monkeypatch.setenv("COCO_ROOT", str(root))
    assert cli.main([str(TABLE2), "--results", str(tmp_path / "results"), "--dry-run", "--rows", "0"]) == 2
    err = _one_line_error(capsys)
    assert "instances_train2017.json is missing" in err and f"{root} lacks" in err and "--smoke" in err
    # following needs no data
    (tmp_path / "results").mkdir()
    assert cli.main([str(TABLE2), "--results", str(tmp_path / "results"), "--status", "--rows", "0"]) == 0


def test_one_command_family(capsys):
    """``python -m harness <verb>`` reaches every tool; an unknown verb lists them."""
    from harness.__main__ import VERBS, main

    assert main([]) == 2
    listed = capsys.readouterr().out
    assert all(f"  {verb} " in listed for verb in VERBS)
    assert main(["nope"]) == 2 and "unknown verb 'nope'" in capsys.readouterr().err
    for verb in VERBS:
        with pytest.raises(SystemExit) as done:
            main([verb, "--help"])
        assert done.value.code == 0
        prog = "run_experiment.py" if verb == "run" else f"python -m harness {verb}"
        assert f"usage: {prog}" in capsys.readouterr().out
