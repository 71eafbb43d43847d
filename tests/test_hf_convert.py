"""Hugging Face transformers <-> ours (model/hf_convert.py), checked against transformers itself.

The transformers models are built from the hub models' configurations, written out here (no download),
with seeded random weights (every tensor, BatchNorm statistics included, so a misplaced key changes the
outputs); converted to ours, both models see the same padded batch of two images of different sizes.
The reverse conversion is loaded strictly by a transformers model built from our configuration dict.

The comparisons need transformers and timm (``pip install '.[hf]'``); they are skipped, saying so, where
these are not installed. The converter's own checks (strictness, key layouts, configurations) need neither.
"""

import dataclasses
import functools
import importlib.util

import pytest
import torch

from model import ModelConfig, build_model
from model.hf_convert import (
    HFConversionError,
    config_from_hf,
    from_hf,
    from_hf_folder,
    hf_config,
    hf_config_dict,
    save_hf_folder,
    to_hf,
)

HAVE_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "timm", "safetensors"))
needs_hf = pytest.mark.skipif(
    not HAVE_HF,
    reason="transformers, timm and safetensors are not installed "
    "(pip install '.[hf]'): the comparison with transformers is skipped",
)

# ------------------------------------------------------------------- the hub models' configurations
# SenseTime/deformable-detr*: the official Deformable DETR settings (main.py defaults), timm ResNet-50
DEFORMABLE = dict(
    use_timm_backbone=True,
    backbone="resnet50",
    dilation=False,
    num_labels=91,
    d_model=256,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    encoder_ffn_dim=1024,
    decoder_ffn_dim=1024,
    dropout=0.1,
    num_queries=300,
    num_feature_levels=4,
    encoder_n_points=4,
    decoder_n_points=4,
    position_embedding_type="sine",
    two_stage=False,
    with_box_refine=False,
    two_stage_num_proposals=300,
)
# facebook/detr-resnet-50 (-dc5): the official DETR settings
DETR = dict(
    use_timm_backbone=True,
    backbone="resnet50",
    dilation=False,
    num_labels=91,
    d_model=256,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    encoder_ffn_dim=2048,
    decoder_ffn_dim=2048,
    dropout=0.1,
    num_queries=100,
    position_embedding_type="sine",
)
# transformers 5 ties every decoder layer's heads to layer 0's unless tie_word_embeddings is false; the hub's
# refinement models hold a head per layer, and tying would make the per-layer heads equal (a weaker test)
VARIANTS = {
    "deformable-detr": ("deformable_detr", dict(DEFORMABLE)),
    "with-box-refine": ("deformable_detr", dict(DEFORMABLE, with_box_refine=True, tie_word_embeddings=False)),
    "with-box-refine-two-stage": (
        "deformable_detr",
        dict(DEFORMABLE, with_box_refine=True, two_stage=True, tie_word_embeddings=False),
    ),
    "single-scale": ("deformable_detr", dict(DEFORMABLE, num_feature_levels=1)),
    "detr-resnet-50": ("detr", dict(DETR)),
    "detr-resnet-50-dc5": ("detr", dict(DETR, dilation=True)),
    # the Hugging Face ResNet instead of timm's (use_timm_backbone: false)
    "deformable-detr, HF ResNet": ("deformable_detr", dict(DEFORMABLE, use_timm_backbone=False, backbone=None)),
    "detr-resnet-50, HF ResNet": ("detr", dict(DETR, use_timm_backbone=False, backbone=None)),
}
EXPECTED = {  # our configuration of each
    "deformable-detr": ModelConfig(pretrained_backbone=False),
    "with-box-refine": ModelConfig(pretrained_backbone=False, with_box_refine=True),
    "with-box-refine-two-stage": ModelConfig(pretrained_backbone=False, with_box_refine=True, two_stage=True),
    "single-scale": ModelConfig(pretrained_backbone=False, num_feature_levels=1),
    "detr-resnet-50": ModelConfig.for_arch("detr", pretrained_backbone=False),
    "detr-resnet-50-dc5": ModelConfig.for_arch("detr", pretrained_backbone=False, dilation=True),
    "deformable-detr, HF ResNet": ModelConfig(pretrained_backbone=False),
    "detr-resnet-50, HF ResNet": ModelConfig.for_arch("detr", pretrained_backbone=False),
}


# the settings of transformers' configurations that the forward pass reads
FORWARD_FIELDS = {
    "deformable_detr": (
        "backbone_config",
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "num_queries",
        "num_feature_levels",
        "encoder_n_points",
        "decoder_n_points",
        "two_stage",
        "with_box_refine",
        "two_stage_num_proposals",
        "position_embedding_type",
        "activation_function",
        "return_intermediate",
        "dilation",
    ),
    "detr": (
        "backbone_config",
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "num_queries",
        "position_embedding_type",
        "activation_function",
        "dilation",
        "auxiliary_loss",
    ),
}


def _hf_config(arch, fields):
    import transformers

    fields = dict(fields)
    if not fields["use_timm_backbone"]:
        stages = (
            ["stage4"] if arch == "detr" or fields.get("num_feature_levels") == 1 else ["stage2", "stage3", "stage4"]
        )
        fields["backbone_config"] = transformers.ResNetConfig(out_features=stages)
    cls = transformers.DeformableDetrConfig if arch == "deformable_detr" else transformers.DetrConfig
    return cls(**fields)


def _hf_class(arch):
    import transformers

    return (
        transformers.DeformableDetrForObjectDetection
        if arch == "deformable_detr"
        else transformers.DetrForObjectDetection
    )


def _randomise(model, seed=0):
    """Seeded random values for every tensor: weights ~ N(0, 1/fan_in), biases and BatchNorm/LayerNorm terms
    around their usual values, running variances in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            elif name.endswith("weight"):  # BatchNorm, LayerNorm, GroupNorm scales
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def _batch(h=128, w=160):
    """Two images padded into one batch: the second 96 x 120 (bottom and right padding, zeros)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, h, w, generator=g)
    padding = torch.zeros(2, h, w, dtype=torch.bool)
    padding[1, 96:, :] = True
    padding[1, :, 120:] = True
    images[1][:, padding[1]] = 0
    return images, padding


@functools.lru_cache(maxsize=1)
def _converted(variant):
    """(transformers model with random weights, its outputs on the batch, our config, our state dict)."""
    arch, fields = VARIANTS[variant]
    hf = _hf_class(arch)(_hf_config(arch, fields)).eval()
    _randomise(hf)
    if arch == "deformable_detr":
        # the official model shares these heads; transformers 5 holds copies: make them one again
        if fields["with_box_refine"]:
            hf.model.decoder.bbox_embed.load_state_dict(hf.bbox_embed.state_dict())
        if fields["two_stage"]:
            hf.model.decoder.class_embed.load_state_dict(hf.class_embed.state_dict())
    images, padding = _batch()
    with torch.no_grad():
        out = hf(pixel_values=images, pixel_mask=(~padding).long())
    cfg, state = from_hf(hf.state_dict(), hf.config)
    return hf, (out.logits, out.pred_boxes), cfg, state


def _ours(cfg, state):
    if cfg.arch == "deformable_detr":
        cfg = dataclasses.replace(cfg, attn_impl="pytorch")  # the reference op, as transformers' on a CPU
    model = build_model(cfg)[0].eval()
    model.load_state_dict(state, strict=True)
    images, padding = _batch()
    with torch.no_grad():
        out = model(images, padding)
    return out["pred_logits"], out["pred_boxes"]


def _assert_close(ours, theirs):
    (logits, boxes), (their_logits, their_boxes) = ours, theirs
    assert logits.shape == their_logits.shape and boxes.shape == their_boxes.shape
    torch.testing.assert_close(logits, their_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, their_boxes, atol=1e-4, rtol=0)
    # the outputs are not degenerate: scores and boxes vary across queries and images
    assert their_logits.std() > 0.1 and their_boxes.std() > 0.02
    assert (their_logits[0] - their_logits[1]).abs().max() > 1e-2


# --------------------------------------------------------------------------- against transformers


@needs_hf
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_both_directions_match_transformers(variant):
    """transformers -> ours: the same logits and boxes as transformers. Ours -> transformers: a transformers
    model built from our configuration dict loads the state dict strictly and holds exactly the original
    weights (nothing silently tied) with the original's settings of the forward pass; with two-stage (the
    trickiest: tied heads, proposals) and DC5 it runs too and gives the same outputs."""
    hf, outputs, cfg, state = _converted(variant)
    assert cfg == EXPECTED[variant]
    _assert_close(_ours(cfg, state), outputs)

    layout = "hf" if "HF ResNet" in variant else "timm"
    config, hf_state = to_hf(cfg, state, backbone_layout=layout)
    assert config_from_hf(config) == (cfg, layout)
    fresh = _hf_class(cfg.arch)(hf_config(config)).eval()
    fresh.load_state_dict(hf_state, strict=True)
    loaded, original = fresh.state_dict(), hf.state_dict()
    assert set(loaded) == set(original) == set(hf_state)
    for k, v in original.items():
        assert torch.equal(loaded[k], v), k
    theirs, ours = hf.config.to_dict(), fresh.config.to_dict()
    for field in FORWARD_FIELDS[cfg.arch]:
        assert ours.get(field) == theirs.get(field), field
    assert fresh.config.num_labels == hf.config.num_labels
    if variant in ("with-box-refine-two-stage", "detr-resnet-50-dc5"):
        images, padding = _batch()
        with torch.no_grad():
            out = fresh(pixel_values=images, pixel_mask=(~padding).long())
        _assert_close(outputs, (out.logits, out.pred_boxes))


@needs_hf
def test_folders_both_ways(tmp_path):
    """A folder written by transformers (save_pretrained, deduplicated shared heads) reads back as the same
    model; a folder we write (4.x keys, as on the hub) is read by from_pretrained without a missing or
    unexpected key and gives the same outputs."""
    hf, outputs, cfg, state = _converted("with-box-refine-two-stage")
    hf.save_pretrained(tmp_path / "theirs")
    cfg2, state2 = from_hf_folder(str(tmp_path / "theirs"))
    assert cfg2 == cfg and set(state2) == set(state)
    assert all(torch.equal(state2[k], state[k]) for k in state)

    save_hf_folder(cfg, state, str(tmp_path / "ours"))
    loaded, info = _hf_class(cfg.arch).from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    images, padding = _batch()
    with torch.no_grad():
        out = loaded.eval()(pixel_values=images, pixel_mask=(~padding).long())
    _assert_close(outputs, (out.logits, out.pred_boxes))


# ------------------------------------------------------------------ the converter's own checks
# A small model of ours, converted with to_hf, stands in for a transformers state dict: no transformers needed.
SMALL = dict(
    pretrained_backbone=False,
    hidden_dim=64,
    dim_feedforward=64,
    nheads=4,
    enc_layers=1,
    dec_layers=2,
    num_queries=10,
    num_classes=8,
    dropout=0.0,
)


def _small(**fields):
    cfg = (
        ModelConfig(**{**SMALL, **fields})
        if fields.get("arch", "deformable_detr") == "deformable_detr"
        else ModelConfig.for_arch(**{**SMALL, "num_queries": 10, **fields})
    )
    torch.manual_seed(0)
    model = build_model(cfg)[0]
    return cfg, model.state_dict()


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"with_box_refine": True},
        {"with_box_refine": True, "two_stage": True},
        {"num_feature_levels": 1},
        {"arch": "detr"},
        {"arch": "detr", "dilation": True},
        {"arch": "detr", "position_embedding": "learned"},
    ],
    ids=repr,
)
@pytest.mark.parametrize("key_format", ["v4", "v5"])
def test_round_trip_through_both_key_layouts(fields, key_format):
    cfg, state = _small(**fields)
    config, hf_state = to_hf(cfg, state, key_format=key_format)
    if key_format == "v4":
        assert any(".conv_encoder." in k for k in hf_state) and not any(".mlp.fc1." in k for k in hf_state)
    else:
        assert not any(".conv_encoder." in k or ".out_proj." in k for k in hf_state)
    cfg2, state2 = from_hf(hf_state, config)
    assert cfg2 == cfg and list(state2) == list(state)
    assert all(torch.equal(state2[k], state[k]) for k in state)


def test_hf_resnet_layout_round_trip():
    cfg, state = _small()
    config, hf_state = to_hf(cfg, state, key_format="v5", backbone_layout="hf")
    assert "model.backbone.model.encoder.stages.3.layers.0.shortcut.convolution.weight" in hf_state
    assert "model.backbone.model.embedder.embedder.normalization.running_var" in hf_state
    cfg2, state2 = from_hf(hf_state, config)
    assert cfg2 == cfg and all(torch.equal(state2[k], state[k]) for k in state)


def test_an_unexpected_key_is_an_error_naming_it():
    cfg, state = _small()
    config, hf_state = to_hf(cfg, state, key_format="v5")
    # a key no rule knows
    hf_state["model.encoder.layers.0.self_attn.sampling_offsets.scale"] = torch.zeros(1)
    with pytest.raises(HFConversionError, match=r"does not expect .*sampling_offsets\.scale"):
        from_hf(hf_state, config)
    del hf_state["model.encoder.layers.0.self_attn.sampling_offsets.scale"]
    # a known kind of key that this configuration has no place for (a second encoder layer)
    hf_state["model.encoder.layers.1.self_attn.value_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(
        HFConversionError,
        match=r"1 unexpected keys: model\.encoder\.layers\.1\.self_attn\."
        r"value_proj\.weight",
    ):
        from_hf(hf_state, config)


def test_a_missing_key_is_an_error_naming_it():
    cfg, state = _small(arch="detr")
    config, hf_state = to_hf(cfg, state, key_format="v4")
    del hf_state["model.decoder.layernorm.bias"]
    with pytest.raises(HFConversionError, match=r"missing keys: model\.decoder\.layernorm\.bias"):
        from_hf(hf_state, config)
    config, hf_state = to_hf(cfg, state, key_format="v5")
    del hf_state["model.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(HFConversionError, match=r"missing keys: model\.encoder\.layers\.0\.self_attn\.k_proj\.weight"):
        from_hf(hf_state, config)
    config, hf_state = to_hf(cfg, state, key_format="v5")
    hf_state["model.input_projection.weight"] = hf_state["model.input_projection.weight"][:, :16]
    with pytest.raises(HFConversionError, match=r"shape of model\.input_projection\.weight"):
        from_hf(hf_state, config)


def test_shared_heads_one_copy_enough_unequal_copies_an_error():
    cfg, state = _small()
    config, hf_state = to_hf(cfg, state, key_format="v4")
    # transformers saves one copy of tied tensors: the others are filled in from it
    for k in [k for k in hf_state if k.startswith(("class_embed.", "bbox_embed.")) and not k.split(".")[1] == "0"]:
        del hf_state[k]
    _, state2 = from_hf(hf_state, config)
    assert torch.equal(state2["class_embed.1.weight"], state["class_embed.0.weight"])
    # copies that differ: the official model (without refinement) has one head, not one per layer
    _, hf_state = to_hf(cfg, state, key_format="v4")
    hf_state["class_embed.1.bias"] = hf_state["class_embed.1.bias"] + 1
    with pytest.raises(HFConversionError, match=r"class_embed\.1\.bias differs from class_embed\.0\.bias"):
        from_hf(hf_state, config)
    # nor may the refinement heads under the decoder differ from the prediction heads
    cfg, state = _small(with_box_refine=True)
    config, hf_state = to_hf(cfg, state, key_format="v5")
    hf_state["model.decoder.bbox_embed.1.layers.2.bias"] = hf_state["model.decoder.bbox_embed.1.layers.2.bias"] + 1
    with pytest.raises(
        HFConversionError,
        match=r"bbox_embed\.1\.layers\.2\.bias differs from "
        r"model\.decoder\.bbox_embed\.1\.layers\.2\.bias",
    ):
        from_hf(hf_state, config)


def test_batchnorm_step_counters_are_dropped():
    cfg, state = _small()
    config, hf_state = to_hf(cfg, state, key_format="v4")
    hf_state["model.backbone.conv_encoder.model.layer1.0.downsample.1.num_batches_tracked"] = torch.tensor(0)
    _, state2 = from_hf(hf_state, config)
    assert set(state2) == set(state)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"dcn": True, "num_feature_levels": 1}, "dcn"),
        ({"neck": "fpn"}, "neck 'fpn'"),
        ({"ms_attention": False}, "ms_attention"),
        ({"num_feature_levels": 2}, "num_feature_levels 2"),
        ({"arch": "detr", "pre_norm": True}, "pre_norm"),
        ({"arch": "detr", "focal_loss": True}, "focal_loss"),
    ],
    ids=repr,
)
def test_what_transformers_cannot_express_is_an_error(fields, words):
    cfg = ModelConfig(**{**SMALL, **fields}) if "arch" not in fields else ModelConfig.for_arch(**{**SMALL, **fields})
    with pytest.raises(HFConversionError, match=words):
        hf_config_dict(cfg)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_feature_levels": 2}, "num_feature_levels 2"),
        ({"encoder_ffn_dim": 2048}, "encoder_ffn_dim 2048 and decoder_ffn_dim 1024 differ"),
        ({"activation_function": "gelu"}, "activation_function 'gelu'"),
        ({"model_type": "conditional_detr"}, "model_type 'conditional_detr'"),
        ({"backbone": "resnet18"}, "backbone 'resnet18'"),
        ({"model_type": "detr", "auxiliary_loss": True}, "auxiliary_loss true"),
        (
            {
                "backbone_config": {
                    "model_type": "resnet",
                    "depths": [3, 4, 6, 3],
                    "downsample_in_bottleneck": True,
                    "out_features": ["stage2", "stage3", "stage4"],
                }
            },
            "downsample_in_bottleneck True",
        ),
        (
            {"backbone_config": {"model_type": "timm_backbone", "backbone": "resnet50", "out_indices": [1, 2, 3, 4]}},
            "out_indices",
        ),
    ],
    ids=repr,
)
def test_transformers_configs_we_cannot_express_are_errors(change, words):
    config = {**hf_config_dict(ModelConfig(pretrained_backbone=False)), **change}
    with pytest.raises(HFConversionError, match=words):
        config_from_hf(config)


def test_hub_style_config_json():
    """A 4.x config.json as the hub's (use_timm_backbone, backbone, id2label; no backbone_config)."""
    config = {
        "model_type": "deformable_detr",
        "use_timm_backbone": True,
        "backbone": "resnet50",
        "use_pretrained_backbone": True,
        "dilation": False,
        "id2label": {str(i): f"c{i}" for i in range(91)},
        "d_model": 256,
        "encoder_layers": 6,
        "decoder_layers": 6,
        "encoder_attention_heads": 8,
        "decoder_attention_heads": 8,
        "encoder_ffn_dim": 1024,
        "decoder_ffn_dim": 1024,
        "dropout": 0.1,
        "num_queries": 300,
        "num_feature_levels": 4,
        "encoder_n_points": 4,
        "decoder_n_points": 4,
        "two_stage": True,
        "with_box_refine": True,
        "two_stage_num_proposals": 300,
        "class_cost": 1,
        "activation_function": "relu",
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "auxiliary_loss": False,
    }
    cfg, layout = config_from_hf(config)
    assert layout == "timm"
    # matcher costs and loss weights stay the official ones (transformers' class_cost is 1, the official 2)
    assert cfg == ModelConfig(pretrained_backbone=False, with_box_refine=True, two_stage=True)


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="safetensors is not installed")
def test_a_folder_is_a_checkpoint_a_row_can_name(tmp_path):
    """eval.checkpoint may name a transformers folder: it loads strictly as ours, and it enters the run id by the
    content of its files (another file in it is another id)."""
    from harness.grid.identity import file_digest
    from model.checkpoint import CheckpointError, load_checkpoint

    cfg, state = _small(with_box_refine=True)
    folder = tmp_path / "hub-download"
    save_hf_folder(cfg, state, str(folder))
    model = build_model(cfg)[0]
    load_checkpoint(str(folder), model)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    with pytest.raises(CheckpointError, match="does not match the configured model"):
        load_checkpoint(str(folder), build_model(ModelConfig(**SMALL))[0])  # no box refinement
    before = file_digest(str(folder))
    (folder / "README.md").write_text("a model card")
    assert file_digest(str(folder)) != before
