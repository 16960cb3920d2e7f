"""Kernels, geometry and de-augmentation of ttach_instance.functional / ops / Candidate.

References are independent of the code under test: hand-computed values, plain pixel-centre
geometry, and coordinate ramps pushed through the real forward ops (so a ``theta`` that
disagrees with what the op actually does to pixels is caught).
"""

import math

import pytest
import torch

from ttach_instance import functional as F
from ttach_instance.ops import (
    AutoContrast,
    CallableOp,
    Color,
    CropResize,
    HFlip,
    Rotate,
    Sharpness,
    VFlip,
    Zoom,
)
from ttach_instance.space import Candidate
from ttach_instance.builtin_spaces import d4, five_crops, paper12, ten_crops

SIZES = [(64, 64), (48, 80), (33, 57)]
GEOMETRIC = [
    [Zoom(0.8)],
    [Zoom(1.2)],
    [Zoom(0.9)],
    [Rotate(20)],
    [Rotate(-20)],
    [Rotate(-33)],
    [CropResize("left_top", 0.75)],
    [CropResize("right_bottom", (20, 30))],
    [CropResize("center", 0.5)],
    [Rotate(20), Zoom(1.2)],
    [Zoom(0.8), Rotate(-20)],
    [HFlip(), Rotate(20)],
    [Zoom(1.2), CropResize("right_top", 0.8)],
    [VFlip(), Zoom(1.2)],
]


def ids(ops_list):
    return [Candidate(ops).name for ops in ops_list]


def pixel_centres(h, w):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij")
    return xs, ys


def ramp(h, w):
    """Channel 0: x / W, channel 1: y / H at pixel centres (a coordinate map in [0, 1])."""
    xs, ys = pixel_centres(h, w)
    return torch.stack([xs / w, ys / h, torch.full_like(xs, 0.5)])[None]


def smooth(n, h, w):
    xs, ys = pixel_centres(h, w)
    chans = [0.5 + 0.4 * torch.sin(2 * math.pi * (0.7 * xs / w + 0.3 * ys / h) + p) for p in (0, 1, 2)]
    return torch.stack(chans)[None].expand(n, -1, -1, -1).float().contiguous()


# --------------------------------------------------------------------------- forward geometry


@pytest.mark.parametrize("h, w", SIZES)
@pytest.mark.parametrize("ops", GEOMETRIC, ids=ids(GEOMETRIC))
def test_theta_matches_forward_op(ops, h, w):
    """Push a coordinate ramp through the op: every view pixel must hold the input
    coordinate that ``theta`` says it reads (away from mirrored borders)."""
    cand = Candidate(ops)
    out = cand.apply(ramp(h, w))[0, :2].permute(1, 2, 0)
    xs, ys = pixel_centres(h, w)
    u = torch.stack([xs / w * 2 - 1, ys / h * 2 - 1], -1)
    theta = cand.theta(h, w)
    mapped = torch.einsum("ij,hwj->hwi", theta[:, :2], u) + theta[:, 2]
    inner = (mapped.abs() < 0.7).all(-1)
    # Crops clamp samples to the box like "crop, then resize" does: the outer 2-px ring of the
    # view (less than half a crop pixel from the box edge) reads the edge pixel instead.
    inner[:2] = inner[-2:] = False
    inner[:, :2] = inner[:, -2:] = False
    assert inner.sum() > 0.1 * h * w
    err_px = ((out - (mapped + 1) / 2).abs() * torch.tensor([w, h])).amax(-1)[inner]
    # PIL's affine bicubic (Keys a = -1, which rotate reproduces) follows a linear ramp only to
    # ~0.13 px (only a = -0.5 reproduces linear functions); resizes and crops to < 0.03 px.
    bound = 0.15 if any(isinstance(op, Rotate) for op in ops) else 0.03
    assert err_px.max() < bound


def test_rotation_direction_hand_computed():
    # PIL convention: positive angle = counter-clockwise on screen, so after rotate(90) the
    # right side of the view shows the bottom of the input (y grows downwards). View pixel
    # centre (24.5, 16.5) is (+8.5, +0.5) from the centre (16, 16) and reads the input at
    # (16 - 0.5, 16 + 8.5).
    out = F.rotate(ramp(32, 32), 90.0)[0]
    assert out[0, 16, 24] * 32 == pytest.approx(15.5, abs=1e-3)
    assert out[1, 16, 24] * 32 == pytest.approx(24.5, abs=1e-3)


def test_zoom_in_hand_computed():
    # zoom(2) on 8 px: canvas 24 -> 48 px, centre crop starts at (48 - 8) / 2 = 20, so view
    # pixel j reads canvas coordinate (j + 20.5) / 2, i.e. image coordinate (j + 20.5) / 2 - 8.
    out = F.zoom(ramp(8, 8).float(), 2.0)[0, 0, 4] * 8
    expected = (torch.arange(8) + 20.5) / 2 - 8
    assert torch.allclose(out, expected.float(), atol=1e-4)


def test_zoom_out_shows_mirrored_border():
    # zoom(0.5) on 8 px: the view shows 16 input px, half of them mirrored (numpy symmetric).
    x = ramp(8, 8).float()
    out = F.zoom(x, 0.5)[0, 0, 4] * 8
    # symmetric mirror of the coordinate: 4 px left of the image -> x = -t mirrored to +t.
    coords = (torch.arange(8) + 0.5) * 2 - 4  # image coordinates of view pixel centres
    mirrored = torch.where(coords < 0, -coords, torch.where(coords > 8, 16 - coords, coords))
    # Antialiased bicubic (support 4 px at this scale) blurs a little around each fold.
    assert torch.allclose(out[2:6], mirrored[2:6].float(), atol=0.1)
    assert torch.allclose(out[3:5], mirrored[3:5].float(), atol=0.02)
    assert out[0] > 1.0 and out[-1] < 7.0


def test_crop_resize_hand_computed():
    x = ramp(16, 16).float()
    out = F.crop_resize(x, (4, 2, 12, 10))[0]  # 8x8 crop upsampled x2
    # view pixel j reads crop coordinate (j + 0.5) / 2 -> image x = 4 + (j + 0.5) / 2
    j = torch.arange(16).float()
    inner = slice(1, 15)
    assert torch.allclose(out[0, 8, inner] * 16, (4 + (j + 0.5) / 2)[inner], atol=1e-4)
    assert torch.allclose(out[1, inner, 8] * 16, (2 + (j + 0.5) / 2)[inner], atol=1e-4)


def test_rotate_paths_agree():
    # CPU: one cached sparse matrix per distinct angle; accelerators: 16-tap gather with per-row
    # maps. Same PIL kernel, so the same pixels; angle 0 is the identity exactly.
    x = torch.rand(5, 3, 20, 28)
    angles = torch.tensor([-20.0, 0.0, 20.0, 33.0, -20.0])
    sparse = F.rotate(x, angles)
    gathered = F._rotate_gather(x, F.rotation_theta(angles, 20, 28)).clamp(0, 1)
    assert torch.allclose(sparse, gathered, atol=1e-6)
    assert torch.equal(sparse[1], x[1])
    assert torch.allclose(F.rotate(x[:1], -20.0), sparse[:1], atol=1e-6)


def test_rotate_pil_kernel_hand_computed():
    # A lone bright pixel rotated by 90 degrees about the centre of a 5x5 image moves exactly
    # (integer source positions: the a = -1 cubic is 1 at 0 and 0 at +-1, +-2).
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 1, 2] = 1.0  # above the centre
    out = F.rotate(x, 90.0)
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, 2, 1] = 1.0  # counter-clockwise: top goes to the left
    assert torch.allclose(out, expected, atol=1e-6)
    # Half-pixel source position: weights of Keys a = -1 at 0.5 / 1.5 are 0.625 / -0.125.
    w = F._pil_cubic(torch.tensor([0.5, 1.5], dtype=torch.float64), -1.0)
    assert torch.allclose(w, torch.tensor([0.625, -0.125], dtype=torch.float64))


def test_five_crop_boxes_ttach_order():
    assert F.five_crop_boxes(10, 12, 4, 6) == [(0, 0, 6, 4), (0, 6, 6, 10), (6, 6, 12, 10), (6, 0, 12, 4), (3, 3, 9, 7)]


# --------------------------------------------------------------------------- photometric


def test_autocontrast_hand_computed():
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = torch.tensor([[0.2, 0.4], [0.6, 0.3]])
    x[0, 1] = 0.7  # constant channel: unchanged
    x[0, 2] = torch.tensor([[0.0, 1.0], [0.5, 0.25]])  # already full range
    out = F.autocontrast(x)
    assert torch.allclose(out[0, 0], torch.tensor([[0.0, 0.5], [1.0, 0.25]]), atol=1e-6)
    assert torch.equal(out[0, 1], x[0, 1])
    assert torch.allclose(out[0, 2], x[0, 2])
    disabled = F.autocontrast(x, enabled=torch.tensor([False]))
    assert torch.equal(disabled, x)


def test_color_hand_computed():
    x = torch.tensor([0.9, 0.3, 0.1]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2)
    gray = 0.299 * 0.9 + 0.587 * 0.3 + 0.114 * 0.1
    assert torch.allclose(F.color(x, 0.0), torch.full_like(x, gray), atol=1e-6)
    half = 0.5 * x + 0.5 * gray
    assert torch.allclose(F.color(x, 0.5), half, atol=1e-6)
    assert torch.allclose(F.color(x, 2.0), (2 * x - gray).clamp(0, 1), atol=1e-6)
    one_channel = torch.rand(2, 1, 4, 4)
    assert torch.equal(F.color(one_channel, 0.3), one_channel)


def test_sharpness_hand_computed():
    # A single bright pixel on black, well inside: SMOOTH spreads 1/13 to each neighbour and
    # keeps 5/13; sharpness f blends f * x + (1 - f) * smooth(x).
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 3, 3] = 0.5
    out = F.sharpness(x, 0.25)
    assert out[0, 0, 3, 3].item() == pytest.approx(0.25 * 0.5 + 0.75 * 0.5 * 5 / 13, abs=1e-6)
    assert out[0, 0, 2, 2].item() == pytest.approx(0.75 * 0.5 / 13, abs=1e-6)
    assert out[0, 0, 0, 0].item() == 0
    # The border ring is filtered over mirrored pixels (paper's expanded canvas).
    edge = torch.zeros(1, 1, 5, 5)
    edge[0, 0, 0, 2] = 0.65
    v = F.sharpness(edge, 0.0)[0, 0, 0, 2].item()
    assert v == pytest.approx(0.65 * (5 + 1) / 13, abs=1e-6)  # the mirrored copy above adds 1/13


@pytest.mark.parametrize("op", [Rotate(20), Zoom(0.8), Zoom(1.2), Sharpness(4.0), Color(2.0), AutoContrast()], ids=str)
def test_constant_image_is_fixed(op):
    x = torch.full((2, 3, 20, 24), 0.37)
    assert torch.allclose(op.apply(x), x, atol=1e-5)


@pytest.mark.parametrize(
    "kernel, values",
    [(F.rotate, [-20.0, 0.0, 33.0]), (F.zoom, [0.8, 1.0, 1.7]), (F.sharpness, [0.2, 1.0, 4.0]), (F.color, [0.5, 1.0, 2.0])],
    ids=["rotate", "zoom", "sharpness", "color"],
)
def test_row_parameters_equal_per_row_calls(kernel, values):
    x = torch.rand(3, 3, 18, 22)
    batched = kernel(x, torch.tensor(values))
    for i, v in enumerate(values):
        assert torch.allclose(batched[i : i + 1], kernel(x[i : i + 1], v), atol=1e-6)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_every_builtin_candidate_keeps_dtype(dtype):
    x = torch.rand(2, 3, 20, 20)
    masks = torch.rand(2, 2, 20, 20)
    tol = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float64: 1e-5}[dtype]
    for space in (paper12(), d4(), ten_crops(16)):
        for cand in space:
            out = cand.apply(x.to(dtype))
            assert out.dtype == dtype and out.device == x.device
            assert (out.float() - cand.apply(x)).abs().max() <= tol, cand.name
            back, valid = cand.deaugment(masks.to(dtype))
            assert back.dtype == dtype and valid.dtype == dtype, cand.name
            ref_back, ref_valid = cand.deaugment(masks)
            assert (back.float() - ref_back).abs().max() <= tol, cand.name


@pytest.mark.parametrize("space", [paper12(), d4(), five_crops(12)], ids=lambda s: s.name)
def test_integer_masks_stay_labels(space):
    labels = torch.randint(0, 5, (len(space), 1, 20, 20))
    index = torch.arange(len(space))
    for fill in ("zero", "border"):
        back, valid = space.deaugment(labels, index, mode="bilinear", fill=fill)
        assert back.dtype == labels.dtype and valid.dtype == torch.float32
        assert set(back.unique().tolist()) <= set(range(5))
        if fill == "zero":
            assert torch.all(back[valid.expand_as(back) == 0] == 0)


# --------------------------------------------------------------------------- de-augmentation


@pytest.mark.parametrize("h, w", SIZES[:2])
@pytest.mark.parametrize("ops", GEOMETRIC, ids=ids(GEOMETRIC))
def test_smooth_image_round_trip(ops, h, w):
    cand = Candidate(ops)
    x = smooth(2, h, w)
    back, valid = cand.deaugment(cand.apply(x))
    inside = valid.bool().expand_as(back)
    assert inside.float().mean() > 0.1
    assert (back - x).abs()[inside].max() < 0.03  # bilinear resampling of a smooth image
    assert torch.all(back[~inside] == 0)


def test_validity_zoom_in_border_exact():
    # zoom(1.2) at 60 px: canvas 180 -> 216, crop from 78; the view covers image coordinates
    # [78 * 180/216 - 60, 138 * 180/216 - 60] = [5, 55]: pixels 5..54 (centres 5.5..54.5).
    _, valid = Zoom(1.2).deaugment_dense(torch.rand(1, 1, 60, 60))
    expected = torch.zeros(60, 60)
    expected[5:55, 5:55] = 1
    assert torch.equal(valid[0, 0], expected)


def test_validity_zoom_out_everywhere():
    _, valid = Zoom(0.8).deaugment_dense(torch.rand(2, 3, 40, 52))
    assert torch.all(valid == 1)


@pytest.mark.parametrize("angle", [20, -20, 45])
def test_validity_rotation_corners(angle):
    h, w = 40, 56
    _, valid = Rotate(angle).deaugment_dense(torch.rand(1, 1, h, w))
    # An input pixel is seen iff its centre, rotated forward about the image centre, lands in
    # the frame. Forward PIL rotation by +a is counter-clockwise on screen (y down).
    xs, ys = pixel_centres(h, w)
    cx, cy = xs - w / 2, ys - h / 2
    a = math.radians(angle)
    vx = math.cos(a) * cx + math.sin(a) * cy
    vy = -math.sin(a) * cx + math.cos(a) * cy
    expected = (vx.abs() <= w / 2) & (vy.abs() <= h / 2)
    margin = ((vx.abs() - w / 2).abs() < 1e-3) | ((vy.abs() - h / 2).abs() < 1e-3)
    got = valid[0, 0].bool()
    assert torch.equal(got[~margin], expected[~margin])
    assert not got[0, 0] and not got[-1, -1] and got[h // 2, w // 2]


@pytest.mark.parametrize("position, box", [("left_top", (0, 0, 48, 36)), ("right_bottom", (16, 12, 64, 48)), ("center", (8, 6, 56, 42))])
def test_validity_outside_crop(position, box):
    _, valid = CropResize(position, 0.75).deaugment_dense(torch.rand(1, 2, 48, 64))
    x0, y0, x1, y1 = box
    expected = torch.zeros(48, 64)
    expected[y0:y1, x0:x1] = 1
    assert torch.equal(valid[0, 0], expected)


@pytest.mark.parametrize("cand", list(d4()) + [Candidate(VFlip()), Candidate([HFlip(), VFlip()])], ids=lambda c: c.name)
def test_flips_and_quarter_turns_exact(cand):
    x = torch.rand(2, 3, 12, 12)
    labels = torch.randint(0, 9, (2, 1, 12, 12))
    back, valid = cand.deaugment(cand.apply(x))
    assert torch.equal(back, x) and torch.all(valid == 1)
    back_labels, _ = cand.deaugment(cand.apply(labels.float()).long())
    assert torch.equal(back_labels, labels)
    # Keypoints: a view pixel centre goes back to the input pixel it came from.
    img = torch.arange(144.0).reshape(1, 1, 12, 12)
    view = cand.apply(img)
    kp = torch.tensor([[[(3 + 0.5) / 12, (7 + 0.5) / 12], [(11 + 0.5) / 12, (0 + 0.5) / 12]]])
    back_kp = cand.deaugment_keypoints(kp, 12, 12)
    for (vx, vy), (ix, iy) in zip(kp[0], back_kp[0]):
        value = view[0, 0, int(vy * 12), int(vx * 12)]
        assert value == img[0, 0, int(iy * 12), int(ix * 12)]


def test_hflip_keypoints_hand_computed():
    kp = torch.tensor([[[0.1, 0.2], [0.75, 0.5]]])
    assert torch.allclose(HFlip().deaugment_keypoints(kp, 10, 10), torch.tensor([[[0.9, 0.2], [0.25, 0.5]]]))
    assert torch.allclose(VFlip().deaugment_keypoints(kp, 10, 10), torch.tensor([[[0.1, 0.8], [0.75, 0.5]]]))


@pytest.mark.parametrize("ops", GEOMETRIC, ids=ids(GEOMETRIC))
def test_keypoints_follow_pixels(ops):
    """A keypoint at a view pixel maps back to the input coordinate that pixel shows."""
    h, w = 48, 80
    cand = Candidate(ops)
    view = cand.apply(ramp(h, w))[0, :2]
    g = torch.Generator().manual_seed(0)
    py = torch.randint(h // 3, 2 * h // 3, (20,), generator=g)
    px = torch.randint(w // 3, 2 * w // 3, (20,), generator=g)
    kp = torch.stack([(px + 0.5) / w, (py + 0.5) / h], -1)[None]
    back = cand.deaugment_keypoints(kp, h, w)[0]
    shown = view[:, py, px].T  # the ramp value = input coordinate seen at that view pixel
    inside = ((shown > 0.05) & (shown < 0.95)).all(-1)  # not on a mirrored fold
    err_px = ((back - shown).abs() * torch.tensor([w, h]))[inside]
    assert inside.sum() >= 10 and err_px.max() < 0.15  # a = -1 bicubic, see test_theta_matches_forward_op


def test_keypoints_round_trip_through_theta():
    h, w = 30, 50
    kp = torch.rand(3, 7, 2, dtype=torch.float64) * 0.6 + 0.2
    for ops in GEOMETRIC:
        theta = Candidate(ops).theta(h, w)
        forward = F.deaugment_keypoints(kp, F.invert_theta(theta[None]))  # input -> view
        assert torch.allclose(F.deaugment_keypoints(forward, theta), kp, atol=1e-9)


def test_chain_path_matches_single_resampling():
    # A geometric CallableOp has no affine map, so the candidate de-augments op by op.
    flip = CallableOp("myflip", lambda x: x.flip(-1), geometric=True, deaugment_dense=lambda m: m.flip(-1))
    chained = Candidate([flip, Zoom(1.2)])
    direct = Candidate([HFlip(), Zoom(1.2)])
    assert chained.theta(40, 40) is None
    x = smooth(2, 40, 40)
    assert torch.allclose(chained.apply(x), direct.apply(x))
    y = direct.apply(x)
    back_c, valid_c = chained.deaugment(y)
    back_d, valid_d = direct.deaugment(y)
    assert torch.equal(valid_c, valid_d)
    assert torch.allclose(back_c, back_d, atol=1e-5)
    labels = torch.randint(0, 4, (2, 1, 40, 40))
    lab_c, _ = chained.deaugment(labels)
    assert lab_c.dtype == labels.dtype and set(lab_c.unique().tolist()) <= set(range(4))


def test_photometric_pass_through():
    y = torch.rand(2, 5, 9, 11)
    for cand in paper12():
        if not cand.geometric:
            back, valid = cand.deaugment(y)
            assert torch.equal(back, y) and torch.all(valid == 1)


def test_deaugment_outputs_at_lower_resolution():
    # A stride-2 head: 16x16 outputs of 32x32 views. Pixel crops (24 px) are defined on the
    # image, so the maps must be built for image_size and applied at the outputs' size.
    from ttach_instance.builtin_spaces import five_crops as crops

    space = crops(24)
    x = smooth(1, 32, 32)
    views = space.apply_all(x)
    outputs = torch.nn.functional.avg_pool2d(views, 2)
    for fill in ("zero", "border"):
        back, valid = space.deaugment(outputs, torch.arange(5)[None], image_size=(32, 32), fill=fill)
        assert valid[:, 0].sum((-1, -2)).tolist() == [144.0] * 5  # 24/32 of 16 px = 12x12
        expected = torch.nn.functional.avg_pool2d(x, 2)
        inside = valid.bool().expand_as(back)
        assert (back - expected.expand_as(back)).abs()[inside].max() < 0.06
    with pytest.raises(ValueError, match="crop size"):
        space.deaugment(outputs, torch.arange(5)[None])  # 24 px crop of a 16 px "image"


def test_zoom_scalar_path_is_cached_and_equals_the_per_row_path():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 20, 24)
    F._ZOOM_CACHE.clear()
    first = F.zoom(x, 0.8)
    assert len(F._ZOOM_CACHE) == 2  # one matrix per axis length
    again = F.zoom(x, 0.8)
    per_row = F.zoom(x, torch.full((3,), 0.8))  # builds its matrices every call
    assert torch.equal(first, again)
    torch.testing.assert_close(first, per_row, atol=1e-6, rtol=0)
    for s in range(40):
        F.zoom(x, 0.5 + s / 40)
    assert len(F._ZOOM_CACHE) <= F._ZOOM_CACHE_SIZE


# --------------------------------------------------------------------------- memory layouts


def _photos_layout(x):
    """The same values with channels-last strides, as ``torch.from_numpy(hwc).permute(...)``
    gives for photos loaded HWC."""
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


@pytest.mark.parametrize("space", [paper12(), d4(), ten_crops(16)], ids=lambda s: s.name)
def test_channels_last_input_gives_the_same_views(space):
    # The kernels read channels-last batches in place (reductions and products along the
    # memory); the arithmetic per output value is the contiguous path's, so the bits agree.
    x = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    photos = _photos_layout(x)
    assert photos.is_contiguous(memory_format=torch.channels_last) and not photos.is_contiguous()
    for cand in space:
        assert torch.equal(cand.apply(photos), cand.apply(x)), cand.name
    index = torch.randint(0, len(space), (3, 2), generator=torch.Generator().manual_seed(1))
    assert torch.equal(space.apply(photos, index), space.apply(x, index))


@pytest.mark.parametrize("cand", paper12().names)
def test_paper12_views_keep_the_input_layout(cand):
    # A channels-last batch gives channels-last views (CPU convolutions are faster on them),
    # a contiguous one contiguous views, also when one candidate covers the batch.
    space = paper12()
    x = torch.rand(4, 3, 16, 16)
    for images, fmt in ((x, torch.contiguous_format), (_photos_layout(x), torch.channels_last)):
        assert space[cand].apply(images).is_contiguous(memory_format=fmt)
        assert space.apply(images, [space.index_of(cand)] * 4).is_contiguous(memory_format=fmt)


def test_rotate_per_row_angles_on_channels_last():
    x = _photos_layout(torch.rand(3, 3, 18, 22))
    batched = F.rotate(x, torch.tensor([20.0, -33.0, 20.0]))
    for i, angle in enumerate([20.0, -33.0, 20.0]):
        assert torch.equal(batched[i : i + 1], F.rotate(x[i : i + 1].contiguous(), angle))


def test_single_candidate_batch_is_the_candidate_output_and_never_the_input():
    space = paper12()
    x = torch.rand(5, 3, 16, 16)
    for c, cand in enumerate(space):
        out = space.apply(x, torch.full((5,), c))
        assert torch.equal(out, cand.apply(x)), cand.name
    same = space.apply(x, torch.zeros(5, dtype=torch.long))  # identity on every row
    assert torch.equal(same, x)
    same += 1  # a fresh tensor: writing to the views leaves the images alone
    assert float(x.max()) <= 1


# --------------------------------------------------------------------------- range check


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_range_check_brute_force(dtype, layout):
    # Reference: the contract read off element by element in Python, tolerance 1e-3.
    values = [0.0, -0.0, 1.0, 0.5, -5e-4, 1.0005, -0.01, 1.01, -3.0, 2.0, float("nan"), -float("nan"),
              float("inf"), -float("inf")]
    base = torch.rand(2, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    for v in values:
        x = base.clone()
        x[1, 2, 3, 5] = v
        x = x.to(dtype)
        if layout == "channels_last":
            x = _photos_layout(x)
        elif layout == "strided":
            x = torch.cat([x, x], -1)[..., ::2]
        stored = float(x[1, 2, 3, 5])
        ok = all(-1e-3 <= float(e) <= 1 + 1e-3 for e in x.flatten())
        assert ok == (-1e-3 <= stored <= 1 + 1e-3), v  # the reference itself
        assert F.in_unit_range(x) == ok, v
        if ok:
            F.check_images(x)
        else:
            with pytest.raises(ValueError, match=r"\[0, 1\]"):
                F.check_images(x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", [Rotate(20), Zoom(0.8), Zoom(1.2), Sharpness(3.0), Color(2.0)], ids=str)
def test_gradients_flow_through_the_ops(op, layout):
    # Views keep the caller's graph: analytical gradients against finite differences, away
    # from the clamp (values near 0.5, so no output leaves [0, 1]).
    g = torch.Generator().manual_seed(0)
    x = (0.45 + 0.1 * torch.rand(1, 3, 5, 6, generator=g, dtype=torch.float64))
    if layout == "channels_last":
        x = _photos_layout(x)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(op.apply, (x,))
