"""Property-based tests (hypothesis) of the pipeline's pure parts against independent references:
per-candidate application (spaces), a brute-force sort (selection) and numpy (merges)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ttach_instance as ti
from ttach_instance.merge import MERGE_MODES, merge_outputs
from ttach_instance.selection import select_oracle, select_topk

FAST = settings(max_examples=25, deadline=None, database=None)  # no example database written into the repository
SPACES = ["paper12", "d4", "flips", "hflip", "five_crops", "ten_crops", "paper12_hflip"]


@st.composite
def batches(draw, space_names=SPACES):
    """``(space, images (B, 3, H, W) in [0, 1], index (B, k))`` with random candidates per row."""
    space = ti.get_space(draw(st.sampled_from(space_names)))
    b, k = draw(st.integers(1, 4)), draw(st.integers(1, min(3, len(space))))
    h = draw(st.integers(12, 40))
    w = h if any(op.name.startswith("rot90") for c in space for op in c.ops) else draw(st.integers(12, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, h, w, generator=g)
    index = torch.randint(0, len(space), (b, k), generator=g)
    return space, images, index


@FAST
@given(batches())
def test_space_apply_equals_each_candidate_on_its_row(case):
    """Bit for bit, except arbitrary rotations: their resampling is one matrix product over the
    whole group, whose float32 sums depend on the group's size (measured <= 4.2e-7)."""
    space, images, index = case
    b, k = index.shape
    views = space.apply(images, index)
    assert views.shape == (b * k,) + tuple(images.shape[1:])
    for i in range(b):
        for j in range(k):  # sample-major: row i * k + j is sample i under index[i, j]
            candidate = space[int(index[i, j])]
            expected = candidate.apply(images[i:i + 1])
            atol = 1e-6 if any(op.name.startswith("rotate(") for op in candidate.ops) else 0
            torch.testing.assert_close(views[i * k + j:i * k + j + 1], expected, rtol=0, atol=atol)


@FAST
@given(batches(["d4", "flips", "hflip"]))
def test_deaugment_undoes_apply_for_flips_and_quarter_turns(case):
    """Candidate.deaugment inverts flips and quarter turns as pixel permutations: bit-exact.
    TransformSpace.deaugment resamples them through the cached inverse maps (one grid_sample):
    exact up to the float32 rounding of the sampling grid, which grows with the size (measured
    3.5e-6 at 27 px, 2.9e-5 at 224 px); a wrong permutation is off by the pixels themselves."""
    space, images, index = case
    expected = images.repeat_interleave(index.shape[1], 0)
    views = space.apply(images, index)
    back, valid = space.deaugment(views, index)
    torch.testing.assert_close(back, expected, rtol=0, atol=1e-5)
    assert bool((valid == 1).all())
    for row, c in enumerate(index.reshape(-1).tolist()):
        exact, ones = space[c].deaugment(views[row:row + 1])
        torch.testing.assert_close(exact, expected[row:row + 1], rtol=0, atol=0)
        assert bool((ones == 1).all())


def _smooth(b: int, h: int, w: int, freqs: np.ndarray) -> torch.Tensor:
    """Low-frequency images in [0.3, 0.7] (at most ~1.5 cycles across): resampling is nearly exact."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h, dtype=torch.float64), torch.linspace(0, 1, w, dtype=torch.float64),
                            indexing="ij")
    f = torch.as_tensor(freqs).view(b * 3, 4)
    planes = [0.5 + 0.1 * torch.sin(2 * math.pi * (a[0] * xx + a[1] * yy) + 6 * a[2]) + 0.1 * torch.cos(2 * math.pi * a[3] * (xx - yy))
              for a in f]
    return torch.stack(planes).view(b, 3, h, w).float()


@FAST
@given(st.integers(1, 3), st.integers(24, 48), st.integers(24, 48), st.sampled_from(["paper12", "five_crops", "ten_crops"]),
       st.integers(0, 2**31 - 1))
def test_deaugment_of_apply_is_the_identity_where_valid_for_resampling_ops(b, h, w, name, seed):
    """Rotations, zooms and crops resample, so on smooth images the round trip is close (not
    exact) wherever the view saw the pixel; an inverse in the wrong direction or frame is off by
    the images' amplitude (0.2)."""
    space = ti.get_space(name)
    geometric = [i for i, c in enumerate(space) if c.ops and all(op.geometric for op in c.ops)]
    rng = np.random.default_rng(seed)
    images = _smooth(b, h, w, rng.uniform(0, 1.5, (b, 3, 4)))
    index = torch.as_tensor(rng.choice(geometric, (b, 1)))
    back, valid = space.deaugment(space.apply(images, index), index)
    seen = valid == 1
    assert seen.float().mean() > 0.5 and bool(((valid == 0) | seen).all())  # binary validity, most pixels seen
    err = (back - images).abs()[seen.expand_as(back)]
    assert float(err.max()) < 0.05, (space.names[int(index[0, 0])], float(err.max()))


# ---------------------------------------------------------------------------------------- selection

SCORE_VALUES = [-1.0, 0.0, 0.0, 0.25, 0.5, 1.0, 2.0, float("nan")]  # few values: many ties


@FAST
@given(st.data(), st.integers(1, 5), st.integers(1, 9), st.sampled_from([torch.float32, torch.float64]))
def test_select_topk_equals_a_brute_force_sort(data, b, t, dtype):
    """Lowest first, ties to the lower candidate index, NaN after every number (the docstring)."""
    values = data.draw(st.lists(st.lists(st.sampled_from(SCORE_VALUES), min_size=t, max_size=t), min_size=b, max_size=b))
    k = data.draw(st.integers(1, t))
    scores = torch.tensor(values, dtype=dtype)
    expected = [sorted(range(t), key=lambda j: (math.isnan(row[j]), 0.0 if math.isnan(row[j]) else row[j], j))[:k]
                for row in values]
    assert select_topk(scores, k).tolist() == expected
    assert select_oracle(scores, k).tolist() == expected


# ---------------------------------------------------------------------------------------- merges


def _np_merge(x: np.ndarray, mode: str, w: np.ndarray = None, losses: np.ndarray = None, temperature: float = 1.0):
    """The merge modes as the merge module's docstring defines them, in float64 numpy. An element
    whose weights ``w`` are all 0 gets the merge without ``w`` ("weighted": its loss weights alone)."""
    k = x.shape[1]
    view_w = np.ones_like(x)
    if mode == "weighted":
        vw = np.exp(-losses / temperature)
        vw = (vw / vw.sum(1, keepdims=True)).reshape((x.shape[0], k) + (1,) * (x.ndim - 2))
        view_w, mode = np.broadcast_to(vw, x.shape), "mean"
    w = view_w if w is None else np.broadcast_to(w, x.shape) * view_w
    out = np.empty(x.shape[:1] + x.shape[2:])
    flat_x = np.moveaxis(x, 1, -1).reshape(-1, k)
    flat_w = np.moveaxis(np.where(w > 0, w, 0.0), 1, -1).reshape(-1, k)
    flat_view_w = np.moveaxis(view_w, 1, -1).reshape(-1, k)
    for e, (v, ww, vw) in enumerate(zip(flat_x, flat_w, flat_view_w)):
        if not (ww > 0).any():
            ww = vw  # all weights 0: the merge without them
        m = ww > 0
        if mode == "sum":
            r = (ww * v)[m].sum()
        elif mode == "max":
            r = v[m].max()
        elif mode == "min":
            r = v[m].min()
        elif mode == "gmean":
            r = np.exp((ww * np.log(np.abs(v)))[m].sum() / ww[m].sum())
            r = -r if (v[m] < 0).sum() % 2 else r
        else:  # mean, tsharpen
            f = np.sign(v) * np.sqrt(np.abs(v)) if mode == "tsharpen" else v
            r = (ww * f)[m].sum() / ww[m].sum()
        out.reshape(-1)[e] = r
    return out


@st.composite
def merge_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    b, k, c = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 4))
    spatial = draw(st.sampled_from([(), (3,), (2, 3)]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.uniform(-3, 3, (b, k, c) + spatial)
    x[np.abs(x) < 1e-3] = 0.5  # keep gmean's logarithms finite
    weights = None
    if draw(st.booleans()):  # validity-like weights (B, k, 1, ...), some zero, sometimes all zero for an element
        weights = rng.choice([0.0, 0.0, 0.5, 1.0], (b, k, 1) + spatial)
    losses = rng.uniform(0, 2, (b, k))
    return dtype, x, weights, losses, draw(st.sampled_from([0.5, 1.0, 2.0]))


@FAST
@given(merge_cases(), st.sampled_from(MERGE_MODES), st.sampled_from(["logits", "probs", "log_probs"]))
def test_merge_outputs_equals_numpy(case, mode, merge_space):
    dtype, x, weights, losses, temperature = case
    kw = dict(losses=torch.tensor(losses, dtype=dtype), temperature=temperature) if mode == "weighted" else {}
    got = merge_outputs(torch.tensor(x, dtype=dtype), mode, weights=None if weights is None else torch.tensor(weights, dtype=dtype),
                        merge_space=merge_space, **kw)
    values = x
    if merge_space != "logits":  # softmax / log-softmax over the class dim 2
        z = np.exp(x - x.max(2, keepdims=True))
        values = z / z.sum(2, keepdims=True)
        if merge_space == "log_probs":
            values = np.log(values)
    expected = _np_merge(values, mode, weights, losses if mode == "weighted" else None, temperature)
    if merge_space == "probs":
        expected = np.log(np.maximum(expected, np.finfo(np.float32 if dtype == torch.float32 else np.float64).tiny))
    assert got.dtype == dtype and tuple(got.shape) == expected.shape
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.numpy().astype(np.float64), expected, **tol)


@pytest.mark.parametrize("mode", ["mean", "sum", "max", "min", "gmean", "tsharpen"])
def test_merge_numpy_reference_is_not_vacuous(mode):
    """The reference above gives the textbook values on a case small enough to check by eye."""
    x = np.array([[[4.0], [1.0]]])  # one sample, two views, one value
    expected = {"mean": 2.5, "sum": 5.0, "max": 4.0, "min": 1.0, "gmean": 2.0, "tsharpen": 1.5}[mode]
    assert _np_merge(x, mode)[0, 0] == pytest.approx(expected)
