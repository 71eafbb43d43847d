"""Command-line overrides (``model.enc_n_points=3``, hydra-style comma sweeps ``train.lr=1e-4,2e-4``) into the
nested mapping an experiment merges last (pure, no torch)."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple, get_args, get_origin

import yaml

from harness.grid.schema import COMMAND_LINE, SECTION_CLASSES, ExperimentError, check_sections, hints


def parse_overrides(path: str, items: Sequence[str]) -> Tuple[dict, Dict[str, list]]:
    """``["model.enc_n_points=8", "launcher.partition=gpu"]`` -> (nested overrides, sweeps); values read as
    YAML (``true``, ``8``, ``[1, 4]``), keys checked against the config sections. A comma list outside
    brackets and quotes (``model.enc_n_points=1,2,4``) is a sweep: ``{dotted key: [values]}``, one row per
    value (:func:`combinations`); ``[1, 2]`` stays one list value (``train.seed=[1,2]``: seeds)."""
    given: Dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ExperimentError(
                path,
                COMMAND_LINE,
                item,
                "expected SECTION.FIELD=VALUE, e.g. model.enc_n_points=8 or launcher.partition=gpu",
            )
        pieces = _top_level_split(text)
        if len(pieces) > 1 and not all(piece.strip() for piece in pieces):
            raise ExperimentError(
                path, COMMAND_LINE, key, f"{text!r} has an empty item; expected VALUE,VALUE,... (one row per value)"
            )
        values = [_read_value(path, key, piece) for piece in pieces]
        given.pop(key, None)  # the last one given wins, in the order given
        given[key] = _Sweep(values) if len(pieces) > 1 else values[0]
    nested: dict = {}
    for key, value in given.items():
        section, _, field = key.partition(".")
        nested.setdefault(section, {})[field] = value
    check_sections(path, COMMAND_LINE, nested)
    sweeps = {}
    for key, value in given.items():
        if isinstance(value, _Sweep):
            section, _, field = key.partition(".")
            del nested[section][field]
            sweeps[key] = _sweep_values(path, key, value, hints(SECTION_CLASSES[section])[field])
    return nested, sweeps


class _Sweep(list):
    """The values of a comma list on the command line."""


def _top_level_split(text: str) -> list:
    """``1,2,[3, 4]`` -> ``["1", "2", "[3, 4]"]``: commas outside brackets, braces and quotes."""
    pieces, depth, quote, start = [], 0, None, 0
    for i, c in enumerate(text):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    return pieces + [text[start:]]


def _read_value(path, key, text):
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ExperimentError(path, COMMAND_LINE, key, f"cannot read the value {text!r} ({e})") from None


def _sweep_values(path, key, values: list, tp) -> list:
    """A sweep's values: distinct, and lists for a list-valued field (``128,160`` there is ambiguous)."""
    for i, value in enumerate(values):
        if value in values[:i]:
            raise ExperimentError(
                path,
                COMMAND_LINE,
                key,
                f"{value!r} is given twice in the comma list; expected distinct values (one row per value)",
            )
    listed = get_origin(tp) in (tuple, Tuple) or any(get_origin(a) in (tuple, Tuple) for a in get_args(tp))
    if listed and not all(isinstance(v, (list, dict)) for v in values):
        raise ExperimentError(
            path,
            COMMAND_LINE,
            key,
            "takes a list, and a comma list outside brackets sweeps "
            "one row per value; expected [a, b] for one value, or [a, b],[c, d] to sweep",
        )
    return list(values)
