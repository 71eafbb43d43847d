"""Reading experiment YAML and command-line overrides and checking their values against the typed configs
(pure, no torch).

Every problem becomes one :class:`ExperimentError` that names the file, the row and the dotted key, with a
suggestion for a misspelt key.
"""

from __future__ import annotations

import difflib
import functools
import itertools
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from harness.config import BenchmarkConfig, DataConfig, EvalConfig, LauncherConfig, TrainConfig
from model.config import ModelConfig

SECTION_CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "benchmark": BenchmarkConfig,
    "launcher": LauncherConfig,
}


# places in an experiment that are not rows, as ExperimentError's ``row``
BASE, SMOKE, COMMAND_LINE = "(base)", "(smoke)", "(command line)"
PLACES = {BASE: "base", SMOKE: "smoke", COMMAND_LINE: "command line"}


class ExperimentError(Exception):
    """A problem in an experiment file: names the file (and the line, where known), the row and the dotted
    key. ``row`` is a row's label or one of :data:`PLACES` (the base, the smoke profile, the command line)."""

    def __init__(self, path: str, row: Optional[str], key: Optional[str], message: str, line: Optional[int] = None):
        where = [f"{path}:{line}" if line else str(path)]
        if row is not None:
            where.append(PLACES.get(row, f"row {row!r}"))
        if key:
            where.append(key)
        super().__init__(": ".join(where + [message]))
        self.path, self.row, self.key, self.message, self.line = str(path), row, key, message, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str) -> dict:
    """Parse ``path``; syntax errors, a missing or empty file become :class:`ExperimentError`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ExperimentError(path, None, None, f"cannot read the file ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ExperimentError(path, None, None, f"YAML syntax error at {at}{problem}") from None
    if data is None:
        raise ExperimentError(path, None, None, "the file is empty; expected a mapping with 'name', 'base' and 'rows'")
    if not isinstance(data, dict):
        raise ExperimentError(path, None, None, f"expected a mapping at the top level, got {type(data).__name__}")
    return data


def yaml_line(path: str, keys: Sequence) -> Optional[int]:
    """The 1-based line of ``keys`` (mapping keys and list indices, outermost first) in the YAML file at
    ``path``: the deepest of them that exists. None if the file cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            node = yaml.compose(f, Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            line, node = match[0][0].start_mark.line + 1, match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def combinations(axes: Mapping[str, list]) -> List[Tuple[str, dict]]:
    """``{model.enc_n_points: [1, 4], model.num_feature_levels: [1, 4]}`` -> (label, nested overrides) per
    combination, in order: ``("enc_n_points=1, num_feature_levels=4", {...})`` (full keys where two
    axes share a field name)."""
    keys = list(axes)
    leaves = [k.rsplit(".", 1)[1] for k in keys]
    names = leaves if len(set(leaves)) == len(leaves) else keys
    out = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        overrides: Dict[str, Any] = {}
        for key, value in zip(keys, combo):
            section, _, field = key.partition(".")
            overrides.setdefault(section, {})[field] = value
        out.append((", ".join(f"{n}={yaml_scalar(v)}" for n, v in zip(names, combo)), overrides))
    return out


def axes_rows(path, axes) -> List[dict]:
    """An experiment's ``axes:`` -> one row (label and overrides) per combination."""
    if axes is None:
        return []
    axes = expect(path, None, "axes", axes, dict)
    for key in axes:
        if "." not in key or key.split(".", 1)[0] not in SECTION_CLASSES:
            raise ExperimentError(
                path, None, f"axes.{key}", "expected a dotted key SECTION.FIELD, e.g. model.enc_n_points"
            )
        if not expect(path, None, f"axes.{key}", axes[key], list):
            raise ExperimentError(path, None, f"axes.{key}", "empty; expected at least one value")
    return [{"label": label, "overrides": overrides} for label, overrides in combinations(axes)]


def yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@functools.lru_cache(maxsize=None)
def hints(cls) -> dict:
    """The resolved type of each field of a config class (cached: resolving them is slow, and a grid of a
    thousand rows asks tens of thousands of times)."""
    return get_type_hints(cls)


def unknown(key, valid: Sequence[str], what: str = "key") -> str:
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    listed = ", ".join(map(str, valid)) if len(valid) <= 12 else ", ".join(map(str, list(valid)[:12])) + ", ..."
    return f"unknown {what} {key!r}; {hint}expected one of: {listed}"


# keys of earlier versions, and where what they said is written now
MOVED = {
    "seeds": "the seeds are one input now: overrides: {train: {seed: [1, 2, 3]}}",
    "launcher.seeds": "the seeds are one input now: train.seed: [1, 2, 3]",
}


def check_keys(path, row, prefix, mapping: Mapping, valid: Sequence[str]) -> None:
    for key in mapping:
        if key not in valid:
            moved = MOVED.get(f"{prefix}{key}")
            raise ExperimentError(
                path, row, f"{prefix}{key}", f"no longer a key; {moved}" if moved else unknown(key, valid)
            )


def check_sections(path, row, overrides: Mapping) -> None:
    """Unknown sections or fields of a nested override mapping."""
    check_keys(path, row, "", overrides, tuple(SECTION_CLASSES))
    for section, values in overrides.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ExperimentError(
                path, row, section, f"expected a mapping of {section} fields, got {type(values).__name__}"
            )
        check_keys(path, row, f"{section}.", values, tuple(hints(SECTION_CLASSES[section])))


_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def expect(path, row, key, value, tp):
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ExperimentError(path, row, key, f"got {value!r} ({type(value).__name__}), expected {_TYPE_NAMES[tp]}")
    return value


class _Mismatch(Exception):
    pass


def coerce(path, row, key, value, tp):
    try:
        return _coerce_value(value, tp)
    except _Mismatch:
        raise ExperimentError(
            path, row, key, f"got {value!r} ({type(value).__name__}), expected {_describe(tp)}"
        ) from None


def _coerce_value(value, tp):
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _coerce_value(value, a)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            if isinstance(value, dict) and len(args) == 2 and args[1] is Ellipsis:
                value = [list(item) for item in value.items()]  # mapping -> (key, value) pairs
            else:
                raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce_value(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce_value(v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    return value


def _describe(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        inner = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if origin in (tuple, Tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
    return _TYPE_NAMES.get(tp, str(tp))


def merge(a: Mapping, b: Mapping) -> dict:
    """Nested merge: mappings merge key by key, anything else in ``b`` replaces ``a``."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def select_rows(path, rows: Sequence[Union[str, int]], labels: List[str]) -> Tuple[str, ...]:
    """Row labels chosen by label or by 0-based index (``--rows 0 2`` or ``--rows "MS inputs, K=1"``)."""
    chosen = []
    for item in rows:
        if item in labels:
            chosen.append(item)
        elif isinstance(item, int) or str(item).isdigit():
            index = int(item)
            if not 0 <= index < len(labels):
                raise ExperimentError(
                    path, None, "rows", f"no row {index}; expected an index from 0 to {len(labels) - 1} or a label"
                )
            chosen.append(labels[index])
        else:
            raise ExperimentError(path, str(item), None, "no such row; " + unknown(item, labels, "row"))
    return tuple(dict.fromkeys(chosen))


def reference_numbers(path, label, key, raw, metrics) -> dict:
    """A row's ``paper:`` or ``official:`` numbers: metrics of the experiment, each a number or null."""
    numbers = expect(path, label, key, raw.get(key) or {}, dict)
    check_keys(path, label, f"{key}.", numbers, metrics)
    for metric, value in numbers.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ExperimentError(path, label, f"{key}.{metric}", f"got {value!r}, expected a number or null")
    return dict(numbers)
