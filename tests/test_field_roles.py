"""The roles config fields declare (model.config.declare) against what they do: for every field of every
section, a tiny training with the field perturbed is compared bitwise with the unperturbed one.

- a field whose change alters the trained weights must declare ``weights`` (it must enter the run id);
- a field that declares ``weights`` must alter them (else it splits run ids for nothing), unless exempted below
  with the reason;
- a field without ``weights`` (evaluation, measurement, none) must leave them bitwise equal: the evaluation
  between epochs must not draw from the generators training uses, scheduling must not reach training;
- a field declared with ``active`` must leave the weights equal where it is inactive (the ids leave it out
  there).

Exemptions (skipped, with the reason), known contradictions (strict xfail) and fields compared up to rounding
are the three short lists below.

Perturbations and bases: tests/field_perturbation.py. The weights compared are the final model's state
(captured from the engine's model); checkpoints are not written except by the default base, whose file the
``eval.checkpoint`` perturbation starts from (and which is compared with the captured state once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import field_perturbation as fp
import pytest
import torch

from harness.data import synthetic
from harness.grid.identity import undeclared
from harness.run import checkpointing, engine
from model.config import WEIGHTS

# Fields whose check cannot run here, each with its reason (a skip that says so in the report).
EXEMPT = {
    "data.dataset": "'coco' needs the real COCO 2017 set; pointed at the synthetic set (same files, read as COCO) "
    "it trains on the same data, so equal weights would prove nothing",
    "eval.checkpoint_sha256": "names which file a released checkpoint's URL must deliver; two values cannot both "
    "match one file, so no run has both (tests/test_released.py refuses the other)",
}
# Fields whose perturbation is known to contradict their declaration, with the reason (xfail, strict).
KNOWN = {}
# Fields without the weights role whose perturbation may change the weights by floating-point rounding only,
# by decision: compared up to ROUNDING_ATOL (an optimiser step moves weights by about lr = 2e-4) instead.
ROUNDING = {
    "model.attn_impl": "the compiled CPU kernel and the PyTorch reference compute the same op with other "
    "rounding; which kernel ran is recorded with each run, not in the id (by decision)",
}
ROUNDING_ATOL = 2e-5

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:effective total batch"),
    pytest.mark.filterwarnings("ignore:Detected call of"),
]


# -------------------------------------------------------------------------------------- fast checks


def test_every_field_declares_its_roles():
    assert undeclared() == []
    silent = [k for k in fp.all_keys() if not fp.metadata(k)["roles"] and not fp.metadata(k)["why"].strip()]
    assert silent == [], f"fields with no role must say why (recorded(..., why=...)): {silent}"


def test_every_field_has_a_valid_perturbation():
    """A new field either perturbs by the generic rule, has a TABLE entry, or is exempted with its reason."""
    problems = []
    for key in fp.all_keys():
        if key in EXEMPT:
            continue
        try:
            p = fp.perturbation(key)
        except LookupError as e:
            problems.append(str(e))
            continue
        if fp.value_of(fp.build(p.base, p.changes), key) == fp.value_of(fp.build(p.base), key):
            problems.append(f"{key}: the perturbation leaves it at its base value")
    assert problems == []
    stale = [k for k in [*EXEMPT, *KNOWN, *ROUNDING, *fp.TABLE] if k not in fp.all_keys()]
    assert stale == [], f"exemptions or table entries for fields that no longer exist: {stale}"
    for name in fp.BASES:
        fp.build(name)  # every base is a valid config


# --------------------------------------------------------------------------------------- training


def _digest(t: torch.Tensor):
    t = t.detach().cpu().contiguous()
    return tuple(t.shape), str(t.dtype), hashlib.sha1(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def differing(a: dict, b: dict) -> list:
    """Names of the state entries that differ between two digests (missing ones included)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class Trainer:
    """Trains configs of tests/field_perturbation.py once each and remembers their weights' digests."""

    def __init__(self, workspace):
        self.ws = str(workspace)
        self.done = {}
        self.kept = {}  # state tensors of the runs asked for with keep=True
        self.count = 0

    # where <ws>/ and <data> point
    def _data_root(self, data_cfg) -> str:
        if data_cfg.dataset != "synthetic":  # the synthetic.* fields are inactive: the default set, as COCO
            data_cfg = fp.build("default").data
        params = dict(
            n=data_cfg.synthetic_train_images,
            v=data_cfg.synthetic_val_images,
            size=list(data_cfg.synthetic_image_size),
            seed=data_cfg.synthetic_seed,
        )
        root = os.path.join(self.ws, "data", hashlib.sha1(json.dumps(params).encode()).hexdigest()[:10])
        synthetic.generate_from_config(data_cfg, root)
        test_images = os.path.join(root, "test2017")
        if not os.path.isdir(test_images):  # a test-dev style split: the val images without annotations
            shutil.copytree(os.path.join(root, "val2017"), test_images)
            with open(os.path.join(root, "annotations", "instances_val2017.json")) as f:
                info = {k: v for k, v in json.load(f).items() if k != "annotations"}
            with open(os.path.join(root, "annotations", "image_info_test-dev2017.json"), "w") as f:
                json.dump(info, f)
        return root

    def resolve(self, cfg):
        sections = {}
        for section in ("model", "data", "train", "eval", "benchmark", "launcher"):
            sub = getattr(cfg, section)
            changes = {}
            for f in dataclasses.fields(sub):
                value = getattr(sub, f.name)
                if isinstance(value, str) and value.startswith(fp.WS):
                    changes[f.name] = self._workspace_file(value[len(fp.WS) :])
                elif value == fp.DATA:
                    changes[f.name] = self._data_root(sub)
            sections[section] = dataclasses.replace(sub, **changes) if changes else sub
        return dataclasses.replace(cfg, **sections)

    def _workspace_file(self, name: str) -> str:
        path = os.path.join(self.ws, name)
        if name.startswith("backbone_") and not os.path.isfile(path):
            import torchvision

            torch.manual_seed(sum(map(ord, name)))  # two different stand-ins for ImageNet weights
            torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
        elif name == "checkpoint.pth":
            self.weights("default")  # written by the default base's run
        return path

    def weights(self, base: str, changes=()) -> dict:
        """``{state entry: (shape, dtype, sha1)}`` of the final weights of ``base`` with ``changes``."""
        key = (base, tuple(changes))
        if key not in self.done:
            self.done[key] = self._train(fp.build(base, key[1]), key, real_checkpoint=key == ("default", ()))
        return self.done[key]

    def tensors(self, base: str, changes=()) -> dict:
        """The final weights themselves (trained again unless kept)."""
        key = (base, tuple(changes))
        if key not in self.kept:
            self.done[key] = self._train(fp.build(base, key[1]), key, real_checkpoint=False, keep=True)
        return self.kept[key]

    def _train(self, cfg, key, real_checkpoint: bool, keep: bool = False) -> dict:
        cfg = self.resolve(cfg)
        self.count += 1
        out = os.path.join(self.ws, "checkpoint-run" if real_checkpoint else f"run{self.count}")
        built = {}
        build_model = engine._build_model

        def capture(run_cfg, device):
            model, criterion, postprocessor = build_model(run_cfg, device)
            built["model"] = model
            return model, criterion, postprocessor

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(engine, "_build_model", capture)
            if not real_checkpoint:  # writing (and checksumming) ~100 MB per epoch: half the time
                mp.setattr(checkpointing, "save_checkpoint", lambda *args, **kwargs: None)
            engine.train(cfg, out, log_fn=lambda record: None, print_fn=None)
        tensors = built["model"].state_dict()
        state = {k: _digest(v) for k, v in tensors.items()}
        if keep:
            self.kept[key] = {k: v.detach().clone() for k, v in tensors.items()}
        if real_checkpoint:
            saved = checkpointing.read_checkpoint(os.path.join(out, checkpointing.CHECKPOINT))["model"]
            assert differing({k: _digest(v) for k, v in saved.items()}, state) == [], (
                "the captured model is not the one the checkpoint holds"
            )
            shutil.copyfile(os.path.join(out, checkpointing.CHECKPOINT), os.path.join(self.ws, "checkpoint.pth"))
        shutil.rmtree(out, ignore_errors=True)
        return state


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return Trainer(tmp_path_factory.mktemp("field_roles"))


def _params():
    out = []
    for key in fp.all_keys():
        marks = [pytest.mark.slow]
        if key in EXEMPT:
            marks.append(pytest.mark.skip(reason=f"exempt: {EXEMPT[key]}"))
        elif key in KNOWN:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[key]))
        out.append(pytest.param(key, marks=marks, id=key))
    return out


def _summary(changed: list) -> str:
    return ", ".join(changed[:4]) + (f", ... ({len(changed)} in all)" if len(changed) > 4 else "")


@pytest.mark.parametrize("key", _params())
def test_declared_role_matches_effect_on_weights(key, trainer):
    p = fp.perturbation(key)
    roles = fp.metadata(key)["roles"]
    if key in ROUNDING:
        assert WEIGHTS not in roles, f"{key} declares 'weights': drop it from ROUNDING"
        a, b = trainer.tensors(p.base), trainer.tensors(p.base, p.changes)
        assert a.keys() == b.keys()
        worst = max(((x.double() - b[k].double()).abs().max().item(), k) for k, x in a.items() if x.is_floating_point())
        assert worst[0] <= ROUNDING_ATOL, (
            f"{key} ({ROUNDING[key]}): {p.describe()} changed {worst[1]} by "
            f"{worst[0]:.3g}, more than rounding ({ROUNDING_ATOL})"
        )
        return
    changed = differing(trainer.weights(p.base), trainer.weights(p.base, p.changes))
    if WEIGHTS in roles:
        assert changed, (
            f"{key} declares roles {roles} but {p.describe()} left the trained weights bitwise "
            "equal: it splits run ids for nothing (or the perturbation is inert here: exempt it "
            "with the reason, or perturb it in a base where it is active)"
        )
    else:
        assert not changed, (
            f"{key} declares roles {roles or '(none)'} but {p.describe()} changed the trained "
            f"weights ({_summary(changed)}): it must declare 'weights'"
        )


def _inactive_params():
    out = []
    for key in fp.all_keys():
        if key in EXEMPT or fp.inactive_perturbation(key) is None:
            continue
        out.append(pytest.param(key, marks=pytest.mark.slow, id=key))
    return out


@pytest.mark.parametrize("key", _inactive_params())
def test_inactive_field_leaves_weights_alone(key, trainer):
    """Where ``active`` says a field is irrelevant the ids leave it out: it must not change the weights there."""
    p = fp.inactive_perturbation(key)
    changed = differing(trainer.weights(p.base), trainer.weights(p.base, p.changes))
    assert not changed, (
        f"{key} is inactive in base {p.base!r} by its declaration (so outside the ids there), "
        f"but {p.describe()} changed the trained weights ({_summary(changed)})"
    )
