"""Parameters and fvcore FLOPs (harness.measure.complexity), against the official implementation's counts
(tests/fixtures/README.md: one 3x800x1199 image, fvcore's default handles)."""

import json

import pytest
import torch

from harness.measure import complexity
from harness.measure.command import main as complexity_main
from harness.measure.complexity import (
    build_for_complexity,
    count_flops,
    measure_complexity,
    set_attention_impl,
    split_unsupported,
)
from harness.measure.inputs import fixed_size_input
from model import ModelConfig, arch_defaults, ops

needs_cpu_kernel = pytest.mark.skipif(
    not ops.kernel_available("cpu"), reason="the compiled CPU kernel of ms_deform_attn cannot be built here"
)


@pytest.fixture(scope="module")
def deformable_detr():
    return build_for_complexity(ModelConfig())


def _count_with(model, impl, inputs):
    set_attention_impl(model, impl)
    try:
        return count_flops(model, inputs)
    finally:
        set_attention_impl(model, "auto")


@needs_cpu_kernel
def test_deformable_detr_800x1199_matches_the_official_count(deformable_detr):
    """185.6 GFLOPs (conv 83.0, linear 100.0, grid_sampler 2.0, layer_norm 0.3, bmm 0.3), whichever
    attention implementation runs."""
    inputs = fixed_size_input(800, 1199)
    compiled = _count_with(deformable_detr, "cpu", inputs)
    reference = _count_with(deformable_detr, "pytorch", inputs)
    for result, attention_key in ((compiled, "ms_deform_attn"), (reference, "grid_sampler")):
        assert result["gflops"] == pytest.approx(185.6, abs=0.1)
        ops_ = result["by_operator"]
        assert ops_["conv"] == pytest.approx(83.0, abs=0.1)
        assert ops_["linear"] == pytest.approx(100.0, abs=0.1)
        assert ops_[attention_key] == pytest.approx(2.0, abs=0.05)
        assert ops_["layer_norm"] == pytest.approx(0.3, abs=0.05)
        assert ops_["bmm"] == pytest.approx(0.3, abs=0.05)
        assert result["unsupported_ops"] == {}
        assert result["gflops_std"] == 0.0 and result["input_sizes"] == ["800x1199"]
    assert compiled["gflops"] == pytest.approx(reference["gflops"], rel=1e-12)
    assert compiled["by_operator"]["ms_deform_attn"] == pytest.approx(
        reference["by_operator"]["grid_sampler"], rel=1e-12
    )
    assert complexity.count_parameters(deformable_detr) == 40_069_665


@needs_cpu_kernel
def test_small_image_same_count_for_compiled_and_pytorch_attention(deformable_detr):
    inputs = fixed_size_input(128, 160)
    compiled = _count_with(deformable_detr, "cpu", inputs)
    reference = _count_with(deformable_detr, "pytorch", inputs)
    assert compiled["gflops"] == pytest.approx(reference["gflops"], rel=1e-12)
    assert compiled["by_operator"]["ms_deform_attn"] == reference["by_operator"]["grid_sampler"]
    # 4 FLOPs per sampled value: N x Lq x M x D x L x P per attention layer (6 encoder over the S tokens of
    # the 4 levels, 6 decoder over 300 queries)
    shapes = [(16, 20), (8, 10), (4, 5), (2, 3)]
    S = sum(h * w for h, w in shapes)
    expected = 4 * 256 * 4 * 4 * (6 * S + 6 * 300)
    assert compiled["by_operator"]["ms_deform_attn"] * 1e9 == pytest.approx(expected)


def test_mean_and_std_over_images_of_different_sizes(deformable_detr):
    images = [torch.randn(3, 96, 128), torch.randn(3, 128, 160)]
    result = count_flops(deformable_detr, images)
    each = result["gflops_each"]
    assert len(each) == 2 and result["num_inputs"] == 2
    assert result["input_sizes"] == ["96x128", "128x160"]
    assert result["gflops"] == pytest.approx(sum(each) / 2)
    assert result["gflops_std"] == pytest.approx(abs(each[0] - each[1]) / 2)
    assert result["gflops_std"] > 0
    assert result["gflops_min"] == min(each) and result["gflops_max"] == max(each)
    assert sum(result["by_operator"].values()) == pytest.approx(result["gflops"])
    # FrozenBatchNorm's affine is elementwise: uncounted, and listed as trivial
    assert "aten::mul" in result["trivial_unsupported_ops"]
    assert result["unsupported_ops"] == {}
    assert "deformable_detr::ms_deform_attn" in result["handles"]


def test_detr_lists_its_uncounted_attention_matmuls():
    """DETR's attention with a key padding mask runs aten::baddbmm, which fvcore's default handles do not
    count (the official count of 89.6 leaves it out too): it is listed as an operator that matters."""
    model = build_for_complexity(ModelConfig(**arch_defaults("detr"), enc_layers=1, dec_layers=1))
    images = torch.randn(1, 3, 128, 160)
    mask = torch.zeros(1, 128, 160, dtype=torch.bool)
    mask[:, :, 140:] = True
    result = count_flops(model, [(images, mask)])
    assert result["unsupported_ops"] == {"aten::baddbmm": 2}
    assert "aten::baddbmm" not in result["trivial_unsupported_ops"]
    assert result["by_operator"]["conv"] > 0 and result["by_operator"]["linear"] > 0


def test_faster_rcnn_is_counted_through_its_list_of_dicts_output():
    cfg = ModelConfig(**arch_defaults("faster_rcnn"))  # pretrained_backbone: a trained run's frozen BN
    model = build_for_complexity(cfg)
    assert complexity.count_parameters(model) == 41_755_286  # 41,808,406 less the frozen BN affine terms
    result = count_flops(model, fixed_size_input(128, 160))
    assert result["gflops"] > 0 and result["by_operator"]["conv"] > 0
    assert "torchvision::roi_align" in result["unsupported_ops"]
    assert "torchvision::nms" not in result["unsupported_ops"]


def test_deform_conv2d_is_counted_as_the_convolution_it_replaces():
    from model.backbone import ModulatedDeformConv3x3

    conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
    dcn = ModulatedDeformConv3x3(conv).eval()
    x = torch.randn(2, 16, 20, 24)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, images, mask):
            return self.m(images)

    plain = count_flops(Wrap(conv), [(x, torch.zeros(2, 20, 24, dtype=torch.bool))])
    deform = count_flops(Wrap(dcn), [(x, torch.zeros(2, 20, 24, dtype=torch.bool))])
    assert deform["by_operator"]["deform_conv2d"] == pytest.approx(plain["by_operator"]["conv"])
    # and the offset/mask branch: a 16 -> 27 channel 3x3 conv at the same stride
    assert deform["by_operator"]["conv"] == pytest.approx(plain["by_operator"]["conv"] * 27 / 32)
    assert deform["unsupported_ops"] == {}


def test_split_unsupported_keeps_what_matters_apart():
    matter, trivial = split_unsupported(
        {"aten::mul": 5, "aten::baddbmm": 12, "aten::add": 9, "torchvision::roi_align": 4, "aten::sigmoid": 1}
    )
    assert matter == {"aten::baddbmm": 12, "torchvision::roi_align": 4}
    assert list(trivial) == ["aten::add", "aten::mul", "aten::sigmoid"]


def test_count_flops_leaves_weights_and_gradients_alone(deformable_detr):
    before = {k: v.clone() for k, v in deformable_detr.state_dict().items()}
    count_flops(deformable_detr, fixed_size_input(64, 96))
    assert not deformable_detr.training
    assert all(torch.equal(before[k], v) for k, v in deformable_detr.state_dict().items())
    assert all(p.grad is None for p in deformable_detr.parameters())
    with pytest.raises(ValueError, match="no images"):
        count_flops(deformable_detr, [])


def _smoke_spec(label="MS inputs, K=1"):
    from harness.grid import expand, load_experiment

    experiment = load_experiment("experiments/table2.yaml", smoke=True, rows=[label], check_data=False)
    return expand(experiment)[0]


def test_measure_complexity_over_the_first_evaluation_images(tmp_path):
    spec = _smoke_spec()
    result = measure_complexity(spec.config, images=2, output_dir=str(tmp_path))
    assert result["gflops_images"] == 2 and len(result["gflops_each"]) == 2
    assert result["gflops_input"] == "first 2 val2017 images (synthetic)"
    assert result["params"] > 0 and result["gflops"] > 0
    assert result["device"].startswith("CPU")
    # the synthetic images are all evaluated at one size: same count for each
    assert result["gflops_std"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="not both"):
        measure_complexity(spec.config, images=1, fixed_size=(64, 64))


def test_command_writes_a_measurement_record(tmp_path, capsys):
    """python -m harness.measure measures without training into the row's measurement record (status done, no
    trained checkpoint); a record a trained run's job made is kept unless --force."""
    from harness.store import ResultsStore

    label = "MS inputs, K=1"
    spec = _smoke_spec(label)
    store = ResultsStore(tmp_path)
    store.complete(spec.measure_key, {"fps_bs1": 3.5, "gflops": 1.0, "trained": False})  # FPS is kept
    argv = ["experiments/table2.yaml", "--smoke", "--rows", label, "--fixed-size", "96x128", "--out", str(tmp_path)]
    assert complexity_main(argv) == 0
    assert store.read_status(spec.measure_key).state == "done"
    assert store.read_status(spec.run_id) is None and store.read_metrics(spec.run_id) is None  # no training
    assert not (store.record_dir(spec.run_id) / "benchmark.json").exists()
    record = store.read_metrics(spec.measure_key)
    assert record["fps_bs1"] == 3.5
    assert record["gflops"] > 1.0 and record["gflops_std"] == 0.0
    assert record["gflops_images"] == 1 and record["gflops_input"] == "3x96x128" and record["fixed_size"] == [96, 128]
    assert record["params"] == complexity.count_parameters(build_for_complexity(spec.config.model))
    assert record["label"] == label and record["scale"] == "smoke"
    assert record["trained"] is False and record["checkpoint_sha256"] is None
    assert record["run_id"] == spec.run_id and record["measure_id"] == spec.measure_id
    assert record["benchmark"]["flops_images"] == spec.config.benchmark.flops_images
    assert record["eval_size"] == spec.config.data.eval_size and record["split"] == spec.config.data.val_split
    assert len(record["date"]) == 10 and record["gpu_hours"] is None  # on the CPU: no GPU-hours
    for key in (
        "unsupported_ops",
        "trivial_unsupported_ops",
        "device",
        "torch",
        "date",
        "commit",
        "notes",
        "gflops_by_operator",
        "flop_counter",
    ):
        assert key in record
    assert "not the paper's mean" in record["notes"]
    json.dumps(record)
    assert label in capsys.readouterr().out
    # a trained run's measurement is not replaced by one without training, unless asked
    store.complete(spec.measure_key, {**record, "trained": True, "checkpoint_sha256": "ab" * 32, "gflops": 2.0})
    assert complexity_main(argv) == 0
    assert "kept" in capsys.readouterr().out and store.read_metrics(spec.measure_key)["gflops"] == 2.0
    assert complexity_main(argv + ["--force"]) == 0
    replaced = store.read_metrics(spec.measure_key)
    assert replaced["gflops"] == record["gflops"] and replaced["trained"] is False and "fps_bs1" not in replaced


def test_command_errors(tmp_path, capsys):
    assert (
        complexity_main(
            ["experiments/table2.yaml", "--rows", "no such row", "--fixed-size", "800x1199", "--out", str(tmp_path)]
        )
        == 2
    )
    assert "no such row" in capsys.readouterr().err
    # full scale over evaluation images needs COCO
    assert (
        complexity_main(
            ["experiments/table2.yaml", "--images", "2", "--root", str(tmp_path / "none"), "--out", str(tmp_path)]
        )
        == 2
    )
    assert "--fixed-size" in capsys.readouterr().err
    assert (
        complexity_main(["experiments/table2.yaml", "--dry-run", "--fixed-size", "800x1199", "--out", str(tmp_path)])
        == 0
    )
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        complexity_main(["experiments/table2.yaml", "--fixed-size", "800by1199"])
