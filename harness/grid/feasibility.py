"""What a config asks of the world: files that must exist (errors: they stop a submission before anything is
queued), resources that cannot train it in reasonable time and settings that would silently do nothing
(warnings, printed by --dry-run and at submission); and what an experiment asks of it: its file, found by
name, and a name that no other experiment file has; and what a command asks of its paths."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import List, Optional

from harness.config import RunConfig
from harness.grid.schema import ExperimentError, read_yaml
from model.released import ReleasedCheckpointError, expected_sha256, is_url


def check_files(path: str, label: str, cfg: RunConfig) -> None:
    """The files a full-scale run reads at its start (the dataset root is checked by
    :func:`harness.grid.validate.check_dataset`): a checkpoint to evaluate or start from."""
    checkpoint = cfg.eval.checkpoint
    if is_url(checkpoint):  # a released file: fetched at submission (model.released)
        try:
            expected_sha256(checkpoint, cfg.eval.checkpoint_sha256)
        except ReleasedCheckpointError as err:
            raise ExperimentError(path, label, "eval.checkpoint_sha256", str(err)) from None
        return
    local = os.path.expanduser(os.path.expandvars(checkpoint)) if checkpoint else None
    if local and not (os.path.isfile(local) or os.path.isfile(os.path.join(local, "config.json"))):
        raise ExperimentError(
            path,
            label,
            "eval.checkpoint",
            f"{checkpoint!r} does not exist; expected a checkpoint "
            "file (an official release or one of ours), a Hugging Face folder (config.json and "
            "its weights) or a URL, that the jobs can read",
        )


def config_warnings(cfg: RunConfig) -> List[str]:
    """Settings that are valid but almost certainly not meant."""
    out = []
    t = cfg.train
    if cfg.data.dataset == "coco" and not cfg.eval.eval_only and cfg.launcher.gpus_per_node == 0:
        out.append(
            f"launcher.gpus_per_node is 0: a COCO training ({t.epochs} epochs) on CPUs only would take "
            "months; set the GPUs per node (8 for the paper's setting), or use --smoke"
        )
    if not cfg.eval.eval_only and t.lr_schedule == "step" and t.lr_drop >= t.epochs:
        out.append(f"train.lr_drop is {t.lr_drop} but training lasts {t.epochs} epochs: the learning rate never drops")
    return out


def find_experiment(name_or_path: str, experiments_dir) -> str:
    """The experiment file ``name_or_path`` names: a path, or a name in ``experiments_dir`` (``table2`` ->
    ``experiments/table2.yaml``)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    for candidate in (
        os.path.join("experiments", f"{name_or_path}.yaml"),
        os.path.join(str(experiments_dir), f"{name_or_path}.yaml"),
        f"{name_or_path}.yaml",
    ):
        if os.path.isfile(candidate):
            return candidate
    known = (
        sorted(f[:-5] for f in os.listdir(experiments_dir) if f.endswith(".yaml"))
        if os.path.isdir(experiments_dir)
        else []
    )
    raise ExperimentError(
        name_or_path,
        None,
        None,
        "no such file, and no experiment of that name in "
        f"{experiments_dir}; expected a YAML path or one of: {', '.join(known) or 'none'}",
    )


def check_unique_name(experiment, experiments_dir) -> None:
    """An experiment's name must be its own: two files with one name would share ``results/<name>/`` and
    overwrite each other's ``reports/<name>.*``. Looks at the YAML files beside it and in ``experiments_dir``."""
    here = os.path.realpath(experiment.path)
    folders = {os.path.dirname(here), os.path.realpath(str(experiments_dir))}
    for folder in sorted(folders):
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            other = os.path.join(folder, entry)
            if not entry.endswith((".yaml", ".yml")) or os.path.realpath(other) == here:
                continue
            try:
                data = read_yaml(other)
            except ExperimentError:
                continue  # not an experiment file (or a broken one): not this check's business
            if data.get("name") == experiment.name and "rows" in data:
                raise ExperimentError(
                    experiment.path,
                    None,
                    "name",
                    f"{experiment.name!r} is already the name of "
                    f"{other}: the two would share results/{experiment.name}/ and overwrite "
                    f"reports/{experiment.name}.*; give this experiment a name of its own",
                )


def command_path_problem(results, reports=None, export=None, must_exist: bool = False) -> Optional[str]:
    """What is wrong, in one line, with a command's ``--results`` (a folder; one that exists where the command
    reads it, ``must_exist``), ``--reports`` (not a file) or ``--export`` file (a known format whose writer is
    installed), before anything is loaded or collected; None: nothing."""
    results = Path(results)
    if results.exists() and not results.is_dir():
        return f"--results {results}: not a folder; expected the results store (a folder holding runs/<run_id>/)"
    if must_exist and not results.is_dir():
        return (
            f"--results {results}: no such folder; expected the results store the rows were submitted to "
            "(a folder holding runs/<run_id>/); a submission creates it"
        )
    if reports is not None and Path(reports).is_file():
        return f"--reports {reports}: a file; expected a folder for the reports"
    if export is not None:
        export, suffix = Path(export), Path(export).suffix.lower()
        if suffix not in (".csv", ".parquet", ".pq"):
            return f"--export {export}: unknown format {suffix or '(no suffix)'!r}; expected a .csv or .parquet file"
        if suffix != ".csv" and importlib.util.find_spec("pyarrow") is None:
            return f"--export {export}: writing Parquet needs pyarrow (pip install pyarrow); or export to a .csv file"
        if export.is_dir():
            return f"--export {export}: a folder; expected a .csv or .parquet file to write"
    return None
