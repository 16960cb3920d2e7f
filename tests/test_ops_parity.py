"""Fidelity of the batched tensor ops to the paper's PIL pipeline (tests/pil_reference.py)
on real photos at 32, 64 and 224 px.

Mean absolute difference in 8-bit units (x255). Targets of issue #2: <= 1 at 224 px and
<= 2 at 32/64 px for every op. Measured (docs/BENCHMARKS.md, "Transform ops"): 0.23-0.50 for
every op except sharpness(4.0) (0.74), at every size. The floor is PIL's 8-bit output (rounding
costs ~0.25 on average, truncation ~0.5: autocontrast's LUT, rotate); sharpness(f) blends with
an 8-bit smoothed image, whose rounding is amplified by |1 - f| (x3 at f = 4).
"""

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import pil_reference as R
from ttach_instance.builtin_spaces import paper12

PHOTOS = ("astronaut", "chelsea", "coffee")
SIZES = (32, 64, 224)
# Per-op bounds (x255) a little above the measured worst case, so a regression shows up.
BOUND = {"sharpness": {32: 0.8, 64: 0.8, 224: 0.8}}
DEFAULT_BOUND = 0.6


def photo(name: str, size: int) -> Image.Image:
    img = Image.fromarray(getattr(skimage.data, name)())
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def as_batch(imgs, layout: str) -> torch.Tensor:
    """``photos``: HWC arrays stacked and permuted, as users load them (channels-last
    strides); ``nchw``: the same values contiguous."""
    x = torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2).float() / 255
    return x.contiguous() if layout == "nchw" else x


@pytest.fixture(scope="module")
def batches():
    return {size: [photo(n, size) for n in PHOTOS] for size in SIZES}


@pytest.mark.parametrize("layout", ["photos", "nchw"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cand", paper12().names)
def test_op_matches_pil(cand, size, layout, batches):
    space = paper12()
    imgs = batches[size]
    x = as_batch(imgs, layout)
    assert x.is_contiguous(memory_format=torch.channels_last) == (layout == "photos")
    out = space[cand].apply(x) * 255
    diffs = []
    for row, img in zip(out, imgs):
        ref = np.asarray(R.apply(cand, img)).astype(np.float64)
        diffs.append(np.abs(row.permute(1, 2, 0).double().numpy() - ref).mean())
    bound = BOUND.get(cand.split("(")[0], {}).get(size, DEFAULT_BOUND)
    assert max(diffs) <= bound, f"{cand} at {size}px: mean abs diff x255 {diffs} > {bound}"
    if cand == "identity":
        assert max(diffs) < 1e-4


def test_reference_distinguishes_ops(batches):
    # The comparison above can fail: ops differ from each other by far more than the bounds.
    imgs = batches[64]
    ref_a = np.asarray(R.apply("sharpness(0.2)", imgs[0])).astype(np.float64)
    ref_b = np.asarray(R.apply("sharpness(4.0)", imgs[0])).astype(np.float64)
    assert np.abs(ref_a - ref_b).mean() > 5 * DEFAULT_BOUND
    x = to_tensor(imgs[0])
    rotated = paper12()["rotate(20)"].apply(x)[0].permute(1, 2, 0).double().numpy() * 255
    wrong_way = np.asarray(R.apply("rotate(-20)", imgs[0])).astype(np.float64)
    assert np.abs(rotated - wrong_way).mean() > 5 * DEFAULT_BOUND
