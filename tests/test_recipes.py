"""Training recipes: every row of Tables 1-3 resolves to its paper's recipe, and the optimiser, schedule,
loaders and initialisations that carry it out do what the recipe says."""

import dataclasses
import hashlib
import math
import os
from pathlib import Path

import pytest
import torch
import torchvision
from builders import tiny_model_config, tiny_run_config

from harness.config import ConfigError, EvalConfig, RunConfig, TrainConfig
from harness.grid import expand, load_experiment
from harness.grid.schema import ExperimentError
from harness.grid.validate import check_run_config
from harness.run import checkpointing, engine, loaders
from harness.run.optim import batch_scale, build_optimizer, build_scheduler, lr_factor, warmup_steps
from model import ModelConfig, build_model
from model.config import BACKBONE_WEIGHTS, arch_defaults

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
COCO_TRAIN_IMAGES = 118_287


def rows(table: int):
    exp = load_experiment(EXPERIMENTS / f"table{table}.yaml", check_data=False)
    return {spec.label: spec.config for spec in expand(exp)}


# ------------------------------------------------------------------------------ rows -> published recipes

DEFORMABLE_DETR = dict(
    optimizer="adamw",
    lr=2e-4,
    lr_backbone=2e-5,
    lr_linear_proj_mult=0.1,
    weight_decay=1e-4,
    lr_schedule="step",
    lr_drop=40,
    epochs=50,
    clip_max_norm=0.1,
    warmup_iters=0,
    batch_size_per_gpu=2,
    total_batch_size=32,
    lr_reference_batch=None,
)


def assert_recipe(cfg: RunConfig, **expected):
    got = {k: getattr(cfg.train, k) for k in expected}
    assert got == pytest.approx(expected) if all(isinstance(v, float) for v in expected.values()) else got == expected


def test_deformable_detr_rows_train_with_the_official_recipe():
    """Every Deformable DETR row of the three tables: the official main.py defaults, evaluated per GPU as
    trained, with the official augmentation."""
    configs = [cfg for t in (1, 2, 3) for cfg in rows(t).values() if cfg.model.arch == "deformable_detr"]
    assert len(configs) == 3 + 6 + 5
    for cfg in configs:
        assert_recipe(cfg, **DEFORMABLE_DETR)
        assert cfg.data.augmentation == "official" and cfg.eval.batch_size_per_gpu is None
        assert loaders.eval_batch_size(cfg) == 2


def test_faster_rcnn_row_trains_with_detectron2s_recipe():
    cfg = rows(1)["Faster R-CNN + FPN"]
    assert cfg.model.arch == "faster_rcnn"
    assert_recipe(
        cfg,
        optimizer="sgd",
        momentum=0.9,
        lr=0.02,
        lr_backbone=0.02,
        weight_decay=1e-4,
        clip_max_norm=0.0,
        lr_schedule="multistep",
        lr_milestones=(101, 107),
        epochs=109,
        warmup_iters=1000,
        warmup_factor=0.001,
        batch_size_per_gpu=2,
        total_batch_size=16,
        lr_reference_batch=16,
    )
    assert cfg.data.augmentation == "official"  # DETR's random crop
    assert cfg.launcher.nodes * cfg.launcher.gpus_per_node * cfg.train.batch_size_per_gpu == 16
    assert batch_scale(cfg.train) == 1.0


def test_faster_rcnn_9x_drops_for_the_last_60k_and_20k_iterations():
    """9x = 9 x Detectron2's 90k iterations at batch 16; the lr drops for the last 60k and the last 20k
    ("Rethinking ImageNet Pre-training"; Detectron2's configs/Misc/scratch_mask_rcnn_R_50_FPN_9x_gn.yaml:
    STEPS (187500, 197500) of 202500 at batch 64). Drops fall on epoch starts: the nearest ones."""
    cfg = rows(1)["Faster R-CNN + FPN"]
    steps = COCO_TRAIN_IMAGES / 16  # 7,392.9 iterations an epoch
    total = 9 * 90_000
    assert abs(cfg.train.epochs * steps - total) < steps
    for epoch, iteration in zip(cfg.train.lr_milestones, (total - 60_000, total - 20_000)):
        assert epoch == round(iteration / steps)  # 101.4 -> 101, 106.9 -> 107
    # Detectron2's 9x config at batch 64 is the same schedule in images
    assert (187_500 * 64, 197_500 * 64, 202_500 * 64) == ((total - 60_000) * 16, (total - 20_000) * 16, total * 16)
    # the schedule as the optimiser sees it: lr 0.02 until epoch 101, 0.002 until 107, then 0.0002
    factor = lr_factor(cfg.train, steps_per_epoch=7392)
    assert [factor(e * 7392) for e in (100, 101, 106, 107, 108)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])


def test_faster_rcnn_giou_is_detectron2s_giou_config():
    """configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_giou.yaml: GIoU in the box head (weight 10)
    and in the RPN (weight 2); the criterion carries the weights."""
    cfg = rows(1)["Faster R-CNN + FPN"].model
    assert (cfg.rcnn_box_loss, cfg.rcnn_box_loss_weight, cfg.rpn_box_loss, cfg.rpn_box_loss_weight) == (
        "giou",
        10.0,
        "giou",
        2.0,
    )
    from model.faster_rcnn import GIoURoIHeads, GIoURPN

    model, criterion, _ = build_model(dataclasses.replace(cfg, pretrained_backbone=False))
    assert isinstance(model.detector.rpn, GIoURPN) and isinstance(model.detector.roi_heads, GIoURoIHeads)
    assert criterion.weight_dict == {
        "loss_objectness": 1.0,
        "loss_rpn_box_reg": 2.0,
        "loss_classifier": 1.0,
        "loss_box_reg": 10.0,
    }
    plain, plain_criterion, _ = build_model(
        ModelConfig(**{**arch_defaults("faster_rcnn"), "pretrained_backbone": False})
    )
    assert set(plain_criterion.weight_dict.values()) == {1.0}
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_giou_rpn_loss_is_giou_of_decoded_anchors_and_keeps_torchvisions_objectness():
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from torchvision.ops import generalized_box_iou_loss

    from model.faster_rcnn import GIoURPN

    model, _, _ = build_model(ModelConfig(**{**arch_defaults("faster_rcnn"), "pretrained_backbone": False}))
    rpn = model.detector.rpn
    giou_rpn = GIoURPN.from_rpn(rpn)
    assert type(rpn) is RegionProposalNetwork and giou_rpn.head is rpn.head
    assert giou_rpn.state_dict().keys() == rpn.state_dict().keys()
    torch.manual_seed(0)
    n = 600
    xy = torch.rand(n, 2) * 200
    anchors = torch.cat([xy, xy + 16 + torch.rand(n, 2) * 100], dim=1)
    gt = anchors + torch.randn(n, 4) * 6
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 2)
    targets = rpn.box_coder.encode_single(gt, anchors)
    deltas = targets + torch.randn(n, 4) * 0.2
    labels = (torch.rand(n) < 0.3).float()
    labels[torch.rand(n) < 0.1] = -1.0  # ignored anchors
    objectness = torch.randn(n, 1)
    torch.manual_seed(1)
    theirs_obj, _ = rpn.compute_loss(objectness, deltas, [labels], [targets])
    torch.manual_seed(1)  # the same sampled anchors
    sampled_pos, sampled_neg = rpn.fg_bg_sampler([labels])
    torch.manual_seed(1)
    ours_obj, ours_box = giou_rpn.compute_loss(objectness, deltas, [labels], [targets])
    assert ours_obj == theirs_obj
    pos = torch.where(sampled_pos[0])[0]
    numel = int(sampled_pos[0].sum() + sampled_neg[0].sum())
    expected = (
        generalized_box_iou_loss(rpn.box_coder.decode_single(deltas[pos], anchors[pos]), gt[pos], reduction="sum")
        / numel
    )
    assert ours_box.item() == pytest.approx(expected.item(), rel=1e-4)


def test_detr_rows_train_with_detrs_recipe():
    """The 500-epoch rows: DETR's own recipe (lr 1e-4, backbone 1e-5, total 64). The 50-epoch DC5 rows: the
    Deformable DETR paper's one stated 50-epoch recipe (lr 2e-4, backbone 2e-5, drop at 40, total 32)."""
    table = rows(1)
    for label in ("DETR", "DETR-DC5 (500 epochs)", "DETR-DC5 (50 epochs)", "DETR-DC5+"):
        cfg = table[label]
        dc5 = cfg.model.dilation
        long = cfg.train.epochs == 500
        assert cfg.model.arch == "detr" and dc5 == (label != "DETR")
        assert_recipe(
            cfg,
            optimizer="adamw",
            weight_decay=1e-4,
            clip_max_norm=0.1,
            lr_schedule="step",
            warmup_iters=0,
            lr_reference_batch=None,
        )
        assert (cfg.train.lr, cfg.train.lr_backbone) == ((1e-4, 1e-5) if long else (2e-4, 2e-5))
        assert (cfg.train.epochs, cfg.train.lr_drop) == ((500, 400) if long else (50, 40))
        assert cfg.train.total_batch_size == (64 if long else 32)
        if not long:
            assert_recipe(cfg, **{k: v for k, v in DEFORMABLE_DETR.items() if k != "batch_size_per_gpu"})
        # DETR's README: non-DC5 trained with 2 images per GPU, DC5 with 1; DC5 evaluates one per GPU
        assert cfg.train.batch_size_per_gpu == (1 if dc5 else 2)
        assert loaders.eval_batch_size(cfg) == (1 if dc5 else 2)
        assert cfg.data.augmentation == "official"
        # the launcher holds the total batch in one step: no accumulation on the stated GPUs
        launched = cfg.launcher.nodes * cfg.launcher.gpus_per_node * cfg.train.batch_size_per_gpu
        assert launched == cfg.train.total_batch_size, label
    plus = table["DETR-DC5+"].model
    assert plus.focal_loss and plus.num_queries == 300 and plus.cls_loss_coef == 2.0


def test_table3_backbones_and_their_weights():
    from model.backbone import weights_info

    table = rows(3)
    assert table["Deformable DETR, ResNet-50"].model.backbone == "resnet50"
    assert table["Deformable DETR, ResNet-101"].model.backbone == "resnet101"
    for label in (
        "Deformable DETR, ResNeXt-101",
        "Deformable DETR, ResNeXt-101 + DCN",
        "Deformable DETR, ResNeXt-101 + DCN, TTA",
    ):
        model = table[label].model
        # the only ResNeXt-101 of the torchvision the official code required, with its 2019 weights
        assert model.backbone == "resnext101_32x8d" and model.backbone_weights is None
        info = weights_info(model)
        assert info["name"] == "ResNeXt101_32X8D_Weights.IMAGENET1K_V1"
        assert info["imagenet_top1"] == pytest.approx(79.312)
    assert weights_info(table["Deformable DETR, ResNet-50"].model)["imagenet_top1"] == pytest.approx(76.13)


def test_table3_schedule_dcn_and_tta_are_the_documented_ones():
    table = rows(3)
    for label, cfg in table.items():
        assert_recipe(cfg, epochs=50, lr_drop=40, lr=2e-4, lr_backbone=2e-5)  # the assumed schedule
    tta = table["Deformable DETR, ResNeXt-101 + DCN, TTA"]
    assert tta.eval.tta and tta.eval.tta_sizes == (600, 700, 800, 900, 1000)
    assert not any(cfg.eval.tta for label, cfg in table.items() if not label.endswith("TTA"))
    from harness.grid.identity import run_id

    assert run_id(tta) == run_id(table["Deformable DETR, ResNeXt-101 + DCN"])  # one training, two evaluations


def test_dcn_modulation_is_detectron2s_sigmoid():
    """Detectron2's DeformBottleneckBlock (deform_modulated): zero-initialised offset conv, mask = sigmoid
    of its logits. At initialisation the deformable conv computes half of the plain conv (mask 0.5)."""
    from model.backbone import ModulatedDeformConv3x3

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
    dcn = ModulatedDeformConv3x3(conv)
    x = torch.randn(2, 8, 12, 10)
    torch.testing.assert_close(dcn(x), 0.5 * conv(x), atol=1e-5, rtol=1e-5)
    # with offsets and mask logits: the sigmoid of the logits multiplies each sampled tap
    with torch.no_grad():
        dcn.conv_offset.weight.normal_(std=0.1)
        dcn.conv_offset.bias.normal_()
    raw = dcn.conv_offset(x)
    offset_x, offset_y, logits = raw.chunk(3, dim=1)
    expected = torchvision.ops.deform_conv2d(
        x, torch.cat((offset_x, offset_y), 1), conv.weight, None, (2, 2), (1, 1), (1, 1), torch.sigmoid(logits)
    )
    torch.testing.assert_close(dcn(x), expected)


def test_dcn_offset_convs_train_at_the_backbone_lr():
    model, _, _ = build_model(
        tiny_model_config(dcn=True, num_feature_levels=1, dec_layers=1, num_queries=5, enc_n_points=4, dec_n_points=4)
    )
    cfg = rows(3)["Deformable DETR, ResNeXt-101 + DCN"].train
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    offsets = {id(p) for n, p in model.named_parameters() if "conv_offset" in n and p.requires_grad}
    assert offsets and offsets <= {id(p) for p in groups["backbone"]["params"]}
    assert groups["backbone"]["lr"] == pytest.approx(2e-5)


def test_smoke_scale_keeps_every_row_runnable():
    exp = load_experiment(EXPERIMENTS / "table1.yaml", smoke=True)
    frcnn = {s.label: s.config for s in expand(exp)}["Faster R-CNN + FPN"]
    assert frcnn.train.optimizer == "sgd" and frcnn.train.lr_schedule == "step" and frcnn.train.warmup_iters == 0


# ----------------------------------------------------------------------------------- optimiser, schedule


def _toy_optimizer(train_cfg, total_batch=None):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    return build_optimizer(model, train_cfg, total_batch)


def _lrs(train_cfg, steps, steps_per_epoch, total_batch=None):
    optimizer = _toy_optimizer(train_cfg, total_batch)
    scheduler = build_scheduler(optimizer, train_cfg, steps_per_epoch, total_batch)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_linear_warmup_per_iteration():
    cfg = TrainConfig(optimizer="sgd", lr=0.02, warmup_iters=4, warmup_factor=0.001, lr_drop=100)
    lrs = _lrs(cfg, 6, steps_per_epoch=10)
    expected = [0.02 * (0.001 * (1 - i / 4) + i / 4) for i in range(4)] + [0.02, 0.02]
    assert lrs == pytest.approx(expected)


def test_multistep_drops_at_the_start_of_each_milestone_epoch():
    cfg = TrainConfig(epochs=6, lr_schedule="multistep", lr_milestones=(2, 4))
    lrs = _lrs(cfg, 18, steps_per_epoch=3)
    assert lrs == pytest.approx([2e-4] * 6 + [2e-5] * 6 + [2e-6] * 6)


def test_step_schedule_is_the_official_step_lr():
    cfg = TrainConfig(lr_drop=3)
    ours = _lrs(cfg, 8, steps_per_epoch=1)
    optimizer = _toy_optimizer(cfg)
    official = torch.optim.lr_scheduler.StepLR(optimizer, 3)
    theirs = []
    for _ in range(8):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        official.step()
    assert ours == pytest.approx(theirs)


def test_linear_scaling_rule_scales_lrs_and_warmup():
    cfg = TrainConfig(
        optimizer="sgd", lr=0.02, lr_backbone=0.01, warmup_iters=1000, lr_reference_batch=16, total_batch_size=16
    )
    assert batch_scale(cfg, 32) == 2.0 and batch_scale(cfg) == 1.0
    assert warmup_steps(cfg, 32) == 500 and warmup_steps(cfg, 8) == 2000
    model = torch.nn.Module()
    model.head = torch.nn.Linear(2, 2)
    model.backbone = torch.nn.Sequential(torch.nn.Linear(2, 2))  # named backbone.0: the backbone group
    groups = {g["name"]: g for g in build_optimizer(model, cfg, 32).param_groups}
    assert groups["default"]["lr"] == pytest.approx(0.04) and groups["backbone"]["lr"] == pytest.approx(0.02)
    assert factor_at(cfg, 0, 32) == pytest.approx(0.001) and factor_at(cfg, 500, 32) == 1.0
    unscaled = TrainConfig(lr=2e-4)
    assert batch_scale(unscaled, 64) == 1.0


def factor_at(cfg, step, total_batch):
    return lr_factor(cfg, 100, total_batch)(step)


def test_sgd_and_adamw():
    sgd = _toy_optimizer(TrainConfig(optimizer="sgd", momentum=0.9, weight_decay=1e-4))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert sgd.param_groups[0]["weight_decay"] == 1e-4
    assert isinstance(_toy_optimizer(TrainConfig()), torch.optim.AdamW)


@pytest.mark.parametrize(
    "fields, key",
    [
        (dict(optimizer="adam"), "train.optimizer"),
        (dict(lr_schedule="cosine"), "train.lr_schedule"),
        (dict(lr_schedule="multistep"), "train.lr_milestones"),
        (dict(lr_schedule="multistep", lr_milestones=(30, 20)), "train.lr_milestones"),
        (dict(lr_schedule="multistep", lr_milestones=(10, 50)), "train.lr_milestones"),
        (dict(lr_milestones=(10,)), "train.lr_milestones"),
        (dict(momentum=0.5), "train.momentum"),
        (dict(optimizer="sgd", momentum=1.0), "train.momentum"),
        (dict(warmup_iters=-1), "train.warmup_iters"),
        (dict(warmup_factor=0.0), "train.warmup_factor"),
        (dict(lr_reference_batch=0), "train.lr_reference_batch"),
    ],
    ids=repr,
)
def test_bad_recipes_name_the_key(fields, key):
    with pytest.raises(ConfigError) as err:
        check_run_config(RunConfig(train=TrainConfig(**fields)))
    assert err.value.key == key


def test_bad_recipe_in_yaml_names_file_row_and_key(tmp_path):
    text = (EXPERIMENTS / "table1.yaml").read_text().replace("lr_milestones: [101, 107]", "lr_milestones: [101, 120]")
    path = tmp_path / "t1.yaml"
    path.write_text(text)
    with pytest.raises(ExperimentError) as err:
        load_experiment(path, check_data=False)
    assert err.value.row == "Faster R-CNN + FPN" and err.value.key == "train.lr_milestones"
    assert "1..108" in str(err.value)


def test_eval_batch_size():
    cfg = RunConfig(train=TrainConfig(batch_size_per_gpu=4))
    assert loaders.eval_batch_size(cfg) == 4
    assert (
        loaders.eval_batch_size(
            RunConfig(train=TrainConfig(batch_size_per_gpu=4), eval=EvalConfig(batch_size_per_gpu=1))
        )
        == 1
    )
    with pytest.raises(ConfigError, match="eval.batch_size_per_gpu"):
        check_run_config(RunConfig(eval=EvalConfig(batch_size_per_gpu=0)))


def test_steps_per_epoch():
    assert engine.steps_per_epoch(10, TrainConfig(), 1) == 10
    assert engine.steps_per_epoch(10, TrainConfig(), 4) == 3  # the last group is shorter
    assert engine.steps_per_epoch(10, TrainConfig(max_iters_per_epoch=3), 2) == 2


# ------------------------------------------------------------------------------------- loaders, resume


def test_training_drops_the_last_incomplete_batch(tmp_path):
    cfg = tiny_run_config(tmp_path / "data", data=dict(synthetic_train_images=5))
    root = str(tmp_path / "data")
    from harness.data import dataset_root

    dataset_root(cfg.data, None)
    dataset, _, loader = loaders.build_train_loader(cfg, root)
    assert len(dataset) == 5 and len(loader) == 2
    assert [len(targets) for _, _, targets in loader] == [2, 2]
    _, eval_loader = loaders.build_eval_loader(cfg, root)
    assert sum(len(targets) for _, _, targets in eval_loader) == cfg.data.synthetic_val_images


def test_too_few_images_for_one_batch_is_an_error(tmp_path):
    cfg = tiny_run_config(
        tmp_path / "data", train=dict(batch_size_per_gpu=4, total_batch_size=4), data=dict(synthetic_train_images=3)
    )
    from harness.data import dataset_root

    root = dataset_root(cfg.data, None)
    with pytest.raises(ValueError, match="fewer than one full batch.*batch_size_per_gpu 4"):
        loaders.build_train_loader(cfg, root)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_warmup_and_multistep_resume_mid_epoch_bit_identical(tmp_path):
    """SGD with warm-up over the stop: the schedule's step count is checkpointed with the iteration."""
    data = tmp_path / "data"
    train = dict(
        total_batch_size=2,
        max_iters_per_epoch=2,
        eval_every=100,
        optimizer="sgd",
        lr=1e-3,
        lr_backbone=1e-3,
        clip_max_norm=0.0,
        warmup_iters=3,
        lr_schedule="multistep",
        lr_milestones=(1,),
    )
    cfg = tiny_run_config(data, epochs=2, train=train, eval=dict(save_detections=False))
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    records = []
    engine.train(cfg, full, log_fn=records.append, print_fn=None)
    # epoch 0 starts the warm-up, epoch 1 starts after the milestone and still in the warm-up (2 steps an epoch)
    assert records[0]["lr_default"] == pytest.approx(1e-3 * 0.001)
    assert records[1]["lr_default"] == pytest.approx(1e-4 * (0.001 * (1 - 2 / 3) + 2 / 3))
    with pytest.raises(engine.TrainingInterrupted, match="epoch 0, iteration 1"):
        engine.train(cfg, part, print_fn=None, should_stop=lambda: True)
    engine.train(cfg, part, print_fn=None)
    a = checkpointing.read_checkpoint(os.path.join(full, checkpointing.CHECKPOINT))
    b = checkpointing.read_checkpoint(os.path.join(part, checkpointing.CHECKPOINT))
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# ------------------------------------------------------------------------------------ model initialisation


def test_detr_focal_head_starts_from_the_prior():
    small = dict(
        pretrained_backbone=False,
        hidden_dim=32,
        dim_feedforward=64,
        enc_layers=1,
        dec_layers=1,
        nheads=2,
        num_classes=5,
    )
    focal, _, _ = build_model(ModelConfig(**{**arch_defaults("detr"), **small, "focal_loss": True}))
    assert torch.allclose(focal.class_embed.bias, torch.full((5,), -math.log(99.0)))
    softmax, _, _ = build_model(ModelConfig(**{**arch_defaults("detr"), **small}))
    assert softmax.class_embed.bias.shape == (6,) and not torch.allclose(
        softmax.class_embed.bias, torch.full((6,), -math.log(99.0))
    )


def test_giou_from_deltas_equals_giou_of_decoded_boxes():
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.ops import generalized_box_iou_loss

    from model.faster_rcnn import giou_loss_from_deltas

    torch.manual_seed(0)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    xy = torch.rand(16, 2) * 100
    proposals = torch.cat([xy, xy + 5 + torch.rand(16, 2) * 80], dim=1)
    gt = proposals + torch.randn(16, 4) * 4
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    target = coder.encode_single(gt, proposals)
    pred = target + torch.randn(16, 4) * 0.3
    expected = generalized_box_iou_loss(coder.decode_single(pred, proposals), gt, reduction="sum")
    ours = giou_loss_from_deltas(pred, target, coder.weights, coder.bbox_xform_clip)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_faster_rcnn_giou_box_losses_train():
    torch.manual_seed(0)
    cfg = ModelConfig(
        **{
            **arch_defaults("faster_rcnn"),
            "pretrained_backbone": False,
            "num_classes": 5,
            "rcnn_box_loss": "giou",
            "rcnn_box_loss_weight": 10.0,
            "rpn_box_loss": "giou",
            "rpn_box_loss_weight": 2.0,
        }
    )
    model, criterion, _ = build_model(cfg)
    plain, _, _ = build_model(
        ModelConfig(**{**arch_defaults("faster_rcnn"), "pretrained_backbone": False, "num_classes": 5})
    )
    assert model.state_dict().keys() == plain.state_dict().keys()
    model.train()
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "labels": torch.tensor([2])}]
    losses = criterion(model(images, mask, targets=targets))
    assert set(losses) == set(criterion.weight_dict) and torch.isfinite(losses["loss_box_reg"])
    assert torch.isfinite(losses["loss_rpn_box_reg"]) and losses["loss_rpn_box_reg"] > 0
    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
    assert model.detector.roi_heads.box_predictor.bbox_pred.weight.grad is not None
    assert model.detector.rpn.head.bbox_pred.weight.grad.abs().sum() > 0
    for field, value in (
        ("rcnn_box_loss", "giou"),
        ("rpn_box_loss", "giou"),
        ("rcnn_box_loss_weight", 10.0),
        ("rpn_box_loss_weight", 2.0),
    ):
        with pytest.raises(ConfigError, match=field):
            ModelConfig(**{field: value})  # Deformable DETR has no such losses
    with pytest.raises(ConfigError, match="rpn_box_loss_weight"):
        ModelConfig(**{**arch_defaults("faster_rcnn"), "rpn_box_loss_weight": 0.0})


# ----------------------------------------------------------------------------------- backbone weights


def test_weights_info_never_downloads(tmp_path, monkeypatch):
    import torchvision

    from model.backbone import weights_info

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(
        torchvision.models.ResNet50_Weights,
        "get_state_dict",
        lambda *a, **k: pytest.fail("weights_info downloaded"),
        raising=False,
    )
    info = weights_info(ModelConfig())
    assert info["name"] == "ResNet50_Weights.IMAGENET1K_V1" and info["sha256"] is None
    assert info["imagenet_top1"] == pytest.approx(76.13)
    assert info["file"] == str(tmp_path / "checkpoints" / "resnet50-0676ba61.pth")
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "resnet50-0676ba61.pth").write_bytes(b"weights")
    assert weights_info(ModelConfig())["sha256"] == hashlib.sha256(b"weights").hexdigest()
    v2 = weights_info(ModelConfig(backbone="resnext101_32x8d", backbone_weights="IMAGENET1K_V2"))
    assert v2["name"] == "ResNeXt101_32X8D_Weights.IMAGENET1K_V2" and v2["imagenet_top1"] == pytest.approx(82.834)
    own = tmp_path / "x101_64x4d_2017.pth"
    own.write_bytes(b"mine")
    info = weights_info(ModelConfig(backbone="resnext101_64x4d", backbone_weights=str(own)))
    assert info["name"] == str(own) and info["imagenet_top1"] is None
    assert info["sha256"] == hashlib.sha256(b"mine").hexdigest()
    assert weights_info(ModelConfig(pretrained_backbone=False))["name"] is None


def test_backbone_weight_names_are_torchvisions():
    import torchvision

    from model.backbone import _BACKBONES

    for backbone, members in BACKBONE_WEIGHTS.items():
        enum = getattr(torchvision.models, _BACKBONES[backbone][1])
        assert members == tuple(w.name for w in enum), backbone
    with pytest.raises(ConfigError, match="backbone_weights.*IMAGENET1K_V1"):
        ModelConfig(backbone="resnext101_64x4d", backbone_weights="IMAGENET1K_V2")
