"""The model reproduces the official implementation: keys, shapes, parameter counts and outputs."""

import json
from pathlib import Path

import pytest
import torch
from golden import apply_deterministic_weights

from model import ModelConfig, arch_defaults, build_model
from model.build import count_parameters

FIXTURES = Path(__file__).parent / "fixtures"

OFFICIAL = {
    "deformable_detr": {},
    "single_scale": {"num_feature_levels": 1},
    "single_scale_dc5": {"num_feature_levels": 1, "dilation": True},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
}
DETR = {"detr": {}, "detr_dc5": {"dilation": True}}


@pytest.fixture(scope="module")
def golden():
    return torch.load(FIXTURES / "official_golden.pt", weights_only=False)


def _max_rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_keys_shapes_and_parameter_count(name):
    ref = json.loads((FIXTURES / "official_state_dicts.json").read_text())[name]
    model, _, _ = build_model(ModelConfig(pretrained_backbone=False, **OFFICIAL[name]))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == ref["state_dict"]
    assert count_parameters(model) == ref["num_parameters"]


@pytest.mark.parametrize("name", DETR)
def test_detr_keys_shapes_and_parameter_count(name):
    ref = json.loads((FIXTURES / "detr_state_dicts.json").read_text())[name]
    model, _, _ = build_model(ModelConfig(pretrained_backbone=False, **arch_defaults("detr"), **DETR[name]))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["state_dict"]
    assert count_parameters(model) == ref["num_parameters"] == 41_524_768


def test_faster_rcnn_parameter_count():
    model, _, _ = build_model(ModelConfig(pretrained_backbone=False, **arch_defaults("faster_rcnn")))
    assert count_parameters(model) == 41_808_406


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_outputs_losses_and_detections(name, golden):
    torch.manual_seed(0)
    model, criterion, postprocess = build_model(
        ModelConfig(pretrained_backbone=False, attn_impl="pytorch", **OFFICIAL[name])
    )
    apply_deterministic_weights(model)
    inputs, expected = golden["inputs"], golden[name]
    with torch.no_grad():
        out = model(inputs["padded"], inputs["mask"])
        losses = criterion(out, inputs["targets"])
        detections = postprocess(out, inputs["orig_target_sizes"])

    tol = 1e-4
    pairs = [(out, expected["outputs"])] + list(zip(out["aux_outputs"], expected["outputs"]["aux_outputs"]))
    assert len(out["aux_outputs"]) == len(expected["outputs"]["aux_outputs"]) == 5
    if "enc_outputs" in expected["outputs"]:
        pairs.append((out["enc_outputs"], expected["outputs"]["enc_outputs"]))
    else:
        assert "enc_outputs" not in out
    for ours, theirs in pairs:
        for key in ("pred_logits", "pred_boxes"):
            assert ours[key].shape == theirs[key].shape
            assert _max_rel_err(ours[key], theirs[key]) <= tol, key

    weighted = {k: v.item() * criterion.weight_dict[k] for k, v in losses.items() if k in criterion.weight_dict}
    assert set(weighted) == set(expected["losses_weighted"])
    for key, value in expected["losses_weighted"].items():
        assert weighted[key] == pytest.approx(value, rel=tol), key
    assert sum(weighted.values()) == pytest.approx(expected["loss_total"], rel=tol)

    for ours, theirs in zip(detections, expected["postprocess"]):
        assert torch.equal(ours["labels"], theirs["labels"])
        assert _max_rel_err(ours["scores"], theirs["scores"]) <= tol
        assert _max_rel_err(ours["boxes"], theirs["boxes"]) <= tol
