"""FPS and training-iteration time (harness.measure.speed) with a tiny model on CPU; on a GPU when there is one."""

import pytest
import torch
from builders import tiny_model_fields

from harness.config import TrainConfig
from harness.measure import inputs, speed
from harness.measure.complexity import build_for_complexity
from harness.run.step import build_step
from model import ModelConfig, arch_defaults, build_model

TINY = tiny_model_fields(nheads=4, dec_layers=1, num_feature_levels=4, enc_n_points=4, dec_n_points=4, attn_impl="auto")


def tiny_config(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_for_complexity(tiny_config())


def _images():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 96, 128, generator=g),
        torch.randn(3, 128, 96, generator=g),
        torch.randn(3, 96, 96, generator=g),
    ]


def test_fps_on_cpu_is_measured_and_labelled(tiny):
    result = speed.measure_fps(tiny, _images(), batch_size=2, iters=3, warmup=1, device="cpu")
    assert result["fps"] > 0
    assert result["fps"] == pytest.approx(2 / result["mean_s"])
    assert result["batch_size"] == 2 and result["iters"] == 3 and result["warmup"] == 1
    assert result["device_type"] == "cpu" and result["fps_device"].startswith("CPU")
    assert result["precision"] == "fp32"
    assert result["torch"] == torch.__version__
    assert "ms_deform_attn" in result["attn_impl"]
    # 3 images in batches of 2: two batches, the second wrapping around to the first image
    assert result["num_inputs"] == 4 and result["input_sizes"] == ["128x128", "96x128"]


def test_speed_at_each_batch_size(tiny):
    record = speed.measure_speed(tiny, _images(), batch_sizes=(1, 4), iters=1, warmup=0, device="cpu")
    assert record["fps_bs1"] > 0 and record["fps_bs4"] > 0
    assert set(record["fps_details"]) == {"bs1", "bs4"}
    assert record["fps_details"]["bs4"]["batch_size"] == 4
    assert record["fps_device"].startswith("CPU") and record["precision"] == "fp32"


def test_given_batch_tensors_are_used_as_they_are(tiny):
    images = torch.randn(2, 3, 96, 96)
    mask = torch.zeros(2, 96, 96, dtype=torch.bool)
    result = speed.measure_fps(tiny, (images, mask), iters=2, warmup=0, device="cpu")
    assert result["batch_size"] == 2 and result["num_inputs"] == 2 and result["input_sizes"] == ["96x96"]


def test_precisions_on_cpu(tiny):
    bf16 = speed.measure_fps(tiny, _images()[:1], iters=1, warmup=0, device="cpu", precision="bf16")
    assert bf16["precision"] == "bf16" and bf16["fps"] > 0
    assert "PyTorch reference" in bf16["attn_impl"]  # no bf16 CPU kernel
    tf32 = speed.measure_fps(tiny, _images()[:1], iters=1, warmup=0, device="cpu", precision="tf32")
    assert tf32["precision"].startswith("fp32") and "CUDA only" in tf32["precision"]
    with pytest.raises(ValueError, match="precision"):
        speed.measure_fps(tiny, _images(), iters=1, device="cpu", precision="fp8")


def test_precision_context_restores_tf32_switches():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with speed.precision_context("tf32", "cpu"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with speed.precision_context("fp32", "cpu"):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    with speed.precision_context("bf16", "cpu"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_attention_labels():
    set_pytorch = build_for_complexity(tiny_config(attn_impl="pytorch"))
    assert speed.attention_impl(set_pytorch, "cpu") == "ms_deform_attn pure-PyTorch reference (grid_sample)"
    auto = build_for_complexity(ModelConfig(**{**TINY, "attn_impl": "auto"}))
    assert speed.attention_impl(auto, "cpu").startswith("ms_deform_attn compiled cpu kernel (auto)")
    assert speed.attention_of_config(
        auto_cfg := ModelConfig(**{**TINY, "attn_impl": "auto"}), "cpu"
    ) == speed.attention_impl(auto, "cpu")
    assert "PyTorch reference" in speed.attention_of_config(auto_cfg, "cpu", amp="bf16")  # no bf16 CPU kernel
    detr = build_for_complexity(
        ModelConfig(**{**TINY, **arch_defaults("detr"), "num_queries": 10, "dim_feedforward": 64})
    )
    assert speed.attention_impl(detr, "cpu") == "dense (torch.nn.MultiheadAttention)"


def test_pad_batch_like_the_evaluation_loader():
    from harness.data.coco import collate_fn

    images = _images()
    padded, mask = inputs.pad_batch(images)
    expected_padded, expected_mask, _ = collate_fn([(img, {}) for img in images])
    assert torch.equal(padded, expected_padded) and torch.equal(mask, expected_mask)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_training_iteration_time_on_cpu(amp):
    """The time of the engine's own optimiser step (harness.run.step), not of a step of its own."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_config(train_backbone=False))  # no backbone backward: fast
    images = torch.randn(2, 3, 96, 96)
    mask = torch.zeros(2, 96, 96, dtype=torch.bool)
    targets = inputs.synthetic_targets(2, num_classes=91, objects=3)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    step = build_step(model, criterion, TrainConfig(amp=amp), "cpu", total_batch=2)
    result = speed.time_train_step(step, images, mask, targets, amp=amp, iters=2, warmup=0)
    assert result["mean_s"] > 0 and result["iters"] == 2 and result["batch_size"] == 2
    assert result["images_per_s"] == pytest.approx(2 / result["mean_s"])
    assert result["amp"] == amp and result["fps_device"].startswith("CPU")
    assert result["input_size"] == "96x96"
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the optimiser stepped
    assert step.scheduler.last_epoch == 2  # and the schedule with it
    with pytest.raises(ValueError, match="amp"):
        speed.time_train_step(step, images, mask, targets, amp="fp8")


def test_measured_step_is_the_engine_s(monkeypatch):
    """measure_run_train_step times harness.run.step.OptimiserStep, built with the run's optimiser (its
    parameter groups and learning rates) and gradient clipping."""
    from harness.config import RunConfig
    from harness.run import step as step_module

    calls = []
    real = step_module.OptimiserStep.__call__

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(step_module.OptimiserStep, "__call__", counted)
    run_cfg = RunConfig(model=tiny_config(train_backbone=False), train=TrainConfig(lr=1e-3, clip_max_norm=0.5))
    result = step_module.measure_run_train_step(
        run_cfg, device="cpu", batch_size=1, image_size=(64, 96), iters=2, warmup=1
    )
    assert len(calls) == 3 and result["iters"] == 2 and result["input_size"] == "64x96" and result["amp"] == "off"
    step = calls[0]
    assert step.clip_max_norm == 0.5
    groups = {g["name"]: g["lr"] for g in step.optimizer.param_groups}
    assert groups["default"] == pytest.approx(1e-3) and groups["linear_proj"] == pytest.approx(1e-4)


def test_synthetic_targets_look_like_the_loader_s():
    targets = inputs.synthetic_targets(2, num_classes=10, objects=4, seed=1)
    assert len(targets) == 2
    for t in targets:
        assert t["labels"].dtype == torch.int64 and t["labels"].shape == (4,)
        assert ((t["labels"] >= 1) & (t["labels"] < 10)).all()
        assert t["boxes"].shape == (4, 4) and (t["boxes"] > 0).all() and (t["boxes"][:, :2] < 1).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_fps_on_gpu(tiny, precision):
    result = speed.measure_fps(tiny, _images(), batch_size=2, iters=3, warmup=2, device="cuda", precision=precision)
    assert result["device_type"] == "cuda" and result["fps_device"] == torch.cuda.get_device_name()
    assert result["precision"] == precision and result["fps"] > 0
    model, criterion, _ = build_model(tiny_config())
    amp = "bf16" if precision == "bf16" else "off"
    model, criterion = model.cuda(), criterion.cuda()
    step = speed.time_train_step(
        build_step(model, criterion, TrainConfig(amp=amp), "cuda", total_batch=2),
        torch.randn(2, 3, 96, 96),
        torch.zeros(2, 96, 96, dtype=torch.bool),
        inputs.synthetic_targets(2),
        amp=amp,
        iters=2,
        warmup=1,
    )
    assert step["peak_memory_mb"] > 0
