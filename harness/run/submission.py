"""Submitting a grid: plan it, claim each record to run, fetch what the jobs need on the login node, submit
them (SLURM, or local processes this waits for, printing their logs) and mark them queued.

The orchestration the command line calls; it imports no torch (the job module is loaded only when something
is submitted).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, Optional

from harness import launch
from harness.grid import expand, runs_elsewhere, unique_runs
from harness.grid.feasibility import config_warnings
from harness.launch.executors import layout_text, sbatch_lines
from harness.launch.follow import job_alive as _job_alive
from harness.launch.follow import job_states as _job_states
from harness.provenance import git_commit
from harness.run.logs import printing_logs
from harness.store.plan import rerun_removals, rerun_text
from model import released

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _warnings(specs) -> List[str]:
    return sorted({w for spec in specs for w in config_warnings(spec.config)})


# ------------------------------------------------------------------------------------------- planning


def launch_plan(experiment, executor: Optional[str]) -> str:
    """The executor that will run the rows and why, and the parameters submitit gives it (sbatch options)."""
    specs = unique_runs(expand(experiment))
    if not specs:
        return ""
    lines = []
    groups = {}
    for spec in specs:
        groups.setdefault(spec.config.launcher, []).append(spec.label)
    for launcher, labels in groups.items():
        kind, why = launch.explain_executor(executor or launcher.executor)
        launch.check_launcher(launcher, kind)
        params = launch.executor_parameters(launcher, kind, job_name=experiment.name)
        shown = ", ".join(f"{k}={v}" for k, v in params.items() if k != "slurm_setup")
        lines.append(f"executor {kind} ({why}) for {len(labels)} run(s): {shown}")
        lines.append(f"  each job: {layout_text(launcher, kind)}")
        if kind == "slurm":
            lines.append("  batch script (per job):")
            lines += [
                "    " + line
                for line in sbatch_lines(launcher, experiment.name, f"<results>/{experiment.name}/.submitit")
            ]
    return "\n".join(lines + [f"warning: {w}" for w in _warnings(specs)]) + "\n"


# ------------------------------------------------------------------------------------------- submitting


def submit(experiment, store, executor=None, rerun=False, root: Path = PROJECT_ROOT):
    """Submit every row that is not done, queued or running; returns (specs, jobs, outcomes).

    Local jobs (one machine, often one GPU or a few CPU cores) run one after the other, so this waits
    for them and ``outcomes`` holds their results; SLURM jobs are only submitted (``outcomes`` is None).
    ``root``: the project whose code the jobs run (snapshotted) and whose experiments/ may share runs.
    """
    # the job module imports torch and the model: loaded only when something is submitted
    from harness.run.job import JobRequest, run_job
    from model.backbone import BackboneWeightsError, fetch_weights

    store.check_writable()
    specs = unique_runs(expand(experiment))
    kind = launch.resolve_executor(executor or specs[0].config.launcher.executor) if specs else "local"
    for spec in specs:
        launch.check_launcher(spec.config.launcher, kind)
    alive = _job_alive(_job_states(store, specs))  # the scheduler, asked once: for the plan and the claims
    entries = store.plan(specs, alive)
    if rerun:
        removals = rerun_removals(store, entries)
        print(rerun_text(store, removals, experiment, runs_elsewhere(experiment, Path(root) / "experiments")), end="")
        store.remove([path for _, paths in removals for path in paths])
        entries = store.plan(specs, alive)
    for warning in _warnings(specs):
        print(f"warning: {warning}")
    for model_cfg in dict.fromkeys(e.spec.config.model for e in entries if e.action == "run"):
        try:
            fetch_weights(model_cfg)  # here, on the login node: not in a job hours later
        except BackboneWeightsError as err:
            raise launch.LaunchError(f"nothing submitted: {err}") from None
    released_files = [
        (e.spec.config.eval.checkpoint, e.spec.config.eval.checkpoint_sha256)
        for e in entries
        if e.action == "run" and released.is_url(e.spec.config.eval.checkpoint)
    ]
    for url, sha256 in dict.fromkeys(released_files):
        try:
            print(f"checkpoint {url}: {released.fetch(url, sha256)} (verified)")
        except released.ReleasedCheckpointError as err:
            raise launch.LaunchError(f"nothing submitted: {err}") from None
    for e in entries:
        if e.action != "run":
            print(f"skip  {e.spec.label!r} ({e.spec.run_id}): {e.state}")
    claims, chosen = {}, []
    for e in entries:
        if e.action == "run" and e.key in claims:  # two rows of one training with different evaluations
            print(
                f"later {e.spec.label!r}: evaluates {e.spec.run_id} once its training (submitted now) is done; "
                "submit again then"
            )
        elif e.action == "run":
            claim = store.claim_for_submit(e.spec, alive)
            if claim is None:
                print(f"skip  {e.spec.label!r} ({e.spec.run_id}): claimed by another submission")
                continue
            claims[e.key] = claim
            store.prepare(e.spec, e.key)
            chosen.append(e)
    if not chosen:
        return [], [], []
    commit = git_commit()
    requests = [JobRequest(e.spec, str(store.root), commit, kind=e.kind) for e in chosen]
    specs = [e.spec for e in chosen]

    def on_submitted(request, job):
        spec = request.spec
        key = spec.key(request.kind)
        job_id = launch.job_id_of(job, kind)  # local:<pid>:<start>, or SLURM's id
        store.mark_queued(key, job_id=job_id, log_dir=exp_root / ".submitit")
        store.release(claims.pop(key))
        stopper.add(job_id)
        what = {"train": "", "evaluate": "evaluation of ", "measure": "measurement of "}[request.kind]
        print(f"submitted {what}{spec.label!r} ({key}) as job {job_id}", flush=True)

    exp_root = Path(store.root) / experiment.name
    batches = [[r] for r in requests] if kind == "local" else [requests]
    jobs, outcomes = [], [] if kind == "local" else None
    # local jobs run while this waits: Ctrl-C stops them as a pre-emption would (launch.LocalStopper)
    stopper = launch.LocalStopper()
    try:
        with stopper if kind == "local" else contextlib.nullcontext():
            for batch in batches:
                if stopper.stopped:  # Ctrl-C: start nothing more
                    break
                submitted = launch.submit(
                    batch,
                    run_job,
                    lambda r: r.spec.config.launcher,
                    exp_root / ".submitit",
                    executor=kind,
                    job_name=experiment.name,
                    snapshot_root=exp_root / ".snapshots",
                    repo_root=root,
                    on_submitted=on_submitted,
                )
                jobs += submitted
                if outcomes is not None:  # a local job writes to its log file: shown here as it grows
                    with printing_logs(
                        [launch.log_paths(exp_root / ".submitit", launch.job_id_of(job, kind)) for job in submitted]
                    ):
                        outcomes += launch.wait(submitted)
                    _mark_if_stopped(store, batch, stopper)
    finally:
        for claim in claims.values():
            store.release(claim)
    if outcomes is not None:  # rows a Ctrl-C kept from starting
        outcomes += [("stopped", "not started: the submission was interrupted")] * (len(specs) - len(outcomes))
    return specs, jobs, outcomes


def _mark_if_stopped(store, requests, stopper) -> None:
    """A local job stopped from here whose process ended with its record still queued or running (killed, or
    stopped before it could say so): interrupted, its last complete checkpoint kept."""
    for request, job_id in zip(requests, stopper.job_ids[-len(requests) :]):
        if stopper.stopped:
            store.mark_interrupted(
                request.spec.key(request.kind), "interrupted before its job could mark it", job_id=job_id
            )
