"""What one job does, on every task of it: train -> (training record) -> the row's evaluation and measurement
records; or, for a training that is done, evaluate its checkpoint or measure its model.

:func:`run_job` is what the launcher submits (pickled by name, so queued jobs run the code snapshot of
their submission). It always resumes from the run folder's latest checkpoint, so a requeued or resubmitted job
carries on from where it stopped: on a stop signal (Ctrl-C, ``--cancel``, ``scancel``, a pre-emption) the
engine writes a mid-epoch checkpoint at the next iteration (or stops between evaluation batches), so a stop
loses seconds, not an epoch, and the record is marked ``interrupted`` (``queued`` when submitit requeues the
job). Rank 0 owns the results store: it claims the record, keeps the claim alive, appends ``log.jsonl``,
writes ``metrics.json`` and the status. What each record holds: :mod:`harness.run.records`.

The training record is completed before the row's evaluation and measurement are made, so a failing
evaluation of one row never fails a training other rows share.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

from harness.grid import RunSpec, eval_id
from harness.launch import current_job_id
from harness.launch.environment import distributed_env_from_submitit
from harness.launch.wrapper import JobInterrupted, requeue_pending, stop_requested, stop_signal_names
from harness.measure import speed
from harness.measure.record import measurement_record
from harness.provenance import device_name
from harness.run import distributed as dist_utils
from harness.run.attempt import Attempt, Heartbeat, RunClaimedElsewhere, claim_when_free
from harness.run.checkpointing import CHECKPOINT
from harness.run.engine import evaluate, train
from harness.run.evaluation import detections_file
from harness.run.records import (
    annotated,
    backbone_weights_text,
    device,
    evaluation_record,
    evaluation_settings,
    file_sha256,
    measure,
    same_evaluation,
    server_submission,
    shown_path,
    today,
    trained_checkpoint,
    training_checkpoint_sha256,
    training_config,
    training_record,
)
from harness.run.tracking import METRICS, ap_text
from harness.store import CorruptFileError, ResultsStore

__all__ = ["JobRequest", "RunClaimedElsewhere", "run_job", "server_submission", "training_config"]


@dataclass(frozen=True)
class JobRequest:
    """A run and where its results go (the argument the launcher pickles for each job)."""

    spec: RunSpec
    results_root: str
    commit: Optional[str] = None
    kind: str = "train"  # train (then evaluate and measure) | evaluate | measure (the trained model only)


def _training_done(store: ResultsStore, key: str) -> bool:
    """A training record that is complete (done, with its checkpoint's hash): a requeued job does not train
    it again, it only makes the row's evaluation and measurement."""
    try:
        status, metrics = store.read_status(key), store.read_metrics(key)
    except CorruptFileError:
        return False
    return status is not None and status.state == "done" and bool((metrics or {}).get("checkpoint_sha256"))


def _mark_stopped(store: ResultsStore, key: str, job_id: Optional[str], err: BaseException) -> None:
    """The record of a job stopped by a signal: queued again when submitit requeues the job (pre-emption,
    time-out), else interrupted, and the next submission resumes it. A cancelled record stays cancelled."""
    try:
        status = store.read_status(key)
    except CorruptFileError:
        status = None
    if requeue_pending() and status is not None and status.state == "running":
        store.mark_queued(key)
        return
    signals = stop_signal_names()
    what = str(err) if isinstance(err, JobInterrupted) and str(err) else f"{type(err).__name__}: {err}"
    store.mark_interrupted(
        key, f"interrupted by {signals}: {what}" if signals else f"interrupted: {what}", job_id=job_id
    )
    print(f"{key}: interrupted; submitting it again resumes from its checkpoint", flush=True)


def _init_distributed(store: ResultsStore, key: str, launcher, job_id: Optional[str]) -> dict:
    """The process group within the launcher's time limits; a rendezvous that fails marks the record failed
    (on rank 0, when the record is still this job's), so that ``--status`` says why instead of "queued"."""
    try:
        return dist_utils.init_distributed(
            rendezvous_timeout_min=launcher.rendezvous_timeout_min,
            collective_timeout_min=launcher.collective_timeout_min,
        )
    except dist_utils.RendezvousError as err:
        status = store.read_status(key) if os.environ.get("RANK", "0") == "0" else None
        if status is not None and status.job_ids and status.job_ids[-1] == job_id:
            store.mark_failed(key, f"{type(err).__name__}: {err}", traceback.format_exc()[-4000:])
        raise


def run_job(request: JobRequest) -> dict:
    """Train, then complete the training record, then make the row's evaluation and measurement records; or
    (``kind`` evaluate / measure) evaluate the training's checkpoint or measure its model. Returns the records
    made on rank 0 ({kind: record}), the training's final metrics on the other ranks."""
    spec, store = request.spec, ResultsStore(request.results_root)
    exp, cfg = spec.experiment, spec.config
    key = spec.key(request.kind)  # the record this job fills: the run, its evaluation or measurement
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():
        # torch's threads default to every core of the node: with one task per GPU (or several CPU tasks)
        # on a node they would oversubscribe it; each task uses the CPUs SLURM gave it
        torch.set_num_threads(int(cpus))
    distributed_env_from_submitit(export=True)
    job_id = current_job_id()
    info = _init_distributed(store, key, cfg.launcher, job_id)
    main = info["rank"] == 0
    out_dir = store.record_dir(key)
    claims: List = []
    heartbeat = None
    attempt = Attempt(store, job_id)
    gpus = info["world_size"] if torch.cuda.is_available() else 0
    completed = False  # the record of ``key`` is done: a later failure is another record's

    try:
        trained = False
        if main:
            store.prepare(spec, key)
            claim = claim_when_free(store, key, job_id)  # waits for the submission that queued it
            if claim is None:
                raise RunClaimedElsewhere(f"{out_dir}: run is claimed by another live job; not running it twice")
            claims.append(claim)
            trained = request.kind == "train" and _training_done(store, key)
            if not trained:
                attempt.open(key, store.mark_running(key, job_id=job_id).attempts, gpus)
            heartbeat = Heartbeat(store, claims, on_beat=attempt.beat)
            heartbeat.start()
            print(f"run {exp}/{key} ({spec.label!r}, seed {spec.seed}, {spec.scale} scale) in {out_dir}", flush=True)
        if request.kind == "train":
            trained = dist_utils.all_gather_object(trained)[0]  # rank 0's answer on every rank
        dist_utils.barrier()
        if request.kind == "evaluate":
            record = _evaluate(spec, store, request.commit, main, attempt, gpus)
            completed = True
            return record
        if request.kind == "measure":  # rank 0 measures; the others only wait
            dist_utils.cleanup()
            record = _measure(spec, store, request.commit, attempt) if main else {}
            completed = True
            return record

        own = training_config(cfg)  # the training evaluates itself as the run, not as the row, asks
        final = None
        if not trained:
            log_fn = (lambda record: store.append_log(key, record)) if main else None
            # a stop signal (Ctrl-C, a cancel, pre-emption, time-out) ends training at the next iteration with a
            # mid-epoch checkpoint; the next attempt resumes at that iteration
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
            dev = device()
            records["train"] = training_record(
                spec,
                store,
                final.get("epochs", cfg.train.epochs),
                gpu_hours=attempt.gpu_hours(key),
                world_size=info["world_size"],
                device=device_name(dev),
                attn_impl=speed.attention_of_config(cfg.model, dev, cfg.train.amp),  # what training ran
                backbone_weights=backbone_weights_text(cfg),
                checkpoint_sha256=file_sha256(checkpoint) if checkpoint is not None else None,
                log_evaluation={**evaluation_settings(own), "eval_id": eval_id(own)},
                commit=request.commit,
                date=today(),
                torch=torch.__version__,
            )
            store.complete(key, records["train"])
        completed = True
        # the row's evaluation and measurement of this training, each its own record (other rows evaluate or
        # measure it differently); one failing leaves the training done and the other still made
        sha = training_checkpoint_sha256(store, spec)
        reuse = final if final is not None and same_evaluation(own, cfg) else None
        sub_gpus = 1 if torch.cuda.is_available() else 0  # rank 0 alone from here
        failures = []
        for kind, make in (
            (
                "evaluate",
                lambda: _evaluate(
                    spec, store, request.commit, True, attempt, sub_gpus, metrics=reuse, checkpoint_sha256=sha
                ),
            ),
            ("measure", lambda: _measure(spec, store, request.commit, attempt, checkpoint_sha256=sha)),
        ):
            made = _sub_record(spec, kind, store, job_id, sha, claims, attempt, sub_gpus, make)
            if isinstance(made, BaseException):
                failures.append(made)
            elif made is not None:
                records[kind] = made
        if failures:
            raise failures[0]
        return records
    except Exception as err:
        if main and not completed and not isinstance(err, RunClaimedElsewhere):
            if stop_requested():  # a failure caused by the stop (a peer gone mid-collective): not the run's
                _mark_stopped(store, key, job_id, err)
            else:
                store.mark_failed(key, f"{type(err).__name__}: {err}", traceback.format_exc()[-4000:])
        raise
    except BaseException as err:  # stopped (JobInterrupted, a hard stop, Ctrl-C in a debug job)
        if main and not completed:
            _mark_stopped(store, key, job_id, err)
        raise
    finally:
        attempt.close()  # the attempt's end, whatever ended it
        if heartbeat is not None:
            heartbeat.stopped.set()
        for claim in claims:
            store.release(claim)
        dist_utils.cleanup()


def _sub_record(
    spec: RunSpec,
    kind: str,
    store: ResultsStore,
    job_id,
    sha: Optional[str],
    claims: List,
    attempt: Attempt,
    gpus: int,
    make: Callable[[], dict],
):
    """Make the row's evaluation or measurement record (``kind``) after its training, in the training's job:
    claimed, marked running and timed as its own record. Returns the record, None when it was not made (done
    already from this very checkpoint, or claimed by another job), or the exception that failed it (the record
    is marked failed; the training stays done)."""
    key = spec.key(kind)
    if stop_requested():  # a stop asked for while the training finished: nothing more is started
        raise JobInterrupted(f"stopped before {key} was made")
    try:
        status, done = store.read_status(key), store.read_metrics(key)
    except CorruptFileError:
        status, done = None, None
    if (
        status is not None
        and status.state == "done"
        and sha is not None
        and (done or {}).get("checkpoint_sha256") == sha
    ):
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
    except BaseException as err:
        if not isinstance(err, Exception) or stop_requested():
            _mark_stopped(store, key, job_id, err)
            raise
        store.mark_failed(key, f"{type(err).__name__}: {err}", traceback.format_exc()[-4000:])
        traceback.print_exc()
        return err
    finally:
        attempt.close()
        claims.remove(claim)
        store.release(claim)


def _evaluate(
    spec: RunSpec,
    store: ResultsStore,
    commit: Optional[str],
    main: bool,
    attempt: Attempt,
    gpus: int,
    metrics: Optional[dict] = None,
    checkpoint_sha256: Optional[str] = None,
) -> dict:
    """The row's evaluation record of the training's final checkpoint, as the row asks (split, size, TTA,
    detections per image). ``metrics``: the training's final-epoch evaluation when it ran with exactly these
    settings (reused, not evaluated again). The training record is not touched."""
    cfg = spec.config
    key = spec.eval_key
    eval_dir, split = store.record_dir(key), cfg.data.val_split
    checkpoint = trained_checkpoint(store, spec)
    reused = metrics is not None
    if reused:
        detections = Path(detections_file(store.record_dir(spec.run_id), split))
    else:
        if checkpoint is None:
            raise FileNotFoundError(
                f"{store.record_dir(spec.run_id) / CHECKPOINT}: no checkpoint of the training to evaluate"
            )
        metrics = evaluate(cfg, output_dir=str(eval_dir), checkpoint=str(checkpoint), should_stop=stop_requested)
        detections = Path(detections_file(eval_dir, split, cfg.eval.tta))
    dist_utils.barrier()
    dist_utils.cleanup()
    if not main:
        return metrics
    attempt.beat()
    submission = None if annotated(split) else server_submission(detections, eval_dir, spec.experiment)
    record = evaluation_record(
        spec,
        metrics,
        reused_training_evaluation=reused,
        checkpoint=shown_path(store, checkpoint),
        checkpoint_sha256=checkpoint_sha256 or training_checkpoint_sha256(store, spec),
        server_submission=submission and submission.name,
        gpu_hours=attempt.gpu_hours(key),
        device=device_name(device()),
        commit=commit,
        date=today(),
        torch=torch.__version__,
    )
    store.complete(key, record)
    if any(k in record for k in METRICS):
        print(f"{spec.label!r} ({key}): final {ap_text(record)}", flush=True)
    return record


def _measure(
    spec: RunSpec, store: ResultsStore, commit: Optional[str], attempt: Attempt, checkpoint_sha256: Optional[str] = None
) -> dict:
    """The row's measurement record of the run's model (parameters, FLOPs, FPS) as its benchmark settings ask,
    on rank 0; the training is not touched."""
    measured = measure(spec.config, str(store.record_dir(spec.run_id)))
    attempt.beat()
    key = spec.measure_key
    record = measurement_record(
        spec,
        measured,
        checkpoint_sha256=checkpoint_sha256 or training_checkpoint_sha256(store, spec),
        trained=True,
        gpu_hours=attempt.gpu_hours(key),
        device=device_name(device()),
        commit=commit,
        date=today(),
        torch=torch.__version__,
    )
    store.complete(key, record)
    return record
