"""Code snapshots: the files a job imports, copied once per submission so that editing the code after
submitting does not change what queued or requeued jobs run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Sequence, Union

from harness.launch.executors import LaunchError
from harness.provenance import git_commit, utc_now

SNAPSHOT_INFO = "SNAPSHOT.json"


PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding harness/ and model/
# what a job imports and reads when there is no git repository to list the files (an unpacked release
# archive, a non-editable install): the packages, the entry point and the experiment files
PROJECT_FILES = ("harness", "model", "run_experiment.py", "experiments")


def _git_toplevel(start: Path) -> Optional[Path]:
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=start, capture_output=True, text=True)
    except OSError:  # git is not installed
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 else None


def repository_root(start: Union[str, Path, None] = None) -> Path:
    """The git repository holding ``start`` (default: this project), else the folder holding the packages."""
    here = Path(start) if start else PROJECT_ROOT
    return _git_toplevel(here) or (Path(start) if start else PROJECT_ROOT)


# untracked files under these folders, or larger than this, stay out of a snapshot (outputs, not code)
UNTRACKED_EXCLUDE = ("results/", "reports/", "data/", "datasets/", "checkpoints/", "outputs/")
UNTRACKED_MAX_BYTES = 10 * 2**20


def _git_ls(root: Path, *args: str) -> List[str]:
    out = subprocess.run(["git", "ls-files", "-z", *args], cwd=root, capture_output=True, check=True)
    return [n for n in out.stdout.decode("utf-8", "surrogateescape").split("\0") if n]


def repository_files(root: Path) -> List[str]:
    """The code a job needs (relative paths). In a git repository: tracked files, and untracked files git
    does not ignore (new modules not yet added), except outputs (:data:`UNTRACKED_EXCLUDE`) and large
    files. Elsewhere: every file of :data:`PROJECT_FILES` but Python's caches."""
    if _git_toplevel(root) is None:
        names = set()
        for entry in PROJECT_FILES:
            path = root / entry
            found = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
            names.update(
                str(p.relative_to(root))
                for p in found
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            )
        return sorted(names)
    names = set(_git_ls(root, "--cached"))
    for name in _git_ls(root, "--others", "--exclude-standard"):
        if name.startswith(UNTRACKED_EXCLUDE) or "/." in "/" + name:
            continue
        try:
            if (root / name).stat().st_size > UNTRACKED_MAX_BYTES:
                continue
        except OSError:
            continue
        names.add(name)
    return sorted(n for n in names if (root / n).is_file() and not (root / n).is_symlink())


def snapshot_code(
    snapshot_root: Union[str, Path], repo_root: Union[str, Path, None] = None, include: Sequence[str] = ()
) -> Path:
    """Copy the repository's files to ``<snapshot_root>/<hash>/`` and return that folder.

    The folder is named by a hash of the file names and contents, so an unchanged tree reuses the
    existing snapshot. ``include`` adds paths git ignores (built extensions, for instance); folders
    are copied whole. The copy is made in a temporary folder and renamed into place, so a snapshot
    folder either is complete or does not exist.
    """
    root = Path(repo_root).resolve() if repo_root else repository_root()
    snapshot_root = Path(snapshot_root).resolve()
    names = repository_files(root)
    for extra in include:
        path = root / extra
        if path.is_dir():
            names += [str(p.relative_to(root)) for p in sorted(path.rglob("*")) if p.is_file()]
        elif path.is_file():
            names.append(str(extra))
        else:
            raise LaunchError(f"snapshot include {extra!r} does not exist under {root}")
    names = sorted(set(names))
    try:
        inside = snapshot_root.relative_to(root)  # never copy earlier snapshots into a new one
        names = [n for n in names if not Path(n).is_relative_to(inside)]
    except ValueError:
        pass
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(hashlib.sha256((root / name).read_bytes()).digest())
    dest = snapshot_root / digest.hexdigest()[:16]
    if (dest / SNAPSHOT_INFO).is_file():
        return dest
    snapshot_root.mkdir(parents=True, exist_ok=True)
    tmp = snapshot_root / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in names:
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    info = {"source": str(root), "commit": git_commit(root), "files": len(names), "created": utc_now()}
    (tmp / SNAPSHOT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    try:
        os.rename(tmp, dest)
    except OSError:  # another submission made the same snapshot meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / SNAPSHOT_INFO).is_file():
            raise
    return dest
