"""Deformable DETR, the DETR baselines and Faster R-CNN behind one contract.

``model.config`` imports nothing heavy, so the harness can validate configs without torch.
"""

from .config import ConfigError, ModelConfig, arch_defaults

__all__ = ["ConfigError", "ModelConfig", "arch_defaults", "build_model", "load_checkpoint"]


def __getattr__(name):
    if name == "build_model":
        from .build import build_model

        return build_model
    if name == "load_checkpoint":
        from .checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(name)
