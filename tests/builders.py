"""The tests' small configurations and their builders, in one place (a helpers module, not a test module).

``TINY_MODEL``: a Deformable DETR small enough for a training step in a second on a CPU; a test states only
what it changes (``tiny_model_fields(nheads=4)``).
"""

from harness.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from model import ModelConfig

TINY_MODEL = dict(
    pretrained_backbone=False,
    hidden_dim=32,
    dim_feedforward=64,
    enc_layers=1,
    dec_layers=2,
    num_queries=10,
    nheads=2,
    num_feature_levels=3,
    enc_n_points=2,
    dec_n_points=2,
    attn_impl="pytorch",
)


# a synthetic set of 48x64 images, four to train on and two to evaluate, read at 64 pixels (no root: each test
# has its own folder)
TINY_DATA = dict(
    dataset="synthetic",
    num_workers=0,
    train_size=64,
    eval_size=64,
    max_size=96,
    synthetic_train_images=4,
    synthetic_val_images=2,
    synthetic_image_size=(48, 64),
)
# two images a step, the learning rate dropped after the first epoch
TINY_TRAIN = dict(epochs=2, batch_size_per_gpu=2, total_batch_size=2, print_freq=1, lr_drop=1, seed=7)


def tiny_model_fields(**kw) -> dict:
    """``TINY_MODEL`` with ``kw`` changed: keyword arguments for :class:`ModelConfig`."""
    return {**TINY_MODEL, **kw}


def tiny_model_config(**kw) -> ModelConfig:
    return ModelConfig(**tiny_model_fields(**kw))


def tiny_run_config(data_root, epochs=2, model=None, train=None, data=None, eval=None):
    return RunConfig(
        model=model or tiny_model_config(),
        data=DataConfig(**{**TINY_DATA, "root": str(data_root), **(data or {})}),
        train=TrainConfig(**{**TINY_TRAIN, "epochs": epochs, **(train or {})}),
        eval=EvalConfig(**(eval or {})),
    )
