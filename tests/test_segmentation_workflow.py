"""The classification workflow's label / fit / eval steps on a segmentation model (``--task segmentation``)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ttach_instance.cli import main
from ttach_instance.data import load_segmentation_dataset, resize_masks
from ttach_instance.evaluation import OracleKSegmentationWrapper, evaluate_segmentation_arrays
from ttach_instance.registry import get_space
from ttach_instance.segmentation import ConfusionMatrix, segmentation_loss, view_losses
from ttach_instance.training.labels import LabelCache, compute_view_losses
from ttach_instance.training.tasks import SegmentationTask
from ttach_instance.wrappers import (LossGuidedSegmentationWrapper, RandomKSegmentationWrapper,
                                     SegmentationTTAWrapper)
from test_segmentation import FixedPredictor

FACTORY = "test_segmentation_workflow:tiny_segmenter"


def tiny_segmenter(num_classes: int = 2) -> nn.Module:
    """A deterministic 3x3 conv segmenter (normalised input -> logits at the input resolution)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, num_classes, 3, padding=1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def _make_folder(root, n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        y0, x0 = rng.integers(0, size // 2, 2)
        mask[y0:y0 + size // 2, x0:x0 + size // 2] = 1
        mask[0, :2] = 255  # unlabelled pixels
        img = (rng.random((size, size, 3)) * 60 + 150 * mask[..., None].clip(0, 1)).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i}.jpg" if i % 2 else root / "images" / f"im{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"im{i}.png")


@pytest.fixture()
def segdata(tmp_path):
    _make_folder(tmp_path / "ds" / "train", 8, seed=0)
    _make_folder(tmp_path / "ds" / "val", 6, seed=1)
    return str(tmp_path / "ds")


def test_mask_folder_and_boxes_loading(segdata, tmp_path):
    ds = load_segmentation_dataset(segdata, split="val", progress=False)
    assert ds.images.shape == (6, 3, 32, 32) and ds.masks.shape == (6, 32, 32) and ds.num_classes == 2
    assert ds.masks[:, 0, :2].eq(255).all()
    arr = np.array(Image.open(os.path.join(segdata, "val", "masks", "im0.png")))
    assert torch.equal(ds.masks[0], torch.from_numpy(arr))
    small = load_segmentation_dataset(segdata, split="val", size=8, progress=False)
    assert small.images.shape == (6, 3, 8, 8) and set(small.masks.unique().tolist()) <= {0, 1, 255}
    # boxes.tsv: inclusive boxes, rows of the split only
    root = tmp_path / "boxes"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "a" / f"{i}.png")
    (root / "boxes.tsv").write_text("split\tpath\tx0\ty0\tx1\ty1\n"
                                    "train\ta/0.png\t1\t2\t3\t4\nval\ta/1.png\t0\t0\t7\t7\ntrain\ta/2.png\t5\t5\t5\t6\n")
    b = load_segmentation_dataset(str(root), split="train", progress=False)
    assert b.classes == ["background", "object"] and b.masks.shape == (2, 8, 8)
    expect = torch.zeros(8, 8, dtype=torch.uint8)
    expect[2:5, 1:4] = 1
    assert torch.equal(b.masks[0], expect) and int(b.masks[1].sum()) == 2
    with pytest.raises(ValueError, match="boxes.tsv, or images/ and masks/"):
        load_segmentation_dataset(str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        load_segmentation_dataset(segdata, split="val", num_classes=1, progress=False)


def test_resize_masks_keeps_labels():
    m = torch.tensor([[[0, 1], [255, 3]]], dtype=torch.uint8)
    up = resize_masks(m, 4)
    assert up.dtype == torch.uint8 and torch.equal(up[0, ::2, ::2], m[0])


@pytest.mark.parametrize("loss", ["ce", "dice"])
def test_task_losses_equal_the_wrappers_view_losses(segdata, loss):
    """The label generator's per-view losses are the k=1 loss-guided wrapper's losses."""
    ds = load_segmentation_dataset(segdata, split="train", progress=False)
    model, space = tiny_segmenter(), get_space("paper12")
    pixels = ds.images.float() / 255
    task = SegmentationTask(loss=loss)
    got = compute_view_losses(model, pixels, ds.masks, space, task, normalize=lambda x: x, batch_size=3)
    ref = view_losses(model, space, pixels, ds.masks, loss=loss)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # ... and choosing candidate j with the wrapper incurs exactly loss j
    j = 4
    scores = torch.ones(len(space))
    scores[j] = 0
    with torch.no_grad():
        out = LossGuidedSegmentationWrapper(model, FixedPredictor(space, scores), k=1)(pixels)
    torch.testing.assert_close(segmentation_loss(out, ds.masks, kind=loss), ref[:, j], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="coverage"):
        SegmentationTask(coverage="identity")


def test_evaluation_matches_the_deployable_wrappers(segdata):
    """Every segmentation method's numbers are those of its wrapper, called as a user would
    (batch by batch, so the random baseline draws as the harness's wrapper does)."""
    ds = load_segmentation_dataset(segdata, split="val", progress=False)
    model, space = tiny_segmenter(), get_space("paper12")
    scores = torch.linspace(1, 0, len(space))  # picks the last two candidates
    pred = FixedPredictor(space, scores)
    # a plain module: the harness normalises with ImageNet's statistics (the CLI's convention)
    res = evaluate_segmentation_arrays(model, ds.images, ds.masks, space, 2, pred, batch_size=4)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = {"mean": mean, "std": std}
    x = (ds.images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = ds.masks.long()
    batches = [slice(0, 4), slice(4, 6)]
    with torch.no_grad():
        for name, w, kw in (("ours_k1", LossGuidedSegmentationWrapper(model, pred, k=1, **norm), {}),
                            ("ours_k2", LossGuidedSegmentationWrapper(model, pred, k=2, **norm), {}),
                            ("hflip", SegmentationTTAWrapper(model, "hflip", **norm), {}),
                            ("full_mean", SegmentationTTAWrapper(model, space, **norm), {}),
                            ("random_k2", RandomKSegmentationWrapper(model, space, k=2, seed=0, **norm), {}),
                            ("oracle_k1", OracleKSegmentationWrapper(model, space, k=1, **norm), {"target": y})):
            cm = ConfusionMatrix(2)
            for b in batches:
                extra = {key: v[b] for key, v in kw.items()}
                cm.update(w(x[b], **extra).argmax(1), y[b])
            m = cm.metrics()
            assert res["miou"][name] == pytest.approx(100 * m["miou"], abs=1e-6), name
            assert res["pixel_acc"][name] == pytest.approx(100 * m["pixel_acc"], abs=1e-6), name
        ident = ConfusionMatrix(2).update(model(x).argmax(1), y).metrics()
    assert res["miou"]["identity"] == pytest.approx(100 * ident["miou"], abs=1e-6)
    assert res["choices"] == [0] * (len(space) - 1) + [6]


def test_cli_segmentation_labels_fit_eval(segdata, tmp_path, capsys):
    labels, fit, ev = (str(tmp_path / d) for d in ("labels", "fit", "eval"))
    common = ["--model", FACTORY, "--data", segdata, "--task", "segmentation"]
    assert main(["labels", *common, "--split", "train", "--out", labels, "--draws", "2", "--corruption-p", "0.5",
                 "--corruptions", "gaussian_noise,contrast", "--severities", "1,3", "--shard-size", "5"]) == 0
    m = LabelCache(labels).manifest()
    assert m["task"] == {"name": "segmentation", "loss": "ce", "ignore_index": 255, "coverage": "extrapolate",
                         "interpolation": "bilinear"}
    data = LabelCache(labels).load()
    assert data["losses"].shape == (16, 12) and data["labels"].shape == (16, 32, 32)
    assert torch.isfinite(data["losses"]).all() and (data["corruption"] >= 0).any()
    assert main(["fit", "--labels", labels, "--out", fit, "--epochs", "2", "--batch-size", "4",
                 "--input-size", "32"]) == 0
    assert os.path.isfile(os.path.join(fit, "predictor.safetensors"))
    from ttach_instance.io import load_tensors
    from ttach_instance.training.losses import tau_from_spread

    # segmentation labels: the listwise temperature comes from their spread, not the paper's 1
    assert f"tau {tau_from_spread(data['losses']):.4g}" in capsys.readouterr().out
    config = load_tensors(os.path.join(fit, "checkpoint.safetensors"))[1]["config"]
    assert config["tau"] == pytest.approx(tau_from_spread(data["losses"])) and config["tau"] < 0.5
    assert main(["eval", *common, "--split", "val", "--predictor", os.path.join(fit, "predictor.safetensors"),
                 "--out", ev, "--corruptions", "gaussian_noise", "--held-out", "speckle_noise", "--severities", "2",
                 "--cost-images", "2", "--cost-repeats", "1", "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "| Ours k=1 |" in out and "| D4 (ttach) |" in out and "mIoU" in out
    res = json.load(open(os.path.join(ev, "results.json")))
    assert res["methods"] == ["identity", "hflip", "d4_ttach", "full_mean", "random_k1", "random_k2", "ours_k1",
                              "ours_k2", "oracle_k1"]
    for group in ("clean", "common_mean", "held_out_mean"):
        for field in ("miou", "pixel_acc"):
            assert all(0 <= v <= 100 for v in res[group][field].values())
    assert res["cost"]["identity"]["model_calls_per_image"] == 1
    assert res["cost"]["d4_ttach"]["model_calls_per_image"] == 8
    assert res["cost"]["ours_k1"]["model_calls_per_image"] == 1
    assert res["cost"]["full_mean"]["model_calls_per_image"] == 12
    # Dice labels go to a cache of their own (the manifest records the task)
    with pytest.raises(SystemExit):
        main(["labels", *common, "--split", "train", "--out", labels, "--seg-loss", "dice", "--draws", "2",
              "--corruption-p", "0.5", "--corruptions", "gaussian_noise,contrast", "--severities", "1,3",
              "--shard-size", "5"])
    assert "other settings" in capsys.readouterr().err


def test_cli_segmentation_leaves_out_pixel_moving_corruptions():
    from ttach_instance.cli import _corruption_list

    assert "elastic_transform" in _corruption_list("common", "--corruptions")
    assert "elastic_transform" not in _corruption_list("common", "--corruptions", "segmentation")
    assert "elastic_transform" in _corruption_list("elastic_transform", "--corruptions", "segmentation")
