"""The RandAugment op families (translate, shear, brightness, contrast, equalize, posterize,
solarize) against PIL (tests/pil_reference.py) on real photos at 32, 64 and 224 px, their
inverse maps, their per-row forms, their errors, and the shipped ``randaugment`` pools.

Mean absolute difference in 8-bit units (x255). House bounds: <= 1 at 224 px, <= 2 at 32/64 px;
the per-op bounds below sit a little above what was measured (docs/BENCHMARKS.md, "Transform
ops"), so a regression shows up: the geometric ops and the two blends land at 0.2-0.51 (PIL
truncates its float result to 8 bits: ~0.5 on average), the lookup-table ops (equalize,
posterize, solarize) at 0 (PIL's tables reproduced on the 8-bit levels).
"""

import numpy as np
import pytest
import torch

import pil_reference as R
from test_ops_parity import PHOTOS, SIZES, as_batch, photo, to_tensor
from ttach_instance import functional as F
from ttach_instance import ops as O
from ttach_instance.registry import make_op, space_from_specs
from ttach_instance.space import Candidate, TransformSpace

# (family, params) checked against PIL; both signs of every geometric op, factors below and
# above 1, several bit depths and thresholds.
CASES = [
    ("translate_x", {"fraction": 0.1}),
    ("translate_x", {"fraction": -0.27}),
    ("translate_y", {"fraction": 0.33}),
    ("translate_y", {"fraction": -0.05}),
    ("shear_x", {"shear": 0.3}),
    ("shear_x", {"shear": -0.6}),
    ("shear_y", {"shear": 0.45}),
    ("shear_y", {"shear": -0.15}),
    ("brightness", {"factor": 0.4}),
    ("brightness", {"factor": 1.7}),
    ("contrast", {"factor": 0.3}),
    ("contrast", {"factor": 1.8}),
    ("equalize", {}),
    ("posterize", {"bits": 2}),
    ("posterize", {"bits": 5}),
    ("solarize", {"threshold": 0.5}),
    ("solarize", {"threshold": 0.85}),
]
BOUND = {"translate_x": 0.6, "translate_y": 0.6, "shear_x": 0.6, "shear_y": 0.6, "brightness": 0.5,
         "contrast": 0.55, "equalize": 1e-4, "posterize": 1e-4, "solarize": 1e-4}


@pytest.fixture(scope="module")
def batches():
    return {size: [photo(n, size) for n in PHOTOS] for size in SIZES}


def pil_diffs(out, imgs, family, params):
    out = out * 255
    diffs = []
    for row, img in zip(out, imgs):
        ref = np.asarray(R.RANDAUGMENT[family](img, *params.values())).astype(np.float64)
        diffs.append(np.abs(row.permute(1, 2, 0).double().numpy() - ref).mean())
    return diffs


@pytest.mark.parametrize("layout", ["photos", "nchw"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family,params", CASES, ids=[f"{f}{tuple(p.values())}" for f, p in CASES])
def test_op_matches_pil(family, params, size, layout, batches):
    imgs = batches[size]
    x = as_batch(imgs, layout)
    op = make_op(family, **params)
    out = op.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    diffs = pil_diffs(out, imgs, family, params)
    bound = BOUND[family]
    assert bound <= (1.0 if size == 224 else 2.0)  # the house bounds
    assert max(diffs) <= bound, f"{op.name} at {size}px: mean abs diff x255 {diffs} > {bound}"


def test_reference_distinguishes_ops(batches):
    # The comparisons above can fail: the wrong sign, or no op at all, is far off PIL.
    imgs = batches[64]
    x = to_tensor(imgs[0])
    for family, params, wrong in [("shear_x", {"shear": 0.3}, {"shear": -0.3}),
                                  ("shear_y", {"shear": 0.3}, {"shear": -0.3}),
                                  ("translate_x", {"fraction": 0.1}, {"fraction": -0.1}),
                                  ("translate_y", {"fraction": 0.1}, {"fraction": -0.1}),
                                  ("contrast", {"factor": 0.5}, {"factor": 1.0}),
                                  ("brightness", {"factor": 0.5}, {"factor": 1.0}),
                                  ("posterize", {"bits": 3}, {"bits": 8}),
                                  ("solarize", {"threshold": 0.5}, {"threshold": 1.0})]:
        out = make_op(family, **wrong).apply(x)
        assert pil_diffs(out, imgs[:1], family, params)[0] > 5 * 0.6, (family, params, wrong)
    assert pil_diffs(x, imgs[:1], "equalize", {})[0] > 5 * 0.6


def test_integer_translation_is_an_exact_mirrored_shift():
    # Hand-computed: an 8-pixel move of a 32-px image is numpy's symmetric pad and a slice.
    x = torch.rand(2, 3, 32, 32)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (8, 8), (8, 8)), mode="symmetric")
    right = torch.from_numpy(padded[:, :, 8:40, 0:32])  # content moved right by 8
    up = torch.from_numpy(padded[:, :, 16:48, 8:40])  # content moved up by 8
    assert torch.equal(O.TranslateX(0.25).apply(x), right)
    assert torch.equal(O.TranslateY(-0.25).apply(x), up)
    assert torch.equal(O.ShearX(0).apply(x), x) and torch.equal(O.TranslateY(0).apply(x), x)


def test_shear_moves_rows_about_the_centre():
    # Hand-computed: shear_x(s) makes row y read x + s * (y + 0.5 - H/2); with s = 1 and an odd
    # height (H = 9) every offset y - 4 is an integer, so every row is a mirrored shifted copy.
    x = torch.rand(1, 1, 9, 16)
    out = O.ShearX(1.0).apply(x)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (0, 0), (16, 16)), mode="symmetric")
    for y in range(9):
        shift = y - 4  # the view at (x, y) reads x + shift
        expect = torch.from_numpy(padded[0, 0, y, 16 + shift:32 + shift])
        assert torch.allclose(out[0, 0, y], expect, atol=1e-6), y
    # shear_y is shear_x of the transposed image.
    xt = x.transpose(-1, -2).contiguous()
    assert torch.equal(O.ShearY(1.0).apply(xt), out.transpose(-1, -2))


GEOMETRIC = [O.TranslateX(0.15), O.TranslateX(-0.3), O.TranslateY(0.2), O.ShearX(0.35), O.ShearX(-0.5),
             O.ShearY(0.25), O.ShearY(-0.4)]


@pytest.mark.parametrize("op", GEOMETRIC, ids=lambda o: o.name)
def test_theta_inverts_the_op(op):
    # A smooth dense map pushed through the op and brought back by the space's de-augmentation
    # equals the original wherever the view saw the input; the keypoint map agrees.
    h, w = 48, 64
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    dense = torch.stack([0.5 + 0.4 * torch.sin(3 * xs + 2 * ys), 0.5 + 0.4 * torch.cos(2 * xs - 3 * ys),
                         xs * 0.9 + 0.05])[None]
    space = TransformSpace([Candidate(), Candidate(op)])
    view = space.apply(dense, [[1]])
    back, valid = space.deaugment(view, [[1]])
    seen = valid[0, 0] > 0.5
    assert 0.3 < seen.float().mean() < 1.0  # part of the input left the view
    err = (back - dense).abs()[0].amax(0)[seen]
    assert float(err.max()) < 0.03 and float(err.mean()) < 0.003
    # The wrong map is far off: the inverse of the inverse.
    wrong = F.deaugment_dense(view, F.invert_theta(op.theta(h, w)[None]))[0]
    assert float((wrong - dense).abs()[0].amax(0)[seen].mean()) > 0.05
    # Keypoints: a bright dot in the input is found at the mapped position in the view.
    img = torch.zeros(1, 1, h, w)
    img[0, 0, 20, 30] = 1
    out = op.apply(img.expand(1, 3, h, w).contiguous())[0, 0]
    peak = divmod(int(out.argmax()), w)
    kp = torch.tensor([[[(peak[1] + 0.5) / w, (peak[0] + 0.5) / h]]])
    xy = op.deaugment_keypoints(kp, h, w)[0, 0]
    assert abs(float(xy[0]) * w - 30.5) < 1.0 and abs(float(xy[1]) * h - 20.5) < 1.0


def test_rows_form_equals_each_op():
    # One space mixing every family (alone and composed): the per-row path and the grouped path
    # give the same bits, on both layouts, and the tables' identity parameters leave rows alone.
    ops = [O.TranslateX(0.2), O.TranslateY(-0.13), O.ShearX(0.3), O.ShearY(-0.45), O.Brightness(1.4),
           O.Contrast(0.6), O.Equalize(), O.Posterize(3), O.Solarize(0.7)]
    cands = [Candidate()] + [Candidate(op) for op in ops] + [Candidate([ops[2], ops[7]]), Candidate([ops[6], ops[1]])]
    space = TransformSpace(cands)
    assert space.row_plan() is not None
    x = torch.rand(len(space), 3, 24, 40)
    idx = torch.arange(len(space))[:, None]
    for images in (x, x.contiguous(memory_format=torch.channels_last)):
        rows = space.apply(images, idx, grouped=False)
        grouped = space.apply(images, idx, grouped=True)
        assert torch.equal(rows, grouped)
        for i, cand in enumerate(space):
            assert torch.equal(rows[i], cand.apply(images[i:i + 1])[0]), cand.name
    for family in (O.TranslateX, O.ShearY, O.Brightness, O.Contrast, O.Equalize, O.Posterize, O.Solarize):
        params = torch.tensor([family.identity_row_params()] * 2, dtype=torch.float32)
        out = family.apply_rows(x[:2], params)
        # posterize(8) keeps every bit of the 8-bit levels: the identity on 8-bit images
        assert torch.equal(out, x[:2]) if family is not O.Posterize else torch.equal(out, (x[:2] * 255).round() / 255)
    # Thetas of the per-row form equal each op's.
    for family in (O.TranslateX, O.TranslateY, O.ShearX, O.ShearY):
        params = torch.tensor([[0.2], [-0.4]])
        rows = family.theta_rows(params, 24, 40)
        assert torch.allclose(rows, torch.stack([family(float(v)).theta(24, 40) for v in params[:, 0]]))


def test_specs_round_trip():
    ops = [O.TranslateX(0.2), O.TranslateY(-0.1), O.ShearX(0.3), O.ShearY(-0.45), O.Brightness(1.4),
           O.Contrast(0.6), O.Equalize(), O.Posterize(3), O.Solarize(0.7)]
    space = TransformSpace([Candidate()] + [Candidate(op) for op in ops] + [Candidate([ops[0], ops[7]])])
    rebuilt = space_from_specs(space.spec())
    assert rebuilt.fingerprint == space.fingerprint and rebuilt.names == space.names
    assert make_op("shear_x", shear=0.3) == O.ShearX(0.3)
    assert [op.name for op in ops[:4]] == ["translate_x(0.2)", "translate_y(-0.1)", "shear_x(0.3)", "shear_y(-0.45)"]


@pytest.mark.parametrize("family,params,words", [
    ("translate_x", {"fraction": 1.5}, ["fraction", "[-1.0, 1.0]", "1.5"]),
    ("translate_y", {"fraction": "0.1"}, ["fraction", "finite number"]),
    ("shear_x", {"shear": -2}, ["shear", "[-1.0, 1.0]"]),
    ("shear_y", {"shear": float("inf")}, ["shear", "finite number"]),
    ("brightness", {"factor": -0.1}, ["factor", ">= 0"]),
    ("contrast", {"factor": -1}, ["factor", ">= 0"]),
    ("posterize", {"bits": 0}, ["bits", "[1, 8]"]),
    ("posterize", {"bits": 4.0}, ["bits", "integer"]),
    ("solarize", {"threshold": 1.2}, ["threshold", "[0.0, 1.0]", "255"]),
    ("solarize", {"threshold": -0.1}, ["threshold", "[0.0, 1.0]"]),
])
def test_bad_parameters_name_the_range(family, params, words):
    with pytest.raises((ValueError, TypeError)) as info:
        make_op(family, **params)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_row_parameters_are_refused():
    x = torch.rand(2, 3, 8, 8)
    for fn, value, words in [(F.translate_x, 1.5, ["fraction", "[-1, 1]"]), (F.shear_y, -3.0, ["shear", "[-1, 1]"]),
                             (F.brightness, -1.0, ["factor", ">= 0"]), (F.contrast, -1.0, ["factor", ">= 0"]),
                             (F.posterize, 2.5, ["bits", "integer in [1, 8]"]), (F.posterize, 9.0, ["bits"]),
                             (F.solarize, -0.5, ["threshold", ">= 0"])]:
        with pytest.raises(ValueError) as info:
            fn(x, torch.tensor([0.5 if fn is not F.posterize else 4.0, value]))
        for word in words:
            assert word in str(info.value), (fn.__name__, word, str(info.value))
        with pytest.raises(ValueError):
            fn(x, value)


# --------------------------------------------------------------------------- the shipped pools

import importlib.util  # noqa: E402
import json  # noqa: E402
from importlib import resources  # noqa: E402
from pathlib import Path  # noqa: E402

import ttach_instance as ti  # noqa: E402
from ttach_instance.pools import POOL_FILES, pool_space  # noqa: E402

RANDAUGMENT_FAMILIES = {"rotate", "autocontrast", "sharpness", "color", "translate_x", "translate_y", "shear_x",
                        "shear_y", "brightness", "contrast", "equalize", "posterize", "solarize"}
# GPS's largest magnitudes: M / 30 * high, M = 45 (32 px) or 20 (64/224 px).
LIMITS = {32: {"shear": 0.75, "fraction": 0.675, "angle": 60}, 224: {"shear": 1 / 3, "fraction": 0.3, "angle": 27}}


def make_pools_module():
    path = Path(__file__).resolve().parent.parent / "tools" / "make_pools.py"
    spec = importlib.util.spec_from_file_location("make_pools", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("file", sorted(set(POOL_FILES.values())))
def test_pool_file_is_what_the_script_writes(file):
    tool = make_pools_module()
    shipped = resources.files("ttach_instance.pools").joinpath(file).read_text(encoding="utf-8")
    assert tool.render(tool.make_pool(file)) == shipped, f"{file} differs from tools/make_pools.py's output"
    assert tool.render(tool.make_pool(file)) == shipped  # deterministic: seeded per file


@pytest.mark.parametrize("size", [32, 64, 224])
def test_pool_candidates_apply_and_invert(size, batches):
    space = ti.get_space("randaugment", size=size)
    assert space.name == "randaugment" and space.params == {"size": size}
    assert len(space) == 101 and space[0].is_identity and len(set(space.names)) == len(space)
    limits = LIMITS[32 if size == 32 else 224]
    for cand in space.candidates[1:]:
        assert 1 <= len(cand.ops) <= 2, cand.name
        for op in cand.ops:
            assert op.family in RANDAUGMENT_FAMILIES, cand.name
            for key, bound in limits.items():
                assert abs(op.params.get(key, 0)) <= bound + 1e-9, cand.name
    assert space.row_plan() is not None  # every op has a per-row form: no host sync on accelerators
    # Every candidate applies to a batch of photos, stays in [0, 1] and changes the image (the
    # photos' range is narrowed so autocontrast has something to stretch).
    imgs = batches[size][: 2 if size < 224 else 1]
    x = 0.1 + 0.8 * as_batch(imgs, "nchw")
    views = space.apply_all(x).view(len(imgs), len(space), *x.shape[1:])
    assert torch.isfinite(views).all() and views.min() >= 0 and views.max() <= 1
    moved = (views - x[:, None]).abs().mean(dim=(0, 2, 3, 4))
    assert moved[0] == 0 and bool((moved[1:] > 1e-3).all()), [space.names[i] for i in (moved < 1e-3).nonzero()]
    # Geometric candidates are invertible: a smooth dense map comes back where the view saw it.
    assert space.invertible and space.thetas(size, size) is not None
    geometric = [i for i, c in enumerate(space) if c.geometric]
    assert len(geometric) >= 20
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    dense = torch.stack([0.5 + 0.4 * torch.sin(3 * xs + 2 * ys), xs])[None]
    index = torch.tensor(geometric)[None]
    pushed = torch.cat([F.warp(dense, space[i].theta(size, size)[None].float()) for i in geometric])
    back, valid = space.deaugment(pushed, index)
    for row, i in enumerate(geometric):
        seen = valid[row, 0] > 0.5
        assert seen.float().mean() > 0.2, space.names[i]
        err = (back[row] - dense[0]).abs().amax(0)[seen]
        assert float(err.mean()) < 0.01, (space.names[i], float(err.mean()))


def test_pool_sizes_and_defaults():
    assert ti.get_space("randaugment").names == ti.get_space("randaugment", size=64).names
    assert ti.get_space("randaugment").fingerprint != ti.get_space("randaugment", size=32).fingerprint
    for bad in (48, "32", True, 32.0):
        with pytest.raises(ValueError, match="size must be 32, 64 or 224"):
            ti.get_space("randaugment", size=bad)


def test_pool_with_flip_is_each_candidate_then_its_mirror():
    base, both = ti.get_space("randaugment", size=32), ti.get_space("randaugment", size=32, flip=True)
    assert len(both) == 2 * len(base) and both.fingerprint != base.fingerprint
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for i in (0, 7, 100):
        assert torch.equal(both[2 * i].apply(x), base[i].apply(x))
        assert torch.equal(both[2 * i + 1].apply(x), base[i].apply(x).flip(-1))
    with pytest.raises(ValueError, match="flip must be true or false"):
        ti.get_space("randaugment", size=32, flip="yes")


def test_pool_files_are_checked():
    good = json.loads(resources.files("ttach_instance.pools").joinpath("randaugment32.json").read_text())
    assert pool_space(good).names == ti.get_space("randaugment", size=32).names
    for change, words in [({"format": "ttach_instance.policy"}, "not a ttach_instance pool file"),
                          ({"format_version": 2}, "format version 2 is not supported"),
                          ({"candidates": []}, "no candidates"),
                          ({"candidates": [{"name": "x", "ops": [{"op": "callable", "name": "x"}]}]}, "not a built-in op"),
                          ({"candidates": [{"name": "rotate(5)", "ops": [{"op": "rotate", "angle": 6}]}]},
                           "named 'rotate(5)' but its ops make 'rotate(6)'")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            pool_space({**good, **change}, "randaugment32.json")
