"""--print-config: a row's resolved configuration, each value with where it came from (default, the arch's
default, base, the smoke profile's two tiers, the row, the command line), the id it enters, and the row's
ids; the provenance agrees with what resolve() gives every row of the paper's tables at both scales."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness import cli
from harness.grid import SCALES, expand, load_experiment
from harness.grid.experiment import SMOKE_LAPTOP, SmokeProfile, provenance, row_provenance

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def _agrees(value, resolved, key):
    if key == "train.seed" and isinstance(value, list):
        return resolved == value[0]  # the config holds the first seed; the row runs them all
    return value == resolved


@pytest.mark.parametrize("name", ["table1", "table2", "table3"])
@pytest.mark.parametrize("overrides", [(), ("train.lr=1e-3", "data.root=/elsewhere", "launcher.nodes=1")])
def test_provenance_agrees_with_resolve_for_every_row(name, overrides):
    for smoke in (False, True):
        experiment = load_experiment(
            EXPERIMENTS / f"{name}.yaml", smoke=smoke, check_data=False, overrides=list(overrides)
        )
        for row in experiment.rows:
            if row.cited:
                continue
            for scale in SCALES:
                cfg = row.configs[scale]
                values = row_provenance(experiment, row.label, scale)
                wrong = [
                    (key, value, getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]))
                    for key, (value, _) in values.items()
                    if not _agrees(value, getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]), key)
                ]
                assert not wrong, (name, row.label, scale, wrong)
                for key, _ in values.items():  # every field of every section, once
                    section, field = key.split(".")
                    assert hasattr(getattr(cfg, section), field)
                if overrides:
                    assert values["train.lr"] == (1e-3, "command line")


EXP = """
name: prov
base:
  data: {dataset: synthetic}
  model: {hidden_dim: 128, enc_layers: 3}
  train: {epochs: 7}
  launcher: {additional_parameters: {gres: 'gpu:8'}}
rows:
  - label: plain
  - label: mine
    overrides:
      model: {enc_layers: 2, backbone: resnet101}
      train: {seed: [1, 2]}
      launcher: {additional_parameters: {constraint: a100}}
  - label: detr
    overrides: {model: {arch: detr}}
  - label: cited
    cited: true
    paper: {AP: 40.0}
smoke:
  train: {epochs: 2}
"""


@pytest.fixture
def experiment_file(tmp_path):
    path = tmp_path / "prov.yaml"
    path.write_text(textwrap.dedent(EXP))
    return path


def test_each_value_names_its_source(experiment_file):
    full = load_experiment(experiment_file, overrides=["train.lr=1e-3"], rows=["mine", "detr"])
    mine = row_provenance(full, "mine")
    assert mine["model.hidden_dim"] == (128, "base")
    assert mine["model.enc_layers"] == (2, "row")
    assert mine["model.dec_layers"] == (6, "default")
    assert mine["train.lr"] == (1e-3, "command line")
    assert mine["train.seed"] == ([1, 2], "row")
    # a mapping merges key by key over the layers
    assert mine["launcher.additional_parameters"] == ((("gres", "gpu:8"), ("constraint", "a100")), "base + row")
    detr = row_provenance(full, "detr")
    assert detr["model.num_queries"] == (100, "arch default") and detr["model.arch"] == ("detr", "row")
    assert detr["model.enc_n_points"] == (4, "default")
    assert row_provenance(full, "plain")["train.lr"] == (2e-4, "default")  # not selected: no command line

    smoke = load_experiment(experiment_file, smoke=True)
    mine = row_provenance(smoke, "mine")
    assert mine["model.enc_layers"] == (2, "row")  # the row wins over the small tier
    assert mine["model.dec_layers"] == (2, "smoke profile (small)")
    assert mine["model.hidden_dim"] == (64, "smoke profile (small)")  # the small tier wins over the base
    assert mine["model.backbone"] == ("resnet50", "smoke profile (laptop)")  # the laptop tier over the row
    assert mine["train.epochs"] == (2, "smoke profile (laptop)")  # the experiment's own smoke: section
    assert mine["data.dataset"] == ("synthetic", "smoke profile (laptop)")
    assert row_provenance(smoke, "mine", "full")["model.backbone"] == ("resnet101", "row")


def test_provenance_follows_merge_where_a_layer_empties_a_section():
    base = {"model": {"hidden_dim": 128}, "train": {"epochs": 3}}
    values = provenance(base, {"model": None}, None, {"train": {"epochs": 5}})
    assert values["model.hidden_dim"] == (256, "default")
    assert values["train.epochs"] == (5, "command line")
    smoke = provenance(base, {}, SmokeProfile({}, SMOKE_LAPTOP), {})
    assert smoke["train.epochs"] == (SMOKE_LAPTOP["train"]["epochs"], "smoke profile (laptop)")


def test_print_config_shows_values_sources_roles_and_ids(experiment_file, tmp_path, capsys):
    argv = [
        str(experiment_file),
        "--results",
        str(tmp_path / "nothing-here"),
        "--print-config",
        "mine",
        "train.lr=1e-3",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    specs = expand(load_experiment(experiment_file, rows=["mine"], overrides=["train.lr=1e-3"]))
    assert [s.seed for s in specs] == [1, 2]
    assert "row 'mine', full scale" in out
    assert f"run id {specs[0].run_id}, evaluation id {specs[0].eval_id}, measurement id {specs[0].measure_id}" in out
    assert f"seed 2: run id {specs[1].run_id}" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and "." in line}
    assert lines["train.lr"][1:] == ["0.001", "command", "line", "weights"]
    assert lines["model.enc_layers"][1:] == ["2", "row", "weights"]
    assert lines["data.num_workers"][-2:] == ["no", "id"]
    assert lines["eval.num_detections"][-1] == "evaluation"
    assert lines["data.val_split"][-1] == "evaluation+measurement"
    assert lines["model.backbone_weights"][1] == "null"
    assert not (tmp_path / "nothing-here").exists()  # it reads no store

    assert cli.main(argv[:4] + ["0", "--smoke"]) == 0  # by index, at smoke scale
    out = capsys.readouterr().out
    assert "row 'plain', smoke scale" in out and "smoke profile (laptop)" in out
    assert cli.main(argv[:4] + ["cited"]) == 0
    assert "a cited row" in capsys.readouterr().out


def test_print_config_needs_no_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COCO_ROOT", raising=False)
    assert cli.main(["table2", "--print-config", "2", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "data.root" in out and "${COCO_ROOT}" in out and "base" in out
