"""A table's descriptive cells that describe the configuration (K, epochs, backbone...) come from it (pure).

A row may still write such a cell (as the paper prints it); it must then agree with what its configuration
gives, or loading fails naming both. A cell no function here knows (``method``) is the row's own text.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

from harness.config import RunConfig

BACKBONE_NAMES = {
    "resnet50": "ResNet-50",
    "resnet101": "ResNet-101",
    "resnext101_32x8d": "ResNeXt-101",
    "resnext101_64x4d": "ResNeXt-101",
}
NECK_NAMES = {"none": "w/o", "fpn": "FPN", "bifpn": "BiFPN"}


def _k(cfg: RunConfig):
    m = cfg.model
    if m.arch != "deformable_detr":
        return None  # no sampling points: dense attention or no attention at all
    return m.enc_n_points if m.enc_n_points == m.dec_n_points else f"{m.enc_n_points}/{m.dec_n_points}"


def _backbone(cfg: RunConfig) -> str:
    return BACKBONE_NAMES[cfg.model.backbone] + (" + DCN" if cfg.model.dcn else "")


# cell name -> (what it is read from, its value)
DERIVED: Dict[str, tuple] = {
    "K": ("model.enc_n_points, model.dec_n_points", _k),
    "epochs": ("train.epochs", lambda cfg: cfg.train.epochs),
    "backbone": ("model.backbone, model.dcn", _backbone),
    "tta": ("eval.tta", lambda cfg: cfg.eval.tta),
    "ms_inputs": ("model.num_feature_levels", lambda cfg: cfg.model.num_feature_levels > 1),
    "ms_attention": ("model.ms_attention", lambda cfg: cfg.model.ms_attention),
    "fpn": ("model.neck", lambda cfg: NECK_NAMES[cfg.model.neck]),
}


def _same(written: Any, derived: Any) -> bool:
    if derived is None:
        return written is None
    if isinstance(written, bool) or isinstance(derived, bool):
        return written is derived
    return written == derived or str(written) == str(derived)


def derive_cells(
    columns, cells: Mapping[str, Any], cfg: RunConfig, fail: Callable[[str, str], None]
) -> Dict[str, Optional[Any]]:
    """``cells`` with every column that :data:`DERIVED` knows filled from ``cfg`` (the full-scale config);
    ``fail(key, message)`` raises for a written cell that disagrees with it."""
    out = dict(cells)
    for column in columns:
        if column not in DERIVED:
            continue
        source, derive = DERIVED[column]
        value = derive(cfg)
        if column in cells and not _same(cells[column], value):
            fail(
                f"cells.{column}",
                f"got {cells[column]!r}, but the row's configuration ({source}) gives "
                f"{value!r}; write {value!r} or leave the cell out (it is derived)",
            )
        out[column] = value
    return out
