"""Loading released official checkpoints (and this project's) into a model, strictly.

The official repositories save ``{"model": state_dict, "optimizer": ..., "args": Namespace, ...}``;
a bare state dict is accepted too. Any difference of keys or shapes is an error that names the keys
and, where it can, the configuration the checkpoint was trained with.
"""
from __future__ import annotations

import argparse
import os
import re

import torch

# which configuration a key belongs to, to make a mismatch actionable
_KEY_HINTS = (
    ("transformer.enc_output.weight", "two_stage: true (a two-stage checkpoint)"),
    ("transformer.decoder.bbox_embed.0.layers.0.weight", "with_box_refine: true"),
    ("transformer.reference_points.weight", "two_stage: false"),
    ("input_proj.3.0.weight", "num_feature_levels: 4"),
    ("transformer.decoder.layers.0.multihead_attn.in_proj_weight", "arch: detr"),
    ("transformer.level_embed", "arch: deformable_detr"),
)


class CheckpointError(RuntimeError):
    pass


def read_checkpoint(path: str) -> dict:
    """The state dict stored at ``path`` (the ``model`` entry of a training checkpoint)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(err).__name__}: {err}); "
                              "the file may be truncated or not a PyTorch checkpoint") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"checkpoint {path}: expected a state dict or a dict with a 'model' state dict")
    # DistributedDataParallel prefixes every key with "module."
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _summarise(keys, limit=12):
    """Keys with layer indices collapsed (``class_embed.N.weight``), so one line covers a repeated module."""
    patterns = list(dict.fromkeys(re.sub(r"\.\d+(?=\.)", ".N", k) for k in keys))
    return ", ".join(patterns[:limit]) + (" ..." if len(patterns) > limit else "")


def _hint(keys):
    hints = [hint for key, hint in _KEY_HINTS if key in keys]
    return f" (the checkpoint has keys of a model with {', '.join(hints)})" if hints else ""


def load_checkpoint(path: str, model: torch.nn.Module) -> None:
    """Load ``path`` into ``model`` with ``strict=True``; a mismatch names the differing keys."""
    state = read_checkpoint(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint {path} does not match the configured model{_hint(unexpected)}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines.append(f"  {len(keys)} {title} keys: {_summarise(keys)}")
        for k in wrong_shape[:8]:
            lines.append(f"  shape of {k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)
