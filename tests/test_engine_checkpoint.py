"""Training checkpoints: atomic rotation, corruption and truncation detection, fall back, key mismatches."""

import os
import random

import numpy as np
import pytest
import torch

from harness.run import checkpointing as ckpt
from model.checkpoint import load_state


def _state(epoch, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = {
        "layer.weight": torch.randn(64, 32, generator=g),
        "layer.bias": torch.zeros(64),
        "half": torch.randn(8, generator=g).to(torch.bfloat16),
        "count": torch.tensor(3),
    }
    return dict(
        model=model,
        optimizer={"state": {}, "param_groups": [{"lr": 1e-4, "name": "default"}]},
        lr_scheduler={"last_epoch": epoch},
        epoch=epoch,
        rng=ckpt.rng_state(),
        sampler={"epoch": epoch + 1, "seed": 0},
        config={"train": {"epochs": 2, "sizes": (1, 2)}},
    )


def _corrupt(path, offset_from_end=None):
    data = bytearray(open(path, "rb").read())
    i = len(data) // 2 if offset_from_end is None else len(data) - offset_from_end
    data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])


def test_round_trip_and_rotation(tmp_path):
    out = str(tmp_path)
    ckpt.save_checkpoint(out, _state(0))
    ckpt.save_checkpoint(out, _state(1))
    assert sorted(os.listdir(out)) == [ckpt.CHECKPOINT, ckpt.PREVIOUS]  # no temporary files left
    state, path = ckpt.load_latest(out, log=None)
    assert path.endswith(ckpt.CHECKPOINT) and state["epoch"] == 1
    assert torch.equal(state["model"]["layer.weight"], _state(1)["model"]["layer.weight"])
    assert ckpt.read_checkpoint(os.path.join(out, ckpt.PREVIOUS))["epoch"] == 0
    assert ckpt.load_latest(str(tmp_path / "none"), log=None) is None


def test_rng_state_round_trip(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), _state(0))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    state = ckpt.read_checkpoint(str(tmp_path / ckpt.CHECKPOINT))
    torch.rand(5), np.random.rand(5), random.random()
    ckpt.set_rng_state(state["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage):
    out = str(tmp_path)
    ckpt.save_checkpoint(out, _state(0))
    ckpt.save_checkpoint(out, _state(1))
    newest = os.path.join(out, ckpt.CHECKPOINT)
    {"flip": _corrupt, "truncate": _truncate, "empty": lambda p: open(p, "wb").close()}[damage](newest)
    with pytest.raises(ckpt.CheckpointError, match=ckpt.CHECKPOINT):
        ckpt.read_checkpoint(newest)
    messages = []
    with pytest.warns(RuntimeWarning, match="falling back to the previous one"):
        state, path = ckpt.load_latest(out, log=messages.append)
    assert path.endswith(ckpt.PREVIOUS) and state["epoch"] == 0
    assert any("instead" in m for m in messages)


def test_flipped_byte_is_detected_by_checksum(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path), _state(0), keep_previous=False)
    size = os.path.getsize(path)
    # a byte inside the tensor data: torch.load itself reads it without complaint
    _corrupt(path)
    with pytest.raises(ckpt.CheckpointError, match="(checksum mismatch|cannot be read)"):
        ckpt.read_checkpoint(path)
    assert os.path.getsize(path) == size


def test_no_usable_checkpoint_is_an_error(tmp_path):
    out = str(tmp_path)
    ckpt.save_checkpoint(out, _state(0))
    ckpt.save_checkpoint(out, _state(1))
    _truncate(os.path.join(out, ckpt.CHECKPOINT))
    _truncate(os.path.join(out, ckpt.PREVIOUS))
    with pytest.warns(RuntimeWarning), pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        ckpt.load_latest(out, log=None)


def test_interrupted_write_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path)
    ckpt.save_checkpoint(out, _state(0))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(out, _state(1))
    monkeypatch.undo()
    state, path = ckpt.load_latest(out, log=None)
    assert state["epoch"] == 0 and path.endswith(ckpt.CHECKPOINT)


def test_not_a_training_checkpoint(tmp_path):
    path = str(tmp_path / "weights.pth")
    torch.save({"layer.weight": torch.zeros(2)}, path)
    with pytest.raises(ckpt.CheckpointError, match="not a training checkpoint"):
        ckpt.read_checkpoint(path)


def test_other_architecture_names_mismatched_keys():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ckpt.CheckpointError) as e:
        load_state(model, other.state_dict(), "run/checkpoint.pth")
    message = str(e.value)
    assert "run/checkpoint.pth" in message and "2 unexpected keys: 2.bias, 2.weight" in message
    assert "shape of 0.weight: checkpoint (5, 4), model (3, 4)" in message
    load_state(model, model.state_dict())
