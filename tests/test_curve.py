"""The label budget made visible: every fit's held-out gain over the identity, and the learning curve."""

import hashlib
import json
import math
import os

import pytest
import torch
from test_trainer import cfg, synthetic, with_groups

from ttach_instance.cli import main
from ttach_instance.predictors import SmallLossPredictor, load_predictor
from ttach_instance.registry import get_space
from ttach_instance.training.curve import learning_curve, parse_fractions, verdict
from ttach_instance.training.trainer import fit_predictor, split_rows
from _tiny import two_class_folder

SPACE = get_space("paper12").subset([0, 1, 2, 3])
IMAGES = 160  # 480 rows: 3 rows per image, so the fold is by image and the errors are clustered


def labelled(n=480):
    """Synthetic rows with corruption groups and a ``correct`` that only the identity gets right on
    clean rows and only the lowest-loss candidate on corrupted ones (as test_trainer's gate test)."""
    data = with_groups(synthetic(n))
    clean = data["corruption"] < 0
    data["correct"] = torch.where(clean[:, None], torch.eye(4, dtype=torch.long)[0],
                                  torch.nn.functional.one_hot(data["losses"].argmin(1), 4)).to(torch.uint8)
    return data


def build():
    torch.manual_seed(0)
    return SmallLossPredictor(SPACE, width=4, input_size=8)


def brute_gain(pred, images, correct, clean):
    """k=1 minus identity accuracy in points, row by row: all, clean, corrupted."""
    sums = {"all": [], "clean": [], "corrupted": []}
    pred.eval()
    with torch.no_grad():
        for img, c, is_clean in zip(images, correct, clean):
            scores = pred(img[None].float() / 255)[0].tolist()
            choice = min(range(len(scores)), key=lambda j: scores[j])
            d = int(c[choice]) - int(c[0])  # candidate 0: paper12's identity
            sums["all"].append(d)
            sums["clean" if is_clean else "corrupted"].append(d)
    return {k: 100 * sum(v) / len(v) for k, v in sums.items() if v}


def test_curve_points_equal_fits_run_by_hand_on_the_same_rows_and_one_fold(tmp_path):
    data = labelled()
    c = cfg(epochs=2, clean_tolerance=0.0, identity_gate=True)
    out_json = str(tmp_path / "curve.json")
    curve = learning_curve(build, data, c, [0.25, 0.5], lambda f, n: str(tmp_path / f"rows_{n}"), num_images=IMAGES,
                           progress=False, log=lambda m: None, out_json=out_json, steps="epochs")
    # by hand: the image split, then one seeded permutation of the training rows cut at each fraction
    train, val = split_rows(data["rows"], IMAGES, 0.2, 0)
    train_pos, val_pos = train.nonzero().squeeze(1), val.nonzero().squeeze(1)
    perm = train_pos[torch.randperm(train_pos.numel(), generator=torch.Generator().manual_seed(0 + 104729))]
    fold_sha = hashlib.sha256(data["rows"][val_pos].numpy().tobytes()).hexdigest()
    assert curve["fold"]["rows_sha256"] == fold_sha and curve["fold"]["heldout_rows"] == val_pos.numel() == 96
    assert [p["fraction"] for p in curve["points"]] == [0.25, 0.5, 1.0]
    previous = set()
    for point, fraction in zip(curve["points"], (0.25, 0.5, 1.0)):
        subset = perm[:round(fraction * train_pos.numel())]
        assert previous <= set(subset.tolist()) and not set(subset.tolist()) & set(val_pos.tolist())  # nested, no fold row
        previous = set(subset.tolist())
        keep = torch.cat([subset, val_pos]).sort().values
        sub = {k: v[keep] for k, v in data.items()}
        pred = build()
        res = fit_predictor(pred, sub, None, c, num_images=IMAGES, progress=False, log=lambda m: None)
        assert torch.equal(keep[res["val_rows"]], val_pos)  # the same held-out rows at every fraction
        assert point["heldout_sha256"] == fold_sha
        assert point["train_rows"] == subset.numel() and point["label_rows"] == round(fraction * 480)
        expected = brute_gain(pred, data["images"][val_pos], data["correct"][val_pos], data["corruption"][val_pos] < 0)
        for split in ("all", "clean", "corrupted"):
            assert point["gain"][split]["gain_points"] == pytest.approx(expected[split], abs=1e-9), (fraction, split)
        assert point["gain"]["clean"]["rows"] + point["gain"]["corrupted"]["rows"] == 96
    # the whole-set point is a plain fit: what fit_predictor reports and records for it
    assert res["heldout_gain"]["all"]["gain_points"] == pytest.approx(expected["all"], abs=1e-9)
    assert res["history"][-1]["heldout_gain"]["corrupted"]["gain_points"] == pytest.approx(expected["corrupted"])
    # the smallest budget learns less than the whole set on this learnable problem
    assert curve["points"][0]["gain"]["corrupted"]["gain_points"] < curve["points"][-1]["gain"]["corrupted"]["gain_points"]
    with open(out_json) as f:
        written = json.load(f)
    assert written["kind"] == "ttach_instance.learning_curve" and written["format_version"] == 1
    assert written["points"] == json.loads(json.dumps(curve["points"])) and written["verdict"] == curve["verdict"]
    # a finished curve rerun resumes every point from its checkpoint: the same numbers, no training
    again = learning_curve(build, data, c, [0.25, 0.5], lambda f, n: str(tmp_path / f"rows_{n}"), num_images=IMAGES,
                           progress=False, log=lambda m: None, steps="epochs")
    assert [p["gain"] for p in again["points"]] == [p["gain"] for p in curve["points"]]


def test_same_steps_curve_scales_each_points_epochs_and_equals_a_hand_fit(tmp_path):
    from dataclasses import replace

    data = labelled()
    c = cfg(epochs=2, clean_tolerance=0.0)
    curve = learning_curve(build, data, c, [0.5], lambda f, n: None, num_images=IMAGES, progress=False,
                           log=lambda m: None)  # same steps: the default
    half, whole = curve["points"]
    assert curve["steps"] == "same" and (half["epochs"], whole["epochs"]) == (4, 2)
    # 192 and 384 training rows in batches of 32: 4 x 6 and 2 x 12 optimiser steps
    assert half["train_rows"] == 192 and (half["steps"], whole["steps"]) == (24, 24)
    train, val = split_rows(data["rows"], IMAGES, 0.2, 0)
    train_pos, val_pos = train.nonzero().squeeze(1), val.nonzero().squeeze(1)
    perm = train_pos[torch.randperm(train_pos.numel(), generator=torch.Generator().manual_seed(104729))]
    keep = torch.cat([perm[:192], val_pos]).sort().values
    pred = build()
    fit_predictor(pred, {k: v[keep] for k, v in data.items()}, None, replace(c, epochs=4), num_images=IMAGES,
                  progress=False, log=lambda m: None)
    expected = brute_gain(pred, data["images"][val_pos], data["correct"][val_pos], data["corruption"][val_pos] < 0)
    assert half["gain"]["all"]["gain_points"] == pytest.approx(expected["all"], abs=1e-9)
    with pytest.raises(ValueError, match="steps must be 'epochs'"):
        learning_curve(build, data, c, [0.5], lambda f, n: None, steps="equal")


def _points(*gains):
    return [{"label_rows": 1000 * 2 ** i, "gain": {"all": {"gain_points": g}}} for i, g in enumerate(gains)]


def test_verdict_hand_computed():
    ids = torch.arange(8).repeat_interleave(2)  # 8 images, 2 rows each
    before = torch.zeros(16)
    after = torch.tensor([1., 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1])  # mean 0.75
    # paired differences summed per image, centred: [.5]*3 + [-1.5] + [.5]*2 + [-1.5, .5]: sum of squares 6,
    # clustered SE = sqrt(8 / 7 * 6) / 16
    se = 100 * math.sqrt(8 / 7 * 6) / 16
    v = verdict(_points(0.0, 75.0), [before, after], ids)
    assert v["delta_points"] == 75.0 and v["se_points"] == pytest.approx(se)
    assert v["reading"] == "pays" and "more labels likely pay" in v["text"] and "last doubling" in v["text"]
    assert "1,000 → 2,000 label rows" in v["text"]
    # +25 points carried by two images: the same clustered SE (centred image sums [1.5]*2 + [-.5]*6), within 2 SE
    lumpy = torch.tensor([1., 1, 1, 1] + [0] * 12)
    flat = verdict(_points(0.0, 25.0), [before, lumpy], ids)
    assert flat["se_points"] == pytest.approx(se) and flat["reading"] == "flat" and "flat" in flat["text"]
    worse = verdict(_points(75.0, 0.0), [after, before], ids)
    assert worse["reading"] == "worse" and worse["delta_points"] == -75.0
    assert verdict(_points(1.0), [before], ids)["reading"] == "one point: no slope"


def test_fractions_and_curve_inputs_are_checked():
    assert parse_fractions("1/8, 0.25,1/2,1/2") == [0.125, 0.25, 0.5]
    for bad, match in (("0", r"\(0, 1\]"), ("3/2", r"\(0, 1\]"), ("half", "numbers or a/b"), ("1/0", "numbers or a/b")):
        with pytest.raises(ValueError, match=match):
            parse_fractions(bad)
    from ttach_instance.training.gain import heldout_gain

    with pytest.raises(ValueError, match=r"correct must be \(N, T\) like scores \(2, 4\)"):
        heldout_gain(torch.zeros(2, 4), torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="identity must be a candidate index"):
        heldout_gain(torch.zeros(2, 4), torch.zeros(2, 4), 4)
    data = labelled(96)
    with pytest.raises(ValueError, match="'correct'"):
        learning_curve(build, {k: v for k, v in data.items() if k != "correct"}, cfg(), [0.5], lambda f, n: None)
    with pytest.raises(ValueError, match="val_fraction must be > 0"):
        learning_curve(build, data, cfg(val_fraction=0.0), [0.5], lambda f, n: None)


@pytest.fixture()
def folder(tmp_path):
    return two_class_folder(tmp_path, {"train": 4})


def test_cli_fit_prints_its_gain_and_the_learning_curve(folder, tmp_path, capsys):
    from ttach_instance.data import build_model
    from ttach_instance.training.labels import LabelCache

    torch.manual_seed(0)
    w = str(tmp_path / "w.pt")
    factory = "ttach_instance.models:small_resnet"
    torch.save(build_model(factory, num_classes=2).state_dict(), w)
    labels = str(tmp_path / "labels")
    assert main(["labels", "--model", factory, "--weights", w, "--data", folder, "--out", labels, "--draws", "4",
                 "--corruptions", "contrast,gaussian_noise", "--corruption-p", "0.5"]) == 0
    fit = str(tmp_path / "fit")
    args = ["--predictor", "small", "--width", "4", "--epochs", "1", "--batch-size", "8", "--optimizer", "adamw",
            "--val-fraction", "0.25", "--clean-tolerance", "0.5", "--identity-gate"]
    capsys.readouterr()
    assert main(["fit", "--labels", labels, "--out", fit, *args]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("held-out k=1 gain")]
    # recomputed from the saved predictor on the fold the fit held out (8 images, seed 0)
    data = LabelCache(labels).load()
    _, val = split_rows(data["rows"], 8, 0.25, 0)
    pred = load_predictor(os.path.join(fit, "predictor.safetensors"))
    expected = brute_gain(pred, data["images"][val], data["correct"][val], data["corruption"][val] < 0)
    assert len(printed) == 2  # logged by the fit, printed at the end
    assert printed[-1].startswith(f"held-out k=1 gain over the identity: {expected['all']:+.2f} points")
    for split in ("clean", "corrupted"):
        if split in expected:
            assert f"{split} {expected[split]:+.2f} (" in printed[-1]
    curve_dir = str(tmp_path / "curve")
    assert main(["fit", "--labels", labels, "--out", curve_dir, *args, "--learning-curve", "1/2"]) == 0
    out = capsys.readouterr().out
    assert "learning curve (held-out k=1 gain" in out and "last doubling" in out
    with open(os.path.join(curve_dir, "learning_curve.json")) as f:
        curve = json.load(f)
    assert [p["label_rows"] for p in curve["points"]] == [16, 32]
    assert curve["steps"] == "same" and [p["epochs"] for p in curve["points"]] == [2, 1]  # --epochs 1 x 1/fraction
    assert os.path.isfile(os.path.join(curve_dir, "learning_curve_same_steps", "rows_16", "predictor.safetensors"))
    assert os.path.getsize(os.path.join(curve_dir, "learning_curve.png")) > 1000
    # the whole-set point is the plain fit above (same settings, same rows): the same gain
    assert curve["points"][-1]["gain"]["all"]["gain_points"] == pytest.approx(expected["all"], abs=1e-9)
    assert curve["points"][0]["heldout_sha256"] == curve["points"][1]["heldout_sha256"]
    with pytest.raises(SystemExit):
        main(["fit", "--labels", labels, "--out", str(tmp_path / "x"), *args, "--learning-curve", "0"])
    assert "--learning-curve" in capsys.readouterr().err
    assert main(["fit", "--labels", labels, "--out", curve_dir, *args, "--learning-curve", "1/2", "--curve-steps",
                 "epochs"]) == 0  # the whole-set point resumes; the half point runs the recipe's 1 epoch
    assert "--curve-steps same gives each about the whole set's steps" in capsys.readouterr().out
    with open(os.path.join(curve_dir, "learning_curve.json")) as f:
        assert [p["epochs"] for p in json.load(f)["points"]] == [1, 1]
    with pytest.raises(SystemExit):
        main(["fit", "--labels", labels, "--out", str(tmp_path / "x"), *args, "--curve-steps", "same"])
    assert "--curve-steps is a --learning-curve option" in capsys.readouterr().err
