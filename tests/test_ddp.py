"""Distributed data parallel with 2 CPU processes (gloo): the same weights on both ranks after training."""

import os
import socket
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

from harness.run import distributed as dist_utils


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, data_root, output_dir, result_dir):
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from builders import tiny_run_config

    from harness.run import engine

    info = dist_utils.init_distributed()
    assert info["world_size"] == world_size and dist_utils.get_rank() == rank
    built = {}
    build = engine._build_model

    def keep(run_cfg, device):
        built["model"], criterion, post = build(run_cfg, device)
        built["initial"] = {k: v.clone() for k, v in built["model"].state_dict().items()}
        return built["model"], criterion, post

    patch = mock.patch.object(engine, "_build_model", keep)  # a spawned worker: no monkeypatch fixture
    patch.start()
    # 8 images, 2 per process and step, total batch 8: two accumulation steps (the first without all-reduce)
    cfg = tiny_run_config(data_root, epochs=1, train=dict(total_batch_size=8), data=dict(synthetic_train_images=8))
    metrics = engine.train(cfg, output_dir, print_fn=None)
    torch.save(
        dict(initial=built["initial"], final=built["model"].state_dict(), metrics=metrics),
        os.path.join(result_dir, f"rank{rank}.pt"),
    )
    dist_utils.cleanup()


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path):
    result_dir = tmp_path / "results"
    result_dir.mkdir()
    mp.spawn(
        _worker,
        args=(2, _free_port(), str(tmp_path / "data"), str(tmp_path / "run"), str(result_dir)),
        nprocs=2,
        join=True,
    )
    r0, r1 = (torch.load(result_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # ranks start from different random weights; DDP broadcasts rank 0's and keeps them in step
    assert any(not torch.equal(r0["initial"][k], r1["initial"][k]) for k in r0["initial"])
    for k in r0["final"]:
        assert torch.equal(r0["final"][k], r1["final"][k]), k
    assert any(not torch.equal(r0["final"][k], r0["initial"][k]) for k in r0["final"])
    # evaluation gathered both ranks' images, and every rank got the same metrics
    assert r0["metrics"] == r1["metrics"]
    assert r0["metrics"]["num_images"] == 2
    # the checkpoint (rank 0) holds the synchronised weights
    from harness.run import checkpointing

    state = checkpointing.read_checkpoint(str(tmp_path / "run" / "checkpoint.pth"))
    assert state["world_size"] == 2 and state["accumulation_steps"] == 2
    for k in r0["final"]:
        assert torch.equal(state["model"][k], r0["final"][k])


def test_single_process_without_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = dist_utils.init_distributed()
    assert info["world_size"] == 1 and not dist_utils.is_dist()
    assert dist_utils.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist_utils.reduce_mean({"loss": 2.0}) == {"loss": 2.0}


def test_missing_master_address_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        dist_utils.init_distributed()
