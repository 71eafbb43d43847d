"""What a config asks of the world: files that must exist (errors: they stop a submission before anything is
queued), resources that cannot train it in reasonable time and settings that would silently do nothing
(warnings, printed by --dry-run and at submission)."""
from __future__ import annotations

import os
from typing import List

from harness.config import RunConfig
from harness.grid.schema import ExperimentError


def check_files(path: str, label: str, cfg: RunConfig) -> None:
    """The files a full-scale run reads at its start (the dataset root is checked by
    :func:`harness.grid.validate.check_dataset`): a checkpoint to evaluate or start from."""
    checkpoint = cfg.eval.checkpoint
    if checkpoint and not os.path.isfile(os.path.expanduser(os.path.expandvars(checkpoint))):
        raise ExperimentError(path, label, "eval.checkpoint", f"{checkpoint!r} does not exist; expected a checkpoint "
                              "file (an official release or one of ours) that the jobs can read")


def config_warnings(cfg: RunConfig) -> List[str]:
    """Settings that are valid but almost certainly not meant."""
    out = []
    t = cfg.train
    if cfg.data.dataset == "coco" and not cfg.eval.eval_only and cfg.launcher.gpus_per_node == 0:
        out.append(f"launcher.gpus_per_node is 0: a COCO training ({t.epochs} epochs) on CPUs only would take "
                   "months; set the GPUs per node (8 for the paper's setting), or use --smoke")
    if not cfg.eval.eval_only and t.lr_schedule == "step" and t.lr_drop >= t.epochs:
        out.append(f"train.lr_drop is {t.lr_drop} but training lasts {t.epochs} epochs: the learning rate never drops")
    return out
