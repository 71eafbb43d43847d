"""The identities of a row, computed from the role every config field declares beside its default
(:func:`model.config.declare`): the run id (what changes the weights), the evaluation id (how the checkpoint
is evaluated) and the measurement id (how the model is measured). Pure, no torch; reading a file's bytes for
a field that names a file is the one I/O, behind ``digest``.

An identity holds, per section, the fields of that role whose canonical value differs from the field's
default (so a new field with a default changes no id), leaving out a field its section makes irrelevant
(``momentum`` with AdamW), with a file named by its content. The run id adds what the fields only decide
together: the effective total batch when accumulation does not fix it. A change in what an existing field
means bumps :data:`SCHEMA_VERSION`; a changed default is caught by comparing a run's stored config with
today's resolution (:func:`differences`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Callable, Dict, List, Tuple

from harness.config import RunConfig
from harness.grid.schema import SECTION_CLASSES
from harness.grid.validate import world_size
from model.config import EVALUATION, MEASUREMENT, ROLES, WEIGHTS, ConfigError, field_roles
from model.released import file_sha256

SCHEMA_VERSION = 3  # 3: ids from declared roles, data.train_size, files by content, seeds per sample
Digest = Callable[[str], str]


def file_digest(path: str) -> str:
    """``sha256:<hex>`` of the file's bytes (cached by path, size and modification time); of a folder (a Hugging
    Face checkpoint folder), of each file's relative name and digest, in name order."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise FileNotFoundError(f"{path}: {e.strerror}") from None
    if os.path.isdir(path):
        h = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(f"{os.path.relpath(full, path)}\0{file_digest(full)}\0".encode())
        return "sha256:" + h.hexdigest()
    return _sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return "sha256:" + file_sha256(path)  # size and mtime: the cache key only


def _json(value):
    return json.loads(json.dumps(value))


@functools.lru_cache(maxsize=None)
def _declarations(cls) -> Tuple[Tuple[str, dict, object], ...]:
    """(name, metadata, default) of each field of a config class."""
    metadata = field_roles(cls)  # raises for a field without a role
    return tuple(
        (f.name, metadata[f.name], f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(cls)
    )


def _canonical(meta: dict, value, section_cfg):
    return meta["canonical"](value, section_cfg) if meta["canonical"] is not None else value


def _names_file(meta: dict, value) -> bool:
    content = meta["content"]
    return value is not None and (content(value) if callable(content) else bool(content))


def identity(cfg: RunConfig, role: str, digest: Digest = file_digest) -> Dict[str, dict]:
    """``{section: {field: canonical value}}`` of the fields of ``role`` that differ from their default.
    :class:`ConfigError` (dotted key) when a file that names an identity cannot be read."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {ROLES}")
    out: Dict[str, dict] = {}
    for section, cls in SECTION_CLASSES.items():
        sub = getattr(cfg, section)
        for name, meta, default in _declarations(cls):
            if role not in meta["roles"] or (meta["active"] is not None and not meta["active"](sub)):
                continue
            value = _canonical(meta, getattr(sub, name), sub)
            if _json(value) == _json(_canonical(meta, default, sub)):
                continue
            if _names_file(meta, value):
                try:
                    value = digest(value)
                except OSError as e:
                    raise ConfigError(
                        f"{section}.{name}",
                        f"cannot read {value!r} ({e}); a file enters the ids "
                        "by its content, so it must be readable where the grid is planned",
                    ) from None
            out.setdefault(section, {})[name] = _json(value)
    if role == WEIGHTS and not cfg.train.accumulate_to_total:
        # without accumulation the total batch is what the processes hold together, which no field says
        out.setdefault("derived", {})["effective_batch"] = cfg.train.batch_size_per_gpu * world_size(cfg.launcher)
    return out


def _hash(doc: dict, length: int) -> str:
    return hashlib.sha1(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:length]


def canonical_json(cfg: RunConfig, digest: Digest = file_digest) -> str:
    """The JSON the run id hashes: the schema version and the weights identity."""
    return json.dumps(
        {"schema": SCHEMA_VERSION, **identity(cfg, WEIGHTS, digest)}, sort_keys=True, separators=(",", ":")
    )


def run_id(cfg: RunConfig, digest: Digest = file_digest) -> str:
    """The training's identity: what changes the weights."""
    return hashlib.sha1(canonical_json(cfg, digest).encode()).hexdigest()[:12]


def _sub_id(cfg: RunConfig, role: str, digest: Digest) -> str:
    found = identity(cfg, role, digest)
    return _hash(found, 8) if found else "default"


def eval_id(cfg: RunConfig, digest: Digest = file_digest) -> str:
    """The evaluation's identity within its training (``default`` when every evaluation field is)."""
    return _sub_id(cfg, EVALUATION, digest)


def measure_id(cfg: RunConfig, digest: Digest = file_digest) -> str:
    """The measurement's identity within its training (``default`` when every measurement field is)."""
    return _sub_id(cfg, MEASUREMENT, digest)


def ids(cfg: RunConfig, digest: Digest = file_digest) -> Tuple[str, str, str]:
    """(run id, evaluation id, measurement id)."""
    return run_id(cfg, digest), eval_id(cfg, digest), measure_id(cfg, digest)


def differences(stored: RunConfig, today: RunConfig, role: str) -> List[Tuple[str, object, object]]:
    """``[(dotted key, stored value, today's value)]`` of the fields of ``role`` (relevant in either config)
    whose values differ: a run whose config no longer resolves to what it ran with (a changed default or
    recipe) is not the row's result any more. Files compare by path here; their content is in the id."""
    found = []
    for section, cls in SECTION_CLASSES.items():
        a, b = getattr(stored, section), getattr(today, section)
        for name, meta, _ in _declarations(cls):
            if role not in meta["roles"]:
                continue
            relevant = meta["active"] is None or meta["active"](a) or meta["active"](b)
            va, vb = (_json(_canonical(meta, getattr(c, name), c)) for c in (a, b))
            if relevant and va != vb:
                found.append((f"{section}.{name}", va, vb))
    return found


def undeclared() -> List[str]:
    """Dotted keys of config fields that declare no role (a test keeps this empty)."""
    missing = []
    for section, cls in SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            if "roles" not in f.metadata:
                missing.append(f"{section}.{f.name}")
    return missing


def roles_of(section: str, name: str) -> Tuple[str, ...]:
    """The roles ``section.name`` declares (empty: it enters no id)."""
    for field_name, meta, _ in _declarations(SECTION_CLASSES[section]):
        if field_name == name:
            return meta["roles"]
    raise KeyError(f"{section}.{name}")
