"""Bad input raises ValueError/TypeError whose message names the argument and what was expected."""

import pytest
import torch

import ttach_instance as ti
from ttach_instance import functional as F
from ttach_instance.ops import Color, CropResize, Rot90, Rotate, Sharpness, Zoom
from ttach_instance.builtin_spaces import five_crops, paper12

X = torch.rand(2, 3, 16, 16)


def _meta_index():
    return torch.tensor([0, 1], device="meta")


CASES = [
    # (id, callable, exception type, substrings the message must contain)
    ("rank", lambda: paper12().apply(torch.rand(3, 16, 16), [0, 0, 0]), ValueError, ["images", "4 dimensions"]),
    ("channels", lambda: paper12().apply(torch.rand(2, 4, 16, 16), [0, 0]), ValueError, ["images", "channels"]),
    ("uint8", lambda: paper12().apply((X * 255).byte(), [0, 0]), TypeError, ["images", "floating-point", "uint8"]),
    ("above 1", lambda: paper12().apply(X * 2, [0, 0]), ValueError, ["images", "[0, 1]"]),
    ("below 0", lambda: paper12().apply(X - 0.5, [0, 0]), ValueError, ["images", "[0, 1]"]),
    ("nan", lambda: paper12().apply(torch.full((1, 3, 4, 4), float("nan")), [0]), ValueError, ["images", "[0, 1]"]),
    ("not a tensor", lambda: paper12().apply(X.numpy(), [0, 0]), TypeError, ["images", "torch.Tensor"]),
    ("kernel uint8", lambda: F.rotate((X * 255).byte(), 10), TypeError, ["images", "floating-point"]),
    ("kernel rank", lambda: F.autocontrast(torch.rand(3, 4, 4)), ValueError, ["images", "4 dimensions"]),
    ("kernel channels", lambda: F.color(torch.rand(2, 4, 4, 4), 0.5), ValueError, ["images", "channels"]),
    ("kernel sharpness rank", lambda: F.sharpness(torch.rand(4, 4), 2.0), ValueError, ["images"]),
    ("unknown space", lambda: ti.get_space("no_such_space"), ValueError, ["no_such_space", "paper12"]),
    ("unknown op", lambda: ti.make_op("no_such_op"), ValueError, ["no_such_op", "rotate"]),
    ("zoom 0", lambda: Zoom(0), ValueError, ["scale", "> 0"]),
    ("zoom negative", lambda: Zoom(-1.5), ValueError, ["scale", "> 0"]),
    ("kernel zoom 0", lambda: F.zoom(X, 0), ValueError, ["scale", "> 0"]),
    ("kernel zoom rows", lambda: F.zoom(X, torch.tensor([1.0, -1.0])), ValueError, ["scale", "> 0"]),
    ("param length", lambda: F.rotate(X, torch.tensor([1.0, 2.0, 3.0])), ValueError, ["angle", "length 2"]),
    ("rotate nan", lambda: Rotate(float("nan")), TypeError, ["angle", "finite number"]),
    ("sharpness str", lambda: Sharpness("a"), TypeError, ["factor", "number"]),
    ("color bool", lambda: Color(True), TypeError, ["factor", "number"]),
    ("rot90 float", lambda: Rot90(1.5), TypeError, ["k", "int"]),
    ("rot90 non-square", lambda: Rot90(1).apply(torch.rand(1, 3, 4, 6)), ValueError, ["square", "4x6"]),
    ("crop larger", lambda: CropResize("center", 32).apply(X), ValueError, ["crop size", "16x16", "32x32"]),
    ("crop larger space", lambda: five_crops(20).apply(X, [0, 1]), ValueError, ["crop size", "20x20"]),
    ("crop box outside", lambda: F.crop_resize(X, (0, 0, 20, 8)), ValueError, ["box", "x1 <= 16"]),
    ("crop box shape", lambda: F.crop_resize(X, torch.zeros(3, 4)), ValueError, ["box", "(2, 4)"]),
    ("crop mode", lambda: F.crop_resize(X, (0, 0, 8, 8), mode="bicubic"), ValueError, ["mode", "bilinear"]),
    ("crop fraction", lambda: five_crops(1.5), ValueError, ["size", "(0, 1]"]),
    ("crop zero", lambda: CropResize("center", 0), ValueError, ["size", "positive"]),
    ("crop position", lambda: CropResize("middle", 0.5), ValueError, ["position", "left_top"]),
    ("empty space", lambda: ti.TransformSpace([]), ValueError, ["candidate"]),
    ("duplicate names", lambda: ti.TransformSpace([Zoom(2.0), Zoom(2.0)]), ValueError, ["unique", "zoom(2.0)"]),
    ("bad candidate", lambda: ti.TransformSpace(["rotate"]), TypeError, ["Candidate", "Op"]),
    ("index too big", lambda: paper12().apply(X, [0, 12]), ValueError, ["index", "[0, 11]"]),
    ("index negative", lambda: paper12().apply(X, [0, -1]), ValueError, ["index", "[0, 11]"]),
    ("index shape", lambda: paper12().apply(X, [0, 1, 2]), ValueError, ["index", "(B,) or (B, k)"]),
    ("index float", lambda: paper12().apply(X, torch.tensor([0.0, 1.0])), TypeError, ["index", "integer"]),
    ("index k=0", lambda: paper12().apply(X, torch.zeros(2, 0, dtype=torch.long)), ValueError, ["index", "k >= 1"]),
    ("index device", lambda: paper12().apply(X, _meta_index()), ValueError, ["index", "meta", "cpu"]),
    ("deaug index", lambda: paper12().deaugment(torch.rand(2, 1, 8, 8), [0, 13]), ValueError, ["index", "[0, 11]"]),
    ("deaug rows", lambda: paper12().deaugment(torch.rand(3, 1, 8, 8), [0, 1]), ValueError, ["outputs", "3 rows"]),
    ("deaug rank", lambda: paper12().deaugment(torch.rand(2, 8, 8), [0, 1]), ValueError, ["outputs", "(N, K, h, w)"]),
    ("deaug mode", lambda: paper12().deaugment(torch.rand(2, 1, 8, 8), [0, 1], mode="area"), ValueError, ["mode", "nearest"]),
    ("deaug fill", lambda: paper12().deaugment(torch.rand(2, 1, 8, 8), [0, 1], fill="edge"), ValueError, ["fill", "'border'"]),
    ("deaug image_size", lambda: paper12().deaugment(torch.rand(2, 1, 8, 8), [0, 1], image_size=(32,)), ValueError, ["image_size", "(height, width)"]),
    ("deaug theta", lambda: F.deaugment_dense(torch.rand(2, 1, 4, 4), torch.rand(3, 2, 3)), ValueError, ["theta", "(2, 2, 3)"]),
    ("deaug theta int", lambda: F.deaugment_dense(torch.rand(2, 1, 4, 4), torch.ones(2, 2, 3, dtype=torch.long)), TypeError, ["theta", "floating"]),
    ("keypoints shape", lambda: F.deaugment_keypoints(torch.rand(2, 5), torch.rand(2, 2, 3)), ValueError, ["keypoints", "(N, P, 2)"]),
    ("keypoints space", lambda: paper12().deaugment_keypoints(torch.rand(2, 5, 3), [1, 2], (8, 8)), ValueError, ["keypoints", "(2, P, 2)"]),
    ("from_ttach", lambda: ti.TransformSpace.from_ttach([1, 2]), TypeError, ["ttach.Compose"]),
]


@pytest.mark.parametrize("fn, exc, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_names_argument(fn, exc, words):
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_valid_inputs_pass():
    # The same calls with good arguments do not raise (the cases above are not vacuous).
    out = paper12().apply(X, [0, 11])
    assert out.shape == X.shape
    assert F.zoom(X, torch.tensor([1.2, 0.8])).shape == X.shape
    assert five_crops(8).apply(X, [0, 4]).shape == X.shape
    back, valid = paper12().deaugment(torch.rand(2, 1, 8, 8), [1, 3])
    assert back.shape == (2, 1, 8, 8) and valid.shape == (2, 1, 8, 8)
    back, valid = paper12().deaugment(torch.rand(2, 1, 8, 8), [1, 3], fill="border", image_size=(32, 32))
    assert back.shape == (2, 1, 8, 8) and valid.shape == (2, 1, 8, 8)
