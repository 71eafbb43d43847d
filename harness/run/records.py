"""What each record of a row holds (DESIGN.md, Records), and the facts a job needs to make them.

* the training record (``runs/<run_id>/metrics.json``, :func:`training_record`): training facts only — epochs
  trained, the last epoch's losses, attempts, GPU-hours, world size, device, attention implementation,
  backbone weights, commit, date, torch and ``checkpoint_sha256`` (of the final ``checkpoint.pth``). Its
  per-epoch evaluation uses the run's own settings (:func:`training_config`), not those of whichever row
  submitted it; its AP stays in ``log.jsonl``.
* the evaluation record (``evaluations/<eval_id>/``, :func:`evaluation_record`): the COCO numbers, the
  settings that made them, the checkpoint's hash, its own GPU-hours and provenance.
* the measurement record (``measurements/<measure_id>/``): parameters, FLOPs, FPS (:func:`measure`, then
  :func:`harness.measure.record.measurement_record`).
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path
from typing import Optional

import torch

from harness.grid import RunSpec, eval_id
from harness.grid.identity import file_digest
from harness.grid.schema import SECTION_CLASSES
from harness.measure import complexity, speed
from harness.metrics import EVALUATED_FIELDS
from harness.provenance import current_device, utc_date
from harness.run.checkpointing import CHECKPOINT
from harness.run.loaders import eval_batch_size
from harness.store import CorruptFileError, ResultsStore
from model.backbone import weights_info
from model.config import EVALUATION, field_roles
from model.released import location


def device() -> torch.device:
    return current_device()


def today() -> str:
    return utc_date()


def file_sha256(path) -> str:
    """Hex sha256 of a checkpoint's bytes (of a Hugging Face folder's files: :func:`file_digest`)."""
    return file_digest(str(path)).split(":", 1)[1]


def trained_checkpoint(store: ResultsStore, spec: RunSpec) -> Optional[Path]:
    """The checkpoint the run's training left: its ``checkpoint.pth``, or for an evaluation-only run
    (``eval.eval_only``) the file it evaluates; None when there is none."""
    path = store.record_dir(spec.run_id) / CHECKPOINT
    if path.is_file():
        return path
    cfg = spec.config
    evaluated = location(cfg.eval.checkpoint) if cfg.eval.eval_only and cfg.eval.checkpoint else None
    return evaluated if evaluated is not None and evaluated.exists() else None


def training_checkpoint_sha256(store: ResultsStore, spec: RunSpec) -> Optional[str]:
    """The training's ``checkpoint_sha256`` as its record says; computed from the checkpoint file where the
    record has none (a record of an earlier version); None without either."""
    try:
        known = (store.read_metrics(spec.run_id) or {}).get("checkpoint_sha256")
    except CorruptFileError:
        known = None
    if known:
        return known
    path = trained_checkpoint(store, spec)
    return file_sha256(path) if path is not None else None


def annotated(split: str) -> bool:
    """Whether a COCO split has public annotations (test-dev / test have image information only)."""
    return not split.startswith("test")


def _training_split(cfg) -> str:
    """The split the training's per-epoch evaluation uses: the row's when it has annotations; for a test-dev
    row the annotated val2017 where the dataset has it, else the row's own split (evaluated once, at the end)."""
    split = cfg.data.val_split
    if annotated(split):
        return split
    if cfg.data.dataset == "synthetic":
        return "val2017"  # the generated set is train2017 + val2017
    from harness.data import split_paths

    root = cfg.data.root
    return "val2017" if root and os.path.isfile(split_paths(root, "val2017")[1]) else split


def training_config(cfg):
    """The run's config as its training evaluates itself between epochs: every evaluation-role field at its
    default, except the split (:func:`_training_split`), the evaluation size (``data.train_size``: the
    resolution it trains at) and the synthetic set's size (it says what the split holds, like the split).
    No TTA. It depends on the training alone, not on the evaluation settings of the row that submitted it."""
    sections = {}
    for section, cls in SECTION_CLASSES.items():
        sub, roles = getattr(cfg, section), field_roles(cls)
        reset = {}
        for f in dataclasses.fields(cls):
            if EVALUATION in roles[f.name]["roles"]:
                reset[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        sections[section] = dataclasses.replace(sub, **reset) if reset else sub
    data = dataclasses.replace(
        sections["data"],
        val_split=_training_split(cfg),
        eval_size=cfg.data.train_size,
        synthetic_val_images=cfg.data.synthetic_val_images,
    )
    return dataclasses.replace(cfg, **{**sections, "data": data})


def same_evaluation(a, b) -> bool:
    """Whether two configs evaluate a checkpoint alike (the same evaluation id)."""
    return eval_id(a) == eval_id(b)


def measure(run_cfg, output_dir) -> dict:
    """Parameters, FLOPs (fvcore, over the first evaluation images) and FPS of the run's model."""
    bench = run_cfg.benchmark
    if bench.flops:
        out = complexity.measure_complexity(run_cfg, images=bench.flops_images, output_dir=output_dir, device=device())
        # the per-image list and per-operator breakdown stay out of metrics.json
        for key in ("gflops_each", "by_operator", "handles"):
            out.pop(key, None)
    else:
        out = {"params": complexity.count_parameters(complexity.build_for_complexity(run_cfg.model))}
    if bench.fps:
        fps = speed.measure_run_speed(run_cfg, output_dir=output_dir)
        if "attn_impl" in fps:  # the implementation the FPS ran
            fps["fps_attn_impl"] = fps.pop("attn_impl")
        out.update(fps)
    return out


def backbone_weights_text(cfg) -> str:
    """The ImageNet weights the run's trunk started from, for its training record and the report's notes; an
    evaluation-only run's trunk is its checkpoint's."""
    if cfg.eval.eval_only:
        return f"the evaluated checkpoint's ({cfg.eval.checkpoint})"
    info = weights_info(cfg.model)
    if not info["pretrained"]:
        return "none (trained from scratch)"
    parts = [f"{info['imagenet_top1']}% ImageNet top-1"] if info["imagenet_top1"] is not None else []
    if info["sha256"]:
        parts.append(f"sha256 {info['sha256'][:12]}")
    return f"{info['name']}" + (f" ({', '.join(parts)})" if parts else "")


def evaluation_settings(cfg) -> dict:
    """The settings an evaluation of ``cfg`` ran with (the evaluation id's fields, resolved)."""
    return {
        "split": cfg.data.val_split,
        "eval_size": cfg.data.eval_size,
        "tta": cfg.eval.tta,
        "tta_sizes": list(cfg.eval.tta_sizes) if cfg.eval.tta else None,
        "num_detections": cfg.eval.num_detections,
        "eval_batch_size": eval_batch_size(cfg),
    }


def evaluation_record(spec: RunSpec, metrics: dict, **provenance) -> dict:
    """What an evaluation record holds: the COCO numbers, the settings that made them, and the checkpoint,
    device, commit, date and GPU-hours of the evaluation (``provenance``)."""
    numbers = {k: metrics[k] for k in EVALUATED_FIELDS if k in metrics}
    if "num_images" in metrics:
        numbers["num_images"] = metrics["num_images"]
    return {
        **numbers,
        "run_id": spec.run_id,
        "eval_id": spec.eval_id,
        "label": spec.label,
        **evaluation_settings(spec.config),
        **provenance,
    }


def training_record(spec: RunSpec, store: ResultsStore, epochs: int, **facts) -> dict:
    """What the training record holds: training facts, no AP and no parameters/FLOPs/FPS. The losses are the
    last epoch's (``train_*`` of log.jsonl)."""
    last = next((r for r in reversed(store.read_log(spec.run_id)) if r.get("epoch") is not None), {})
    losses = {k: v for k, v in last.items() if k.startswith("train_")}
    return {
        "run_id": spec.run_id,
        "label": spec.label,
        "seed": spec.seed,
        "scale": spec.scale,
        "dataset": spec.config.data.dataset,
        "epochs_trained": epochs,
        **losses,
        "attempts": store.attempts(spec.run_id) or None,
        **facts,
    }


def server_submission(detections: Path, folder: Path, name: str) -> Optional[Path]:
    """The zip the COCO evaluation server expects (``detections_test-dev2017_<name>_results.json`` inside)."""
    if not detections.is_file():
        return None
    alg = "".join(c for c in name if c.isalnum())  # no underscores: the server splits the name on them
    inner = f"detections_test-dev2017_{alg}_results.json"
    target = folder / f"{inner[:-5]}.zip"
    tmp = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(detections, inner)
    os.replace(tmp, target)
    return target


def shown_path(store: ResultsStore, path: Optional[Path]) -> Optional[str]:
    """A file as a record names it: relative to the results root when it lies there (records are committed)."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(store.root.resolve()))
    except ValueError:
        return str(path)
