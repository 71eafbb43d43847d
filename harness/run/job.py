"""What one job does, on every task of it: train -> (training record) -> the row's evaluation and measurement
records; or, for a training that is done, evaluate its checkpoint or measure its model.

:func:`run_job` is what the launcher submits (pickled by name, so queued jobs run the code snapshot of
their submission). It always resumes from the run folder's latest checkpoint, so a requeued job (pre-empted,
timed out, ``scontrol requeue``) carries on from where it stopped: on a stop signal the engine writes a
mid-epoch checkpoint at the next iteration, so a pre-emption loses seconds, not an epoch. Rank 0 owns the results store:
it claims the record, keeps the claim alive, appends ``log.jsonl``, writes ``metrics.json`` and the status.

One record per number (DESIGN.md, Records):

* the training record (``runs/<run_id>/metrics.json``): training facts only — epochs trained, the last
  epoch's losses, attempts, GPU-hours, world size, device, attention implementation, backbone weights,
  commit, date, torch and ``checkpoint_sha256`` (of the final ``checkpoint.pth``, computed once, when the
  training completes). Its per-epoch evaluation uses the run's own settings (:func:`training_config`), not
  those of whichever row submitted it; its AP stays in ``log.jsonl``.
* the evaluation record (``evaluations/<eval_id>/``): the COCO numbers, the settings that made them, the
  checkpoint's hash, its own GPU-hours and provenance (:func:`evaluation_record`).
* the measurement record (``measurements/<measure_id>/``): parameters, FLOPs, FPS
  (:func:`harness.measure.record.measurement_record`).

The training record is completed before the row's evaluation and measurement are made, so a failing
evaluation of one row never fails a training other rows share.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import submitit
import torch

from harness.grid import RunSpec, eval_id
from harness.grid.schema import SECTION_CLASSES
from harness.launch.environment import distributed_env_from_submitit
from harness.launch.wrapper import stop_requested
from harness.measure import complexity, speed
from harness.measure.record import measurement_record
from harness.metrics import EVALUATED_FIELDS
from harness.provenance import device_name
from harness.run import distributed as dist_utils
from harness.run.checkpointing import CHECKPOINT
from harness.run.engine import evaluate, train
from harness.run.loaders import eval_batch_size
from harness.store import CorruptFileError, ResultsStore
from model.backbone import weights_info
from model.config import EVALUATION, field_roles

HEARTBEAT_S = 60


@dataclass(frozen=True)
class JobRequest:
    """A run and where its results go (the argument the launcher pickles for each job)."""
    spec: RunSpec
    results_root: str
    commit: Optional[str] = None
    kind: str = "train"          # train (then evaluate and measure) | evaluate | measure (the trained model only)


class RunClaimedElsewhere(RuntimeError):
    pass


def _job_id() -> Optional[str]:
    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:          # not in a submitit job
        return os.environ.get("SLURM_JOB_ID")


class _Attempt:
    """The attempt this job is making at one record (its key), recorded in that record's attempts.json when it
    opens, on every heartbeat and when it closes, so each record's GPU-hours are its own."""

    def __init__(self, store: ResultsStore):
        self.store = store
        self.key: Optional[str] = None
        self.lock = threading.Lock()

    def open(self, key: str, attempt, gpus: int) -> None:
        with self.lock:
            self.key, self.attempt, self.gpus, self.started = key, str(attempt), int(gpus), time.time()
        self.beat()

    def beat(self) -> None:
        with self.lock:
            if self.key is not None:
                self.store.record_attempt(self.key, self.attempt, self.started, self.gpus)

    def close(self) -> None:
        self.beat()
        with self.lock:
            self.key = None

    def gpu_hours(self, key: str) -> Optional[float]:
        """The record's GPU-hours over all its attempts (None for a record made without GPUs)."""
        return round(self.store.gpu_hours(key), 4) if self.gpus else None


class _Heartbeat(threading.Thread):
    """Keeps the claims alive and the open attempt's GPU time recorded while the job works."""

    def __init__(self, store, claims: List, on_beat=None, period_s=HEARTBEAT_S):
        super().__init__(daemon=True)
        self.store, self.claims, self.on_beat, self.period_s = store, claims, on_beat, period_s
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(self.period_s):
            if self.on_beat is not None:
                self.on_beat()
            for claim in list(self.claims):
                self.store.heartbeat(claim)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _today() -> str:
    return datetime.date.today().isoformat()


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes (a checkpoint: read in blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def trained_checkpoint(store: ResultsStore, spec: RunSpec) -> Optional[Path]:
    """The checkpoint the run's training left: its ``checkpoint.pth``, or for an evaluation-only run
    (``eval.eval_only``) the file it evaluates; None when there is none."""
    path = store.record_dir(spec.run_id) / CHECKPOINT
    if path.is_file():
        return path
    cfg = spec.config
    if cfg.eval.eval_only and cfg.eval.checkpoint and os.path.isfile(cfg.eval.checkpoint):
        return Path(cfg.eval.checkpoint)
    return None


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
        return "val2017"                       # the generated set is train2017 + val2017
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
    data = dataclasses.replace(sections["data"], val_split=_training_split(cfg), eval_size=cfg.data.train_size,
                               synthetic_val_images=cfg.data.synthetic_val_images)
    return dataclasses.replace(cfg, **{**sections, "data": data})


def same_evaluation(a, b) -> bool:
    """Whether two configs evaluate a checkpoint alike (the same evaluation id)."""
    return eval_id(a) == eval_id(b)


def measure(run_cfg, output_dir) -> dict:
    """Parameters, FLOPs (fvcore, over the first evaluation images) and FPS of the run's model."""
    bench = run_cfg.benchmark
    if bench.flops:
        out = complexity.measure_complexity(run_cfg, images=bench.flops_images, output_dir=output_dir,
                                            device=_device())
        # the per-image list and per-operator breakdown stay out of metrics.json
        for key in ("gflops_each", "by_operator", "handles"):
            out.pop(key, None)
    else:
        out = {"params": complexity.count_parameters(complexity.build_for_complexity(run_cfg.model))}
    if bench.fps:
        fps = speed.measure_run_speed(run_cfg, output_dir=output_dir)
        if "attn_impl" in fps:      # the implementation the FPS ran
            fps["fps_attn_impl"] = fps.pop("attn_impl")
        out.update(fps)
    return out


def backbone_weights_text(model_cfg) -> str:
    """The ImageNet weights the run's trunk started from, for its training record and the report's notes."""
    info = weights_info(model_cfg)
    if not info["pretrained"]:
        return "none (trained from scratch)"
    parts = [f"{info['imagenet_top1']}% ImageNet top-1"] if info["imagenet_top1"] is not None else []
    if info["sha256"]:
        parts.append(f"sha256 {info['sha256'][:12]}")
    return f"{info['name']}" + (f" ({', '.join(parts)})" if parts else "")


def evaluation_settings(cfg) -> dict:
    """The settings an evaluation of ``cfg`` ran with (the evaluation id's fields, resolved)."""
    return {"split": cfg.data.val_split, "eval_size": cfg.data.eval_size, "tta": cfg.eval.tta,
            "tta_sizes": list(cfg.eval.tta_sizes) if cfg.eval.tta else None,
            "num_detections": cfg.eval.num_detections, "eval_batch_size": eval_batch_size(cfg)}


def evaluation_record(spec: RunSpec, metrics: dict, **provenance) -> dict:
    """What an evaluation record holds: the COCO numbers, the settings that made them, and the checkpoint,
    device, commit, date and GPU-hours of the evaluation (``provenance``)."""
    numbers = {k: metrics[k] for k in EVALUATED_FIELDS if k in metrics}
    if "num_images" in metrics:
        numbers["num_images"] = metrics["num_images"]
    return {**numbers, "run_id": spec.run_id, "eval_id": spec.eval_id, "label": spec.label,
            **evaluation_settings(spec.config), **provenance}


def training_record(spec: RunSpec, store: ResultsStore, epochs: int, **facts) -> dict:
    """What the training record holds: training facts, no AP and no parameters/FLOPs/FPS. The losses are the
    last epoch's (``train_*`` of log.jsonl)."""
    last = next((r for r in reversed(store.read_log(spec.run_id)) if r.get("epoch") is not None), {})
    losses = {k: v for k, v in last.items() if k.startswith("train_")}
    status = store.read_status(spec.run_id)
    return {"run_id": spec.run_id, "label": spec.label, "seed": spec.seed, "scale": spec.scale,
            "dataset": spec.config.data.dataset, "epochs_trained": epochs, **losses,
            "attempts": status.attempts if status is not None else None, **facts}


def server_submission(detections: Path, folder: Path, name: str) -> Optional[Path]:
    """The zip the COCO evaluation server expects (``detections_test-dev2017_<name>_results.json`` inside)."""
    if not detections.is_file():
        return None
    alg = "".join(c for c in name if c.isalnum())       # no underscores: the server splits the name on them
    inner = f"detections_test-dev2017_{alg}_results.json"
    target = folder / f"{inner[:-5]}.zip"
    tmp = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(detections, inner)
    os.replace(tmp, target)
    return target


def _training_done(store: ResultsStore, key: str) -> bool:
    """A training record that is complete (done, with its checkpoint's hash): a requeued job does not train
    it again, it only makes the row's evaluation and measurement."""
    try:
        status, metrics = store.read_status(key), store.read_metrics(key)
    except CorruptFileError:
        return False
    return status is not None and status.state == "done" and bool((metrics or {}).get("checkpoint_sha256"))


def run_job(request: JobRequest) -> dict:
    """Train, then complete the training record, then make the row's evaluation and measurement records; or
    (``kind`` evaluate / measure) evaluate the training's checkpoint or measure its model. Returns the records
    made on rank 0 ({kind: record}), the training's final metrics on the other ranks."""
    spec, store = request.spec, ResultsStore(request.results_root)
    exp, cfg = spec.experiment, spec.config
    key = spec.key(request.kind)          # the record this job fills: the run, its evaluation or measurement
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():
        # torch's threads default to every core of the node: with one task per GPU (or several CPU tasks)
        # on a node they would oversubscribe it; each task uses the CPUs SLURM gave it
        torch.set_num_threads(int(cpus))
    distributed_env_from_submitit(export=True)
    info = dist_utils.init_distributed()
    main = info["rank"] == 0
    job_id = _job_id()
    out_dir = store.record_dir(key)
    claims: List = []
    heartbeat = None
    attempt = _Attempt(store)
    gpus = info["world_size"] if torch.cuda.is_available() else 0
    completed = False                     # the record of ``key`` is done: a later failure is another record's

    try:
        trained = False
        if main:
            store.prepare(spec, key)
            claim = store.claim(key, job_id=job_id)
            if claim is None:
                raise RunClaimedElsewhere(f"{out_dir}: run is claimed by another live job; not running it twice")
            claims.append(claim)
            trained = request.kind == "train" and _training_done(store, key)
            if not trained:
                attempt.open(key, store.mark_running(key, job_id=job_id).attempts, gpus)
            heartbeat = _Heartbeat(store, claims, on_beat=attempt.beat)
            heartbeat.start()
            print(f"run {exp}/{key} ({spec.label!r}, seed {spec.seed}, {spec.scale} scale) in {out_dir}",
                  flush=True)
        if request.kind == "train":
            trained = dist_utils.all_gather_object(trained)[0]       # rank 0's answer on every rank
        dist_utils.barrier()
        if request.kind == "evaluate":
            record = _evaluate(spec, store, request.commit, main, attempt, gpus)
            completed = True
            return record
        if request.kind == "measure":          # rank 0 measures; the others only wait
            dist_utils.cleanup()
            record = _measure(spec, store, request.commit, attempt) if main else {}
            completed = True
            return record

        own = training_config(cfg)            # the training evaluates itself as the run, not as the row, asks
        final = None
        if not trained:
            log_fn = (lambda record: store.append_log(key, record)) if main else None
            # a stop signal (pre-emption, time-out, scontrol requeue) ends training at the next iteration with a
            # mid-epoch checkpoint; the requeued job resumes at that iteration
            final = train(own, str(out_dir), log_fn=log_fn, should_stop=stop_requested)
        dist_utils.barrier()
        dist_utils.cleanup()  # what follows runs on rank 0 alone
        if not main:
            return dict(final or {})
        records = {}
        if trained:
            print(f"training {key} is done already: making the row's evaluation and measurement", flush=True)
        else:
            attempt.close()
            checkpoint = trained_checkpoint(store, spec)
            device = _device()
            records["train"] = training_record(
                spec, store, final.get("epochs", cfg.train.epochs),
                gpu_hours=attempt.gpu_hours(key), world_size=info["world_size"], device=device_name(device),
                attn_impl=speed.attention_of_config(cfg.model, device, cfg.train.amp),   # what training ran
                backbone_weights=backbone_weights_text(cfg.model),
                checkpoint_sha256=file_sha256(checkpoint) if checkpoint is not None else None,
                log_evaluation={**evaluation_settings(own), "eval_id": eval_id(own)},
                commit=request.commit, date=_today(), torch=torch.__version__)
            store.complete(key, records["train"])
        completed = True
        # the row's evaluation and measurement of this training, each its own record (other rows evaluate or
        # measure it differently); one failing leaves the training done and the other still made
        sha = training_checkpoint_sha256(store, spec)
        reuse = final if final is not None and same_evaluation(own, cfg) else None
        sub_gpus = 1 if torch.cuda.is_available() else 0     # rank 0 alone from here
        failures = []
        for kind, make in (("evaluate", lambda: _evaluate(spec, store, request.commit, True, attempt, sub_gpus,
                                                            metrics=reuse, checkpoint_sha256=sha)),
                           ("measure", lambda: _measure(spec, store, request.commit, attempt,
                                                        checkpoint_sha256=sha))):
            made = _sub_record(spec, kind, store, job_id, sha, claims, attempt, sub_gpus, make)
            if isinstance(made, BaseException):
                failures.append(made)
            elif made is not None:
                records[kind] = made
        if failures:
            raise failures[0]
        return records
    except Exception as err:  # a SystemExit (pre-emption, requeue) leaves the run to its next attempt
        if main and not completed and not isinstance(err, RunClaimedElsewhere):
            store.mark_failed(key, f"{type(err).__name__}: {err}", traceback.format_exc()[-4000:])
        raise
    finally:
        attempt.close()                  # the attempt's end, whatever ended it
        if heartbeat is not None:
            heartbeat.stopped.set()
        for claim in claims:
            store.release(claim)
        dist_utils.cleanup()


def _sub_record(spec: RunSpec, kind: str, store: ResultsStore, job_id, sha: Optional[str], claims: List,
                attempt: _Attempt, gpus: int, make: Callable[[], dict]):
    """Make the row's evaluation or measurement record (``kind``) after its training, in the training's job:
    claimed, marked running and timed as its own record. Returns the record, None when it was not made (done
    already from this very checkpoint, or claimed by another job), or the exception that failed it (the record
    is marked failed; the training stays done)."""
    key = spec.key(kind)
    try:
        status, done = store.read_status(key), store.read_metrics(key)
    except CorruptFileError:
        status, done = None, None
    if status is not None and status.state == "done" and sha is not None and (done or {}).get(
            "checkpoint_sha256") == sha:
        print(f"{key}: done already from this checkpoint", flush=True)
        return None
    store.prepare(spec, key)
    claim = store.claim(key, job_id=job_id)
    if claim is None:
        print(f"{key}: claimed by another live job; not made here", flush=True)
        return None
    claims.append(claim)
    try:
        attempt.open(key, store.mark_running(key, job_id=job_id).attempts, gpus)
        print(f"{'evaluating' if kind == 'evaluate' else 'measuring'} {key}", flush=True)
        return make()
    except Exception as err:
        store.mark_failed(key, f"{type(err).__name__}: {err}", traceback.format_exc()[-4000:])
        traceback.print_exc()
        return err
    finally:
        attempt.close()
        claims.remove(claim)
        store.release(claim)


def _shown_path(store: ResultsStore, path: Optional[Path]) -> Optional[str]:
    """A file as a record names it: relative to the results root when it lies there (records are committed)."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(store.root.resolve()))
    except ValueError:
        return str(path)


def _evaluate(spec: RunSpec, store: ResultsStore, commit: Optional[str], main: bool, attempt: _Attempt, gpus: int,
              metrics: Optional[dict] = None, checkpoint_sha256: Optional[str] = None) -> dict:
    """The row's evaluation record of the training's final checkpoint, as the row asks (split, size, TTA,
    detections per image). ``metrics``: the training's final-epoch evaluation when it ran with exactly these
    settings (reused, not evaluated again). The training record is not touched."""
    cfg = spec.config
    key = spec.eval_key
    eval_dir, split = store.record_dir(key), cfg.data.val_split
    checkpoint = trained_checkpoint(store, spec)
    reused = metrics is not None
    if reused:
        detections = store.record_dir(spec.run_id) / f"detections_{split}.json"
    else:
        if checkpoint is None:
            raise FileNotFoundError(f"{store.record_dir(spec.run_id) / CHECKPOINT}: no checkpoint of the training to "
                                    "evaluate")
        metrics = evaluate(cfg, output_dir=str(eval_dir), checkpoint=str(checkpoint))
        detections = eval_dir / f"detections_{split}{'_tta' if cfg.eval.tta else ''}.json"
    dist_utils.barrier()
    dist_utils.cleanup()
    if not main:
        return metrics
    attempt.beat()
    submission = None if annotated(split) else server_submission(detections, eval_dir, spec.experiment)
    record = evaluation_record(
        spec, metrics, reused_training_evaluation=reused,
        checkpoint=_shown_path(store, checkpoint),
        checkpoint_sha256=checkpoint_sha256 or training_checkpoint_sha256(store, spec),
        server_submission=submission and submission.name, gpu_hours=attempt.gpu_hours(key),
        device=device_name(_device()), commit=commit, date=_today(), torch=torch.__version__)
    store.complete(key, record)
    return record


def _measure(spec: RunSpec, store: ResultsStore, commit: Optional[str], attempt: _Attempt,
             checkpoint_sha256: Optional[str] = None) -> dict:
    """The row's measurement record of the run's model (parameters, FLOPs, FPS) as its benchmark settings ask,
    on rank 0; the training is not touched."""
    measured = measure(spec.config, str(store.record_dir(spec.run_id)))
    attempt.beat()
    key = spec.measure_key
    record = measurement_record(spec, measured, checkpoint_sha256=checkpoint_sha256 or training_checkpoint_sha256(
        store, spec), trained=True, gpu_hours=attempt.gpu_hours(key), device=device_name(_device()), commit=commit,
        date=_today(), torch=torch.__version__)
    store.complete(key, record)
    return record
