"""Device classes: which machines' speeds (FPS) and training times (GPU hours) can be set against each other (pure).

A record names its device as the provenance code found it (``NVIDIA H100 80GB HBM3``, ``Tesla V100-SXM2-32GB``,
``CPU (AMD EPYC, 2 threads)``). Two numbers are compared only when their devices are of one class: the GPU
model without memory size or form factor (``V100``, ``A100``, ``H100``, ``RTX 4090``), or ``CPU``. The
references' class is :data:`harness.metrics.REFERENCE_DEVICE_CLASS` (the paper and the official README measured
on a V100).
"""

from __future__ import annotations

import re
from typing import List, Optional

from harness.metrics import BY_NAME, REFERENCE_DEVICE_CLASS

_VENDOR = re.compile(r"\b(nvidia|tesla|geforce|quadro|amd|radeon|instinct|intel|apple)\b", re.IGNORECASE)
_FAMILY = re.compile(r"\b(rtx|gtx|titan)\s*([a-z]?\d{3,4}\w*)", re.IGNORECASE)
_MODEL = re.compile(r"\b([a-z]{1,3}\d{1,4}[a-z]?)\b", re.IGNORECASE)


def device_class(device: Optional[str]) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``, ``"Tesla V100-SXM2-32GB"`` -> ``"V100"``, ``"cpu"`` and
    ``"CPU (AMD EPYC, 2 threads)"`` -> ``"CPU"``; ``""`` for no device; a name without a recognisable model
    stays as given (compared only with the very same name)."""
    text = (device or "").strip()
    if not text:
        return ""
    if re.match(r"cpu\b", text, re.IGNORECASE):
        return "CPU"
    rest = _VENDOR.sub(" ", text)
    family = _FAMILY.search(rest)
    if family:
        return f"{family.group(1).upper()} {family.group(2).upper()}"
    model = _MODEL.search(rest.replace("-", " "))
    return model.group(1).upper() if model else text


def split_devices(devices: str) -> List[str]:
    """An aggregated device text (seeds measured on several machines: ``a, b``) as its device names; a comma
    inside parentheses is part of a name (``CPU (AMD EPYC, 2 threads)``)."""
    names, depth, current = [], 0, ""
    for char in devices or "":
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(current)
            current = ""
        else:
            current += char
    names.append(current)
    return [name.strip() for name in names if name.strip()]


def classes(devices: str) -> List[str]:
    """The distinct device classes of an aggregated device text, sorted."""
    return sorted({device_class(d) for d in split_devices(devices)} - {""})


def comparable(metric: str, devices: str) -> bool:
    """Whether our ``metric`` measured on ``devices`` (the aggregated device text of a line) may be set against
    the references': always for a number that does not depend on the machine; else only when every run of the
    line was measured on the references' device class."""
    if BY_NAME[metric].device_field is None:
        return True
    found = list(classes(devices))
    return found == [REFERENCE_DEVICE_CLASS]
