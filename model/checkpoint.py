"""Checkpoints, one stack for both formats: released official checkpoints and this project's own.

The official repositories save ``{"model": state_dict, "optimizer": ..., "args": Namespace, ...}`` (a bare
state dict is accepted too). This project's training checkpoints have the same layout plus ``checksum``, a
SHA-256 over every tensor and value of the rest, so a file with flipped bytes is detected as well as a
truncated one (``torch.load`` alone notices only the latter). :func:`read_file` reads either and verifies
the checksum where there is one; :func:`load_state` and :func:`load_checkpoint` load weights strictly, and
any difference of keys or shapes is a :class:`CheckpointError` that names the keys and, where it can, the
configuration the checkpoint was trained with.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re

import numpy as np
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
    """A checkpoint that cannot be used; ``path`` names it."""

    def __init__(self, path, message: str):
        super().__init__(f"checkpoint {path}: {message}")
        self.path, self.message = str(path), message


# ------------------------------------------------------------------------------------------ integrity


def _digest(obj, h) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"N{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def checksum(state: dict) -> str:
    """SHA-256 over everything in ``state`` but its ``checksum`` entry."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "checksum"}, h)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- reading


def read_file(path: str, map_location="cpu") -> dict:
    """The dict stored at ``path`` (official or ours; a bare state dict too), its checksum verified when it
    has one. :class:`CheckpointError` if it is missing, truncated, corrupt or not a dict."""
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file")
    try:
        # official checkpoints hold their command-line arguments as an argparse.Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read means the file is unusable
        raise CheckpointError(
            path, f"cannot be read ({type(err).__name__}: {err}); the file may be truncated or not a PyTorch checkpoint"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(path, f"expected a dict, got a {type(ckpt).__name__}")
    if "checksum" in ckpt and checksum(ckpt) != ckpt["checksum"]:
        raise CheckpointError(path, "checksum mismatch: the file is corrupt")
    return ckpt


def model_state(ckpt: dict, path: str = "checkpoint") -> dict:
    """The model's state dict in a checkpoint dict (its ``model`` entry, or the dict itself), without the
    ``module.`` prefix DistributedDataParallel adds."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(path, "expected a state dict or a dict with a 'model' state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_checkpoint(path: str) -> dict:
    """The model state dict stored at ``path``: an official or our checkpoint file, or a Hugging Face
    transformers folder (``config.json`` and its weights: :func:`model.hf_convert.from_hf_folder`)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        from model.hf_convert import from_hf_folder  # its own imports: only for such a folder

        return from_hf_folder(path)[1]
    return model_state(read_file(path), path)


# ------------------------------------------------------------------------------------------- loading


def _summarise(keys, limit=12):
    """Keys with layer indices collapsed (``class_embed.N.weight``), so one line covers a repeated module."""
    patterns = list(dict.fromkeys(re.sub(r"\.\d+(?=\.)", ".N", k) for k in keys))
    return ", ".join(patterns[:limit]) + (" ..." if len(patterns) > limit else "")


def _hint(keys):
    hints = [hint for key, hint in _KEY_HINTS if key in keys]
    return f" (the checkpoint has keys of a model with {', '.join(hints)})" if hints else ""


def _wrapped_layout(own: dict, state: dict) -> dict:
    """torchvision's released detection models are the bare detector's state dict (``backbone.body...``,
    ``rpn...``, ``roi_heads...``); our Faster R-CNN holds that detector as ``detector``."""
    prefix = "detector."
    if own and state and all(k.startswith(prefix) for k in own) and not any(k.startswith(prefix) for k in state):
        return {prefix + k: v for k, v in state.items()}
    return state


def load_state(model: torch.nn.Module, state: dict, path: str = "checkpoint") -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch names the differing keys and shapes."""
    own = model.state_dict()
    state = _wrapped_layout(own, state)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        lines = [f"does not match the configured model{_hint(unexpected)}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines.append(f"  {len(keys)} {title} keys: {_summarise(keys)}")
        for k in wrong_shape[:8]:
            lines.append(f"  shape of {k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}")
        raise CheckpointError(path, "\n".join(lines))
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str, model: torch.nn.Module) -> None:
    """Load the weights of ``path`` (official or ours) into ``model``, strictly."""
    load_state(model, read_checkpoint(path), path)
