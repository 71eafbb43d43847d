"""Move a results store made before schema 3 to today's ids and records.

    python tools/migrate_store.py --results results [--from-commit COMMIT] [--dry-run] [EXPERIMENT.yaml ...]

Schema 3 computes the ids from the role every config field declares (harness/grid/identity.py), adds
``data.train_size`` (until then the training sizes followed ``data.eval_size``: the migrated configs get
``train_size = eval_size``, which is what those runs trained at) and reads the seeds from ``train.seed``
alone. The old ids cannot be recomputed from a stored config without the old code, so the old ids of every
row of the experiment files (both scales, every seed) are computed by the code of ``--from-commit`` (the
last commit of schema 2 by default), in a temporary copy of it, and matched with today's ids row by row.

Each record folder found under an old id moves to the new one, its config.yaml gets the upgraded config
and the new ids, and its numbers are rewritten into today's records (:func:`split_records`). A record whose
upgraded config disagrees with today's resolution of its row on a field that changes its numbers is left
where it is and named. Nothing is deleted; a target that already exists is never overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import yaml

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from harness.grid import SCALES, config_from_dict, differences, expand, load_experiment  # noqa: E402
from harness.grid.specs import EVALUATIONS, MEASUREMENTS  # noqa: E402
from harness.store.files import atomic_write_json, read_json  # noqa: E402
from model.config import EVALUATION, MEASUREMENT, WEIGHTS  # noqa: E402

LAST_SCHEMA_2 = "ec71d1d"
Key = Tuple[str, str, str, int]  # experiment, row label, scale, seed

_OLD_IDS = r"""
import json, sys
from harness.grid import SCALES, expand, load_experiment
out = []
for path in sys.argv[1:]:
    experiment = load_experiment(path, check_data=False)
    for scale in SCALES:
        for s in expand(experiment, scale):
            out.append([s.experiment, s.label, s.scale, s.seed, s.run_id, s.eval_id, s.measure_id])
print(json.dumps(out))
"""


def old_ids(commit: str, experiments: List[str]) -> Dict[Key, Tuple[str, str, str]]:
    """(experiment, label, scale, seed) -> (run id, evaluation id, measurement id) under the code of ``commit``.

    An experiment file of this repository is read as it was at ``commit`` (the rows that made the store;
    today's file may use keys the old code does not know); a file elsewhere is read as it is."""
    with tempfile.TemporaryDirectory(prefix="schema2-") as tmp:
        archive = subprocess.run(["git", "-C", str(REPOSITORY), "archive", commit], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        paths = []
        for path in map(os.path.abspath, experiments):
            inside = os.path.relpath(path, REPOSITORY)
            then = os.path.join(tmp, inside)
            paths.append(then if not inside.startswith("..") and os.path.isfile(then) else path)
        done = subprocess.run(
            [sys.executable, "-c", _OLD_IDS, *paths],
            cwd=tmp,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": tmp},
        )
    if done.returncode != 0:
        raise SystemExit(
            f"error: the code of {commit} could not expand {', '.join(experiments)}:\n{done.stderr.strip()[-2000:]}"
        )
    return {(e, label, sc, int(seed)): (r, ev, m) for e, label, sc, seed, r, ev, m in json.loads(done.stdout)}


def upgrade_config(config: dict) -> dict:
    """A schema-2 config as schema 3 reads it: the training sizes it ran at, no launcher seeds."""
    config = json.loads(json.dumps(config))
    data = config.setdefault("data", {})
    data.setdefault("train_size", data.get("eval_size", 800))
    (config.get("launcher") or {}).pop("seeds", None)
    return config


TRAINING_FACTS = (
    "run_id",
    "label",
    "seed",
    "scale",
    "dataset",
    "epochs_trained",
    "gpu_hours",
    "world_size",
    "device",
    "attn_impl",
    "backbone_weights",
    "commit",
    "date",
    "torch",
)
DROPPED = ("gflops_min", "gflops_max", "num_inputs", "input_sizes", "device_type")


def _write(path: Path, data, dry: bool) -> None:
    if not dry:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)


def _done_status(path: Path, dry: bool) -> None:
    if not path.is_file():
        stamp = "1970-01-01T00:00:00Z"
        _write(
            path,
            {
                "state": "done",
                "job_ids": [],
                "attempts": 0,
                "queued_at": None,
                "started_at": None,
                "finished_at": stamp,
                "updated_at": stamp,
                "reason": None,
                "log_tail": None,
                "host": None,
                "log_dir": None,
            },
            dry,
        )


def split_records(folder: Path, spec, dry: bool) -> List[str]:
    """A schema-2 run folder -> schema-3 records: the training's metrics.json keeps training facts, its AP goes
    to the row's evaluation record, its parameters, FLOPs and FPS (and benchmark.json, a measurement made
    without training) to the measurement record; each number stays in the one record that produced it."""
    from harness.metrics import EVALUATED_FIELDS, MEASURED_FIELDS

    done = []
    cfg = spec.config
    training = read_json(folder / "metrics.json")
    measure_dir = folder / MEASUREMENTS / spec.measure_id
    measurement_settings = {
        "benchmark": json.loads(json.dumps(dataclasses.asdict(cfg.benchmark))),
        "split": cfg.data.val_split,
        "eval_size": cfg.data.eval_size,
        "max_size": cfg.data.max_size,
    }
    benchmark = read_json(folder / "benchmark.json")
    if benchmark is not None:
        target = measure_dir / "metrics.json"
        if target.is_file():
            done.append(f"{folder.name}/benchmark.json: a trained measurement is there; kept that one")
        else:
            size = (benchmark.get("gflops_input") or "").split("x")
            record = {
                **{k: v for k, v in benchmark.items() if k not in DROPPED},
                "date": str(benchmark.get("date", ""))[:10] or None,
                "run_id": spec.run_id,
                "measure_id": spec.measure_id,
                "trained": False,
                "checkpoint_sha256": None,
                "gpu_hours": None,
                "fixed_size": [int(size[1]), int(size[2])]
                if len(size) == 3 and all(x.isdigit() for x in size[1:])
                else None,
                **measurement_settings,
            }
            _write(target, record, dry)
            _done_status(measure_dir / "status.json", dry)
            done.append(f"{folder.name}/benchmark.json -> {MEASUREMENTS}/{spec.measure_id}/")
        if not dry:
            (folder / "benchmark.json").unlink()
    if training is None or "AP" not in training and "params" not in training:
        return done  # no schema-2 training record here (or already split)
    status = read_json(folder / "status.json") or {}
    log = (
        [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
        if (folder / "log.jsonl").is_file()
        else []
    )
    last = [r for r in log if r.get("epoch") is not None][-1:] or [{}]
    e = cfg.eval
    facts = {k: training.get(k) for k in TRAINING_FACTS if k in training}
    facts.update(
        {k: v for k, v in last[0].items() if k.startswith("train_")},
        attempts=status.get("attempts"),
        checkpoint_sha256=None,
        log_evaluation={
            "split": cfg.data.val_split,
            "eval_size": cfg.data.eval_size,
            "tta": e.tta,
            "tta_sizes": list(e.tta_sizes) if e.tta else None,
            "num_detections": e.num_detections,
            "eval_batch_size": e.batch_size_per_gpu or cfg.train.batch_size_per_gpu,
            "eval_id": spec.eval_id,
        },
    )
    evaluation_path = folder / EVALUATIONS / spec.eval_id / "metrics.json"
    evaluation = read_json(evaluation_path) or {k: training[k] for k in EVALUATED_FIELDS if k in training}
    evaluation.update(
        label=spec.label,
        num_images=training.get("num_images"),
        eval_size=cfg.data.eval_size,
        tta_sizes=list(e.tta_sizes) if e.tta else None,
        checkpoint_sha256=None,
        eval_batch_size=e.batch_size_per_gpu or cfg.train.batch_size_per_gpu,
        reused_training_evaluation="checkpoint" not in evaluation,
        torch=training.get("torch"),
        gpu_hours=evaluation.get("gpu_hours"),
        run_id=spec.run_id,
        eval_id=spec.eval_id,
    )
    measurement_path = measure_dir / "metrics.json"
    measurement = read_json(measurement_path) or {
        k: v for k, v in training.items() if k in MEASURED_FIELDS or k.startswith("fps_")
    }
    measurement.update(
        label=spec.label,
        scale=spec.scale,
        trained=True,
        checkpoint_sha256=None,
        gpu_hours=None,
        run_id=spec.run_id,
        measure_id=spec.measure_id,
        **measurement_settings,
        **{k: training[k] for k in ("fps_details", "trivial_unsupported_ops") if k in training},
    )
    _write(evaluation_path, evaluation, dry)
    _write(measurement_path, measurement, dry)
    _write(folder / "metrics.json", facts, dry)
    return done + [
        f"{folder.name}: training facts kept; AP -> {EVALUATIONS}/{spec.eval_id}, "
        f"params/FLOPs/FPS -> {MEASUREMENTS}/{spec.measure_id}"
    ]


def _rewrite_config(folder: Path, spec, dry: bool) -> List[str]:
    """Upgrade folder/config.yaml to ``spec``'s ids; the differences from today's resolution, if any."""
    path = folder / "config.yaml"
    if not path.is_file():
        return []
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["config"] = upgrade_config(doc.get("config") or {})
    role = {EVALUATIONS: EVALUATION, MEASUREMENTS: MEASUREMENT}.get(folder.parent.name, WEIGHTS)
    changed = differences(config_from_dict(doc["config"]), spec.config, role)
    if changed:
        return [f"{k}: {a!r} stored, {b!r} today" for k, a, b in changed]
    doc.update(schema=3, run_id=spec.run_id, eval_id=spec.eval_id, measure_id=spec.measure_id)
    if not dry:
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None), encoding="utf-8")
        os.replace(tmp, path)
    return []


def migrate(results: Path, experiments: List[str], commit: str, dry: bool = False) -> List[str]:
    runs = results / "runs"
    before = old_ids(commit, experiments)
    report, moved, split = [], {}, set()
    for path in experiments:
        experiment = load_experiment(path, check_data=False)
        for scale in SCALES:
            for spec in expand(experiment, scale):
                old = before.get((spec.experiment, spec.label, spec.scale, spec.seed))
                if old is None:
                    continue
                pairs = [(runs / old[0], runs / spec.run_id)]
                pairs += [
                    (runs / spec.run_id / EVALUATIONS / old[1], runs / spec.run_id / EVALUATIONS / spec.eval_id),
                    (runs / spec.run_id / MEASUREMENTS / old[2], runs / spec.run_id / MEASUREMENTS / spec.measure_id),
                ]
                for source, target in pairs:
                    source = moved.get(source, source)
                    if source == target or not source.is_dir():
                        continue
                    if target.exists():
                        report.append(f"kept {source}: {target} exists")
                        continue
                    problems = _rewrite_config(source, spec, dry=True)
                    if problems:
                        report.append(f"kept {source} ({spec.label!r}, {scale}): " + "; ".join(problems))
                        continue
                    report.append(f"{source.relative_to(results)} -> {target.relative_to(results)}")
                    if not dry:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.move(str(source), str(target))
                        _rewrite_config(target, spec, dry=False)
                    moved[source] = target
                if (runs / spec.run_id).is_dir() and (runs / spec.run_id) not in split:
                    split.add(runs / spec.run_id)
                    report += split_records(runs / spec.run_id, spec, dry)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("experiments", nargs="*", help="experiment files whose rows name the runs (default: experiments/)")
    p.add_argument("--results", default=str(REPOSITORY / "results"))
    p.add_argument("--from-commit", default=LAST_SCHEMA_2, help="the code that made the store (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="say what would move; change nothing")
    args = p.parse_args(argv)
    experiments = args.experiments or sorted(str(p) for p in (REPOSITORY / "experiments").glob("*.yaml"))
    for line in migrate(Path(args.results), experiments, args.from_commit, args.dry_run):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
