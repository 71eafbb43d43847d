"""Augmentation is a function of (train.seed, epoch, dataset index) alone; training sizes follow
data.train_size, evaluation data.eval_size, test-time augmentation eval.tta_sizes as given."""

import pytest
import torch
from builders import tiny_run_config

from harness.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from harness.data import synthetic
from harness.data import transforms as T
from harness.data.coco import build_dataset
from harness.grid.experiment import SMOKE_DEFAULTS
from harness.run import engine, evaluation, loaders


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(
        str(tmp_path_factory.mktemp("data") / "synthetic"), num_train=6, num_val=2, image_size=(96, 128), seed=5
    )


def _train_set(root, **data):
    cfg = DataConfig(**dict(dict(root=root, train_size=128, max_size=200, augmentation="official"), **data))
    return build_dataset(root, "train2017", train=True, data_cfg=cfg)


def _same(a, b):
    (ia, ta), (ib, tb) = a, b
    return ia.shape == ib.shape and torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])


# ------------------------------------------------------------------------------------------ per sample


def test_a_sample_draws_the_same_augmentation_in_any_order_and_worker(root):
    ds = _train_set(root)
    keys = [T.SampleKey(i, 3, 42) for i in range(len(ds))]
    forward = [ds[k] for k in keys]
    backward = [ds[k] for k in reversed(keys)][::-1]
    for a, b in zip(forward, backward):
        assert _same(a, b)
    # the same keys through two data-loader workers, in another order and batching
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=list(reversed(keys)), num_workers=2)
    for a, b in zip(forward[::-1], loader):
        assert _same(a, b)
    # what draws from the global generators in between changes nothing
    torch.rand(10)
    import random

    random.random()
    assert _same(ds[keys[2]], forward[2])
    # a plain index is (index, epoch 0, seed 0)
    assert _same(ds[1], ds[T.SampleKey(1, 0, 0)])


def test_another_epoch_or_seed_draws_another_augmentation(root):
    ds = _train_set(root)
    n = len(ds)
    epoch3 = [ds[T.SampleKey(i, 3, 42)] for i in range(n)]
    epoch4 = [ds[T.SampleKey(i, 4, 42)] for i in range(n)]
    seed7 = [ds[T.SampleKey(i, 3, 7)] for i in range(n)]
    assert not all(_same(a, b) for a, b in zip(epoch3, epoch4))
    assert not all(_same(a, b) for a, b in zip(epoch3, seed7))
    assert len({T.sample_seed(42, e, i) for e in range(5) for i in range(50)}) == 250


def test_train_sampler_shuffles_as_the_distributed_sampler_and_keys_its_items(root):
    ds = _train_set(root)
    sampler = loaders.TrainSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=42)
    plain = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=42)
    for epoch in (0, 5):
        sampler.set_epoch(epoch)
        plain.set_epoch(epoch)
        keys = list(sampler)
        assert [k.index for k in keys] == list(plain)
        assert {(k.epoch, k.seed) for k in keys} == {(epoch, 42)}
        assert all(type(k.index) is int for k in keys)
    assert len(sampler) == len(plain)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_weights_do_not_depend_on_the_number_of_workers(tmp_path):
    """Training with 0 and with 2 data-loader workers ends with bit-identical weights (augmentation on)."""
    data = tmp_path / "data"
    weights = []
    for workers in (0, 2):
        cfg = tiny_run_config(
            data,
            epochs=2,
            train=dict(max_iters_per_epoch=2, eval_every=100),
            data=dict(augmentation="official", num_workers=workers, synthetic_train_images=6),
            eval=dict(save_detections=False),
        )
        out = tmp_path / f"workers{workers}"
        engine.train(cfg, str(out), print_fn=None)
        weights.append(torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["model"])
    a, b = weights
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------- sizes


def _short_side(image):
    return min(image.shape[-2:])


def test_training_follows_train_size_and_evaluation_eval_size(root):
    # no augmentation: training at train_size, evaluation at eval_size (images are 96 x 128)
    cfg = DataConfig(root=root, train_size=80, eval_size=112, max_size=400, augmentation="none")
    train = build_dataset(root, "train2017", train=True, data_cfg=cfg)
    val = build_dataset(root, "val2017", train=False, data_cfg=cfg)
    assert {_short_side(train[T.SampleKey(i, e, 1)][0]) for i in range(len(train)) for e in range(3)} == {80}
    assert {_short_side(val[i][0]) for i in range(len(val))} == {112}
    # changing eval_size leaves training alone
    other = build_dataset(
        root,
        "train2017",
        train=True,
        data_cfg=DataConfig(root=root, train_size=80, eval_size=64, max_size=400, augmentation="none"),
    )
    assert _same(train[0], other[0])
    # official augmentation: the official short sides scaled by train_size / 800, whatever eval_size is
    cfg = DataConfig(root=root, train_size=160, eval_size=96, max_size=1000, augmentation="official")
    train = build_dataset(root, "train2017", train=True, data_cfg=cfg)
    sides = {_short_side(train[T.SampleKey(i, e, 0)][0]) for i in range(len(train)) for e in range(8)}
    assert sides <= set(T.scaled(T.OFFICIAL_SCALES, 160)) and len(sides) > 1
    assert T.scaled(T.OFFICIAL_SCALES, 160) == [96, 102, 109, 115, 122, 128, 134, 141, 147, 154, 160]


def test_official_defaults():
    assert DataConfig().train_size == 800 and DataConfig().eval_size == 800
    assert T.scaled(T.OFFICIAL_SCALES, DataConfig().train_size) == list(range(480, 801, 32))
    assert T.scaled(T.OFFICIAL_CROP_RESIZE, 800) == [400, 500, 600]
    assert EvalConfig().tta_sizes == (600, 700, 800, 900, 1000)


@pytest.mark.parametrize(
    "tta_sizes, eval_size",
    [
        ((600, 700, 800, 900, 1000), 800),
        (tuple(SMOKE_DEFAULTS["eval"]["tta_sizes"]), SMOKE_DEFAULTS["data"]["eval_size"]),
    ],
)
def test_tta_sizes_are_used_as_given(root, monkeypatch, tta_sizes, eval_size):
    seen = []

    def fake_tta(
        model, postprocessor, raw_images, orig_sizes, device, sizes, max_size, num_detections, amp_dtype, eval_size=800
    ):
        seen.append((list(sizes), max_size))
        return [
            dict(scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.int64), boxes=torch.zeros(0, 4))
            for _ in raw_images
        ]

    monkeypatch.setattr(evaluation, "predict_tta", fake_tta)
    cfg = RunConfig(
        data=DataConfig(root=root, num_workers=0, eval_size=eval_size, max_size=1333),
        train=TrainConfig(batch_size_per_gpu=2),
        eval=EvalConfig(tta=True, tta_sizes=tta_sizes),
    )
    dataset, loader = loaders.build_eval_loader(cfg, root)
    evaluation.run_evaluation(
        torch.nn.Identity(), None, loader, dataset, torch.device("cpu"), cfg.eval, cfg.data, verbose=False
    )
    assert seen and all(s == (list(tta_sizes), 1333) for s in seen)
