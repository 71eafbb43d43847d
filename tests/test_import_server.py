"""--import-server: the COCO evaluation server's scores for a test-dev row become its evaluation record, and
bad input is refused (naming the file, the row and the field with its value) without writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import cli
from harness.grid import expand, load_experiment
from harness.store import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
TABLE3 = ROOT / "experiments" / "table3.yaml"
ROW = "Deformable DETR, ResNet-50"
TTA_ROW = "Deformable DETR, ResNeXt-101 + DCN, TTA"  # shares its training with the row above it
FRACTIONS = {"AP": 0.469, "AP50": 0.662, "AP75": 0.507, "AP_small": 0.280, "AP_medium": 0.496, "AP_large": 0.610}
PERCENT = {"AP": 46.9, "AP50": 66.2, "AP75": 50.7, "APs": 28.0, "APm": 49.6, "APl": 61.0}
SUBMISSION = "detections_test-dev2017_table3_results.zip"


def _spec(row=ROW, overrides=()):
    return expand(load_experiment(str(TABLE3), rows=[row], check_data=False, overrides=list(overrides)))[0]


def _store(tmp_path) -> ResultsStore:
    return ResultsStore(tmp_path / "results")


def _trained(store, spec, evaluated=True):
    """The row's training done and (``evaluated``) its evaluation done: the detections the server scored."""
    store.prepare(spec)
    store.complete(spec.run_id, {"run_id": spec.run_id, "epochs_trained": 50})
    if evaluated:
        store.prepare(spec, spec.eval_key)
        store.complete(
            spec.eval_key,
            {
                "run_id": spec.run_id,
                "eval_id": spec.eval_id,
                "split": "test-dev2017",
                "server_submission": SUBMISSION,
                "commit": "abc1234",
                "device": "H100",
            },
        )


def _import(tmp_path, scores, *extra, row=ROW):
    """Run --import-server with ``scores`` (an object, or the file's text); returns (exit code, scores file)."""
    path = tmp_path / "scores.json"
    path.write_text(scores if isinstance(scores, str) else json.dumps(scores))
    argv = [str(TABLE3), "--results", str(tmp_path / "results"), "--rows", row, "--import-server", str(path), *extra]
    return cli.main(argv), path


def _files(tmp_path) -> dict:
    root = tmp_path / "results"
    return (
        {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        if root.exists()
        else {}
    )


def _refused(tmp_path, capsys, scores, *extra, row=ROW) -> str:
    """The import is refused (exit 2) and nothing in the store changes; returns the error."""
    before = _files(tmp_path)
    code, path = _import(tmp_path, scores, *extra, row=row)
    err = capsys.readouterr().err
    assert code == 2, err
    assert _files(tmp_path) == before
    assert str(path) in err and f"row {row!r}" in err, err
    return err


# ------------------------------------------------------------------------------------------- the good path


def test_fractions_become_percent_and_the_detections_provenance_is_kept(tmp_path, capsys):
    store, spec = _store(tmp_path), _spec()
    _trained(store, spec)
    code, path = _import(tmp_path, FRACTIONS, "--scores-unit", "fraction")
    assert code == 0, capsys.readouterr().err
    assert "AP 46.9 from the evaluation server" in capsys.readouterr().out
    record = store.read_metrics(spec.eval_key)
    assert {k: record[k] for k in PERCENT} == PERCENT
    assert record["source"] == "evaluation server" and record["scores_unit"] == "fraction"
    assert record["scores_file"] == str(path.resolve()) and record["split"] == "test-dev2017"
    # which detections were scored: the evaluation's own fields stay
    assert record["server_submission"] == SUBMISSION and record["commit"] == "abc1234"
    assert store.read_status(spec.eval_key).state == "done"
    assert store.read_metrics(spec.run_id) == {"run_id": spec.run_id, "epochs_trained": 50}  # training untouched


def test_percent_from_the_files_unit_key_and_minus_one_is_null(tmp_path, capsys):
    store, spec = _store(tmp_path), _spec()
    _trained(store, spec)
    code, _ = _import(tmp_path, {**PERCENT, "APs": -1, "unit": "percent"})
    assert code == 0, capsys.readouterr().err
    record = store.read_metrics(spec.eval_key)
    assert record["AP"] == 46.9 and record["APl"] == 61.0 and record["scores_unit"] == "percent"
    assert record["APs"] is None
    assert '"APs": null' in (store.record_dir(spec.eval_key) / "metrics.json").read_text()


def test_percent_from_the_option(tmp_path, capsys):
    store, spec = _store(tmp_path), _spec()
    _trained(store, spec)
    assert _import(tmp_path, PERCENT, "--scores-unit", "percent")[0] == 0
    assert store.read_metrics(spec.eval_key)["AP75"] == 50.7


@pytest.mark.parametrize("wrap", [lambda stats: stats, lambda stats: {"stats": stats}], ids=["bare", "mapping"])
def test_cocoevals_stats_list_is_fractions_and_its_minus_one_is_null(tmp_path, capsys, wrap):
    store, spec = _store(tmp_path), _spec()
    _trained(store, spec)
    stats = [0.469, 0.662, 0.507, 0.280, 0.496, -1.0, 0.36, 0.59, 0.63, 0.45, 0.67, 0.80]  # + the six ARs
    assert _import(tmp_path, wrap(stats))[0] == 0, capsys.readouterr().err
    record = store.read_metrics(spec.eval_key)
    assert record["AP"] == 46.9 and record["APs"] == 28.0 and record["APl"] is None
    assert record["scores_unit"] == "fraction"


def test_the_stats_list_in_percent_with_the_unit_given(tmp_path, capsys):
    store, spec = _store(tmp_path), _spec()
    _trained(store, spec)
    assert _import(tmp_path, {"stats": [46.9, 66.2, 50.7, 28.0, 49.6, 61.0], "unit": "percent"})[0] == 0
    assert store.read_metrics(spec.eval_key)["AP"] == 46.9


def test_a_new_import_replaces_the_last_one(tmp_path, capsys):
    store, spec = _store(tmp_path), _spec()
    _trained(store, spec)
    assert _import(tmp_path, PERCENT, "--scores-unit", "percent")[0] == 0
    assert _import(tmp_path, {**PERCENT, "AP": 47.0}, "--scores-unit", "percent")[0] == 0
    record = store.read_metrics(spec.eval_key)
    assert record["AP"] == 47.0 and record["server_submission"] == SUBMISSION


# ------------------------------------------------------------------------------------------- refusals


def test_a_val2017_row_is_refused(tmp_path, capsys):
    spec = _spec(overrides=["data.val_split=val2017"])
    _trained(_store(tmp_path), spec)
    err = _refused(tmp_path, capsys, PERCENT, "--scores-unit", "percent", "data.val_split=val2017")
    assert "data.val_split = 'val2017'" in err and "expected a test-dev split" in err


@pytest.mark.parametrize("state", [None, "queued", "running", "failed"])
def test_a_training_that_is_not_done_is_refused(tmp_path, capsys, state):
    store, spec = _store(tmp_path), _spec()
    if state:
        store.prepare(spec)
        store.write_status(spec.run_id, state)
    err = _refused(tmp_path, capsys, PERCENT, "--scores-unit", "percent")
    assert f"state of its training {spec.run_id} = {state or 'not started'!r}" in err
    assert "the training is not done" in err and "uploaded first" in err
    assert store.read_status(spec.eval_key) is None


def test_a_row_whose_evaluation_is_not_done_is_refused(tmp_path, capsys):
    """The TTA row shares the training of the row above it; its own detections (with TTA) are not there yet."""
    store, spec = _store(tmp_path), _spec(TTA_ROW)
    _trained(store, _spec("Deformable DETR, ResNeXt-101 + DCN"))
    assert store.read_status(spec.run_id).state == "done" and store.read_status(spec.eval_key) is None
    err = _refused(tmp_path, capsys, PERCENT, "--scores-unit", "percent", row=TTA_ROW)
    assert f"state of its evaluation {spec.eval_key} = 'not started'" in err and "uploaded first" in err


def test_a_cited_row_is_refused(tmp_path, capsys):
    before = _files(tmp_path)
    code, _ = _import(tmp_path, PERCENT, "--scores-unit", "percent", row="FCOS")
    err = capsys.readouterr().err
    assert code == 2 and "row 'FCOS'" in err and "not cited" in err
    assert _files(tmp_path) == before


def test_a_mapping_without_a_unit_is_refused_never_guessed(tmp_path, capsys):
    _trained(_store(tmp_path), _spec())
    err = _refused(tmp_path, capsys, FRACTIONS)
    assert "unit = None" in err and "--scores-unit fraction|percent" in err


@pytest.mark.parametrize(
    "scores, extra, expected",
    [
        ({**PERCENT, "unit": "percent"}, ["--scores-unit", "fraction"], "unit = 'percent'"),
        ({**PERCENT, "unit": "%"}, [], "unit = '%'"),
        ({**PERCENT, "unit": ["percent"]}, [], "unit = ['percent']"),
    ],
    ids=["option-disagrees", "unknown", "not-a-string"],
)
def test_a_bad_unit_is_refused(tmp_path, capsys, scores, extra, expected):
    _trained(_store(tmp_path), _spec())
    assert expected in _refused(tmp_path, capsys, scores, *extra)


@pytest.mark.parametrize(
    "key, text, unit, shown",
    [
        ("AP", "NaN", "percent", "nan"),
        ("AP50", "Infinity", "percent", "inf"),
        ("AP75", "-Infinity", "fraction", "-inf"),
        ("APm", "true", "percent", "True"),
        ("APl", '"61.0"', "percent", "'61.0'"),
        ("AP", "null", "percent", "None"),
        ("AP", "1e400", "percent", "inf"),
        ("AP", str(10**400), "percent", str(10**400)),
        ("AP", "46.9", "fraction", "46.9"),
        ("APs", "1.01", "fraction", "1.01"),
        ("APs", "100.5", "percent", "100.5"),
        ("APm", "-0.5", "fraction", "-0.5"),
        ("APs", "-100", "percent", "-100"),
        ("AP", "-1", "fraction", "-1"),  # -1 is "no objects of that size": only the size-wise APs
    ],
)
def test_a_bad_number_is_refused_naming_its_key(tmp_path, capsys, key, text, unit, shown):
    store, spec = _store(tmp_path), _spec()
    _trained(store, spec)
    assert _import(tmp_path, PERCENT, "--scores-unit", "percent")[0] == 0  # a record that must survive
    capsys.readouterr()
    base = PERCENT if unit == "percent" else {k: v / 100 for k, v in PERCENT.items()}
    body = ", ".join(f'"{k}": {text if k == key else v}' for k, v in base.items())
    err = _refused(tmp_path, capsys, "{" + body + "}", "--scores-unit", unit)
    assert f"{key} = {shown}; expected a number in [0, {1 if unit == 'fraction' else 100}] ({unit})" in err
    assert store.read_metrics(spec.eval_key)["AP"] == 46.9


def test_percent_read_as_fractions_says_which_option_to_give(tmp_path, capsys):
    _trained(_store(tmp_path), _spec())
    err = _refused(tmp_path, capsys, {"stats": [46.9, 66.2, 50.7, 28.0, 49.6, 61.0]})
    assert "stats[0] (AP) = 46.9; expected a number in [0, 1] (fraction)" in err and "--scores-unit percent" in err


@pytest.mark.parametrize(
    "scores, expected",
    [
        ("{not json", "expected JSON"),
        ('"46.9"', "the scores are a JSON str"),
        ({"stats": "0.469"}, "stats = '0.469'"),
        ({"stats": [0.469, 0.662]}, "no number for AP75, APs, APm, APl"),
        ({"AP": 46.9, "unit": "percent"}, "no number for AP50"),
        ({**PERCENT, "AP_small": 27.0, "unit": "percent"}, "AP_small = 27.0; expected one value for APs"),
    ],
)
def test_a_malformed_file_is_refused(tmp_path, capsys, scores, expected):
    _trained(_store(tmp_path), _spec())
    assert expected in _refused(tmp_path, capsys, scores)


def test_a_missing_file_is_refused(tmp_path, capsys):
    _trained(_store(tmp_path), _spec())
    before = _files(tmp_path)
    missing = tmp_path / "nowhere.json"
    argv = [
        str(TABLE3),
        "--results",
        str(tmp_path / "results"),
        "--rows",
        ROW,
        "--import-server",
        str(missing),
        "--scores-unit",
        "percent",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and f"row {ROW!r}: cannot read the scores" in err
    assert _files(tmp_path) == before
