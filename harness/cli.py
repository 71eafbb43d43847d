"""``run_experiment.py``: plan, submit, follow, cancel and report an experiment grid (argument parsing and wiring)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from harness import launch
from harness.config import EXECUTORS, ConfigError
from harness.grid import (
    ExperimentError,
    check_unique_name,
    expand,
    find_experiment,
    load_experiment,
    runs_elsewhere,
    unique_runs,
)
from harness.grid.experiment import row_provenance
from harness.grid.feasibility import command_path_problem
from harness.grid.identity import roles_of
from harness.grid.schema import SECTION_CLASSES
from harness.launch.follow import LOG_LINES, cancel, status_text
from harness.launch.follow import job_alive as _job_alive
from harness.launch.follow import job_states as _job_states
from harness.report.inventory import all_runs_text
from harness.run.logs import follow_logs, logs_text
from harness.run.submission import launch_plan, submit
from harness.store import ResultsError, ResultsStore, dry_run_plan
from harness.store.plan import rerun_removals, rerun_text
from harness.store.server_scores import import_server_scores

ROOT = Path(__file__).resolve().parent.parent
OVERRIDE = re.compile(rf"({'|'.join(SECTION_CLASSES)})\.[A-Za-z_]\w*=")  # SECTION.FIELD=VALUE


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="run_experiment.py",
        description=__doc__.split(":")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  run_experiment.py table2                           submit the grid\n"
            "  run_experiment.py table2 --dry-run                 plan, resources, GPU-hours\n"
            "  run_experiment.py table2 --status                  progress of each row\n"
            "  run_experiment.py table2 --report                  regenerate reports\n"
            "  run_experiment.py table2 --smoke                   laptop scale, end to end\n"
            "  run_experiment.py table2 model.enc_n_points=8 --rows 5 --partition gpu\n"
            "  run_experiment.py table2 --rows 5 model.enc_n_points=1,2,4  one row per value\n"
            "  run_experiment.py table2 --print-config 5 --smoke  each value and its source\n"
            "  run_experiment.py table2 --cancel --rows 0 1       cancel two rows' jobs"
        ),
    )
    p.add_argument("experiment", help="experiment YAML, or its name in experiments/ (table1, table2, table3, ...)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="SECTION.FIELD=VALUE",
        help="override a config field for the selected rows (all rows without --rows); part of the "
        "run id and recorded in each run's config; give the same overrides to --status/--report; "
        "A=1,2 sweeps (one row per value, labelled '<row>, A=1'), A=[1,2] is one list value",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (run ids, executor, sbatch parameters, GPU-hours); submit nothing",
    )
    mode.add_argument("--status", action="store_true", help="each row's state, progress, ETA and log")
    mode.add_argument(
        "--report",
        action="store_true",
        help="regenerate reports/<experiment>.{md,tex} and figures "
        "(every row, as written; with overrides: reports/<experiment>+<tag>.*)",
    )
    mode.add_argument(
        "--cancel",
        action="store_true",
        help="cancel the queued and running jobs of the selected rows (their checkpoints stay; a "
        "later submission resumes them)",
    )
    mode.add_argument("--logs", metavar="ROW", help="the tail of a row's job log (a label or an index)")
    p.add_argument("--lines", type=int, metavar="N", help=f"with --logs: the last N lines (default {LOG_LINES})")
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="with --logs: then what the job writes, until it ends (Ctrl-C stops following)",
    )
    mode.add_argument("--export", metavar="FILE", help="the collected results as a table (.csv or .parquet)")
    mode.add_argument("--print-config", metavar="ROW", help="a row's config: each value, its source, its id")
    mode.add_argument(
        "--import-server",
        metavar="SCORES",
        help="the COCO evaluation server's scores (JSON) for "
        "the test-dev row given with --rows, as its evaluation (its training and evaluation done)",
    )
    p.add_argument(
        "--scores-unit",
        choices=("fraction", "percent"),
        help="the unit of --import-server's scores (else the file's \"unit\" key; COCOeval's stats "
        "list defaults to fraction; a mapping of names needs one); -1 = no value",
    )
    p.add_argument(
        "--smoke", action="store_true", help="laptop scale on a generated dataset, local processes; waits and reports"
    )
    p.add_argument(
        "--rows", nargs="+", metavar="ROW", help="only these rows (labels as in the YAML, or 0-based indices)"
    )
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        help="override the launcher config's executor (auto: slurm where sbatch exists)",
    )
    for key in ("partition", "account", "qos"):
        p.add_argument(f"--{key}", help=f"SLURM {key} (the same as launcher.{key}=...)")
    p.add_argument(
        "--all",
        action="store_true",
        help="with --status: every record of the experiment in the store, "
        "override variants included: run id, scale, overrides, state, canonical or not",
    )
    p.add_argument("--wait", action="store_true", help="after submitting, wait for the jobs, then report")
    p.add_argument(
        "--rerun",
        action="store_true",
        help="run the selected rows again from scratch even where they are done: their trainings' files "
        "and their own evaluations and measurements are deleted (other rows' records of a shared "
        "training stay, and are redone from the new checkpoint when submitted); queued and running "
        "rows are left alone; with --dry-run, lists what would be deleted",
    )
    p.add_argument("--results", default=str(ROOT / "results"), help="results store (default: %(default)s)")
    p.add_argument("--reports", default=str(ROOT / "reports"), help="reports folder (default: %(default)s)")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.all and not args.status:
        p.error("--all goes with --status")
    if (args.follow or args.lines is not None) and not args.logs:
        p.error("--follow and --lines go with --logs")
    if args.lines is not None and args.lines < 0:
        p.error("--lines: expected a number >= 0")
    if args.rows:  # and after --rows: SECTION.FIELD=VALUE is an override there too (a row so named: by index)
        args.overrides += [r for r in args.rows if OVERRIDE.match(r)]
        args.rows = [r for r in args.rows if not OVERRIDE.match(r)] or p.error("--rows: expected a row, then overrides")
    return args


def _report(experiment, args, submitted: bool = False) -> int:
    """--report, and the report that ends a submission: canonical or tagged, as harness.report.variant says."""
    from harness.report.markdown import write_invocation_report  # pandas and matplotlib: only for reports

    return write_invocation_report(experiment, args.results, args.reports, submitted)


def _export(experiment, args) -> None:
    from harness.report.collect import collect, export  # pandas: loaded only for exports

    path = export(collect(args.results, experiment), args.export)
    print(f"wrote {path}")


def config_text(experiment) -> str:
    """--print-config: each selected row's resolved configuration, each value's source and role, and its ids."""
    out, shown = [], set()
    for spec in expand(experiment):
        ids = f"run id {spec.run_id}, evaluation id {spec.eval_id}, measurement id {spec.measure_id}"
        if spec.label in shown or shown.add(spec.label):  # the row's next seed: its ids
            out.append(f"  seed {spec.seed}: {ids}")
            continue
        out += [
            f"\n{experiment.name} ({experiment.path}), row {spec.label!r}, {experiment.scale} scale",
            ids + (f" (seed {spec.seed})" if experiment.row(spec.label).seeds else ""),
            f"  {'field':36}  {'value':24}  {'from':22}  enters",
        ]
        for key, (value, source) in row_provenance(experiment, spec.label).items():
            value = value if isinstance(value, str) else json.dumps(value)
            out.append(f"  {key:36}  {value:24}  {source:22}  {'+'.join(roles_of(*key.split('.', 1))) or 'no id'}")
    return "\n".join(out).lstrip("\n")


def resume_command(argv: Optional[List[str]] = None) -> str:
    """The command that resumes what ``argv`` started (the same, without --rerun: it would start over)."""
    return shlex.join(
        ["python", "run_experiment.py", *[a for a in (sys.argv[1:] if argv is None else argv) if a != "--rerun"]]
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    follows = args.status or args.report or args.export or args.logs or args.cancel  # read the store
    problem = command_path_problem(args.results, args.reports, args.export, must_exist=bool(follows))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        path = find_experiment(args.experiment, ROOT / "experiments")
        overrides = list(args.overrides) + [
            f"launcher.{k}={getattr(args, k)}" for k in ("partition", "account", "qos") if getattr(args, k)
        ]
        rows = [args.logs or args.print_config] if args.logs or args.print_config else args.rows
        # a dry run checks what a submission would (data, checkpoints); following and reporting need no data
        needs_data = not (follows or args.import_server or args.print_config)
        experiment = load_experiment(path, smoke=args.smoke, rows=rows, check_data=needs_data, overrides=overrides)
        check_unique_name(experiment, ROOT / "experiments")
        store = ResultsStore(args.results)
        if args.dry_run:
            job_alive = _job_alive(_job_states(store, expand(experiment)))
            elsewhere = runs_elsewhere(experiment, ROOT / "experiments")
            if args.rerun:  # exactly what a submission with --rerun deletes first
                entries = store.plan(unique_runs(expand(experiment)), job_alive)
                print(
                    rerun_text(store, rerun_removals(store, entries), experiment, elsewhere)
                    or "--rerun deletes nothing: no selected row has records to redo\n",
                    end="",
                )
            print(dry_run_plan(experiment, store, job_alive, elsewhere), end="")
            print(launch_plan(experiment, args.executor), end="")
            return 0
        if args.status:
            print(all_runs_text(experiment, store) if args.all else status_text(experiment, store))
            return 0
        if args.print_config:
            print(config_text(experiment) or f"{args.print_config}: a cited row (the paper's numbers only)")
            return 0
        if args.logs:
            lines = LOG_LINES if args.lines is None else args.lines
            if not args.follow:
                print(logs_text(experiment, store, args.logs, lines))
                return 0
            try:
                follow_logs(experiment, store, args.logs, lines)
            except KeyboardInterrupt:  # the way to stop following: no traceback, no resume hint
                print()
            return 0
        if args.cancel:
            print("\n".join(cancel(experiment, store)) or "nothing queued or running to cancel")
            return 0
        if args.report:
            return _report(experiment, args)
        if args.export:
            _export(experiment, args)
            return 0
        if args.import_server:
            if not experiment.selected or len(experiment.selected) != 1:
                raise ExperimentError(path, None, "--rows", "--import-server needs the one row the scores are for")
            specs = expand(experiment)
            if len(specs) != 1:  # a cited row has no run; a row with seeds has one upload per seed
                raise ExperimentError(
                    path,
                    experiment.selected[0],
                    "--rows",
                    f"{len(specs)} runs; --import-server needs a row with one run (not cited, one seed)",
                )
            record = import_server_scores(store, specs[0], args.import_server, args.scores_unit)
            print(f"{specs[0].label!r} ({specs[0].eval_key}): AP {record['AP']:.1f} from the evaluation server")
            return 0
        specs, jobs, outcomes = submit(experiment, store, args.executor, rerun=args.rerun, root=ROOT)
        if outcomes is None and not (args.wait or args.smoke):
            if jobs:
                print(f"{len(jobs)} job(s) submitted; follow with --status, then --report")
            return 0
        failed, stopped = 0, []
        for spec, (outcome, value) in zip(specs, outcomes if outcomes is not None else launch.wait(jobs)):
            entry = store.plan_one(spec) if outcome != "success" else None
            if entry is not None and (outcome == "stopped" or entry.state in ("interrupted", "cancelled")):
                stopped.append(f"{spec.label!r} ({entry.key}{', cancelled' if entry.state == 'cancelled' else ''})")
            elif entry is not None:
                failed += 1
                # the record that failed: the training, or the evaluation or measurement of a trained run
                reason = entry.reason if entry.state == "failed" and entry.reason else str(value).strip()
                print(f"FAILED {spec.label!r} ({spec.run_id}): {reason}\n  log: {value}")
        if stopped:  # Ctrl-C: one line, no traceback, no report
            print(f"interrupted: {', '.join(stopped)}; resume with: {resume_command(argv)}")
            return 130
        return max(_report(experiment, args, submitted=True), 1 if failed else 0)
    except KeyboardInterrupt:  # Ctrl-C while planning or submitting: claims released, nothing half-done
        print(f"\ninterrupted; resume with: {resume_command(argv)}", file=sys.stderr)
        return 130
    except (ExperimentError, ResultsError, ConfigError, launch.LaunchError) as err:
        # the message names the file, row and key, or what to change: no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
