"""Released checkpoints as evaluation-only rows (experiments/released.yaml, model.released).

* a URL's file name, Google Drive's direct address, the checksum a name carries;
* fetched from a real HTTP server into the cache, verified on every use: a published checksum, else the one
  recorded at the first download; a corrupt or different file is refused with its path and both hashes; a web
  page instead of a checkpoint, or no network, stops with the file to put where;
* ``--dry-run`` of released.yaml: "evaluate released checkpoint", its evaluation GPU-hours only;
* torchvision's released Faster R-CNN state dict loads into Table 1's Faster R-CNN and gives torchvision's own
  detections; the row's URL and AP are torchvision's;
* end to end: an evaluation-only row fetches its checkpoint at submission, evaluates it, and the report holds
  it to the publisher's AP within 0.1 (flagged beyond).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import yaml
from test_experiment import fake_coco

from harness import cli
from model import released

ROOT = Path(__file__).resolve().parents[1]
RELEASED = ROOT / "experiments" / "released.yaml"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(released.ENV_CACHE, str(folder))
    return folder


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on localhost serving ``tmp_path/www``; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------- addresses


def test_names_addresses_and_published_checksums():
    detr = "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth"
    assert released.file_name(detr) == "detr-r50-e632da11.pth"
    assert released.expected_sha256(detr) == "e632da11"  # torch.hub's name-<hash> convention
    assert released.expected_sha256(detr, "SHA256:" + "AB" * 32) == "ab" * 32  # a given checksum wins
    drive = "https://drive.google.com/file/d/1nDWZWHuRwtwGden77NLM9JoWe-YisJnA/view?usp=sharing"
    assert released.download_url(drive) == (
        "https://drive.usercontent.google.com/download?id=1nDWZWHuRwtwGden77NLM9JoWe-YisJnA&export=download&confirm=t"
    )
    assert released.download_url("https://drive.google.com/open?id=abc_1").startswith(
        "https://drive.usercontent.google.com/download?id=abc_1&"
    )
    assert released.file_name(drive) == "gdrive-1nDWZWHuRwtwGden77NLM9JoWe-YisJnA.pth"
    assert released.expected_sha256(drive) is None  # recorded at the first download
    assert released.is_url(drive) and released.is_url("file:///x.pth") and not released.is_url("/data/x.pth")
    with pytest.raises(released.ReleasedCheckpointError, match="expected 8 to 64 hex digits"):
        released.expected_sha256(detr, "e632")


# ------------------------------------------------------------------------------------------- fetching


def test_fetch_records_the_first_download_and_refuses_a_changed_file(cache, server):
    www, base = server
    data = b"checkpoint bytes" * 1000
    (www / "model.pth").write_bytes(data)
    url = f"{base}/model.pth"
    path = released.fetch(url, progress=False)
    assert path == cache / "model.pth" and path.read_bytes() == data
    assert (cache / released.SUMS).read_text() == f"{_sha256(data)}  model.pth\n"
    assert released.cached_path(url) == path  # a job's use: verified, no download
    assert released.local_file(url) == str(path) and released.local_file("/some/file.pth") == "/some/file.pth"
    # the file changes in the cache (a partial copy, another file under the same name): refused, both hashes named
    path.write_bytes(data[:-1] + b"X")
    with pytest.raises(released.ReleasedCheckpointError) as err:
        released.cached_path(url)
    text = str(err.value)
    assert str(path) in text and _sha256(data[:-1] + b"X") in text and _sha256(data) in text
    assert "recorded in" in text
    with pytest.raises(released.ReleasedCheckpointError):
        released.fetch(url, progress=False)  # a fetch does not paper over it


def test_published_checksums_are_checked(cache, server):
    www, base = server
    data = b"released weights"
    digest = _sha256(data)
    (www / f"net-{digest[:8]}.pth").write_bytes(data)
    assert released.fetch(f"{base}/net-{digest[:8]}.pth", progress=False).read_bytes() == data
    assert not (cache / released.SUMS).exists()  # published: nothing to record
    (www / "other.pth").write_bytes(data)
    released.fetch(f"{base}/other.pth", sha256=digest, progress=False)
    (www / "wrong.pth").write_bytes(data)
    with pytest.raises(released.ReleasedCheckpointError, match=f"expected {'0' * 64} \\(published\\)"):
        released.fetch(f"{base}/wrong.pth", sha256="0" * 64, progress=False)


def test_a_web_page_or_no_network_says_where_the_file_belongs(cache, server):
    www, base = server
    (www / "page.pth").write_text("<!DOCTYPE html><html>sign in</html>")
    with pytest.raises(released.ReleasedCheckpointError, match="served a web page"):
        released.fetch(f"{base}/page.pth", progress=False)
    assert not (cache / "page.pth").exists() and not list(cache.glob("*.partial"))
    with pytest.raises(released.ReleasedCheckpointError) as err:
        released.fetch(f"{base}/missing.pth", progress=False)  # 404
    assert f"put the file at {cache / 'missing.pth'}" in str(err.value)
    with pytest.raises(released.ReleasedCheckpointError, match="not in the cache: expected"):
        released.cached_path(f"{base}/never-fetched.pth")


# ------------------------------------------------------------------------------------------- the rows


def test_dry_run_evaluates_released_checkpoints_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COCO_ROOT", str(fake_coco(tmp_path / "coco")))
    assert cli.main([str(RELEASED), "--results", str(tmp_path / "results"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "released checkpoint" in line]
    assert len(rows) == len(yaml.safe_load(RELEASED.read_text())["rows"]) == 8
    assert all(line.rstrip().endswith(" 0.2") for line in rows)  # the evaluation's GPU-hours only
    assert "estimated GPU-hours (V100-equivalent): 1.6 in total" in out
    assert "one more seed" not in out  # a seed retrains nothing here
    assert (
        cli.main([str(RELEASED), "--results", str(tmp_path / "results"), "--dry-run", "eval.checkpoint_sha256=xyz"])
        == 2
    )
    assert "eval.checkpoint_sha256" in capsys.readouterr().err


def test_the_torchvision_row_is_torchvisions_release():
    weights = pytest.importorskip("torchvision").models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    (row,) = [r for r in yaml.safe_load(RELEASED.read_text())["rows"] if "torchvision" in r["label"]]
    assert row["overrides"]["eval"]["checkpoint"] == weights.url
    assert row["official"]["AP"] == weights.meta["_metrics"]["COCO-val2017"]["box_map"]


def test_torchvision_faster_rcnn_state_dict_loads_and_detects_as_torchvision(tmp_path):
    torch = pytest.importorskip("torch")
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    from model import build_model
    from model.checkpoint import load_checkpoint
    from model.config import ModelConfig

    torch.manual_seed(0)
    # as torchvision's fasterrcnn_resnet50_fpn builds its trained model (frozen BN, 3 trainable stages), with
    # sizes that keep its transform from resizing the test image
    trunk = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    theirs = FasterRCNN(_resnet_fpn_extractor(trunk, 3), num_classes=91, min_size=160, max_size=240).eval()
    for module in theirs.modules():  # trained statistics, not the identity
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = theirs.state_dict()  # the released file's layout: the bare detector
    path = tmp_path / "fasterrcnn_resnet50_fpn_coco-00000000.pth"
    torch.save(state, path)
    imagenet = tmp_path / "imagenet.pth"
    torch.save(torchvision.models.resnet50().state_dict(), imagenet)
    cfg = ModelConfig.for_arch("faster_rcnn", pretrained_backbone=True, backbone_weights=str(imagenet))
    ours, _, postprocess = build_model(cfg)
    load_checkpoint(str(path), ours)
    ours.eval()
    theirs.roi_heads.score_thresh = ours.detector.roi_heads.score_thresh
    image = torch.rand(3, 160, 224)  # short side = min_size: torchvision's transform does not resize
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        (expected,) = theirs([image])
        padded = torch.zeros(1, 3, 192, 256)
        padded[0, :, :160, :224] = (image - mean) / std
        mask = torch.ones(1, 192, 256, dtype=torch.bool)
        mask[0, :160, :224] = False
        (got,) = postprocess(ours(padded, mask), torch.tensor([[160, 224]]))
    assert len(got["scores"]) == len(expected["scores"]) == 100
    order = expected["scores"].argsort(descending=True)
    torch.testing.assert_close(got["scores"], expected["scores"][order], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["boxes"], expected["boxes"][order], atol=1e-3, rtol=1e-5)
    assert torch.equal(got["labels"], expected["labels"][order])


# ------------------------------------------------------------------------------------------- end to end


def _tiny_released_experiment(tmp_path: Path, url: str, published: dict) -> Path:
    tiny = yaml.safe_load((ROOT / "tests" / "fixtures" / "tiny_experiment.yaml").read_text())
    tiny["name"] = "tiny_released"
    tiny["base"]["launcher"].update(executor="local", tasks_per_node=1)
    tiny["base"]["eval"] = {"eval_only": True, "checkpoint": url}
    tiny["columns"] = ["method"]
    tiny["rows"] = [
        {"label": f"published {ap}", "cells": {"method": f"published {ap}"}, "official": {"AP": ap, "AP50": None}}
        for ap in published
    ]
    path = tmp_path / "tiny_released.yaml"
    path.write_text(yaml.safe_dump(tiny, sort_keys=False))
    return path


def test_an_evaluation_only_row_fetches_evaluates_and_is_held_to_its_publisher(tmp_path, cache, server, capsys):
    torch = pytest.importorskip("torch")
    from harness.grid import expand, load_experiment
    from harness.store import ResultsStore
    from model import build_model

    www, base = server
    url = f"{base}/tiny-release.pth"
    experiment = _tiny_released_experiment(tmp_path, url, [0.0])
    spec = expand(load_experiment(str(experiment)))[0]
    model, _, _ = build_model(spec.config.model)
    torch.save({"model": model.state_dict()}, www / "tiny-release.pth")
    argv = [str(experiment), "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "reports")]
    assert cli.main(argv + ["--wait"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {url}: {cache / 'tiny-release.pth'} (verified)" in out
    metrics = ResultsStore(tmp_path / "results").read_metrics(spec.eval_key)
    assert metrics["AP"] >= 0.0
    # the published AP set to ours +-0.1 and +-0.3: within the released band, then flagged
    ours = round(metrics["AP"], 1)
    rows = {"within": round(ours + 0.1, 1), "above": round(ours - 0.3, 1)}
    experiment = _tiny_released_experiment(tmp_path, url, list(rows.values()))
    assert cli.main([str(experiment), *argv[1:], "--report"]) == 0
    report = (tmp_path / "reports" / "tiny_released.md").read_text()
    lines = report.splitlines()
    for verdict, ap in rows.items():
        ours_line = lines[lines.index(next(line for line in lines if f"published {ap}" in line)) + 1]
        assert ("≈" in ours_line) == (verdict == "within") and ("↑" in ours_line) == (verdict == "above"), ours_line
    assert "held to ±0.1 AP" in report
