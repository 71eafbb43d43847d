"""Training engine: optimiser groups, batch accumulation, exact resume, non-finite loss, progress log."""

import json
import os

import pytest
import torch
from builders import tiny_model_config, tiny_run_config

from harness.config import EvalConfig, TrainConfig
from harness.run import checkpointing, engine
from harness.run.optim import build_optimizer, build_scheduler, param_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(output_dir):
    return checkpointing.read_checkpoint(os.path.join(output_dir, checkpointing.CHECKPOINT))


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_param_groups_follow_official_names():
    from model import build_model

    model, _, _ = build_model(tiny_model_config())
    cfg = TrainConfig()
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups["default"]["lr"] == 2e-4
    assert groups["backbone"]["lr"] == 2e-5
    assert groups["linear_proj"]["lr"] == pytest.approx(2e-5)
    assert all("backbone.0" in names[id(p)] for p in groups["backbone"]["params"])
    proj = [names[id(p)] for p in groups["linear_proj"]["params"]]
    assert any("sampling_offsets" in n for n in proj) and any("reference_points" in n for n in proj)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups.values()) == n_trainable
    optimizer = build_optimizer(model, cfg)
    assert all(g["weight_decay"] == 1e-4 for g in optimizer.param_groups)
    scheduler = build_scheduler(optimizer, TrainConfig(lr_drop=2))
    lrs = []
    for _ in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert lrs == pytest.approx([2e-4, 2e-4, 2e-5])


def test_accumulation_steps_and_warning():
    assert engine.accumulation_steps(TrainConfig(batch_size_per_gpu=2, total_batch_size=32), 16) == 1
    assert engine.accumulation_steps(TrainConfig(batch_size_per_gpu=2, total_batch_size=32), 4) == 4
    with pytest.warns(RuntimeWarning, match="effective total batch is 30"):
        assert engine.accumulation_steps(TrainConfig(batch_size_per_gpu=2, total_batch_size=32), 3) == 5
    with pytest.warns(RuntimeWarning, match="effective total batch is 2 "):
        engine.accumulation_steps(TrainConfig(batch_size_per_gpu=2, accumulate_to_total=False), 1)


def test_resume_is_bit_identical(tmp_path):
    """Stopped after epoch 0 and resumed == never stopped (augmentation, dropout and accumulation on)."""
    data = tmp_path / "data"
    common = dict(
        train=dict(total_batch_size=4, max_iters_per_epoch=3, eval_every=100),
        data=dict(augmentation="official"),
        eval=dict(save_detections=False),
    )
    cfg = tiny_run_config(data, epochs=2, **common)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    records = []
    engine.train(cfg, full, log_fn=records.append, print_fn=None)
    engine.train(tiny_run_config(data, epochs=1, **common), part, print_fn=None)
    assert _weights(part)["epoch"] == 0
    engine.train(cfg, part, print_fn=None)  # resumes at epoch 1
    a, b = _weights(full), _weights(part)
    assert a["epoch"] == b["epoch"] == 1
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["lr_default"] == pytest.approx(2e-5)  # lr_drop=1
    assert {"train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "epoch_time_s", "AP", "AP50"} <= set(
        records[1]
    )


def test_log_jsonl_and_console(tmp_path, capsys):
    cfg = tiny_run_config(tmp_path / "data", epochs=1, train=dict(max_iters_per_epoch=2))
    out = str(tmp_path / "run")
    metrics = engine.train(cfg, out)
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert len(lines) == 1 and lines[0]["epoch"] == 0 and "train_loss" in lines[0] and "AP" in lines[0]
    printed = capsys.readouterr().out
    assert "epoch 0/1 [1/2]  loss" in printed and "eta" in printed and "it/s" in printed
    assert "epoch 0/1  AP " in printed and "final  AP " in printed
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "num_detections"}
    assert metrics["num_detections"] == 100
    assert os.path.isfile(os.path.join(out, "detections_val2017.json"))


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_run_config(tmp_path / "data", epochs=2, train=dict(max_iters_per_epoch=2, eval_every=100))
    out = str(tmp_path / "run")
    build = engine._build_model
    calls = {"n": 0}

    def poisoned(run_cfg, device):
        model, criterion, post = build(run_cfg, device)
        forward = criterion.forward

        def nan_in_second_epoch(outputs, targets):
            losses = forward(outputs, targets)
            calls["n"] += 1
            if calls["n"] == 4:  # epoch 1, iteration 1
                losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
            return losses

        criterion.forward = nan_in_second_epoch
        return model, criterion, post

    monkeypatch.setattr(engine, "_build_model", poisoned)
    with pytest.raises(engine.NonFiniteLossError, match=r"epoch 1, iteration 1.*loss_bbox=nan"):
        engine.train(cfg, out, print_fn=None)
    state = _weights(out)  # epoch 0's checkpoint is intact
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_evaluate_only_from_checkpoint(tmp_path):
    cfg = tiny_run_config(tmp_path / "data", epochs=1, train=dict(max_iters_per_epoch=1))
    out = str(tmp_path / "run")
    trained = engine.train(cfg, out, print_fn=None)
    again = engine.evaluate(cfg, str(tmp_path / "eval"), checkpoint=os.path.join(out, "checkpoint.pth"), print_fn=None)
    for k in ("AP", "AP50", "APl"):
        assert again[k] == trained[k] if trained[k] is None else again[k] == pytest.approx(trained[k])
    assert os.path.isfile(str(tmp_path / "eval" / "detections_val2017.json"))
    with pytest.raises(checkpointing.CheckpointError, match="nothing to evaluate"):
        engine.evaluate(cfg, str(tmp_path / "empty"), print_fn=None)


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="not writable"):
        engine.check_output_dir(str(blocker / "run"))


@pytest.mark.filterwarnings("ignore:Detected call of")  # fp16: the scaler skips steps with inf gradients
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, amp):
    cfg = tiny_run_config(
        tmp_path / "data", epochs=1, train=dict(amp=amp, max_iters_per_epoch=2), eval=dict(save_detections=False)
    )
    metrics = engine.train(cfg, str(tmp_path / "run"), print_fn=None)
    assert 0.0 <= metrics["AP"] <= 100.0
    state = _weights(str(tmp_path / "run"))
    assert (state["scaler"] is not None) == (amp == "fp16")
    assert all(v.dtype != torch.bfloat16 for v in state["model"].values())  # weights stay fp32


def test_eval_only_run_and_test_dev(tmp_path):
    """``eval.eval_only`` through train(); a test-dev style split (no annotations) gives the JSON only."""
    import shutil

    cfg = tiny_run_config(tmp_path / "data", epochs=1, train=dict(max_iters_per_epoch=1))
    out = str(tmp_path / "run")
    engine.train(cfg, out, print_fn=None)
    data = str(tmp_path / "data")
    shutil.copytree(os.path.join(data, "val2017"), os.path.join(data, "test2017"))
    with open(os.path.join(data, "annotations", "instances_val2017.json")) as f:
        info = {k: v for k, v in json.load(f).items() if k != "annotations"}
    with open(os.path.join(data, "annotations", "image_info_test-dev2017.json"), "w") as f:
        json.dump(info, f)
    import dataclasses

    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, val_split="test-dev2017"),
        eval=EvalConfig(eval_only=True, checkpoint=os.path.join(out, "checkpoint.pth")),
    )
    records = []
    metrics = engine.train(cfg, str(tmp_path / "eval"), log_fn=records.append, print_fn=None)
    assert "AP" not in metrics and metrics["num_images"] == 2 and metrics["epochs"] == 0
    detections = json.load(open(tmp_path / "eval" / "detections_test-dev2017.json"))
    assert len(detections) == 2 * 100 and {d["image_id"] for d in detections} == {5, 6}
    assert records and records[0]["eval_only"]


@pytest.mark.parametrize("stop_at_poll", [1, 2])  # epoch 0 (nothing finished yet) / epoch 1
def test_stop_mid_epoch_and_resume_is_bit_identical(tmp_path, stop_at_poll):
    """A pre-emption signal mid-epoch: checkpoint, stop, resume -> the weights of an uninterrupted run."""
    data = tmp_path / "data"
    common = dict(
        train=dict(total_batch_size=4, max_iters_per_epoch=4, eval_every=100),
        data=dict(augmentation="official", synthetic_train_images=8),
        eval=dict(save_detections=False),
    )
    cfg = tiny_run_config(data, epochs=2, **common)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    engine.train(cfg, full, print_fn=None)
    polls = []

    def should_stop():
        polls.append(1)
        return len(polls) == stop_at_poll

    with pytest.raises(engine.TrainingInterrupted, match=f"epoch {stop_at_poll - 1}, iteration 2"):
        engine.train(cfg, part, print_fn=None, should_stop=should_stop)
    state = _weights(part)
    assert state["epoch"] == stop_at_poll - 2 and state["partial"]["iteration"] == 2
    engine.train(cfg, part, print_fn=None, should_stop=lambda: False)
    a, b = _weights(full), _weights(part)
    assert b["epoch"] == 1 and b.get("partial") is None
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
