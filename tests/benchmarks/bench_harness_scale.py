"""How the harness copes with a large grid: seconds for --status and --dry-run of a 1,000-row experiment whose
runs are all queued, and how many times each asks SLURM (stand-in squeue/sacct/scontrol that count calls).

    python tests/benchmarks/bench_harness_scale.py [--rows-per-axis 10] [--json out.json]

The target: each command under 5 s, and one squeue call whatever the number of rows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from harness import cli  # noqa: E402
from harness.grid import expand, load_experiment  # noqa: E402
from harness.store import ResultsStore  # noqa: E402

STAND_IN = {  # each records its call; squeue lists every asked job as RUNNING
    "sbatch": "exit 1",
    "srun": "exit 1",
    "sacct": "exit 0",
    "scontrol": "exit 0",
    "squeue": 'while [ $# -gt 0 ]; do if [ "$1" = -j ]; then shift; tr , "\\n" <<< "$1" | '
    'sed "s/$/ RUNNING/"; fi; shift; done',
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows-per-axis", type=int, default=10, help="the grid is this many rows cubed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bin_dir, calls = tmp / "bin", tmp / "calls.log"
        bin_dir.mkdir()
        for name, body in STAND_IN.items():
            (bin_dir / name).write_text(f'#!/bin/bash\necho "$(basename "$0")" >> {calls}\n{body}\n')
            (bin_dir / name).chmod(0o755)
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        values = list(range(1, args.rows_per_axis + 1))
        tiny = (ROOT / "tests" / "fixtures" / "tiny_experiment.yaml").read_text().split("rows:")[0]
        path = tmp / "grid.yaml"
        path.write_text(
            tiny.replace("name: tiny", "name: grid")
            + textwrap.dedent(f"""\
            rows: []
            axes:
              model.enc_n_points: {values}
              model.dec_n_points: {values}
              train.seed: {values}
            """)
        )
        start = time.perf_counter()
        specs = expand(load_experiment(str(path)))
        load_s = time.perf_counter() - start
        store = ResultsStore(tmp / "results")
        for i, spec in enumerate(specs):
            store.mark_queued(spec.run_id, job_id=str(10_000 + i))
        record = {"rows": len(specs), "load_and_expand_s": round(load_s, 2)}
        for command in ("--status", "--dry-run"):
            calls.write_text("")
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                rc = cli.main([str(path), "--results", str(tmp / "results"), command])
            seconds = time.perf_counter() - start
            counts = {name: calls.read_text().split().count(name) for name in ("squeue", "sacct", "scontrol")}
            record[command.strip("-")] = {"seconds": round(seconds, 2), "exit": rc, "calls": counts}
            print(f"{command:<10} {len(specs)} rows: {seconds:.2f} s, exit {rc}, SLURM calls {counts}")
    print(f"loading and expanding the grid: {load_s:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
