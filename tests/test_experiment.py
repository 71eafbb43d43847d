"""Experiment files: loading, validation messages, grid expansion and run ids (no torch)."""

import textwrap
from pathlib import Path

import pytest

from harness.grid import ExperimentError, estimate_gpu_hours, expand, load_experiment, run_id, unique_runs

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def fake_coco(root: Path, splits=("train2017", "val2017")) -> Path:
    """A COCO 2017 folder the checks before queueing accept: each split's annotation file (image info for
    test-dev) and a non-empty image folder."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in splits:
        test = split.startswith("test")
        name = f"image_info_{split}.json" if test else f"instances_{split}.json"
        (root / "annotations" / name).write_text(
            '{"images": [], "categories": []' + ("}" if test else ', "annotations": []}')
        )
        (root / ("test2017" if test else split)).mkdir(exist_ok=True)
        (root / ("test2017" if test else split) / "000000000001.jpg").write_bytes(b"jpeg")
    return root


BASIC = """
name: t
columns: [K]
base:
  data: {root: ROOT}
rows:
  - label: base
    cells: {K: 4}
    paper: {AP: 43.8}
  - label: K=1
    overrides: {model: {enc_n_points: 1, dec_n_points: 1}}
"""


def basic(tmp_path, text=BASIC, **kwargs):
    return load_experiment(write(tmp_path, text.replace("ROOT", str(fake_coco(tmp_path / "coco")))), **kwargs)


def error(tmp_path, text, **kwargs):
    path = write(tmp_path, textwrap.dedent(text).replace("ROOT", str(fake_coco(tmp_path / "coco"))))
    with pytest.raises(ExperimentError) as info:
        load_experiment(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    return info.value, message


# ------------------------------------------------------------------------------------------ expansion


def test_rows_resolve_over_the_base(tmp_path):
    exp = basic(tmp_path)
    specs = expand(exp)
    assert [s.label for s in specs] == ["base", "K=1"]
    assert specs[0].config.model.enc_n_points == 4 and specs[1].config.model.enc_n_points == 1
    assert specs[1].config.model.dec_n_points == 1
    assert specs[0].paper == {"AP": 43.8}
    assert all(s.scale == "full" and len(s.run_id) == 12 for s in specs)


def test_axes_expand_into_a_cartesian_grid(tmp_path):
    exp = basic(
        tmp_path,
        BASIC
        + textwrap.dedent("""
        axes:
          model.num_feature_levels: [1, 4]
          model.enc_n_points: [1, 2, 4]
        """),
    )
    labels = [s.label for s in expand(exp)]
    assert labels[:2] == ["base", "K=1"]
    grid = labels[2:]
    assert len(grid) == 6
    assert grid[0] == "num_feature_levels=1, enc_n_points=1"
    assert grid[-1] == "num_feature_levels=4, enc_n_points=4"
    specs = {s.label: s for s in expand(exp)}
    assert specs["num_feature_levels=1, enc_n_points=2"].config.model.num_feature_levels == 1
    assert specs["num_feature_levels=1, enc_n_points=2"].config.model.enc_n_points == 2
    # the grid point equal to the base row resolves to the same run
    assert specs["num_feature_levels=4, enc_n_points=4"].run_id == specs["base"].run_id
    assert len(unique_runs(expand(exp))) == 7


def test_seeds_give_one_run_each(tmp_path):
    exp = basic(
        tmp_path,
        BASIC.replace("    paper: {AP: 43.8}", "    paper: {AP: 43.8}\n    overrides: {train: {seed: [1, 2, 3]}}"),
    )
    specs = [s for s in expand(exp) if s.label == "base"]
    assert [s.seed for s in specs] == [1, 2, 3]
    assert [s.config.train.seed for s in specs] == [1, 2, 3]
    assert len({s.run_id for s in specs}) == 3


def test_seeds_are_one_input_and_never_repeat(tmp_path):
    # the old inputs point to the one that replaced them
    with pytest.raises(ExperimentError, match=r"row 'base': seeds: no longer a key.*train: \{seed"):
        basic(tmp_path, BASIC.replace("    paper: {AP: 43.8}", "    paper: {AP: 43.8}\n    seeds: [1, 2]"))
    with pytest.raises(ExperimentError, match=r"launcher.seeds: no longer a key.*train.seed: \[1, 2, 3\]"):
        basic(tmp_path, BASIC.replace("data: {root: ROOT}", "data: {root: ROOT}\n  launcher: {seeds: [1, 1]}"))
    # a repeat is refused wherever the list comes from: the base, a row, the command line
    with pytest.raises(ExperimentError, match=r"train.seed\[1\]: seed 1 is given twice"):
        basic(tmp_path, BASIC.replace("data: {root: ROOT}", "data: {root: ROOT}\n  train: {seed: [1, 1]}"))
    with pytest.raises(ExperimentError, match=r"command line.*train.seed\[2\]: seed 3 is given twice"):
        basic(tmp_path, overrides=["train.seed=[3, 4, 3]"])
    exp = basic(tmp_path, overrides=["train.seed=[5, 6]"])
    assert {s.seed for s in expand(exp)} == {5, 6}


def test_run_id_is_stable_and_changes_with_the_row(tmp_path):
    first = {s.label: s.run_id for s in expand(basic(tmp_path))}
    again = {s.label: s.run_id for s in expand(basic(tmp_path))}
    assert first == again
    changed = BASIC.replace("enc_n_points: 1,", "enc_n_points: 2,")
    ids = {s.label: s.run_id for s in expand(basic(tmp_path, changed))}
    assert ids["base"] == first["base"] and ids["K=1"] != first["K=1"]
    # where the data lives and how it is launched do not change what a run computes
    moved = BASIC.replace("data: {root: ROOT}", "data: {root: ROOT, num_workers: 7}\n  launcher: {partition: gpu}")
    assert {s.label: s.run_id for s in expand(basic(tmp_path, moved))} == first
    # stating a default explicitly is the same run
    explicit = BASIC.replace(
        "data: {root: ROOT}", "data: {root: ROOT}\n  model: {hidden_dim: 256}\n  train: {lr: 2e-4}"
    )
    assert {s.label: s.run_id for s in expand(basic(tmp_path, explicit))} == first


def test_run_id_is_a_known_hash(tmp_path):
    spec = expand(basic(tmp_path))[0]
    assert run_id(spec.config) == spec.run_id
    assert all(c in "0123456789abcdef" for c in spec.run_id)


def test_smoke_profile_shrinks_every_row(tmp_path):
    exp = basic(tmp_path, smoke=True)
    specs = expand(exp)
    assert all(s.scale == "smoke" for s in specs)
    cfg = specs[0].config
    assert cfg.data.dataset == "synthetic" and cfg.data.root is None
    assert cfg.model.hidden_dim <= 64 and cfg.model.pretrained_backbone is False
    assert cfg.model.backbone == "resnet50"
    assert cfg.launcher.executor == "local" and cfg.launcher.gpus_per_node == 0
    assert cfg.train.epochs <= 12
    assert specs[1].config.model.enc_n_points == 1  # the row's own change survives
    full_ids = {s.run_id for s in expand(exp, "full")}
    assert not full_ids & {s.run_id for s in specs}


def test_smoke_needs_no_dataset(tmp_path):
    text = BASIC.replace("data: {root: ROOT}", "data: {root: /nonexistent/coco}")
    exp = load_experiment(write(tmp_path, text), smoke=True)
    assert len(expand(exp)) == 2


def test_yaml_smoke_section_refines_the_defaults(tmp_path):
    exp = basic(tmp_path, BASIC + "smoke:\n  train: {epochs: 1}\n  model: {hidden_dim: 32}\n", smoke=True)
    cfg = expand(exp)[0].config
    assert cfg.train.epochs == 1 and cfg.model.hidden_dim == 32 and cfg.data.dataset == "synthetic"


def test_arch_defaults_start_the_model(tmp_path):
    text = BASIC + "  - label: detr\n    overrides: {model: {arch: detr}}\n"
    spec = [s for s in expand(basic(tmp_path, text)) if s.label == "detr"][0]
    assert spec.config.model.num_queries == 100 and spec.config.model.focal_loss is False
    assert spec.config.model.num_feature_levels == 1


def test_rows_selection(tmp_path):
    path = write(tmp_path, BASIC.replace("ROOT", str(fake_coco(tmp_path / "coco"))))
    exp = load_experiment(path, rows=["K=1"])
    assert [s.label for s in expand(exp)] == ["K=1"]
    with pytest.raises(ExperimentError, match="did you mean 'K=1'"):
        load_experiment(path, rows=["K=2"])


def test_yaml_lists_become_tuples(tmp_path):
    exp = basic(
        tmp_path,
        BASIC.replace(
            "data: {root: ROOT}",
            "data: {root: ROOT, synthetic_image_size: [64, 96]}\n  launcher: {additional_parameters: {gres: 'gpu:8'}}",
        ),
    )
    cfg = expand(exp)[0].config
    assert cfg.data.synthetic_image_size == (64, 96)
    assert cfg.launcher.additional_parameters == (("gres", "gpu:8"),)


# ------------------------------------------------------------------------------------------ validation


def test_unknown_field_suggests_the_closest(tmp_path):
    err, message = error(tmp_path, BASIC.replace("enc_n_points: 1,", "enc_n_poins: 1,"))
    assert err.row == "K=1" and err.key == "model.enc_n_poins"
    assert "row 'K=1'" in message and "model.enc_n_poins" in message
    assert "did you mean 'enc_n_points'" in message


def test_unknown_section_suggests_the_closest(tmp_path):
    err, message = error(tmp_path, BASIC.replace("overrides: {model:", "overrides: {modle:"))
    assert err.key == "modle" and "did you mean 'model'" in message and "row 'K=1'" in message


def test_unknown_row_key_and_top_key(tmp_path):
    _, message = error(tmp_path, BASIC.replace("    overrides:", "    overides:"))
    assert "overides" in message and "did you mean 'overrides'" in message and "row 'K=1'" in message
    _, message = error(tmp_path, BASIC.replace("base:", "bass:"))
    assert "did you mean 'base'" in message


def test_unknown_key_in_base(tmp_path):
    err, message = error(tmp_path, BASIC.replace("data: {root: ROOT}", "data: {root: ROOT, num_worker: 2}"))
    assert err.row == "(base)" and err.key == "data.num_worker" and "did you mean 'num_workers'" in message


def test_unknown_paper_metric(tmp_path):
    err, message = error(tmp_path, BASIC.replace("paper: {AP: 43.8}", "paper: {AP_50: 43.8}"))
    assert err.row == "base" and err.key == "paper.AP_50" and "did you mean 'AP50'" in message


def test_wrong_type_names_the_expected_type(tmp_path):
    err, message = error(tmp_path, BASIC.replace("enc_n_points: 1,", "enc_n_points: four,"))
    assert err.row == "K=1" and err.key == "model.enc_n_points"
    assert "'four'" in message and "expected an integer" in message
    err, message = error(tmp_path, BASIC.replace("enc_n_points: 1,", "with_box_refine: yes please,"))
    assert err.key == "model.with_box_refine" and "true or false" in message
    err, message = error(
        tmp_path, BASIC.replace("data: {root: ROOT}", "data: {root: ROOT, synthetic_image_size: [1, 2, 3]}")
    )
    assert err.key == "data.synthetic_image_size" and "a list of 2 items" in message


def test_out_of_range_value(tmp_path):
    err, message = error(tmp_path, BASIC.replace("enc_n_points: 1,", "enc_n_points: 0,"))
    assert err.row == "K=1" and err.key == "model.enc_n_points" and "expected an integer >= 1" in message
    err, message = error(tmp_path, BASIC.replace("data: {root: ROOT}", "data: {root: ROOT}\n  train: {epochs: 0}"))
    assert err.key == "train.epochs" and ">= 1" in message
    err, message = error(tmp_path, BASIC.replace("data: {root: ROOT}", "data: {root: ROOT}\n  train: {amp: fp8}"))
    assert err.key == "train.amp" and "'bf16'" in message


def test_impossible_combination_names_the_field(tmp_path):
    text = BASIC.replace("{enc_n_points: 1, dec_n_points: 1}", "{two_stage: true}")
    err, message = error(tmp_path, text)
    assert err.row == "K=1" and err.key == "model.two_stage" and "with_box_refine" in message
    text = BASIC.replace("{enc_n_points: 1, dec_n_points: 1}", "{neck: fpn, num_feature_levels: 1}")
    err, message = error(tmp_path, text)
    assert err.key == "model.neck" and "multi-scale" in message


def test_total_batch_must_split_over_processes(tmp_path):
    text = BASIC.replace(
        "data: {root: ROOT}",
        "data: {root: ROOT}\n  train: {total_batch_size: 30}\n  launcher: {nodes: 2, gpus_per_node: 8}",
    )
    err, message = error(tmp_path, text)
    assert err.key == "train.total_batch_size" and "multiple" in message


def test_empty_file(tmp_path):
    err, message = error(tmp_path, "")
    assert "empty" in message
    err, message = error(tmp_path, "# only a comment\n")
    assert "empty" in message


def test_yaml_syntax_error_names_the_line(tmp_path):
    err, message = error(tmp_path, "name: t\nrows:\n  - label: [unclosed\n")
    assert "YAML syntax error" in message and "line" in message


def test_duplicate_key_is_an_error(tmp_path):
    _, message = error(tmp_path, BASIC.replace("    cells: {K: 4}", "    cells: {K: 4}\n    cells: {K: 1}"))
    assert "duplicate key 'cells'" in message


def test_missing_dataset_for_a_full_run(tmp_path):
    err, message = error(tmp_path, BASIC.replace("data: {root: ROOT}", "data: {root: /nonexistent/coco}"))
    assert err.key == "data.root" and err.row == "(base)" and "/nonexistent/coco" in message and "--smoke" in message
    err, message = error(tmp_path, BASIC.replace("data: {root: ROOT}", "data: {root: '${NO_SUCH_VAR_FOR_TEST}'}"))
    assert err.key == "data.root" and "environment variable" in message
    # reports and status need no data
    path = write(tmp_path, BASIC.replace("data: {root: ROOT}", "data: {root: /nonexistent/coco}"))
    assert len(expand(load_experiment(path, check_data=False))) == 2


def test_duplicate_labels_and_missing_label(tmp_path):
    _, message = error(tmp_path, BASIC.replace("label: K=1", "label: base"))
    assert "row 'base'" in message and "unique" in message
    _, message = error(tmp_path, BASIC.replace("  - label: K=1\n", "  - cells: {K: 1}\n"))
    assert "rows[1]" in message and "label" in message


def test_cited_rows_are_paper_only(tmp_path):
    text = BASIC + "  - label: FCOS\n    cited: true\n    paper: {AP: 44.7}\n"
    exp = basic(tmp_path, text)
    assert [s.label for s in expand(exp)] == ["base", "K=1"]
    assert exp.row("FCOS").cited
    _, message = error(tmp_path, text + "    overrides: {model: {hidden_dim: 32}}\n")
    assert "row 'FCOS'" in message and "cited" in message


# ------------------------------------------------------------------------------------ the paper tables


@pytest.mark.parametrize("name,n_rows,n_runs", [("table1", 8, 8), ("table2", 6, 6), ("table3", 9, 5)])
def test_paper_tables_load_at_both_scales(name, n_rows, n_runs):
    for smoke in (False, True):
        exp = load_experiment(EXPERIMENTS / f"{name}.yaml", smoke=smoke, check_data=False)
        assert len(exp.rows) == n_rows
        assert len(expand(exp)) == n_runs


def test_paper_numbers_match_the_reference():
    import yaml

    reference = ROOT / "tests" / "fixtures" / "paper_tables.yaml"  # a copy of shared/reference's
    tables = yaml.safe_load(reference.read_text())
    for name in ("table1", "table2", "table3"):
        exp = load_experiment(EXPERIMENTS / f"{name}.yaml", check_data=False)
        ref_rows = tables[name]["rows"]
        assert len(ref_rows) == len(exp.rows)
        for ref, row in zip(ref_rows, exp.rows):
            for metric, value in row.paper.items():
                assert ref[metric] == value, (name, row.label, metric)
            assert bool(ref.get("cited", False)) == row.cited


def test_table2_rows_map_the_ablation_switches():
    exp = load_experiment(EXPERIMENTS / "table2.yaml", check_data=False)
    for spec in expand(exp):
        m, cells = spec.config.model, exp.row(spec.label).cells
        assert (m.num_feature_levels > 1) == cells["ms_inputs"]
        assert m.ms_attention == cells["ms_attention"]
        assert m.enc_n_points == m.dec_n_points == cells["K"]
        assert m.neck == {"w/o": "none", "FPN": "fpn", "BiFPN": "bifpn"}[cells["fpn"]]


def test_gpu_hour_estimates():
    exp = load_experiment(EXPERIMENTS / "table1.yaml", check_data=False)
    spec = [s for s in expand(exp) if s.label == "Deformable DETR"][0]
    assert estimate_gpu_hours(spec.config, 325, 50) == pytest.approx(325)
    assert estimate_gpu_hours(spec.config) == pytest.approx(6.5 * 50)
    smoke = expand(load_experiment(EXPERIMENTS / "table1.yaml", smoke=True))[0]
    assert estimate_gpu_hours(smoke.config) == 0.0


def test_a_new_field_with_a_default_renames_no_run(monkeypatch):
    """Run ids hash the fields that differ from their defaults (and a schema version): adding a field with
    a default keeps every existing id, setting it to another value gives a new one."""
    import dataclasses

    from harness.config import TrainConfig
    from harness.grid import schema

    specs = expand(load_experiment(EXPERIMENTS / "table2.yaml", check_data=False))
    before = [s.run_id for s in specs]
    from model.config import weights

    extended = dataclasses.make_dataclass(
        "TrainConfig", [("new_knob", int, weights(3))], bases=(TrainConfig,), frozen=True
    )
    monkeypatch.setitem(schema.SECTION_CLASSES, "train", extended)
    configs = [dataclasses.replace(s.config, train=extended(**dataclasses.asdict(s.config.train))) for s in specs]
    assert [run_id(c) for c in configs] == before
    changed = dataclasses.replace(configs[0], train=dataclasses.replace(configs[0].train, new_knob=4))
    assert run_id(changed) not in before
    assert len(set(before)) == len(before)  # the rows still differ from each other
