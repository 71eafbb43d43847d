"""What tests/test_field_roles.py trains: a tiny base run per setting, and for every config field a perturbed
run (a helpers module, not a test module; pure, no torch).

Every field of every section is enumerated from the dataclasses (:data:`harness.grid.schema.SECTION_CLASSES`),
so a new field is covered without a line here, unless its value cannot be perturbed by the generic rule:

- a field with a list of choices (:data:`CHOICES`, the lists of ``harness/config.py`` and ``model/config.py``):
  the first other choice;
- bool: flipped; int: +1, else x2, else -1; float: x2, else x0.5 (0: 0.1); ``Optional[int]`` None: 1;
  ``Optional[str]`` None: a made-up string;
- anything else (tuples, paths, strings without a list): an entry of :data:`TABLE`, which also says in which
  base a field is perturbed when the default base makes it irrelevant (momentum needs SGD) and what other
  fields must change with it for the config to be valid (``companions``).

The first candidate that makes a valid config (:class:`model.config.ModelConfig`'s checks and
:func:`harness.grid.validate.check_run_config`) is the perturbation. A value starting with ``<ws>/`` is a file in
the test's workspace; ``<data>`` is the synthetic set that the data section describes (made by the test).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Dict, List, NamedTuple, Optional, Tuple

from builders import TINY_DATA, TINY_TRAIN, tiny_model_fields

from harness import config as hcfg
from harness.config import RunConfig
from harness.grid.schema import SECTION_CLASSES
from harness.grid.validate import check_run_config
from model import config as mcfg
from model.config import ConfigError

DATA = "<data>"  # the synthetic set of the data section (one folder per generated set)
WS = "<ws>/"  # a file in the test's workspace


# --------------------------------------------------------------------------------------------- the bases
# Tiny and fast on two CPU cores: hidden 32, one encoder layer, two decoder layers (aux_loss has an effect),
# 10 queries, three feature levels, a frozen backbone (Adam over ResNet-50 dominated the time), 48x64 images,
# four training images, two iterations per epoch, two epochs (lr_drop 1 drops before the second).
DEFAULT: Dict[str, dict] = {
    "model": tiny_model_fields(train_backbone=False),
    "data": {**TINY_DATA, "root": DATA},
    "train": {**TINY_TRAIN, "max_iters_per_epoch": 2},
    # tta_sizes: small, so that perturbing eval.tta does not evaluate at 1000 pixels (inactive without tta)
    "eval": dict(tta_sizes=(48, 64)),
    "benchmark": dict(),
    "launcher": dict(executor="local", gpus_per_node=0, tasks_per_node=1),
}

_TINY_DETR = dict(
    pretrained_backbone=False,
    train_backbone=False,
    hidden_dim=32,
    dim_feedforward=64,
    nheads=2,
    enc_layers=1,
    dec_layers=2,
    num_queries=10,
)

# name -> {section: {field: value}} on top of DEFAULT ("model" replaces DEFAULT's model section when it has
# "arch": another architecture starts from its own defaults, model.config.arch_defaults)
BASES: Dict[str, Dict[str, dict]] = {
    "default": {},
    "train_backbone": {"model": dict(train_backbone=True)},
    "sgd": {"train": dict(optimizer="sgd")},
    "warmup": {"train": dict(warmup_iters=2)},
    "multistep": {"train": dict(epochs=3, lr_schedule="multistep", lr_milestones=(2,))},
    "accumulating": {"train": dict(total_batch_size=4)},
    "no_accumulation": {"train": dict(accumulate_to_total=False)},
    "pretrained": {"model": dict(pretrained_backbone=True, backbone_weights=WS + "backbone_a.pth")},
    "box_refine": {"model": dict(with_box_refine=True)},
    "detr": {"model": dict(arch="detr", **_TINY_DETR)},
    "faster_rcnn": {
        "model": dict(arch="faster_rcnn", pretrained_backbone=False, train_backbone=False),
        "train": dict(epochs=1),
    },
    "from_checkpoint": {"eval": dict(checkpoint=WS + "checkpoint.pth")},
    "tta": {"eval": dict(tta=True)},
    # the synthetic set read as COCO (same files): the synthetic.* fields are inactive there
    "coco_format": {"data": dict(dataset="coco")},
}

CHOICES: Dict[str, Tuple] = {
    "model.arch": mcfg.ARCHS,
    "model.backbone": mcfg.BACKBONES,
    "model.neck": mcfg.NECKS,
    "model.attn_impl": mcfg.ATTN_IMPLS,
    "model.rcnn_box_loss": mcfg.RCNN_BOX_LOSSES,
    "model.rpn_box_loss": mcfg.RCNN_BOX_LOSSES,
    "model.position_embedding": ("sine", "learned"),  # model.config.validate lists them inline
    "data.dataset": hcfg.DATASETS,
    "data.augmentation": hcfg.AUGMENTATIONS,
    "train.optimizer": hcfg.OPTIMIZERS,
    "train.lr_schedule": hcfg.LR_SCHEDULES,
    "train.amp": tuple(hcfg.AMP_MODES),
    "benchmark.precision": hcfg.PRECISIONS,
    "launcher.executor": hcfg.EXECUTORS,
}


class Entry(NamedTuple):
    """How one field is perturbed where the generic rule does not do: in ``base``, to ``value`` (None: the
    generic rule from the base's value), with ``companions`` (dotted key -> value) that validity requires."""

    base: str = "default"
    value: object = None
    companions: Tuple[Tuple[str, object], ...] = ()


def _e(base="default", value=None, **companions):
    return Entry(base, value, tuple((k.replace("__", "."), v) for k, v in companions.items()))


TABLE: Dict[str, Entry] = {
    # DETR needs one feature level and the deformable attention's switches at their defaults
    "model.arch": _e(
        value="detr", model__num_feature_levels=1, model__enc_n_points=4, model__dec_n_points=4, model__attn_impl="auto"
    ),
    # ImageNet weights cannot be downloaded here: a local file of (random) ResNet-50 weights stands for them
    "model.pretrained_backbone": _e(value=True, model__backbone_weights=WS + "backbone_a.pth"),
    "model.backbone_weights": _e("pretrained", WS + "backbone_b.pth"),
    "model.position_embedding": _e("detr"),  # Deformable DETR allows only sine
    "model.pre_norm": _e("detr"),  # DETR only
    "model.eos_coef": _e("detr"),  # the softmax loss (focal_loss false)
    # DETR's softmax -> sigmoid focal loss. Deformable DETR with focal_loss false passes validation but fails
    # in the loss (its class head has no no-object logit: "weight tensor should be defined either for all or
    # no classes"), so the switch is perturbed where it works
    "model.focal_loss": _e("detr"),
    "model.two_stage": _e("box_refine"),  # needs with_box_refine
    "model.rcnn_box_loss": _e("faster_rcnn"),
    "model.rcnn_box_loss_weight": _e("faster_rcnn"),
    "model.rpn_box_loss": _e("faster_rcnn"),
    "model.rpn_box_loss_weight": _e("faster_rcnn"),
    "model.attn_impl": _e(value="cpu"),  # the compiled CPU kernel vs the PyTorch reference
    "model.set_cost_giou": _e(value=20.0),  # x2 (and x4) leave the tiny run's matching unchanged
    "data.root": _e(value=WS + "data-elsewhere"),  # the same generated set in another folder
    "data.train_split": _e(value="val2017"),
    "data.val_split": _e(value="test-dev2017"),  # images without annotations (the test makes the files)
    "data.num_workers": _e(value=2),
    "data.max_size": _e(value=72),  # 96 never caps a 64-pixel short side of a 4:3 image
    "data.synthetic_image_size": _e(value=(64, 48)),
    "train.lr_backbone": _e("train_backbone"),  # a frozen backbone has no backbone lr
    "train.momentum": _e("sgd"),
    "train.warmup_factor": _e("warmup"),
    # step with lr_drop 1 vs multistep at epoch 2 of 3 (step vs multistep [1] would be the same schedule)
    "train.lr_schedule": _e("multistep", "step", train__lr_milestones=()),
    "train.lr_milestones": _e("multistep", (1,)),
    "train.accumulate_to_total": _e("accumulating"),  # with total 2 = batch 2 there is nothing to accumulate
    # a batch of 3 or 4 is no divisor of the total 2: perturbed without accumulation
    "train.batch_size_per_gpu": _e("no_accumulation"),
    "train.max_iters_per_epoch": _e(value=1),  # 3 > the 2 batches of an epoch would cut nothing
    "eval.eval_only": _e("from_checkpoint"),  # needs a checkpoint
    "eval.checkpoint": _e(value=WS + "checkpoint.pth"),  # the default base's checkpoint, as initial weights
    "eval.tta_sizes": _e("tta", (48,)),
    "benchmark.fps_batch_sizes": _e(value=(1,)),
    "launcher.additional_parameters": _e(value=(("comment", "perturbed"),)),
    # more processes: valid only where the total batch need not be a multiple of them
    "launcher.nodes": _e("no_accumulation"),
    "launcher.tasks_per_node": _e("no_accumulation"),
}


# ---------------------------------------------------------------------------------------------- configs


def all_keys() -> List[str]:
    """``section.field`` of every field of every config section, in declaration order."""
    return [f"{s}.{f.name}" for s, cls in SECTION_CLASSES.items() for f in dataclasses.fields(cls)]


def metadata(key: str) -> dict:
    section, name = key.split(".")
    return {f.name: f.metadata for f in dataclasses.fields(SECTION_CLASSES[section])}[name]


def base_sections(base: str) -> Dict[str, dict]:
    over = BASES[base]
    out = {s: dict(DEFAULT[s]) for s in SECTION_CLASSES}
    for section, fields in over.items():
        if section == "model" and "arch" in fields:
            out["model"] = dict(mcfg.arch_defaults(fields["arch"]), **fields)
        else:
            out[section].update(fields)
    return out


def build(base: str, changes: Tuple[Tuple[str, object], ...] = ()) -> RunConfig:
    """The run config of ``base`` with ``changes`` (dotted key -> value); :class:`ConfigError` when invalid."""
    sections = base_sections(base)
    for key, value in changes:
        section, name = key.split(".")
        sections[section][name] = value
    cfg = RunConfig(**{s: cls(**sections[s]) for s, cls in SECTION_CLASSES.items()})  # ModelConfig validates
    check_run_config(cfg)
    return cfg


def value_of(cfg: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _hints(key: str):
    section, name = key.split(".")
    cls = SECTION_CLASSES[section]
    return typing.get_type_hints(cls, vars(__import__(cls.__module__, fromlist=["_"])))[name]


def candidates(key: str, value) -> list:
    """The generic rule's values for ``key`` now at ``value``, in order of preference."""
    if key in CHOICES:
        return [c for c in CHOICES[key] if c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [v for v in (value + 1, value * 2, value - 1) if v != value]
    if isinstance(value, float):
        return [value * 2, value * 0.5] if value else [0.1]
    if value is None:
        args = typing.get_args(_hints(key))
        if int in args:
            return [1]
        if str in args:
            return ["perturbed"]
    return []


class Perturbation(NamedTuple):
    key: str
    base: str
    changes: Tuple[Tuple[str, object], ...]  # the field first, then its companions

    @property
    def value(self):
        return self.changes[0][1]

    def describe(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.changes[1:])
        return f"{self.key}={self.value!r}{extra} in base {self.base!r}"


def perturbation(key: str, base: Optional[str] = None) -> Perturbation:
    """How ``key`` is perturbed (in ``base``, default: its :data:`TABLE` base or "default").
    :class:`LookupError` saying why when no valid perturbation is known."""
    entry = TABLE.get(key, Entry())
    base = base or entry.base
    current = value_of(build(base), key)
    values = [entry.value] if entry.value is not None else candidates(key, current)
    if not values:
        raise LookupError(
            f"{key}: no generic perturbation of {current!r} ({_hints(key)}); add an entry to "
            "TABLE in tests/field_perturbation.py (or an exemption with its reason)"
        )
    errors = []
    for value in values:
        if value == current:
            continue
        changes = ((key, value),) + entry.companions
        try:
            build(base, changes)
        except (ConfigError, ValueError, TypeError) as e:
            errors.append(f"{value!r}: {e}")
            continue
        return Perturbation(key, base, changes)
    raise LookupError(
        f"{key}: no valid perturbation in base {base!r} ({'; '.join(errors) or 'no candidate'}); "
        "add an entry to TABLE in tests/field_perturbation.py"
    )


def inactive_perturbation(key: str) -> Optional[Perturbation]:
    """For a field declared with ``active``: a valid perturbation in the first base where the field is inactive
    (left out of the ids), or None when there is none (validation forbids setting it there: momentum)."""
    active = metadata(key)["active"]
    if active is None:
        return None
    section = key.split(".")[0]
    for base in BASES:
        if active(getattr(build(base), section)):
            continue
        try:
            return perturbation(key, base)
        except LookupError:
            continue
    return None
