"""What one run does, on every task of its job: train -> evaluate -> complexity -> speed -> metrics.json.

:func:`run_job` is what the launcher submits (pickled by name, so queued jobs run the code snapshot of
their submission). It always resumes from the run folder's latest checkpoint, so a requeued job (pre-empted,
timed out, ``scontrol requeue``) carries on from where it stopped: on a stop signal the engine writes a
mid-epoch checkpoint at the next iteration, so a pre-emption loses seconds, not an epoch. Rank 0 owns the results store:
it claims the run, keeps the claim alive, appends ``log.jsonl``, writes ``metrics.json`` and the status.
"""
from __future__ import annotations

import datetime
import os
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import submitit
import torch

from harness.grid import RunSpec
from harness.launch.environment import distributed_env_from_submitit
from harness.launch.wrapper import stop_requested
from harness.measure import complexity, speed
from harness.metrics import EVALUATED_FIELDS, MEASURED_FIELDS
from harness.provenance import device_name
from harness.run import distributed as dist_utils
from harness.run.checkpointing import CHECKPOINT
from harness.run.engine import evaluate, train
from harness.store import ResultsStore
from model.backbone import weights_info

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


class _Heartbeat(threading.Thread):
    """Keeps the claim alive and the attempt's GPU time recorded while the run works."""

    def __init__(self, store, claim, on_beat=None, period_s=HEARTBEAT_S):
        super().__init__(daemon=True)
        self.store, self.claim, self.on_beat, self.period_s = store, claim, on_beat, period_s
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(self.period_s):
            if self.on_beat is not None:
                self.on_beat()
            self.store.heartbeat(self.claim)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        if "attn_impl" in fps:      # the implementation the FPS ran (attn_impl is kept for what training ran)
            fps["fps_attn_impl"] = fps.pop("attn_impl")
        out.update(fps)
    return out


def backbone_weights_text(model_cfg) -> str:
    """The ImageNet weights the run's trunk started from, for its metrics and the report's notes."""
    info = weights_info(model_cfg)
    if not info["pretrained"]:
        return "none (trained from scratch)"
    parts = [f"{info['imagenet_top1']}% ImageNet top-1"] if info["imagenet_top1"] is not None else []
    if info["sha256"]:
        parts.append(f"sha256 {info['sha256'][:12]}")
    return f"{info['name']}" + (f" ({', '.join(parts)})" if parts else "")


def evaluation_record(spec: RunSpec, metrics: dict, **provenance) -> dict:
    """What an evaluation record holds: the COCO numbers and where, how and on what they were measured."""
    numbers = {k: metrics[k] for k in EVALUATED_FIELDS if k in metrics}
    return {**numbers, "run_id": spec.run_id, "eval_id": spec.eval_id, "split": spec.config.data.val_split,
            "tta": spec.config.eval.tta, "num_detections": spec.config.eval.num_detections, **provenance}


def measurement_record(spec: RunSpec, measured: dict) -> dict:
    """What a measurement record holds: parameters, FLOPs and FPS, and on what and where they were measured."""
    keep = set(MEASURED_FIELDS) | {"gflops_input", "gflops_images", "fps_input", "fps_device", "precision",
                                   "fps_attn_impl", "device", "commit", "date", "torch", "unsupported_ops"}
    kept = {k: v for k, v in measured.items() if k in keep or k.startswith("fps_bs") or k == "fps_details"}
    return {**kept, "run_id": spec.run_id, "measure_id": spec.measure_id}


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


def run_job(request: JobRequest) -> dict:
    """Train, evaluate and measure one run, or (``kind`` evaluate / measure) evaluate its checkpoint or measure
    its model; returns the metrics (on every rank)."""
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
    out_dir = store.run_dir(key)
    claim = heartbeat = attempt = None
    started = time.time()
    gpus = info["world_size"] if torch.cuda.is_available() else 0

    def record_attempt():
        store.record_attempt(key, attempt, started, gpus)

    try:
        if main:
            store.prepare(spec, key)
            claim = store.claim(key, job_id=job_id)
            if claim is None:
                raise RunClaimedElsewhere(f"{out_dir}: run is claimed by another live job; not running it twice")
            attempt = f"{store.mark_running(key, job_id=job_id).attempts}"
            record_attempt()
            heartbeat = _Heartbeat(store, claim, on_beat=record_attempt)
            heartbeat.start()
            print(f"run {exp}/{key} ({spec.label!r}, seed {spec.seed}, {spec.scale} scale) in {out_dir}",
                  flush=True)
        dist_utils.barrier()
        if request.kind == "evaluate":
            return _evaluate(request, store, key, main, record_attempt, gpus)
        if request.kind == "measure":
            return _measure(request, store, key, main, record_attempt)
        log_fn = (lambda record: store.append_log(key, record)) if main else None
        # a stop signal (pre-emption, time-out, scontrol requeue) ends training at the next iteration with a
        # mid-epoch checkpoint; the requeued job resumes at that iteration
        metrics = train(cfg, str(out_dir), log_fn=log_fn, should_stop=stop_requested)
        dist_utils.barrier()
        dist_utils.cleanup()  # what follows runs on rank 0 alone
        if main:
            metrics = dict(metrics)
            print("measuring parameters, FLOPs and FPS", flush=True)
            measured = measure(cfg, str(out_dir))
            world = info["world_size"]
            device = _device()
            record_attempt()
            metrics.update(measured)
            metrics.update(
                attn_impl=speed.attention_of_config(cfg.model, device, cfg.train.amp),   # what training ran
                backbone_weights=backbone_weights_text(cfg.model),
                label=spec.label, seed=spec.seed, run_id=spec.run_id, scale=spec.scale, dataset=cfg.data.dataset,
                epochs_trained=metrics.pop("epochs", cfg.train.epochs), num_detections=cfg.eval.num_detections,
                device=device_name(device),
                world_size=world,
                # every attempt's GPU time: a pre-empted and requeued run costs what all its attempts cost
                gpu_hours=round(store.gpu_hours(key), 4) if gpus else None,
                commit=request.commit, date=datetime.date.today().isoformat(), torch=torch.__version__)
            # the row's evaluation and measurement of this training, as their own records (other rows evaluate
            # or measure it differently); the training is done last, once they are there
            eval_dir = store.prepare(spec, spec.eval_key)
            submission = server_submission(out_dir / f"detections_{cfg.data.val_split}.json", eval_dir, exp)
            store.complete(spec.eval_key, evaluation_record(
                spec, metrics, device=metrics["device"], commit=request.commit, date=metrics["date"],
                server_submission=submission and submission.name))
            store.prepare(spec, spec.measure_key)
            store.complete(spec.measure_key, measurement_record(spec, metrics))
            store.complete(key, metrics)
        return metrics
    except Exception as err:  # a SystemExit (pre-emption, requeue) leaves the run to its next attempt
        if main and not isinstance(err, RunClaimedElsewhere):
            store.mark_failed(key, f"{type(err).__name__}: {err}", traceback.format_exc()[-4000:])
        raise
    finally:
        if attempt is not None:
            record_attempt()             # the attempt's end, whatever ended it
        if heartbeat is not None:
            heartbeat.stopped.set()
        if claim is not None:
            store.release(claim)
        dist_utils.cleanup()


def _evaluate(request: JobRequest, store: ResultsStore, key: str, main: bool, record_attempt, gpus: int) -> dict:
    """Evaluate the run's final checkpoint as the row asks (split, TTA, detections per image) into its
    evaluation record; the training is not touched."""
    spec, cfg = request.spec, request.spec.config
    eval_dir = store.run_dir(key)
    checkpoint = store.run_dir(spec.run_id) / CHECKPOINT
    metrics = evaluate(cfg, output_dir=str(eval_dir), checkpoint=str(checkpoint))
    dist_utils.barrier()
    dist_utils.cleanup()
    if main:
        record_attempt()
        suffix = "_tta" if cfg.eval.tta else ""
        submission = server_submission(eval_dir / f"detections_{cfg.data.val_split}{suffix}.json", eval_dir,
                                       spec.experiment)
        metrics = evaluation_record(
            spec, metrics, device=device_name(_device()), commit=request.commit,
            date=datetime.date.today().isoformat(), gpu_hours=round(store.gpu_hours(key), 4) if gpus else None,
            checkpoint=str(checkpoint),
            server_submission=submission and submission.name)
        store.complete(key, metrics)
    return metrics


def _measure(request: JobRequest, store: ResultsStore, key: str, main: bool, record_attempt) -> dict:
    """Measure the run's model as the row's benchmark settings ask (parameters, FLOPs, FPS) into its
    measurement record; the training is not touched. Rank 0 measures; the others only wait."""
    spec = request.spec
    dist_utils.barrier()
    dist_utils.cleanup()
    if not main:
        return {}
    measured = measure(spec.config, str(store.run_dir(spec.run_id)))
    measured.update(device=device_name(_device()), commit=request.commit, date=datetime.date.today().isoformat(),
                    torch=torch.__version__)
    record_attempt()
    record = measurement_record(spec, measured)
    store.complete(key, record)
    return record
