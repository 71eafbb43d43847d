"""Overfit 8 synthetic images: AP50 >= 0.9 on them proves that data, matcher, losses, optimiser,
post-processing and COCO evaluation are wired together correctly.

A small Deformable DETR (2 feature levels, hidden 64, 1 encoder + 2 decoder layers, 20 queries, randomly
initialised ResNet-50) trained on the 8 images at 96 x 128 with batch 8, no augmentation and no dropout.
With lr 2e-3 (backbone 2e-4) it passes AP50 90 after about 25 epochs (about 1.3 s each on 2 idle CPU
cores); the test evaluates every 5 epochs from epoch 20 on and stops as soon as it gets there.
"""

import time

import pytest
import torch
from builders import tiny_model_config

from harness.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from harness.data import synthetic
from harness.run import engine, loaders
from harness.run.evaluation import run_evaluation
from harness.run.optim import build_optimizer, build_scheduler
from harness.run.step import OptimiserStep

MAX_EPOCHS = 60


def overfit_config(root):
    model = tiny_model_config(
        hidden_dim=64,
        dim_feedforward=128,
        num_queries=20,
        nheads=4,
        num_feature_levels=2,
        enc_n_points=4,
        dec_n_points=4,
        dropout=0.0,
    )
    data = DataConfig(
        dataset="coco",
        root=root,
        val_split="train2017",
        augmentation="none",
        train_size=96,
        eval_size=96,
        max_size=128,
        num_workers=0,
    )
    train = TrainConfig(
        epochs=MAX_EPOCHS,
        batch_size_per_gpu=8,
        total_batch_size=8,
        lr=2e-3,
        lr_backbone=2e-4,
        lr_drop=1000,
        seed=0,
        print_freq=1000,
    )
    return RunConfig(model=model, data=data, train=train, eval=EvalConfig(save_detections=False))


@pytest.mark.slow
def test_overfit_eight_images_reaches_ap50_90(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        root = synthetic.generate(
            str(tmp_path / "data"),
            num_train=8,
            num_val=1,
            image_size=(96, 128),
            seed=0,
            num_objects=(1, 3),
            size_classes=("medium", "large"),
        )
        cfg = overfit_config(root)
        device = torch.device("cpu")
        engine.seed_everything(cfg.train.seed)
        train_set, sampler, loader = loaders.build_train_loader(cfg, root, cfg.model.num_classes)
        eval_set, eval_loader = loaders.build_eval_loader(cfg, root)
        assert len(train_set) == len(eval_set) == 8
        model, criterion, postprocessor = engine._build_model(cfg, device)
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train)
        start, history = time.time(), []
        for epoch in range(MAX_EPOCHS):
            engine.seed_everything(engine.epoch_seed(cfg.train.seed, epoch, 0))
            sampler.set_epoch(epoch)
            step = OptimiserStep(model, criterion, optimizer, clip_max_norm=cfg.train.clip_max_norm, device=device)
            losses = engine.train_one_epoch(step, loader, epoch)
            scheduler.step()
            if epoch + 1 >= 20 and (epoch + 1) % 5 == 0:
                metrics = run_evaluation(
                    model, postprocessor, eval_loader, eval_set, device, cfg.eval, cfg.data, verbose=False
                )
                history.append((epoch, round(losses["loss"], 3), round(metrics["AP50"], 1), round(time.time() - start)))
                if metrics["AP50"] >= 90.0:
                    break
        print("epoch, loss, AP50, seconds:", history)
        assert metrics["AP50"] >= 90.0, history
        assert metrics["num_images"] == 8
    finally:
        torch.set_num_threads(threads)
