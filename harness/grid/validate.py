"""Checks across config sections: ranges, choices and combinations; the dataset a row reads (pure but for
looking at its files, no torch).

:func:`check_run_config` raises :class:`ConfigError` with a dotted key; the experiment loader turns it into
an :class:`~harness.grid.schema.ExperimentError` naming the file and row.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Tuple

from harness.config import (
    AMP_MODES,
    AUGMENTATIONS,
    DATASETS,
    EXECUTORS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    DataConfig,
    LauncherConfig,
    RunConfig,
    TrainConfig,
)
from harness.grid.schema import ExperimentError, expect
from model.config import ConfigError, check_choice


def check_run_config(cfg: RunConfig) -> None:
    """Ranges and combinations across sections; raises :class:`ConfigError` with a dotted key."""
    d, t, e, b, launcher = cfg.data, cfg.train, cfg.eval, cfg.benchmark, cfg.launcher
    check_choice("data.dataset", d.dataset, DATASETS)
    check_choice("data.augmentation", d.augmentation, AUGMENTATIONS)
    check_choice("train.amp", t.amp, tuple(AMP_MODES))
    check_choice("train.optimizer", t.optimizer, OPTIMIZERS)
    check_choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    check_choice("benchmark.precision", b.precision, PRECISIONS)
    check_choice("launcher.executor", launcher.executor, EXECUTORS)
    for key, value in (
        ("train.epochs", t.epochs),
        ("train.batch_size_per_gpu", t.batch_size_per_gpu),
        ("train.total_batch_size", t.total_batch_size),
        ("train.print_freq", t.print_freq),
        ("train.eval_every", t.eval_every),
        ("data.eval_size", d.eval_size),
        ("data.train_size", d.train_size),
        ("data.max_size", d.max_size),
        ("data.synthetic_train_images", d.synthetic_train_images),
        ("data.synthetic_val_images", d.synthetic_val_images),
        ("eval.num_detections", e.num_detections),
        ("benchmark.flops_images", b.flops_images),
        ("benchmark.fps_images", b.fps_images),
        ("launcher.nodes", launcher.nodes),
        ("launcher.cpus_per_task", launcher.cpus_per_task),
        ("launcher.timeout_min", launcher.timeout_min),
        ("launcher.max_array_size", launcher.max_array_size),
    ):
        if value < 1:
            raise ConfigError(key, f"got {value!r}, expected an integer >= 1")
    for key, value in (
        ("train.lr_drop", t.lr_drop),
        ("data.num_workers", d.num_workers),
        ("benchmark.fps_warmup", b.fps_warmup),
        ("launcher.gpus_per_node", launcher.gpus_per_node),
        ("launcher.max_requeues", launcher.max_requeues),
        ("data.synthetic_seed", d.synthetic_seed),
        ("train.warmup_iters", t.warmup_iters),
    ):
        if value < 0:
            raise ConfigError(key, f"got {value!r}, expected an integer >= 0")
    for key, value in (
        ("train.lr", t.lr),
        ("train.lr_linear_proj_mult", t.lr_linear_proj_mult),
        ("launcher.rendezvous_timeout_min", launcher.rendezvous_timeout_min),
        ("launcher.collective_timeout_min", launcher.collective_timeout_min),
    ):
        if value <= 0:
            raise ConfigError(key, f"got {value!r}, expected a number > 0")
    for key, value in (
        ("train.lr_backbone", t.lr_backbone),
        ("train.weight_decay", t.weight_decay),
        ("train.clip_max_norm", t.clip_max_norm),
    ):
        if value < 0:
            raise ConfigError(key, f"got {value!r}, expected a number >= 0")
    check_recipe(t)
    if e.batch_size_per_gpu is not None and e.batch_size_per_gpu < 1:
        raise ConfigError(
            "eval.batch_size_per_gpu",
            f"got {e.batch_size_per_gpu!r}, expected null (the training batch per GPU) or an integer >= 1",
        )
    if t.max_iters_per_epoch is not None and t.max_iters_per_epoch < 1:
        raise ConfigError("train.max_iters_per_epoch", f"got {t.max_iters_per_epoch!r}, expected null or >= 1")
    if launcher.mem_gb is not None and launcher.mem_gb < 1:
        raise ConfigError("launcher.mem_gb", f"got {launcher.mem_gb!r}, expected null or >= 1")
    if launcher.tasks_per_node is not None and launcher.tasks_per_node < 1:
        raise ConfigError("launcher.tasks_per_node", f"got {launcher.tasks_per_node!r}, expected null or >= 1")
    if any(s < 1 for s in b.fps_batch_sizes):
        raise ConfigError("benchmark.fps_batch_sizes", f"got {list(b.fps_batch_sizes)}, expected sizes >= 1")
    if any(s < 1 for s in e.tta_sizes) or (e.tta and not e.tta_sizes):
        raise ConfigError("eval.tta_sizes", f"got {list(e.tta_sizes)}, expected one or more sizes >= 1")
    if any(s < 1 for s in d.synthetic_image_size):
        raise ConfigError("data.synthetic_image_size", "expected [height, width] >= 1")
    for key, size in (("train_size", d.train_size), ("eval_size", d.eval_size)):
        if d.max_size < size:
            raise ConfigError("data.max_size", f"got {d.max_size}, expected >= data.{key} ({size})")
    if launcher.gpus_per_node < 0:
        raise ConfigError("launcher.gpus_per_node", f"got {launcher.gpus_per_node}, expected >= 0 (0: a CPU job)")
    per_step = t.batch_size_per_gpu * world_size(launcher)
    if t.accumulate_to_total and t.total_batch_size % per_step:
        raise ConfigError(
            "train.total_batch_size",
            f"got {t.total_batch_size}, expected a multiple of batch_size_per_gpu x processes "
            f"({t.batch_size_per_gpu} x {world_size(launcher)} = {per_step})",
        )
    if e.eval_only and not e.checkpoint:
        raise ConfigError("eval.checkpoint", "eval_only: true needs a checkpoint to evaluate")
    if e.tta and cfg.model.arch == "faster_rcnn":
        raise ConfigError("eval.tta", "test-time augmentation is implemented for the DETR family only")


def check_recipe(t: TrainConfig) -> None:
    """The optimiser and schedule fields: ranges, and no field set that the chosen recipe would ignore."""
    if not 0.0 <= t.momentum < 1.0:
        raise ConfigError("train.momentum", f"got {t.momentum!r}, expected 0 <= momentum < 1")
    if t.optimizer != "sgd" and t.momentum != TrainConfig.momentum:
        raise ConfigError(
            "train.momentum",
            f"applies to optimizer 'sgd' only, not {t.optimizer!r}; leave it at {TrainConfig.momentum}",
        )
    if not 0.0 < t.warmup_factor <= 1.0:
        raise ConfigError("train.warmup_factor", f"got {t.warmup_factor!r}, expected 0 < warmup_factor <= 1")
    if t.lr_reference_batch is not None and t.lr_reference_batch < 1:
        raise ConfigError(
            "train.lr_reference_batch",
            f"got {t.lr_reference_batch!r}, expected null (no scaling) "
            "or the total batch the learning rates are stated for (>= 1)",
        )
    milestones = list(t.lr_milestones)
    if t.lr_schedule == "multistep":
        if not milestones:
            raise ConfigError(
                "train.lr_milestones",
                "empty; lr_schedule 'multistep' needs the epochs at which the learning rate drops, e.g. [8, 11]",
            )
        if milestones != sorted(set(milestones)) or milestones[0] < 1 or milestones[-1] >= t.epochs:
            raise ConfigError(
                "train.lr_milestones",
                f"got {milestones}, expected increasing epochs in 1..{t.epochs - 1} (train.epochs is {t.epochs})",
            )
    elif milestones:
        raise ConfigError(
            "train.lr_milestones",
            f"applies to lr_schedule 'multistep' only, not "
            f"{t.lr_schedule!r} (which drops every lr_drop epochs); expected []",
        )


def world_size(launcher: LauncherConfig) -> int:
    """Processes of one run: one per GPU unless ``tasks_per_node`` says otherwise (CPU runs)."""
    per_node = launcher.tasks_per_node or max(launcher.gpus_per_node, 1)
    return launcher.nodes * per_node


def check_dataset(path, label, data: DataConfig, training: bool = True) -> None:
    """A COCO row's dataset: the root, and in it what the row reads (the training split unless it only
    evaluates, and the evaluation split): each annotation file present, non-empty and a JSON object (parsed,
    with its keys checked, up to :data:`PARSE_AT_MOST` bytes; COCO's 450 MB train file only opened), each
    image folder non-empty. One :class:`ExperimentError` names every missing piece and what to put where."""
    if data.dataset != "coco":
        return
    if data.root is None:
        raise ExperimentError(
            path,
            label,
            "data.root",
            "not set; expected the COCO 2017 folder (train2017/, val2017/, annotations/), or run with --smoke",
        )
    if "$" in data.root:
        raise ExperimentError(
            path,
            label,
            "data.root",
            f"{data.root!r}: an environment variable in it "
            "is not set; expected the COCO 2017 folder, or run with --smoke",
        )
    if not os.path.isdir(data.root):
        raise ExperimentError(
            path,
            label,
            "data.root",
            f"{data.root!r} does not exist; expected the COCO "
            "2017 folder (train2017/, val2017/, annotations/), or run with --smoke",
        )
    problems, archives = [], []
    for split in dict.fromkeys(([data.train_split] if training else []) + [data.val_split]):
        test = split.startswith("test")  # test-dev2017: image info only, images in test2017/
        folder = "test2017" if test else split
        annotations = f"annotations/image_info_{split}.json" if test else f"annotations/instances_{split}.json"
        year = split[-4:] if split[-4:].isdigit() else ""
        for rel, problem, archive in (
            (
                annotations,
                _json_problem(os.path.join(data.root, annotations), ("images",) if test else ("images", "annotations")),
                f"image_info_test{year}.zip" if test else f"annotations_trainval{year}.zip" if year else None,
            ),
            (folder + "/", _folder_problem(os.path.join(data.root, folder)), f"{folder}.zip"),
        ):
            if problem:
                problems.append(f"{os.path.join(data.root, rel)} {problem}")
                archives += [archive] if archive and archive not in archives else []
    if problems:
        fix = (
            f"unzip {', '.join(archives)} (https://cocodataset.org/#download) in {data.root}"
            if archives
            else f"put the split's annotations and images in {data.root}"
        )
        raise ExperimentError(
            path,
            label,
            "data.root",
            f"{data.root} lacks files the run reads: "
            f"{'; '.join(problems)}. Expected the COCO 2017 layout (annotations/, train2017/, "
            f"val2017/, test2017/): {fix}, or run with --smoke",
        )


PARSE_AT_MOST = 16 * 2**20  # an annotation file larger than this is opened, not parsed (train: 450 MB)


def _json_problem(file: str, keys) -> str:
    """What is wrong with a COCO annotation file ('' if nothing seen)."""
    if not os.path.exists(file):
        return "is missing"
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(1024).lstrip()
            f.seek(max(size - 1024, 0))
            tail = f.read().rstrip()
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not head:
        return "is empty"
    if not head.startswith(b"{") or not tail.endswith(b"}"):
        return "is not a JSON object (it does not " + (
            "start with '{')" if not head.startswith(b"{") else "end with '}': an interrupted download?)"
        )
    if size > PARSE_AT_MOST:
        return ""
    found = _json_keys(file, size, os.stat(file).st_mtime_ns)
    if isinstance(found, str):
        return f"is not valid JSON ({found})"
    missing = [key for key in keys if key not in found]
    return f"has no {' or '.join(map(repr, missing))} key; expected a COCO annotation file" if missing else ""


@functools.lru_cache(maxsize=64)
def _json_keys(file: str, size: int, mtime_ns: int):
    """The top-level keys of a JSON object file, or why it cannot be read as one."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        return str(e)
    return tuple(data) if isinstance(data, dict) else f"a JSON {type(data).__name__}, not an object"


def _folder_problem(folder: str) -> str:
    if not os.path.isdir(folder):
        return "is not a folder" if os.path.exists(folder) else "is missing"
    try:
        with os.scandir(folder) as entries:
            return "" if next(entries, None) is not None else "is empty"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"


def check_seeds(path, label, value) -> Tuple[int, ...]:
    """``train.seed`` as a list of distinct integers (a single integer: no list; the config holds it)."""
    if not isinstance(value, list):
        return ()
    if not value:
        raise ExperimentError(path, label, "train.seed", "an empty list; expected a seed or a list of seeds")
    for i, seed in enumerate(value):
        expect(path, label, f"train.seed[{i}]", seed, int)
        if seed in value[:i]:
            raise ExperimentError(
                path,
                label,
                f"train.seed[{i}]",
                f"seed {seed} is given twice; expected distinct "
                "seeds (a repeated seed would count one run twice in the mean)",
            )
    return tuple(value)
