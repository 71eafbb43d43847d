"""Ids from the roles config fields declare: what enters the run id, the evaluation id and the measurement id;
the smoke profile's tiers; cells derived from the configuration."""

import dataclasses
import textwrap
from pathlib import Path

import pytest

from harness.config import DataConfig, EvalConfig, LauncherConfig, RunConfig, TrainConfig
from harness.grid import ExperimentError, collapsed_at_smoke, expand, load_experiment
from harness.grid.identity import eval_id, ids, measure_id, run_id
from harness.store import dry_run_plan
from model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def _with(cfg: RunConfig, section: str, **fields) -> RunConfig:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})


BASE = RunConfig(data=DataConfig(dataset="synthetic"))


def test_training_and_evaluation_sizes_enter_their_own_ids():
    bigger_eval = _with(BASE, "data", eval_size=1000, max_size=1333)
    assert run_id(bigger_eval) == run_id(BASE) and eval_id(bigger_eval) != eval_id(BASE)
    assert measure_id(bigger_eval) != measure_id(BASE)  # FLOPs and FPS are measured at that size
    bigger_train = _with(BASE, "data", train_size=1000, max_size=1333)
    assert run_id(bigger_train) != run_id(BASE) and eval_id(bigger_train) == eval_id(BASE)


@pytest.mark.parametrize(
    "section, fields",
    [
        ("data", dict(num_workers=7)),
        ("data", dict(root="/elsewhere")),
        ("train", dict(eval_every=5)),
        ("train", dict(print_freq=1)),
        ("model", dict(attn_impl="pytorch")),
        ("eval", dict(save_detections=False)),
        ("launcher", dict(partition="gpu", nodes=4, cpus_per_task=3)),
    ],
)
def test_what_changes_no_number_enters_no_id(section, fields):
    assert ids(_with(BASE, section, **fields)) == ids(BASE)


def test_two_spellings_of_one_thing_are_one_id():
    pretrained = RunConfig()
    assert run_id(_with(pretrained, "model", backbone_weights="IMAGENET1K_V1")) == run_id(pretrained)
    assert run_id(_with(pretrained, "model", backbone_weights="IMAGENET1K_V2")) != run_id(pretrained)
    # a field its section makes irrelevant leaves the ids: no TTA, no TTA sizes; multistep, no lr_drop
    assert eval_id(_with(BASE, "eval", tta_sizes=(100, 200))) == eval_id(BASE)
    assert eval_id(_with(BASE, "eval", tta=True, tta_sizes=(100, 200))) != eval_id(_with(BASE, "eval", tta=True))
    multistep = _with(BASE, "train", lr_schedule="multistep", lr_milestones=(40,))
    assert run_id(_with(multistep, "train", lr_drop=7)) == run_id(multistep)
    assert run_id(_with(BASE, "train", warmup_factor=0.5)) == run_id(BASE)
    assert run_id(_with(BASE, "model", pretrained_backbone=False, backbone_weights="IMAGENET1K_V2")) == run_id(
        _with(BASE, "model", pretrained_backbone=False)
    )


def test_a_weights_file_is_its_content(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"imagenet weights")
    b.write_bytes(b"imagenet weights")
    first, copy = (_with(BASE, "model", backbone_weights=str(p)) for p in (a, b))
    assert run_id(first) == run_id(copy) != run_id(BASE)
    b.write_bytes(b"other weights")
    assert run_id(_with(BASE, "model", backbone_weights=str(b))) != run_id(first)
    start = _with(BASE, "eval", checkpoint=str(a))
    assert run_id(start) != run_id(BASE)


def test_an_unreadable_weights_file_is_named_with_its_row(tmp_path):
    (tmp_path / "exp.yaml").write_text(
        textwrap.dedent(f"""\
        name: files
        base: {{data: {{dataset: synthetic}}, launcher: {{executor: local, gpus_per_node: 0, tasks_per_node: 1}}}}
        rows:
          - label: mine
            overrides: {{model: {{backbone_weights: {tmp_path}/missing.pth}}}}
        """)
    )
    with pytest.raises(ExperimentError, match=r"row 'mine': model.backbone_weights: cannot read .*missing.pth"):
        expand(load_experiment(str(tmp_path / "exp.yaml"), check_data=False))


def test_the_effective_batch_is_in_the_id_where_accumulation_does_not_fix_it():
    fixed = [_with(BASE, "launcher", nodes=n, gpus_per_node=8) for n in (1, 2, 4)]
    assert len({run_id(c) for c in fixed}) == 1  # accumulation keeps the total at 32
    free = [_with(c, "train", accumulate_to_total=False) for c in fixed]
    assert len({run_id(c) for c in free}) == 3  # 16, 32 and 64 images per step
    # without accumulation, total_batch_size says nothing: the processes do
    assert run_id(_with(free[0], "train", total_batch_size=64)) == run_id(free[0])


def _copy_of_table2(tmp_path, extra_rows: str, smoke: str = "") -> Path:
    text = (ROOT / "experiments" / "table2.yaml").read_text().replace("name: table2", "name: mine")
    path = tmp_path / "mine.yaml"
    path.write_text(text + textwrap.indent(textwrap.dedent(extra_rows), "  ") + smoke)
    return path


def test_a_rows_own_settings_win_over_the_smoke_profile(tmp_path):
    path = _copy_of_table2(
        tmp_path,
        """
          - label: three encoder layers
            cells: {ms_inputs: true, ms_attention: true, K: 4, fpn: w/o}
            overrides: {model: {enc_layers: 3}, train: {epochs: 30}}
        """,
    )
    exp = load_experiment(str(path), smoke=True, check_data=False)
    specs = {s.label: s for s in expand(exp)}
    mine, baseline = specs["three encoder layers"], specs["MS inputs + MS attention, K=4"]
    assert mine.config.model.enc_layers == 3 and mine.run_id != baseline.run_id
    assert mine.config.train.epochs == 12  # a laptop setting still wins, and says so
    assert exp.row("three encoder layers").smoke_changes == (("train.epochs", 30, 12),)
    text = dry_run_plan(exp)
    assert "smoke profile changes 'three encoder layers': train.epochs 30 -> 12" in text


def test_rows_that_collapse_at_smoke_scale_are_named(tmp_path):
    path = _copy_of_table2(
        tmp_path,
        """
          - label: longer schedule
            cells: {ms_inputs: true, ms_attention: true, K: 4, fpn: w/o}
            overrides: {train: {epochs: 100, lr_drop: 80}}
        """,
    )
    exp = load_experiment(str(path), smoke=True, check_data=False)
    collapsed = collapsed_at_smoke(exp)
    assert list(collapsed.values()) == [["longer schedule", "MS inputs + MS attention, K=4"]] or list(
        collapsed.values()
    ) == [["MS inputs + MS attention, K=4", "longer schedule"]]
    assert "one run at smoke scale" in dry_run_plan(exp) and "'longer schedule'" in dry_run_plan(exp)
    # the committed tables: Table 3's backbones are one ResNet-50 at smoke scale, and said to be
    table3 = load_experiment(str(ROOT / "experiments" / "table3.yaml"), smoke=True, check_data=False)
    assert any("Deformable DETR, ResNet-101" in labels for labels in collapsed_at_smoke(table3).values())


def test_cells_that_describe_the_config_are_derived_or_checked(tmp_path):
    path = _copy_of_table2(
        tmp_path,
        """
          - label: K=2
            cells: {ms_inputs: true, ms_attention: true, fpn: w/o}
            overrides: {model: {enc_n_points: 2, dec_n_points: 2}}
        """,
    )
    exp = load_experiment(str(path), check_data=False)
    assert exp.row("K=2").cells["K"] == 2  # derived, not written
    wrong = _copy_of_table2(
        tmp_path,
        """
          - label: K=2
            cells: {ms_inputs: true, ms_attention: true, K: 8, fpn: w/o}
            overrides: {model: {enc_n_points: 2, dec_n_points: 2}}
        """,
    )
    with pytest.raises(
        ExperimentError,
        match=r"row 'K=2': cells.K: got 8, but the row's configuration "
        r"\(model.enc_n_points, model.dec_n_points\) gives 2",
    ):
        load_experiment(str(wrong), check_data=False)
    # a command-line override changes the derived cell, never contradicts the written one
    exp = load_experiment(
        str(ROOT / "experiments" / "table2.yaml"),
        check_data=False,
        rows=["MS inputs, K=4"],
        overrides=["model.enc_n_points=8", "model.dec_n_points=8"],
    )
    assert exp.row("MS inputs, K=4").cells["K"] == 8
    table1 = load_experiment(str(ROOT / "experiments" / "table1.yaml"), check_data=False)
    assert table1.row("DETR").cells["epochs"] == 500 == table1.row("DETR").configs["full"].train.epochs


def test_every_field_declares_a_role():
    from harness.grid.identity import undeclared

    assert undeclared() == []
    for cls in (ModelConfig, DataConfig, TrainConfig, EvalConfig, LauncherConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata["roles"] or f.metadata["why"], f"{cls.__name__}.{f.name}: no role and no reason"


def test_the_report_marks_collapsed_rows_and_hides_a_changed_run(tmp_path):
    import yaml

    from harness.report.collect import collect
    from harness.report.markdown import render_markdown
    from harness.store import ResultsStore

    path = _copy_of_table2(
        tmp_path,
        """
          - label: longer schedule
            cells: {ms_inputs: true, ms_attention: true, K: 4, fpn: w/o}
            overrides: {train: {epochs: 100, lr_drop: 80}}
        """,
    )
    exp = load_experiment(str(path), smoke=True, check_data=False)
    spec = [s for s in expand(exp) if s.label == "longer schedule"][0]
    store = ResultsStore(tmp_path / "results")
    for key, numbers in (
        (spec.run_id, {"epochs_trained": 12}),
        (spec.eval_key, {"AP": 2.5}),
        (spec.measure_key, {"params": 10}),
    ):
        store.prepare(spec, key)
        store.complete(key, numbers)
    md = render_markdown(exp, collect(tmp_path / "results", exp))
    line = [text for text in md.splitlines() if "ours (smoke" in text and "longer schedule" in text]
    assert line and "2.5" in line[0]
    assert "one run with 'MS inputs + MS attention, K=4'" in md
    # its training ran with another learning rate than today's resolution: its numbers are not shown
    config = store.record_dir(spec.run_id) / "config.yaml"
    doc = yaml.safe_load(config.read_text())
    doc["config"]["train"]["lr"] = 0.5
    config.write_text(yaml.safe_dump(doc))
    df = collect(tmp_path / "results", exp)
    row = df[(df["label"] == "longer schedule") & (df["scale"] == "smoke")].iloc[0]
    assert row["state"] == "changed" and row["AP"] != row["AP"] and "train.lr 0.5 then" in row["error"]
