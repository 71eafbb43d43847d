"""Behaviour of the model's ablation switches, its contract and its checkpoint loading."""

import pytest
import torch
from builders import tiny_model_fields

from model import ModelConfig, arch_defaults, build_model, load_checkpoint
from model.checkpoint import CheckpointError
from model.config import ConfigError

TINY = tiny_model_fields(
    nheads=4, enc_layers=2, num_classes=8, dropout=0.0, num_feature_levels=4, enc_n_points=4, dec_n_points=4
)


def tiny_config(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def _batch(h=64, w=96):
    torch.manual_seed(0)
    images = torch.randn(2, 3, h, w)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[1, :, w - 32 :] = True  # second image is narrower
    targets = [
        {"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2]])},
        {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.5]])},
    ]
    return images, mask, targets


def _train_step(cfg, size=(64, 96)):
    model, criterion, postprocess = build_model(cfg)
    images, mask, targets = _batch(*size)
    model.train()
    if getattr(model, "needs_targets", False):
        outputs = model(images, mask, targets=targets)
    else:
        outputs = model(images, mask)
    losses = criterion(outputs, targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    total.backward()
    assert torch.isfinite(total)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    model.eval()
    with torch.no_grad():
        results = postprocess(model(images, mask), torch.tensor([[480, 640], [300, 300]]))
    assert len(results) == 2
    for r in results:
        assert r["boxes"].shape[-1] == 4 and r["scores"].shape == r["labels"].shape
        assert len(r["scores"]) <= 100
    return model, outputs


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_feature_levels": 1},
        {"ms_attention": False},
        {"ms_attention": False, "num_feature_levels": 1, "enc_n_points": 1, "dec_n_points": 1},
        {"neck": "fpn"},
        {"neck": "bifpn"},
        {"with_box_refine": True},
        {"with_box_refine": True, "two_stage": True},
        {"dcn": True, "num_feature_levels": 1},
        {"dilation": True, "num_feature_levels": 1},
    ],
    ids=repr,
)
def test_deformable_variants_train_and_detect(overrides):
    _, outputs = _train_step(ModelConfig(**{**TINY, **overrides}))
    assert outputs["pred_logits"].shape == (2, 10, 8)
    assert len(outputs["aux_outputs"]) == 1


@pytest.mark.parametrize("backbone", ["resnet101", "resnext101_32x8d", "resnext101_64x4d"])
def test_other_backbones_build_and_run(backbone):
    _train_step(ModelConfig(**{**TINY, "backbone": backbone, "num_feature_levels": 2, "dcn": True}), size=(32, 64))


@pytest.mark.parametrize("overrides", [{}, {"dilation": True}, {"focal_loss": True, "num_queries": 12}], ids=repr)
def test_detr_variants(overrides):
    cfg = ModelConfig(
        **{**TINY, **arch_defaults("detr"), "dim_feedforward": 64, "num_queries": 10, "attn_impl": "auto", **overrides}
    )
    _, outputs = _train_step(cfg)
    extra = 0 if cfg.focal_loss else 1
    assert outputs["pred_logits"].shape == (2, cfg.num_queries, 8 + extra)


def test_faster_rcnn_contract():
    _train_step(ModelConfig(**{**TINY, **arch_defaults("faster_rcnn"), "attn_impl": "auto"}))


def test_encoder_without_ms_attention_keeps_levels_apart():
    """With ms_attention off an encoder query's output does not depend on other levels' values."""
    model, _, _ = build_model(tiny_config(ms_attention=False))
    layer = model.transformer.encoder.layers[0]
    shapes = torch.tensor([[6, 8], [3, 4], [2, 2], [1, 1]])
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    S = int(shapes.prod(1).sum())
    src = torch.randn(1, S, 32, requires_grad=True)
    ref = torch.rand(1, S, 4, 2)
    out = layer.attend(src, ref, src, shapes, start, None)
    out[0, 50].sum().backward()  # a query of level 1 (tokens 48..59)
    grad_per_token = src.grad[0].abs().sum(-1)
    assert grad_per_token[48:60].sum() > 0
    assert grad_per_token[:48].sum() == 0 and grad_per_token[60:].sum() == 0
    # with ms_attention on, the same query reads every level
    model_ms, _, _ = build_model(tiny_config())
    src.grad = None
    out = model_ms.transformer.encoder.layers[0].attend(src, ref, src, shapes, start, None)
    out[0, 50].sum().backward()
    assert src.grad[0, :48].abs().sum() > 0


def test_decoder_without_ms_attention_normalises_each_level(monkeypatch):
    model, _, _ = build_model(tiny_config(ms_attention=False))
    attn = model.transformer.decoder.layers[0].cross_attn
    assert attn.per_level_softmax and attn.n_levels == 4
    captured = {}
    import model.ms_deform_attn as module

    original = module.ms_deform_attn

    def spy(value, shapes, start, locations, weights, impl):
        captured["weights"] = weights
        return original(value, shapes, start, locations, weights, impl=impl)

    monkeypatch.setattr(module, "ms_deform_attn", spy)
    images, mask, _ = _batch()
    model.eval()
    with torch.no_grad():
        model(images, mask)
    per_level = captured["weights"].sum(-1)  # N x Lq x M x L
    assert torch.allclose(per_level, torch.full_like(per_level, 0.25))


def test_two_levels_use_c4_and_c5():
    model, _, _ = build_model(tiny_config(num_feature_levels=2))
    assert model.backbone[0].num_channels == [1024, 2048] and model.backbone[0].strides == [16, 32]
    images, mask, targets = _batch()
    model.train()
    _, criterion, _ = build_model(tiny_config(num_feature_levels=2))
    losses = criterion(model(images, mask), targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
    # every trainable parameter takes part (DDP needs it)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_single_scale_uses_c5_only():
    model, _, _ = build_model(tiny_config(num_feature_levels=1))
    assert model.backbone[0].num_channels == [2048] and model.backbone[0].strides == [32]
    assert len(model.input_proj) == 1


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"two_stage": True}, "two_stage"),
        ({"enc_n_points": 0}, "enc_n_points"),
        ({"dec_n_points": 0}, "dec_n_points"),
        ({"backbone": "resnet18"}, "backbone"),
        ({"neck": "fpn", "num_feature_levels": 1}, "neck"),
        ({"arch": "detr", "with_box_refine": True}, "with_box_refine"),
        ({"nheads": 7}, "nheads"),
        ({"dropout": 1.5}, "dropout"),
        ({"aux_loss": "yes"}, "aux_loss"),
    ],
)
def test_impossible_configs_name_the_field(overrides, key):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**overrides)
    assert err.value.key == key and key in str(err.value)


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model, _, _ = build_model(tiny_config())
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    fresh, _, _ = build_model(tiny_config())
    load_checkpoint(str(path), fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])

    two_stage, _, _ = build_model(tiny_config(with_box_refine=True, two_stage=True))
    torch.save({"model": two_stage.state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(path), fresh)
    message = str(err.value)
    assert "transformer.enc_output.weight" in message and "two_stage: true" in message
    assert "transformer.reference_points.weight" in message

    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(str(path), fresh)


def test_one_list_of_attention_implementations():
    """The config's choices are exactly the implementations the dispatcher has (plus auto)."""
    from model import ops
    from model.config import ATTN_IMPLS

    assert set(ATTN_IMPLS) == set(ops.IMPLEMENTATIONS)
