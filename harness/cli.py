"""``run_experiment.py``: plan, submit, follow and report an experiment grid (argument parsing and wiring)."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from harness import launch
from harness.config import EXECUTORS, ConfigError
from harness.grid import ExperimentError, expand, load_experiment, unique_runs
from harness.launch.slurm import PENDING_STATES, RUNNING_STATES
from harness.provenance import git_commit
from harness.store import ResultsError, ResultsStore, dry_run_plan

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_experiment.py", description=__doc__.split(":")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                                    "examples:\n"
                                    "  run_experiment.py experiments/table2.yaml            submit the grid\n"
                                    "  run_experiment.py experiments/table2.yaml --dry-run  plan, GPU-hours\n"
                                    "  run_experiment.py experiments/table2.yaml --status   state of each row\n"
                                    "  run_experiment.py experiments/table2.yaml --report   regenerate reports\n"
                                    "  run_experiment.py experiments/table2.yaml --smoke    laptop scale, end to end"))
    p.add_argument("experiment", help="experiment YAML (experiments/table{1,2,3}.yaml or your own)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan (run ids, resources, GPU-hours); submit nothing")
    mode.add_argument("--status", action="store_true", help="show each row's state and job ids")
    mode.add_argument("--report", action="store_true", help="regenerate reports/<experiment>.{md,tex} and figures")
    p.add_argument("--smoke", action="store_true",
                   help="laptop scale on a generated dataset, local processes; waits and reports")
    p.add_argument("--rows", nargs="+", metavar="LABEL", help="only these rows (labels as in the YAML)")
    p.add_argument("--executor", choices=EXECUTORS,
                   help="override the launcher config's executor (auto: slurm where sbatch exists)")
    p.add_argument("--wait", action="store_true", help="after submitting, wait for the jobs, then report")
    p.add_argument("--rerun", action="store_true",
                   help="run the selected rows again from scratch even where they are done (their run folders "
                        "are replaced); queued and running rows are still left alone")
    p.add_argument("--results", default=str(ROOT / "results"), help="results store (default: %(default)s)")
    p.add_argument("--reports", default=str(ROOT / "reports"), help="reports folder (default: %(default)s)")
    return p.parse_args(argv)


def _status(experiment, store) -> str:
    entries = store.plan(unique_runs(expand(experiment)), job_alive=_job_alive())
    lines = [f"{experiment.name} ({experiment.scale} scale): {len(entries)} run(s)"]
    width = max([len(e.spec.label) for e in entries] + [3])
    for e in entries:
        status = store.read_status(e.spec.experiment, e.spec.run_id) if e.state != "corrupt" else None
        jobs = ",".join(e.job_ids) or "-"
        line = f"  {e.spec.label.ljust(width)}  {e.spec.run_id}  {e.state:<8}  job {jobs}"
        if e.reason:
            line += f"  ({e.reason})"
        if status is not None and status.state == "failed" and status.reason:
            line += f"\n      failed: {status.reason}"
        lines.append(line)
    return "\n".join(lines)


def _job_alive():
    if not launch.slurm_available():
        return None

    def alive(job_id: str):
        state = launch.slurm_job_state(job_id)
        if state is None:
            return None
        return state.split()[0] in PENDING_STATES | RUNNING_STATES
    return alive


def submit(experiment, store, executor=None, rerun=False):
    """Submit every row that is not done, queued or running; returns (specs, jobs, outcomes).

    Local jobs (one machine, often one GPU or a few CPU cores) run one after the other, so this waits
    for them and ``outcomes`` holds their results; SLURM jobs are only submitted (``outcomes`` is None).
    """
    # the job module imports torch and the model: loaded only when something is submitted
    from harness.run.job import JobRequest, run_job

    store.check_writable()
    specs = unique_runs(expand(experiment))
    entries = store.plan(specs, job_alive=_job_alive())
    if rerun:
        for e in entries:
            if e.state == "done":
                shutil.rmtree(store.run_dir(e.spec.experiment, e.spec.run_id))
        entries = store.plan(specs, job_alive=_job_alive())
    for e in entries:
        if e.action != "run":
            print(f"skip  {e.spec.label!r} ({e.spec.run_id}): {e.state}")
    claims, specs = {}, []
    for e in entries:
        if e.action == "run":
            claim = store.claim_for_submit(e.spec)
            if claim is None:
                print(f"skip  {e.spec.label!r} ({e.spec.run_id}): claimed by another submission")
                continue
            claims[e.spec.run_id] = claim
            store.prepare(e.spec)
            specs.append(e.spec)
    if not specs:
        return [], [], []
    commit = git_commit()
    requests = [JobRequest(spec, str(store.root), commit) for spec in specs]

    def on_submitted(request, job):
        spec = request.spec
        store.mark_queued(spec.experiment, spec.run_id, job_id=str(job.job_id))
        store.release(claims.pop(spec.run_id))
        print(f"submitted {spec.label!r} ({spec.run_id}) as job {job.job_id}", flush=True)

    exp_root = Path(store.root) / experiment.name
    kind = launch.resolve_executor(executor or specs[0].config.launcher.executor)
    batches = [[r] for r in requests] if kind == "local" else [requests]
    jobs, outcomes = [], [] if kind == "local" else None
    try:
        for batch in batches:
            submitted = launch.submit(batch, run_job, lambda r: r.spec.config.launcher, exp_root / ".submitit",
                                      executor=kind, job_name=experiment.name,
                                      snapshot_root=exp_root / ".snapshots", repo_root=ROOT,
                                      on_submitted=on_submitted)
            jobs += submitted
            if outcomes is not None:
                outcomes += launch.wait(submitted)
    finally:
        for claim in claims.values():
            store.release(claim)
    return specs, jobs, outcomes


def _report(experiment, args) -> None:
    from harness.report.tables import write_report  # pandas and matplotlib: loaded only for reports
    for path in write_report(experiment, args.results, args.reports):
        print(f"wrote {path}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        needs_data = not (args.status or args.report or args.dry_run)
        experiment = load_experiment(args.experiment, smoke=args.smoke, rows=args.rows, check_data=needs_data)
        store = ResultsStore(args.results)
        if args.dry_run:
            print(dry_run_plan(experiment, store), end="")
            return 0
        if args.status:
            print(_status(experiment, store))
            return 0
        if args.report:
            _report(experiment, args)
            return 0
        specs, jobs, outcomes = submit(experiment, store, args.executor, rerun=args.rerun)
        if outcomes is None and not (args.wait or args.smoke):
            if jobs:
                print(f"{len(jobs)} job(s) submitted; follow with --status, then --report")
            return 0
        failed = 0
        for spec, (outcome, value) in zip(specs, outcomes if outcomes is not None else launch.wait(jobs)):
            if outcome != "success":
                failed += 1
                status = store.read_status(spec.experiment, spec.run_id)
                reason = status.reason if status is not None and status.reason else str(value).strip()
                print(f"FAILED {spec.label!r} ({spec.run_id}): {reason}\n  log: {value}")
        _report(experiment, args)
        return 1 if failed else 0
    except (ExperimentError, ResultsError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except launch.LaunchError as err:  # no sbatch, submission refused: the message, without a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
