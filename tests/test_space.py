"""TransformSpace: fingerprint, names, batched apply/deaugment against per-sample loops."""

import os
import subprocess
import sys

import pytest
import torch

import ttach_instance as ti
from ttach_instance import functional as F
from ttach_instance.ops import CallableOp, Color, CropResize, HFlip, Rotate, Sharpness, Zoom
from ttach_instance.space import Candidate, TransformSpace
from ttach_instance.builtin_spaces import BUILTIN_SPACES, d4, five_crops, hflip, paper12, ten_crops

# sha256 of the canonical JSON of the candidates; changing these means every saved predictor
# stops matching its space, so it must be a deliberate decision.
EXPECTED_FINGERPRINTS = {
    "paper12": "535cb7a7c9b6b074",
    "five_crops": "14e1250ccefc80be",
    "ten_crops": "f4db1401e8d1a737",
    "hflip": "e447277fe1f6d81f",
    "d4": "229d6681b1e0c3e5",
}

SPACES = {
    "paper12": paper12,
    "identity": lambda: ti.get_space("identity"),
    "hflip": hflip,
    "flips": lambda: ti.get_space("flips"),
    "d4": d4,
    "five_crops": lambda: five_crops(0.75),
    "five_crops_px": lambda: five_crops(20),
    "ten_crops": lambda: ten_crops(24),
    "paper12_hflip": lambda: ti.get_space("paper12_hflip"),
    "center_crop_paper": lambda: ti.get_space("center_crop_paper"),
    "five_crops_paper": lambda: ti.get_space("five_crops_paper", fraction=0.75),
    "ten_crops_paper": lambda: ti.get_space("ten_crops_paper"),
    "randaugment": lambda: ti.get_space("randaugment"),  # the 224-px pool: every RandAugment family
    "sweep": lambda: ti.get_space("sweep"),
}


def test_sweep_families_span_both_sides_of_the_identity():
    """The staged search's pool: each family a few magnitudes, below and above the identity's."""
    from ttach_instance.staged_search import op_families

    space = ti.get_space("sweep")
    families = op_families(space.spec())
    assert families[0] is None and space[0].is_identity
    members = {}
    for cand, fam in zip(space, families):
        if fam is not None:
            members.setdefault(fam, []).append(next(iter(cand.ops[0].params.values()), None))
    assert sorted(members) == ["brightness", "color", "contrast", "hflip", "rotate", "sharpness", "translate_x",
                               "translate_y", "zoom"]
    neutral = {"translate_x": 0, "translate_y": 0, "rotate": 0, "zoom": 1, "brightness": 1, "contrast": 1,
               "color": 1, "sharpness": 1}
    for fam, centre in neutral.items():
        assert min(members[fam]) < centre < max(members[fam]), fam
    assert space.invertible


def test_builtin_spaces_covered():
    assert set(BUILTIN_SPACES) <= {k.replace("_px", "") for k in SPACES}


@pytest.mark.parametrize("name, expected", sorted(EXPECTED_FINGERPRINTS.items()))
def test_fingerprint_hard_coded(name, expected):
    assert ti.get_space(name).fingerprint == expected


def test_fingerprint_stable_across_processes():
    code = "import ttach_instance as ti; print(ti.get_space('paper12').fingerprint, ti.get_space('ten_crops', crop_size=100).fingerprint)"
    values = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        values.add(out.stdout.split()[0] + " " + out.stdout.split()[1])
    assert values == {f"535cb7a7c9b6b074 {ten_crops(100).fingerprint}"}


def test_fingerprint_changes_with_parameters_and_order():
    base = paper12()
    changed = TransformSpace([Candidate(Sharpness(0.25)) if c.name == "sharpness(0.2)" else c for c in base], name="paper12")
    assert changed.fingerprint != base.fingerprint
    assert five_crops(0.75).fingerprint != five_crops(0.875).fingerprint
    assert five_crops(20).fingerprint != five_crops(21).fingerprint
    reordered = TransformSpace(list(base)[::-1], name="paper12")
    assert reordered.fingerprint != base.fingerprint
    # The space's name is not part of the fingerprint; integer-valued floats are normalised.
    assert TransformSpace(list(base), name="other").fingerprint == base.fingerprint
    assert TransformSpace([Rotate(20.0)]).fingerprint == TransformSpace([Rotate(20)]).fingerprint
    assert TransformSpace([Rotate(20.5)]).fingerprint != TransformSpace([Rotate(20)]).fingerprint


def test_names_and_lookup():
    space = paper12()
    assert space.names == [
        "identity", "rotate(-20)", "rotate(20)", "zoom(0.8)", "zoom(1.2)", "autocontrast",
        "sharpness(0.2)", "sharpness(0.5)", "sharpness(3.0)", "sharpness(4.0)", "color(0.5)", "color(2.0)",
    ]
    assert space.index_of("zoom(1.2)") == 4 and space["zoom(1.2)"] is space[4]
    with pytest.raises(KeyError, match="zoom\\(9.0\\)"):
        space.index_of("zoom(9.0)")
    assert d4().names == ["identity", "rot90(1)", "rot90(2)", "rot90(3)", "hflip", "hflip+rot90(1)", "hflip+rot90(2)", "hflip+rot90(3)"]
    assert five_crops(0.5).names[0] == "crop_left_top(0.5x0.5)"
    assert ten_crops(8).names[-1] == "crop_center(8x8)+hflip"


def _reference_apply(space, images, index):
    rows = []
    for i in range(index.shape[0]):
        for j in range(index.shape[1]):
            rows.append(space[int(index[i, j])].apply(images[i : i + 1]))
    return torch.cat(rows)


@pytest.mark.parametrize("name", sorted(SPACES))
@pytest.mark.parametrize("k", [1, 3])
def test_apply_equals_per_sample_loop(name, k):
    space = SPACES[name]()
    g = torch.Generator().manual_seed(k)
    images = torch.rand(7, 3, 32, 32, generator=g)
    index = torch.randint(0, len(space), (7, k), generator=g)
    ref = _reference_apply(space, images, index)
    arg = index[:, 0] if k == 1 else index
    out = space.apply(images, arg)
    assert out.shape == (7 * k, 3, 32, 32)
    assert torch.allclose(out, ref, atol=1e-6)
    if space.row_plan() is not None:
        rows = space.apply(images, arg, grouped=False)
        assert torch.allclose(rows, ref, atol=1e-5)
    if k == 3:
        # Documented order: row i * k + j is sample i under candidate index[i, j].
        i, j = 4, 2
        assert torch.allclose(out[i * k + j], space[int(index[i, j])].apply(images[i : i + 1])[0], atol=1e-6)


def test_paper12_grouped_equals_rows_exactly():
    space = paper12()
    images = torch.rand(24, 3, 40, 40)
    index = torch.randint(0, 12, (24, 2))
    assert torch.equal(space.apply(images, index, grouped=True), space.apply(images, index, grouped=False))


def test_apply_all():
    space = paper12()
    images = torch.rand(2, 3, 16, 16)
    out = space.apply_all(images)
    assert out.shape == (24, 3, 16, 16)
    assert torch.allclose(out[12 + 5], space[5].apply(images[1:2])[0])


def test_apply_runs_each_candidate_once():
    calls = []

    def op(name):
        return CallableOp(name, lambda x, n=name: calls.append((n, x.shape[0])) or x * 0.5)

    space = TransformSpace([op("a"), op("b"), op("c")])
    index = torch.tensor([0, 2, 0, 0, 2, 2, 2, 0])
    space.apply(torch.rand(8, 3, 4, 4), index)
    assert sorted(calls) == [("a", 4), ("c", 4)]


def _reference_deaugment(space, outputs, index):
    backs, valids = [], []
    for r, c in enumerate(index.reshape(-1).tolist()):
        b, v = space[c].deaugment(outputs[r : r + 1])
        backs.append(b)
        valids.append(v)
    return torch.cat(backs), torch.cat(valids)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_deaugment_equals_per_sample_loop(name):
    space = SPACES[name]()
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, len(space), (5, 2), generator=g)
    outputs = torch.rand(10, 4, 32, 32, generator=g)
    ref_back, ref_valid = _reference_deaugment(space, outputs, index)
    back, valid = space.deaugment(outputs, index)
    assert torch.allclose(back, ref_back, atol=1e-6) and torch.equal(valid, ref_valid)
    thetas = space.thetas(32, 32)
    if thetas is not None:
        # functional.deaugment_dense with each row's composed map: the same resampling
        flat = index.reshape(-1)
        f_back, f_valid = F.deaugment_dense(outputs, thetas[flat])
        assert torch.allclose(back, f_back, atol=1e-5) and torch.equal(valid, f_valid)
    kp = torch.rand(10, 3, 2, generator=g)
    ref_kp = torch.cat([space[c].deaugment_keypoints(kp[r : r + 1], 32, 32) for r, c in enumerate(index.reshape(-1).tolist())])
    assert torch.allclose(space.deaugment_keypoints(kp, index, (32, 32)), ref_kp)


@pytest.mark.parametrize("name", sorted(SPACES))
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_deaugment_border_fill_differs_from_zero_only_where_invalid(name, mode):
    """``fill="border"`` and ``fill="zero"`` give the same validity and the same values wherever
    the view saw the pixel; where it did not, zero fill holds 0 and border fill the nearest
    covered value (functional.deaugment_dense's border fill, row by row). Every candidate once."""
    space = SPACES[name]()
    index = torch.arange(len(space))[None]
    outputs = torch.rand(len(space), 3, 32, 32, generator=torch.Generator().manual_seed(5)) + 0.5  # never 0
    zero, valid_z = space.deaugment(outputs, index, mode=mode, fill="zero")
    border, valid_b = space.deaugment(outputs, index, mode=mode, fill="border")
    assert torch.equal(valid_z, valid_b)
    inside = valid_z.bool().expand_as(zero)
    assert torch.equal(zero[inside], border[inside])
    assert torch.all(zero[~inside] == 0) and torch.all(border[~inside] >= 0.5)
    # a rotation, zoom-in or crop among the candidates leaves pixels unseen; flips and quarter
    # turns see everything
    lossy = any(op.name.startswith(("rotate", "zoom(1.2)", "crop", "resize_crop")) for c in space for op in c.ops)
    assert bool((~inside).any()) == lossy
    thetas = space.thetas(32, 32)
    if thetas is not None:
        ref, _ = F.deaugment_dense(outputs, thetas, mode=mode, fill="border")
        assert torch.allclose(border, ref, atol=1e-5)


def test_augment_then_deaugment_whole_space():
    # A smooth image through every paper12/ten_crops candidate and back matches inside validity.
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 48), indexing="ij")
    image = torch.stack([0.2 + 0.6 * xs, 0.2 + 0.6 * ys, 0.5 + 0.3 * xs * ys])[None]
    for space in (paper12(), ten_crops(0.75), d4()):
        views = space.apply_all(image)
        back, valid = space.deaugment(views, torch.arange(len(space))[None])
        geometric = torch.tensor([c.geometric for c in space])
        inside = valid.bool().expand_as(back)
        diff = (back - image).abs()
        # photometric views change pixel values; geometric ones must come back
        assert diff[geometric][inside[geometric]].max() < 0.02, space.name
        assert torch.all(valid[~geometric] == 1)


def test_product_and_subset():
    space = paper12().product(hflip())
    assert len(space) == 24 and space.names[:3] == ["identity", "hflip", "rotate(-20)"]
    assert space.names[3] == "rotate(-20)+hflip"
    sub = paper12().subset(["zoom(1.2)", 0])
    assert sub.names == ["zoom(1.2)", "identity"]


def test_get_space_parameters():
    assert ti.get_space("five_crops", crop_size=24).fingerprint == five_crops(24).fingerprint
    assert ti.get_space("ten_crops", crop_size=0.5).names[0] == "crop_left_top(0.5x0.5)"


def test_mixed_candidates_with_custom_ops():
    space = TransformSpace([Candidate([Zoom(1.1), Color(0.7)]), Candidate([HFlip(), CropResize("center", 0.6)]), Rotate(5)])
    images = torch.rand(6, 3, 20, 20)
    index = torch.tensor([[0, 1], [2, 2], [1, 0], [0, 0], [2, 1], [1, 1]])
    assert torch.allclose(space.apply(images, index), _reference_apply(space, images, index), atol=1e-6)
