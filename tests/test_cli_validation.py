"""The CLI checks its arguments and its data before doing any work: every bad value is refused by
argparse naming the flag, every user mistake (missing split, unreadable or mixed-size images, a
boxes.tsv path outside the dataset, unreadable weights) ends in one line ``ttach-instance <cmd>:
error: ...`` and exit status 2, without a traceback."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ttach_instance.cli import build_parser, main
from ttach_instance.data import UnreadableImageError, load_dataset, load_segmentation_dataset
from ttach_instance.training.labels import LabelCache

FACTORY = "ttach_instance.models:small_resnet"
LABELS = ["labels", "--model", FACTORY, "--data", "d", "--out", "o"]
FIT = ["fit", "--labels", "l", "--out", "o"]
EVAL = ["eval", "--model", FACTORY, "--data", "d", "--out", "o"]
PREDICT = ["predict", "--model", FACTORY, "--predictor", "p.safetensors", "x.png"]

BAD = [
    (LABELS, "--size", "0"), (LABELS, "--size", "-3"), (LABELS, "--size", "1.5"), (LABELS, "--draws", "0"),
    (LABELS, "--batch-size", "-1"), (LABELS, "--batch-size", "0"), (LABELS, "--shard-size", "0"),
    (LABELS, "--corruption-p", "1.5"), (LABELS, "--corruption-p", "-0.1"), (LABELS, "--corruption-p", "nan"),
    (LABELS, "--num-classes", "0"), (LABELS, "--num-classes", "-1"), (LABELS, "--seed", "-1"),
    (LABELS, "--seed", "4294967296"), (LABELS, "--device", "gpu"), (LABELS, "--device", "cuda:7"),
    (FIT, "--device", "cpu:x"),
    (LABELS, "--severities", "0,6"), (LABELS, "--severities", "a"), (LABELS, "--ignore-index", "-2"),
    (FIT, "--input-size", "0"), (FIT, "--epochs", "0"), (FIT, "--batch-size", "0"), (FIT, "--lr", "0"),
    (FIT, "--lr", "inf"), (FIT, "--ema", "1"), (FIT, "--val-fraction", "1.0"), (FIT, "--val-fraction", "-0.2"),
    (FIT, "--width", "0"), (FIT, "--clean-tolerance", "-1"), (FIT, "--clean-tolerance", "101"), (FIT, "--tau", "0"),
    (FIT, "--tau", "hot"), (FIT, "--group-weight", "-1"), (FIT, "--distill-weight", "nan"),
    (FIT, "--init-num-classes", "0"), (FIT, "--seed", "-5"), (FIT, "--weight-decay", "-0.1"),
    (EVAL, "--limit", "0"), (EVAL, "--size", "0"), (EVAL, "--cost-images", "-1"), (EVAL, "--batch-size", "0"),
    (EVAL, "--cost-repeats", "0"), (EVAL, "--num-classes", "0"), (EVAL, "--severities", "3,9"),
    (PREDICT, "--k", "0"), (PREDICT, "--size", "0"), (PREDICT, "--num-classes", "-4"),
    (["demo"], "--size", "0"), (["render"], "--size", "-1"),
]


@pytest.mark.parametrize("base, flag, value", BAD, ids=[f"{b[0]} {f} {v}" for b, f, v in BAD])
def test_bad_values_are_refused_naming_the_flag(base, flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        main([*base[:1], flag, value, *base[1:]])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: " in err and repr(value) in err, err


def test_good_values_at_the_bounds_parse():
    p = build_parser()
    a = p.parse_args([*LABELS, "--size", "1", "--corruption-p", "0", "--batch-size", "1", "--num-classes", "1",
                      "--seed", "0", "--severities", "1, 5"])
    assert (a.size, a.corruption_p, a.batch_size, a.num_classes, a.seed, a.severities) == (1, 0.0, 1, 1, 0, [1, 5])
    assert p.parse_args([*LABELS, "--corruption-p", "1"]).corruption_p == 1.0
    a = p.parse_args([*FIT, "--ema", "0", "--val-fraction", "0", "--tau", "auto", "--clean-tolerance", "0"])
    assert (a.ema, a.val_fraction, a.tau, a.clean_tolerance, a.input_size) == (0.0, 0.0, "auto", 0.0, None)
    assert p.parse_args([*FIT, "--tau", "0.5"]).tau == 0.5
    assert p.parse_args([*FIT, "--weight-decay", "0"]).weight_decay == 0.0
    a = p.parse_args([*EVAL, "--cost-images", "0", "--limit", "1"])
    assert (a.cost_images, a.limit, a.severities) == (0, 1, [1, 2, 3, 4, 5])


def _folder(root, sizes=((32, 32),) * 4, split="train"):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        d = os.path.join(root, split, ("ants", "bees")[i % 2])
        os.makedirs(d, exist_ok=True)
        paths.append(os.path.join(d, f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _user_error(argv, capsys):
    """Run the CLI expecting a user error: its one-line message (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1].split("\r")[-1].strip()  # after any progress bar
    assert "Traceback" not in err and last.startswith(f"ttach-instance {argv[0]}: error: "), err
    return last


def test_unreadable_images_are_named_or_skipped_and_counted(tmp_path, capsys):
    paths = _folder(str(tmp_path / "ds"), sizes=((32, 32),) * 6)
    with open(paths[1], "wb") as f:
        f.write(b"not an image at all")
    jpeg = paths[2].replace(".png", ".jpg")
    Image.open(paths[2]).save(jpeg, quality=90)
    os.remove(paths[2])
    with open(jpeg, "r+b") as f:
        f.truncate(os.path.getsize(jpeg) // 2)
    with pytest.raises(UnreadableImageError, match=r"2\.jpg' cannot be read \(OSError: image file is truncated"):
        load_dataset(str(tmp_path / "ds"), split="train")  # ants/2.jpg comes before bees/1.png
    ds = load_dataset(str(tmp_path / "ds"), split="train", skip_bad=True)
    assert sorted(ds.skipped) == sorted([paths[1], jpeg]) and len(ds) == 4
    assert ds.paths == [paths[0], paths[4], paths[3], paths[5]]  # ants 0, 4; bees 3, 5 (sorted per class)
    for kept, label in zip(ds.paths, ds.labels.tolist()):
        assert torch.equal(ds.images[ds.paths.index(kept)].permute(1, 2, 0), torch.from_numpy(np.array(Image.open(kept))))
        assert label == int(os.path.basename(kept)[0]) % 2
    args = ["labels", "--model", FACTORY, "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "c")]
    err = _user_error(args, capsys)
    assert f"image {jpeg!r} cannot be read" in err and "--skip-bad-images" in err
    assert not os.path.exists(tmp_path / "c")
    assert main([*args, "--skip-bad-images", "--corruption-p", "0", "--num-classes", "2"]) == 0
    assert f"skipped 2 unreadable image(s) of {str(tmp_path / 'ds')!r} (first: " in capsys.readouterr().err
    assert LabelCache(str(tmp_path / "c")).manifest()["num_images"] == 4


def test_mixed_sizes_are_resized_with_size_and_refused_without(tmp_path, capsys):
    paths = _folder(str(tmp_path / "ds"), sizes=((32, 32), (32, 32), (24, 40), (32, 32)))
    with pytest.raises(ValueError, match=r"differ in size \(32x32 .*0\.png', 40x24 .*2\.png'\).*--size"):
        load_dataset(str(tmp_path / "ds"), split="train")
    ds = load_dataset(str(tmp_path / "ds"), split="train", mixed_size=16)
    assert sorted(ds.paths) == sorted(paths) and ds.images.shape == (4, 3, 16, 16)
    for i, path in enumerate(ds.paths):  # every image resized alike (PIL bicubic), the odd one included
        ref = np.array(Image.open(path).convert("RGB").resize((16, 16), Image.BICUBIC, reducing_gap=None))
        assert torch.equal(ds.images[i].permute(1, 2, 0), torch.from_numpy(ref)), path
    args = ["labels", "--model", FACTORY, "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "c"),
            "--num-classes", "2", "--corruption-p", "0"]
    assert "differ in size" in _user_error(args, capsys)
    assert main([*args, "--size", "16"]) == 0
    assert LabelCache(str(tmp_path / "c")).load()["images"].shape == (4, 3, 16, 16)


def test_missing_split_is_an_error_naming_it(tmp_path, capsys):
    _folder(str(tmp_path / "ds"), split="train")
    _folder(str(tmp_path / "ds"), split="val")
    missing = os.path.join(str(tmp_path / "ds"), "test")
    with pytest.raises(ValueError, match=rf"split 'test' not found: {missing!r} is not a directory .*\['train', 'val'\]"):
        load_dataset(str(tmp_path / "ds"), split="test")
    err = _user_error(["eval", "--model", FACTORY, "--data", str(tmp_path / "ds"), "--split", "test", "--out",
                       str(tmp_path / "e")], capsys)
    assert "split 'test' not found" in err
    # a root of class folders (no split directories) is the data itself, whatever the split
    flat = str(tmp_path / "ds" / "train")
    assert len(load_dataset(flat, split="val")) == 4
    with pytest.raises(ValueError, match="cifar10 must be 'train', 'val' or 'test'"):
        load_dataset("cifar10:" + str(tmp_path), split="dev")
    assert "is not a directory" in _user_error(["labels", "--model", FACTORY, "--data", str(tmp_path / "nope"),
                                                "--out", str(tmp_path / "c")], capsys)


def _boxes(root, lines):
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(os.path.join(root, "img", "a.png"))
    with open(os.path.join(root, "boxes.tsv"), "w") as f:
        f.write("split\tpath\tx0\ty0\tx1\ty1\n" + "".join("\t".join(map(str, r)) + "\n" for r in lines))


@pytest.mark.parametrize("row, words", [
    (("val", "../outside.png", 0, 0, 1, 1), "line 3: path '../outside.png' must be relative to the dataset root and "
                                            "stay inside it"),
    (("val", "/etc/passwd", 0, 0, 1, 1), "path '/etc/passwd' must be relative"),
    (("val", "img/../../x.png", 0, 0, 1, 1), "stay inside it"),
    (("val", "img/missing.png", 0, 0, 1, 1), "image"),
    (("val", "img/a.png", 0, 0, 10, 3), "box (0, 0, 10, 3) must satisfy 0 <= x0 <= x1 < 10"),
    (("val", "img/a.png", 3, 0, 2, 3), "0 <= x0 <= x1"),
    (("val", "img/a.png", "one", 0, 2, 3), "x0 y0 x1 y1 must be integers"),
])
def test_boxes_outside_the_dataset_or_the_image_are_refused(tmp_path, row, words):
    root = str(tmp_path / "seg")
    _boxes(root, [("val", "img/a.png", 1, 1, 4, 5), row])
    with pytest.raises(ValueError) as info:
        load_segmentation_dataset(root, split="val", progress=False)
    assert words in str(info.value) and "boxes.tsv" in str(info.value)


def test_boxes_inside_the_dataset_load(tmp_path):
    root = str(tmp_path / "seg")
    _boxes(root, [("val", "img/a.png", 1, 2, 4, 5), ("train", "../elsewhere.png", 0, 0, 1, 1)])
    ds = load_segmentation_dataset(root, split="val", progress=False)  # other splits' rows are not read
    expect = torch.zeros(1, 8, 10, dtype=torch.uint8)
    expect[0, 2:6, 1:5] = 1
    assert torch.equal(ds.masks, expect)


def test_unreadable_weights_are_a_user_error(tmp_path, capsys):
    _folder(str(tmp_path / "ds"))
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"\x00garbage")
    base = ["labels", "--model", FACTORY, "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "c"),
            "--num-classes", "2"]
    assert f"weights {str(bad)!r} are not a readable torch state dict" in _user_error([*base, "--weights", str(bad)],
                                                                                         capsys)
    st = tmp_path / "w.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert "not a readable safetensors file" in _user_error([*base, "--weights", str(st)], capsys)


def test_predict_names_an_unreadable_image_and_a_missing_classes_file(tmp_path, capsys):
    from ttach_instance.predictors import create_predictor

    pred = str(tmp_path / "p.safetensors")
    create_predictor("small", "paper12", width=4, input_size=16).save(pred)
    good, bad = str(tmp_path / "good.png"), str(tmp_path / "bad.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good)
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n broken")
    base = ["predict", "--model", FACTORY, "--num-classes", "2", "--predictor", pred, "--size", "16"]
    assert f"image {bad!r} cannot be read" in _user_error([*base, good, bad], capsys)
    missing = str(tmp_path / "classes.txt")
    assert f"No such file or directory: {missing!r}" in _user_error([*base, "--classes", missing, good], capsys)
    assert main([*base, good]) == 0 and capsys.readouterr().out.startswith(f"{good}: class ")


def test_a_model_factory_that_fails_is_a_user_error(tmp_path, capsys):
    _folder(str(tmp_path / "ds"))
    err = _user_error(["labels", "--model", "json:loads", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "c")],
                      capsys)
    assert "model 'json:loads': loads(**{'num_classes': 2}) failed: TypeError" in err
