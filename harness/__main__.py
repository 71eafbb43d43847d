"""``python -m harness <verb> ...``: one command for everything the harness does.

    run      an experiment: plan, submit, status, report (the same as ``python run_experiment.py``)
    measure  parameters, FLOPs and FPS of a configuration or a checkpoint
    check    a toy multi-process job through the launcher (is a cluster's rendezvous and requeue working?)
    preview  render a generated LaTeX table to PNG, to look at

The kernels have their own: ``python -m model.ops.doctor`` (which implementation runs here, and why).
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

# verb -> (module whose main(argv) it runs, one line of help)
VERBS = {
    "run": ("harness.cli", "an experiment: plan, submit, status, report (= run_experiment.py)"),
    "measure": ("harness.measure.command", "parameters, FLOPs and FPS of a configuration or a checkpoint"),
    "check": ("harness.launch.check", "a toy multi-process job through the launcher (rendezvous, requeue)"),
    "preview": ("harness.report.preview", "render a generated LaTeX table to PNG"),
}


def usage() -> str:
    lines = ["usage: python -m harness <verb> [--help | arguments]", "", "verbs:"]
    lines += [f"  {verb:<8} {help_text}" for verb, (_, help_text) in VERBS.items()]
    lines += ["", "kernels: python -m model.ops.doctor"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    sys.argv[0] = f"python -m harness {verb}"  # what argparse names in usage lines
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
