"""Released checkpoints named by URL: fetched once into a cache the compute nodes see, checked by checksum on
every use.

``eval.checkpoint`` may be a URL (the official Deformable DETR's Google Drive files, DETR's and torchvision's
download servers) instead of a path. The file lands in :func:`cache_dir` under its own name, downloaded on the
login node at submission (:func:`fetch`); jobs only read it (:func:`cached_path`), since compute nodes often
have no network. Its checksum, in order of precedence:

- ``eval.checkpoint_sha256``: a published sha256, or a prefix of one (at least 8 hex digits);
- the file name's: torch.hub's convention, ``name-<first hex digits of the sha256>.pth`` (DETR's and
  torchvision's files);
- none published: the sha256 of the first download, recorded in ``<cache>/SHA256SUMS`` and verified on every
  later use, so the file cannot change under a result.

No torch at import time: the harness's planning imports :func:`is_url`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Optional
from urllib.parse import parse_qs, unquote, urlparse

ENV_CACHE = "HARNESS_CHECKPOINT_CACHE"
SUMS = "SHA256SUMS"
_HEX_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")  # torch.hub's check_hash convention
_DRIVE_FILE = re.compile(r"^/file/d/([A-Za-z0-9_-]+)")


class ReleasedCheckpointError(RuntimeError):
    """A released checkpoint that cannot be had or does not match its checksum."""


def is_url(value) -> bool:
    return isinstance(value, str) and value.split("://", 1)[0] in ("http", "https", "file") and "://" in value


def cache_dir() -> Path:
    """``$HARNESS_CHECKPOINT_CACHE``, else ``<torch hub dir>/checkpoints`` (``$TORCH_HOME/hub/checkpoints``, where
    torchvision keeps its weights): a folder the compute nodes must see."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints"


def download_url(url: str) -> str:
    """The URL that serves the file's bytes: a Google Drive page (``drive.google.com/file/d/<id>/view``,
    ``open?id=``, ``uc?id=``) becomes its direct download, past the virus-scan page of large files."""
    parts = urlparse(url)
    if parts.netloc == "drive.google.com":
        match = _DRIVE_FILE.match(parts.path)
        file_id = match.group(1) if match else (parse_qs(parts.query).get("id") or [None])[0]
        if not file_id:
            raise ReleasedCheckpointError(f"{url}: a Google Drive address without a file id")
        return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"
    return url


def file_name(url: str) -> str:
    """The cached file's name: the URL's last path component; a Google Drive file by its id."""
    parts = urlparse(url)
    if parts.netloc == "drive.google.com":
        return "gdrive-" + download_url(url).split("id=", 1)[1].split("&", 1)[0] + ".pth"
    name = os.path.basename(unquote(parts.path))
    if not name:
        raise ReleasedCheckpointError(f"{url}: no file name in the address")
    return name


def expected_sha256(url: str, sha256: Optional[str] = None) -> Optional[str]:
    """The published checksum (or its prefix), lower-case: ``sha256`` where given, else the file name's."""
    if sha256:
        value = sha256.lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{8,64}", value):
            raise ReleasedCheckpointError(f"checksum {sha256!r} of {url}: expected 8 to 64 hex digits of a sha256")
        return value
    match = _HEX_IN_NAME.search(file_name(url))
    return match.group(1) if match else None


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in blocks (the one file hash of the project; no torch)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _recorded(folder: Path) -> Dict[str, str]:
    """file name -> sha256 of ``SHA256SUMS`` (``sha256sum``'s format)."""
    path = folder / SUMS
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if digest and name:
            out[name] = digest
    return out


def _record(folder: Path, name: str, digest: str) -> None:
    """Add one line to ``SHA256SUMS`` under a lock (several submissions may fetch at once), via write-and-rename."""
    with open(folder / (SUMS + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sums = _recorded(folder)
        sums[name] = digest
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=SUMS + ".")
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{d}  {n}\n" for n, d in sorted(sums.items()))
        os.replace(tmp, folder / SUMS)


def _verify(path: Path, url: str, sha256: Optional[str]) -> str:
    """The file's sha256, once it matches the published checksum or the one recorded at its first download."""
    actual = file_sha256(path)
    expected = expected_sha256(url, sha256)
    source = "published"
    if expected is None:
        expected, source = (
            _recorded(path.parent).get(path.name),
            f"recorded in {path.parent / SUMS} at its first download",
        )
    if expected is not None and not actual.startswith(expected):
        raise ReleasedCheckpointError(
            f"checkpoint {path} (from {url}) has sha256 {actual}, expected {expected} ({source}): a corrupt or "
            f"different file; delete it and submit again to download it anew"
        )
    return actual


def cached_path(url: str, sha256: Optional[str] = None) -> Path:
    """The verified local copy of ``url`` (what a job reads; it never downloads)."""
    path = cache_path(url)
    if not path.is_file():
        raise ReleasedCheckpointError(
            f"checkpoint {url} is not in the cache: expected {path} (fetched at submission on the login node; "
            f"{ENV_CACHE} or TORCH_HOME must name a folder the compute nodes see)"
        )
    _verify(path, url, sha256)
    return path


def fetch(url: str, sha256: Optional[str] = None, progress: bool = True) -> Path:
    """Download ``url`` into the cache unless it is there, verify it, record its sha256 where none is published;
    returns its path. :class:`ReleasedCheckpointError` names the file to put where when it cannot be had."""
    path = cache_path(url)
    folder = path.parent
    if not path.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _download(download_url(url), path, progress)
        except ReleasedCheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - no network, a moved file: say where the file belongs
            raise ReleasedCheckpointError(
                f"checkpoint {url} cannot be downloaded ({type(err).__name__}: {err}); put the file at {path} "
                f"(or set {ENV_CACHE} to a folder that holds it)"
            ) from None
    digest = _verify(path, url, sha256)
    if expected_sha256(url, sha256) is None and path.name not in _recorded(folder):
        _record(folder, path.name, digest)
    return path


def _download(url: str, path: Path, progress: bool) -> None:
    """To ``path`` through a temporary file (torch.hub's downloader), so a cut download never looks complete."""
    from torch.hub import download_url_to_file

    partial = path.with_name(path.name + ".partial")
    download_url_to_file(url, str(partial), progress=progress)
    with open(partial, "rb") as f:
        if f.read(15).lstrip().lower().startswith((b"<!doctype", b"<html")):
            partial.unlink()
            raise ReleasedCheckpointError(
                f"{url} served a web page, not a checkpoint (a quota or sign-in page); "
                f"download the file by hand and put it at {path}"
            )
    os.replace(partial, path)


def local_file(checkpoint: Optional[str], sha256: Optional[str] = None) -> Optional[str]:
    """The file ``eval.checkpoint`` names: a path as given, a URL's verified copy in the cache (never downloads);
    None for no checkpoint."""
    if not checkpoint:
        return None
    return str(cached_path(checkpoint, sha256)) if is_url(checkpoint) else checkpoint


def cache_path(url: str) -> Path:
    """Where ``url``'s copy lives (or will), unverified: for plans and messages."""
    return cache_dir() / file_name(url)


def location(checkpoint: str) -> Path:
    """Where the file ``eval.checkpoint`` names is (a URL: its place in the cache), unverified: for plans."""
    return cache_path(checkpoint) if is_url(checkpoint) else Path(os.path.expanduser(os.path.expandvars(checkpoint)))
