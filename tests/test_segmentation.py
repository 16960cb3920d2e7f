"""Segmentation through the one pipeline: de-augmentation (``TransformSpace.deaugment``), the
validity-weighted merge (probabilities by default), coverage, strided heads, uncertainty, the
segmentation presets, the oracle, losses and metrics."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

import ttach_instance as ti
from ttach_instance import functional as F
from ttach_instance.evaluation.methods import OracleKSegmentationWrapper
from ttach_instance.merge import merge_outputs
from ttach_instance.ops import CallableOp, CropResize, Rotate, Zoom
from ttach_instance.segmentation import ConfusionMatrix, segmentation_loss, segmentation_metrics, view_losses
from ttach_instance.space import Candidate, TransformSpace
from ttach_instance.training.tasks import SegmentationTask
from ttach_instance.wrappers import LossGuidedSegmentationWrapper, RandomKSegmentationWrapper, SegmentationTTAWrapper

CUDA = torch.cuda.is_available()


def smooth_images(b=2, size=32):
    """Low-frequency images in [0, 1]: resampling them loses little, so an equivariant model
    must come back to the identity view up to interpolation error."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([0.5 + 0.3 * torch.sin(2 * math.pi * xx + c) * torch.cos(math.pi * yy * (c + 1)) for c in range(3)])
    imgs = base[None].repeat(b, 1, 1, 1)
    imgs[1::2] = imgs[1::2].flip(-1)
    return imgs


def pointwise_model(classes=4, seed=0):
    """A 1x1 convolution: equivariant to every geometric transform."""
    torch.manual_seed(seed)
    return nn.Conv2d(3, classes, 1).eval()


def conv_model(classes=3, seed=0):
    """Two 3x3 convolutions with confident logits: not equivariant, so the views of an image disagree."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, classes, 3, padding=1)).eval()
    with torch.no_grad():
        model[2].weight.mul_(10)
    return model


class FixedPredictor(nn.Module):
    """Returns given scores (lower = better) and carries its space like a LossPredictor."""

    def __init__(self, space, scores):
        super().__init__()
        self.space = space
        self.scores = scores

    def forward(self, pixels):
        return self.scores.to(pixels.device).expand(pixels.shape[0], -1)


def prefer(space, *names):
    """A FixedPredictor whose best candidates are ``names``, in that order."""
    scores = torch.full((len(space),), 10.0)
    for rank, name in enumerate(names):
        scores[space.index_of(name)] = float(rank)
    return FixedPredictor(space, scores)


class Spy(nn.Module):
    """``pointwise_model()`` that records ``record(x)`` of every input batch in ``seen``."""

    def __init__(self, record):
        super().__init__()
        self.net = pointwise_model()
        self.record = record
        self.seen = []

    def forward(self, x):
        self.seen.append(self.record(x))
        return self.net(x)


class Ramp(nn.Module):
    """Logits ``(x, 0)`` with ``x`` the column coordinate in [-2, 2]: not flip-equivariant."""

    def forward(self, x):
        b, _, h, w = x.shape
        col = torch.linspace(-2, 2, w).expand(b, 1, h, w)
        return torch.cat([col, torch.zeros_like(col)], 1)


def log_mean_probs(views, validity):
    """Hand-computed default merge: the log of the validity-weighted mean of the views' softmax
    ``sum(v p) / sum(v)``; a pixel no view covers takes the plain mean of the views' softmax."""
    p = views.softmax(2)
    den = validity.sum(1)
    weighted = (validity * p).sum(1) / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, weighted, p.mean(1)).log()


# --------------------------------------------------------------------------- de-augmentation


@pytest.mark.parametrize("space_name", ["paper12", "five_crops", "ten_crops"])
def test_equivariant_model_comes_back_to_identity_inside_valid_region(space_name):
    space = ti.get_space(space_name)
    model = pointwise_model()
    images = smooth_images()
    with torch.no_grad():
        ref = model(images)
        r = SegmentationTTAWrapper(model, space).run(images)
    scale = ref.abs().max()
    for t, cand in enumerate(space):
        back, valid = r["views"][:, t], r["validity"][:, t]
        if not cand.geometric:
            # Photometric candidates pass through untouched: the model's output on the view
            # (up to float rounding: the batched call may take another conv kernel).
            with torch.no_grad():
                torch.testing.assert_close(back, model(cand.apply(images)), atol=1e-6, rtol=0)
            assert torch.all(valid == 1)
            continue
        err = ((back - ref).abs() * valid).max() / scale
        # Worst pixel, relative to the logit range. rotate's forward kernel is PIL's bicubic
        # (Keys a = -1, which does not reproduce linear ramps: ~0.13 px, see
        # test_functional), the inverse warp is bilinear: 0.0203 measured on rotate(-20).
        assert err < 0.03, (cand.name, float(err))
        # The view's coverage: a crop of 28/32 sees 28x28 pixels; zoom-in and rotations lose a
        # border / corners; zoom-out sees everything.
        frac = float(valid.mean())
        if "crop" in cand.name:
            assert frac == pytest.approx((28 / 32) ** 2)
        elif cand.name == "zoom(1.2)":
            assert 0.6 < frac < 0.8
        elif cand.name.startswith("rotate"):
            assert 0.8 < frac < 0.95
        elif cand.name == "zoom(0.8)":
            assert frac == 1.0


def test_wrong_inverse_would_be_caught():
    """The tolerance above is meaningful: the forward map instead of the inverse fails it."""
    space = TransformSpace([Rotate(20)], name="r")
    model = pointwise_model()
    images = smooth_images()
    with torch.no_grad():
        ref = model(images)
        out = model(space.apply(images, [0, 0]))
    wrong = F.warp(out, F.rotation_theta(torch.tensor([20.0]), 32, 32), padding_mode="zeros")
    assert (wrong - ref).abs().max() / ref.abs().max() > 0.1


@pytest.mark.parametrize("space_name", ["d4", "flips"])
def test_exact_groups_come_back_exactly(space_name):
    space = ti.get_space(space_name)
    model = pointwise_model()
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(images)
        r = SegmentationTTAWrapper(model, space).run(images)
        raw = SegmentationTTAWrapper(model, space, merge_space="logits")(images)
    assert torch.all(r["validity"] == 1)
    for t in range(len(space)):
        torch.testing.assert_close(r["views"][:, t], ref, atol=1e-5, rtol=0)
    # Every view agrees: the merged probabilities are the model's, returned as their log.
    torch.testing.assert_close(r["output"], ref.log_softmax(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(raw, ref, atol=1e-5, rtol=0)


def test_composed_user_space_and_plugin_style_callable_op():
    space = ti.get_space("flips").product(TransformSpace([Candidate(), Candidate(Zoom(1.2))]), name="combo")
    model = pointwise_model()
    images = smooth_images()
    with torch.no_grad():
        ref = model(images)
        r = SegmentationTTAWrapper(model, space).run(images)
    err = ((r["views"] - ref[:, None]).abs() * r["validity"]).max() / ref.abs().max()
    assert err < 0.02
    # A user op with its own inverse (no affine map): goes through the op's de-augmentation.
    flip = CallableOp("myflip", lambda x: x.flip(-1), geometric=True, deaugment_dense=lambda y: y.flip(-1))
    space2 = TransformSpace([Candidate(), Candidate(flip)], name="user")
    with torch.no_grad():
        out = SegmentationTTAWrapper(model, space2, merge_space="logits")(images)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("fill", ["zero", "border"])
def test_space_deaugment_matches_functional_reference(mode, fill):
    """``space.deaugment`` (cached inverse maps, moved rows only) against
    ``functional.deaugment_dense`` row by row with each candidate's own composed map."""
    space = ti.get_space("paper12").product(ti.get_space("hflip"))
    outputs = torch.randn(2 * 3, 5, 24, 24)
    index = torch.tensor([[1, 6, 8], [9, 2, 23]])
    back, valid = space.deaugment(outputs, index, mode=mode, fill=fill)
    for r, c in enumerate(index.reshape(-1).tolist()):
        ref_back, ref_valid = F.deaugment_dense(outputs[r:r + 1], space[c].theta(24, 24), mode=mode, fill=fill)
        assert torch.equal(valid[r:r + 1], ref_valid), space[c].name
        # nearest has no blending; bilinear on an exact map (identity, flips) reads pixel
        # centres up to the rounding of the map
        torch.testing.assert_close(back[r:r + 1], ref_back, atol=1e-6 if mode == "nearest" else 1e-5, rtol=0)


@pytest.mark.parametrize("fill", ["zero", "border"])
def test_cpu_deaugment_warps_only_moved_rows_with_the_same_values(fill):
    """The CPU path resamples only geometric rows; it must give what one grid_sample over all
    rows with a per-row choice (the accelerator path) gives, bilinear, mixed candidates."""
    space = ti.get_space("paper12")
    outputs = torch.randn(4 * 3, 2, 20, 20)
    index = torch.tensor([[0, 1, 5], [3, 3, 4], [6, 2, 11], [0, 7, 10]])
    back, valid = space.deaugment(outputs, index, fill=fill)
    inverse = F.invert_theta(space.thetas(20, 20).to(torch.float64)).to(torch.float32)
    moved = torch.tensor([c.geometric for c in space])
    flat = index.reshape(-1)
    grid = TF.affine_grid(inverse[flat], [12, 1, 20, 20], align_corners=False)
    ref = TF.grid_sample(outputs, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ref_valid = (grid.abs() <= 1 + 1e-4).all(-1).unsqueeze(1).float()
    if fill == "zero":
        ref = ref * ref_valid
    rows_moved = moved[flat][:, None, None, None]
    torch.testing.assert_close(back, torch.where(rows_moved, ref, outputs), atol=0, rtol=0)
    torch.testing.assert_close(valid, torch.where(rows_moved, ref_valid, torch.ones_like(ref_valid)), atol=0, rtol=0)
    assert torch.equal(back[0], outputs[0]) and back[0].data_ptr() != outputs[0].data_ptr()  # a copy, not a view
    # no geometric row at all: a copy with full validity
    b0, v0 = space.deaugment(outputs[:2], torch.tensor([[0], [5]]), fill=fill)
    assert torch.equal(b0, outputs[:2]) and bool((v0 == 1).all()) and b0.data_ptr() != outputs.data_ptr()


def test_bilinear_on_logits_is_linear_so_constant_logits_survive():
    space = ti.get_space("paper12")
    outputs = torch.full((12, 3, 20, 20), 2.5)
    back, valid = space.deaugment(outputs, torch.arange(12)[None], fill="border")
    assert torch.allclose(back, torch.full_like(back, 2.5))
    back0, valid0 = space.deaugment(outputs, torch.arange(12)[None], fill="zero")
    assert torch.allclose(back0, 2.5 * valid0)
    assert (valid0 == 0).any() and torch.equal(valid, valid0)


class Strided(nn.Module):
    """``pointwise_model()`` followed by an average pool of ``stride``: a head at 1/stride."""

    def __init__(self, stride):
        super().__init__()
        self.net = pointwise_model()
        self.stride = stride

    def forward(self, x):
        return TF.avg_pool2d(self.net(x), self.stride)


@pytest.mark.parametrize("stride, size", [(2, 16), (4, 32)])
def test_strided_head_uses_the_image_geometry(stride, size):
    """A stride-2 (16 -> 8) or stride-4 (32 -> 8) head is accepted: the maps come from the
    image and apply to the smaller logits. Pooling by the stride commutes with flips and
    quarter turns, so D4 comes back exactly; a top-left quarter crop covers 1/4 of the map."""
    model = Strided(stride)
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        ref = model(images)
        out = SegmentationTTAWrapper(model, "d4")(images)
        r = SegmentationTTAWrapper(model, TransformSpace([CropResize("left_top", size // 2)], name="c")).run(images)
    assert ref.shape[-2:] == (size // stride, size // stride) and out.shape == ref.shape
    torch.testing.assert_close(out, ref.log_softmax(1), atol=1e-5, rtol=0)
    side = size // stride // 2
    expected = torch.zeros_like(r["validity"][0, 0, 0])
    expected[:side, :side] = 1
    assert torch.equal(r["validity"][0, 0, 0], expected)  # the crop is the top-left quarter of the map


def test_output_of_another_size_is_refused_naming_the_expected_size():
    """A 3x3 convolution without padding gives 30x30 logits for a 32x32 input: not an integer
    stride of the input, so no map brings it back; the wrapper says what it expected."""

    class Unpadded(nn.Module):
        def __init__(self, out_h=None, out_w=None):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.size = (out_h, out_w)

        def forward(self, x):
            y = self.conv(x)
            return y if self.size[0] is None else TF.interpolate(y, size=self.size)

    images = torch.rand(2, 3, 32, 32)
    space = ti.get_space("paper12")
    for wrapper in (SegmentationTTAWrapper(Unpadded(), "flips"),
                    LossGuidedSegmentationWrapper(Unpadded(), prefer(space, "rotate(20)"), k=1),
                    RandomKSegmentationWrapper(Unpadded(), space, k=2)):
        with pytest.raises(ValueError, match="32x32") as info:
            wrapper(images)
        assert "(2, 4, 30, 30)" in str(info.value) and "stride" in str(info.value)
    # strides that differ between height and width (8x16 for 32x32), or an output larger than the input
    for h, w in ((8, 16), (64, 64)):
        with pytest.raises(ValueError, match="32x32"):
            SegmentationTTAWrapper(Unpadded(h, w), "flips")(images)
    # the same model at the size it does fit is accepted
    assert SegmentationTTAWrapper(Unpadded(8, 8), "flips")(images).shape == (2, 4, 8, 8)


# --------------------------------------------------------------------------- merge


def test_validity_weighted_merge_hand_computed():
    """merge_outputs with validity weights on two views of four pixels; the last pixel no view
    covers falls back to the unweighted merge of the views."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]).reshape(1, 2, 1, 1, 4)
    v = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]).reshape(1, 2, 1, 1, 4)
    merged = merge_outputs(x, "mean", weights=v, merge_space="logits")
    assert merged.flatten().tolist() == [3.0, 6.0, 3.0, 6.0]
    assert v.sum(1).flatten().tolist() == [2.0, 1.0, 1.0, 0.0]  # the wrappers' coverage
    # "weighted": softmax(-losses) = [3/4, 1/4] times validity; the uncovered pixel takes the
    # loss weights alone: 3/4 * 4 + 1/4 * 8 = 5
    losses = torch.tensor([[0.0, math.log(3.0)]])
    merged = merge_outputs(x, "weighted", losses=losses, weights=v, merge_space="logits")
    torch.testing.assert_close(merged.flatten(), torch.tensor([(3 * 1 + 5) / 4, 6.0, 3.0, 5.0]))
    # probabilities over two classes: view 0 says (a, b), view 1 says (c, d) per pixel
    logits = torch.tensor([[[0.0, 2.0], [1.0, -1.0]], [[3.0, 0.0], [0.0, 0.0]]]).reshape(1, 2, 2, 1, 2)
    val = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).reshape(1, 2, 1, 1, 2)
    got = merge_outputs(logits, "mean", weights=val, merge_space="probs")
    p0, p1 = logits[0, 0, :, 0].softmax(0), logits[0, 1, :, 0].softmax(0)  # (classes, pixels)
    expected = torch.stack([(p0[:, 0] + p1[:, 0]) / 2, p0[:, 1]], 1).log()
    torch.testing.assert_close(got[0, :, 0], expected)


def test_wrapper_merge_hand_computed_with_crop():
    """Identity + a 2x2 top-left crop of a 4x4 image; the model outputs the logits (m, 0) with
    m the image's mean, broadcast: the crop's de-augmented output is its own mean on the
    top-left 2x2 block only, so the merge there is over both views and elsewhere the identity
    alone -- logits (m_id + m_crop) / 2, or the log of the mean of (sigmoid(m), 1 - sigmoid(m))."""

    class MeanModel(nn.Module):
        def forward(self, x):
            m = x.mean((1, 2, 3), keepdim=True).expand(-1, 1, 4, 4)
            return torch.cat([m, torch.zeros_like(m)], 1)

    space = TransformSpace([Candidate(), Candidate(CropResize("left_top", 2))], name="idcrop")
    img = torch.rand(1, 3, 4, 4)
    m_id = float(img.mean())
    m_crop = float(F.crop_resize(img, (0, 0, 2, 2)).mean())
    logits = SegmentationTTAWrapper(MeanModel(), space, merge_space="logits")(img)
    expected = torch.zeros((1, 2, 4, 4))
    expected[:, 0] = m_id
    expected[:, 0, :2, :2] = (m_id + m_crop) / 2
    torch.testing.assert_close(logits, expected)
    probs = SegmentationTTAWrapper(MeanModel(), space)(img)
    s_id, s_crop = 1 / (1 + math.exp(-m_id)), 1 / (1 + math.exp(-m_crop))
    expected = torch.empty((1, 2, 4, 4))
    expected[:, 0], expected[:, 1] = math.log(s_id), math.log(1 - s_id)
    expected[:, 0, :2, :2] = math.log((s_id + s_crop) / 2)
    expected[:, 1, :2, :2] = math.log(1 - (s_id + s_crop) / 2)
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("coverage", ["extrapolate", "zero"])
def test_default_merge_is_log_of_validity_weighted_mean_softmax(coverage):
    """Every segmentation preset merges probabilities by default: the output is the log of the
    validity-weighted mean of the views' softmax, hand-computed from run()'s views and validity
    (rotations and zoom-in leave pixels that only some views, or none, cover)."""
    space = ti.get_space("paper12")
    model = conv_model()
    images = smooth_images(3)
    wrappers = [
        LossGuidedSegmentationWrapper(model, prefer(space, "rotate(20)", "zoom(1.2)"), k=2, coverage=coverage),
        LossGuidedSegmentationWrapper(model, prefer(space, "zoom(1.2)"), k=1, coverage=coverage),
        RandomKSegmentationWrapper(model, space, k=3, seed=4, coverage=coverage),
        SegmentationTTAWrapper(model, space.subset(["rotate(-20)", "zoom(1.2)", "rotate(20)"]), coverage=coverage),
    ]
    for w in wrappers:
        assert w.merge_space == "probs"
        with torch.no_grad():
            r = w.run(images)
        views, validity = r["views"], r["validity"]
        assert (validity == 0).any()
        expected = log_mean_probs(views, validity)
        torch.testing.assert_close(r["output"], expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["coverage"], validity.sum(1))
        if coverage == "zero" and w.k == 1:
            # uncovered pixels: zero logits -> uniform probabilities
            gone = (r["coverage"] == 0).expand_as(r["output"])
            assert gone.any()
            torch.testing.assert_close(r["output"][gone], torch.full_like(r["output"][gone], -math.log(3)))
        if w.k > 1:
            # the reference can fail: a log-softmax of the weighted mean of the logits differs
            den = validity.sum(1).clamp_min(1)
            logit_mean = ((validity * views).sum(1) / den).log_softmax(1)
            assert (logit_mean - r["output"]).abs().max() > 1e-3


@pytest.mark.parametrize("merge_space", ["probs", "logits"])
def test_loss_guided_k1_output_is_its_one_view(merge_space):
    """k = 1 with border fill: the one view covers every pixel it can and its border the rest,
    so the merged output is the de-augmented view itself (or its log-softmax)."""
    space = ti.get_space("paper12")
    scores = torch.rand(3, len(space))

    class PerImage(nn.Module):
        def __init__(self):
            super().__init__()
            self.space = space

        def forward(self, pixels):
            return scores[: pixels.shape[0]]

    w = LossGuidedSegmentationWrapper(conv_model(), PerImage(), k=1, merge_space=merge_space)
    with torch.no_grad():
        r = w.run(smooth_images(3, 24))
    assert torch.equal(r["selection"].index[:, 0], scores.argmin(1))
    view = r["views"][:, 0]
    expected = view if merge_space == "logits" else view.log_softmax(1)
    torch.testing.assert_close(r["output"], expected, atol=0 if merge_space == "logits" else 1e-6, rtol=0)
    torch.testing.assert_close(r["coverage"], r["validity"][:, 0], atol=0, rtol=0)


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("coverage", ["extrapolate", "identity", "zero"])
def test_loss_guided_k1_zoom_in_coverage_modes(coverage):
    space = ti.get_space("paper12")
    zoom = space.index_of("zoom(1.2)")
    model = Spy(lambda x: x.shape[0])
    calls = model.seen
    images = smooth_images(2, 32)
    w = LossGuidedSegmentationWrapper(model, prefer(space, "zoom(1.2)"), k=1, coverage=coverage)
    raw = LossGuidedSegmentationWrapper(model, prefer(space, "zoom(1.2)"), k=1, coverage=coverage,
                                        merge_space="logits")
    with torch.no_grad():
        r = w.run(images)
        out_logits = raw(images)
        ref = model.net(images)
        zoomed = model.net(space[zoom].apply(images))
    assert r["selection"].index.tolist() == [[zoom], [zoom]]
    # one model call of B rows (+ one for the identity view's output)
    assert calls == ([2, 2, 2, 2] if coverage == "identity" else [2, 2])
    out, valid = r["output"], r["validity"][:, 0]
    inside, outside = valid > 0, valid == 0
    assert outside.any() and inside.any()
    # Inside: the zoom view's de-augmented output (as log-probabilities).
    ls_ref = ref.log_softmax(1)
    assert ((out - ls_ref).abs() * inside).max() / ls_ref.abs().max() < 0.02
    assert ((out_logits - ref).abs() * inside).max() / ref.abs().max() < 0.02
    assert torch.equal(r["coverage"] > 0, inside)
    o = outside.expand_as(out)
    if coverage == "identity":
        torch.testing.assert_close(out[o], ls_ref[o])
        torch.testing.assert_close(out_logits[o], ref[o])
    elif coverage == "zero":
        assert torch.all(out_logits[o] == 0)
        torch.testing.assert_close(out[o], torch.full_like(out[o], -math.log(4)))  # uniform over 4 classes
    else:
        # nearest covered value: the view's edge pixels, i.e. row 0 / column 0 of its output.
        torch.testing.assert_close(out_logits[:, :, 0, 0], zoomed[:, :, 0, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, :, 0, 0], zoomed.log_softmax(1)[:, :, 0, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out_logits[:, :, 16, -1], zoomed[:, :, 16, -1], atol=0.05, rtol=0)


def test_every_pixel_covered_for_spaces_with_identity_or_full_crops():
    model = pointwise_model()
    images = torch.rand(2, 3, 32, 32)
    for name in ["paper12", "five_crops", "d4"]:
        r = SegmentationTTAWrapper(model, name).run(images)
        assert torch.all(r["coverage"] > 0), name


# --------------------------------------------------------------------------- wrappers


def test_loss_guided_selects_lowest_predicted_and_matches_direct_computation():
    space = ti.get_space("paper12")
    scores = torch.arange(len(space), dtype=torch.float32).flip(0)  # last candidates best
    model = pointwise_model()
    images = smooth_images(3)
    w = LossGuidedSegmentationWrapper(model, FixedPredictor(space, scores), k=2)
    with torch.no_grad():
        r = w.run(images)
        out = w(images)
        a, b = model(space[11].apply(images)), model(space[10].apply(images))
    assert r["selection"].index.tolist() == [[11, 10]] * 3
    torch.testing.assert_close(r["selection"].predicted_losses, scores.expand(3, -1))
    # both are photometric (color 2.0, color 0.5): the mean of the two views' probabilities
    torch.testing.assert_close(out, ((a.softmax(1) + b.softmax(1)) / 2).log(), atol=1e-6, rtol=0)
    with torch.no_grad():
        raw = LossGuidedSegmentationWrapper(model, FixedPredictor(space, scores), k=2, merge_space="logits")(images)
    torch.testing.assert_close(raw, (a + b) / 2, atol=1e-6, rtol=0)


def test_flip_adds_the_flipped_view_of_each_chosen_view():
    """flip=True: views (B, 2k); the flipped view's output is flipped back before merging. The
    model outputs logits (x, 0) with x the column coordinate: the flipped view, flipped back,
    says (-x, 0), so the merged probabilities are 1/2 everywhere."""

    images = torch.rand(2, 3, 4, 6)
    r = SegmentationTTAWrapper(Ramp(), "identity", flip=True).run(images)
    col = torch.linspace(-2, 2, 6)
    assert r["views"].shape == (2, 2, 2, 4, 6) and torch.all(r["validity"] == 1)
    torch.testing.assert_close(r["views"][:, 0, 0], col.expand(2, 4, 6))
    torch.testing.assert_close(r["views"][:, 1, 0], col.flip(0).expand(2, 4, 6))
    torch.testing.assert_close(r["output"], torch.full((2, 2, 4, 6), math.log(0.5)))


def test_normalisation_from_arguments_or_the_model():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    space = ti.get_space("paper12")
    model = pointwise_model()
    images = smooth_images()
    w = LossGuidedSegmentationWrapper(model, prefer(space, "color(2.0)"), mean=mean, std=std)
    with torch.no_grad():
        out = w((images - m) / s)
        expected = model((F.color(images, 2.0) - m) / s)
    torch.testing.assert_close(out, expected.log_softmax(1), atol=1e-5, rtol=0)

    class Normalised(nn.Module):
        """A model that states its input normalisation, as SmallResNet or timm models do."""

        def __init__(self):
            super().__init__()
            self.net = model
            self.mean, self.std = mean, std

        def forward(self, x):
            return self.net(x)

    for wrapper in (LossGuidedSegmentationWrapper(Normalised(), prefer(space, "color(2.0)")),
                    RandomKSegmentationWrapper(Normalised(), ti.get_space("hflip").product(space), k=1)):
        assert wrapper.mean == mean and wrapper.std == std
    with torch.no_grad():
        resolved = LossGuidedSegmentationWrapper(Normalised(), prefer(space, "color(2.0)"))((images - m) / s)
    torch.testing.assert_close(resolved, out, atol=0, rtol=0)
    # pixels in [0, 255] (or not normalised as the model wants) are refused, not turned white
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LossGuidedSegmentationWrapper(model, prefer(space, "color(2.0)"))(images * 255)


def test_dict_outputs():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = pointwise_model()

        def forward(self, x):
            return {"mask": self.net(x), "aux": x.mean()}

    images = smooth_images()
    dm = DictModel()
    out = SegmentationTTAWrapper(dm, "paper12", output_mask_key="mask")(images)
    plain = SegmentationTTAWrapper(dm.net, "paper12")(images)
    assert set(out) == {"mask"}
    torch.testing.assert_close(out["mask"], plain)
    o, unc = SegmentationTTAWrapper(dm, "flips", output_mask_key="mask").forward_with_uncertainty(images)
    assert set(o) == {"mask"} and unc.shape == (2, 1, 32, 32)
    with pytest.raises(TypeError, match="output_mask_key"):
        SegmentationTTAWrapper(dm, "flips")(images)
    with pytest.raises(KeyError, match="logits"):
        SegmentationTTAWrapper(dm, "flips", output_mask_key="logits")(images)
    with pytest.raises(TypeError, match="'mask'.*not a dict"):
        SegmentationTTAWrapper(dm.net, "flips", output_mask_key="mask")(images)


def test_uncertainty_hand_computed_two_views():
    """hflip space; the model outputs logits [x, 0] where x is the column coordinate, so the
    flipped view disagrees: probabilities p and 1 - p -> variance per class ((p - q) / 2)^2."""

    images = torch.rand(1, 3, 4, 6)
    col = torch.linspace(-2, 2, 6)
    p = torch.sigmoid(col)  # class-0 probability of the identity view
    q = torch.sigmoid(col.flip(0))  # after de-flipping the flipped view
    expected = 2 * ((p - q) / 2) ** 2
    for merge_space in ("probs", "logits"):
        w = SegmentationTTAWrapper(Ramp(), "hflip", uncertainty="variance", merge_space=merge_space)
        out, unc = w.forward_with_uncertainty(images)
        torch.testing.assert_close(unc[0, 0, 0], expected, atol=1e-6, rtol=0)
        if merge_space == "logits":
            torch.testing.assert_close(out[0, 0, 0], (col + col.flip(0)) / 2, atol=1e-6, rtol=0)
        else:  # (p + q) / 2 = 1/2 for both classes
            torch.testing.assert_close(out, torch.full_like(out, math.log(0.5)), atol=1e-6, rtol=0)
        _, ent = SegmentationTTAWrapper(Ramp(), "hflip", uncertainty="entropy",
                                        merge_space=merge_space).forward_with_uncertainty(images)
        assert torch.allclose(ent, torch.full_like(ent, math.log(2)), atol=1e-6)  # merged 50/50
    # an equivariant model: no disagreement at all
    _, unc0 = SegmentationTTAWrapper(pointwise_model(), "d4").forward_with_uncertainty(torch.rand(2, 3, 8, 8))
    assert unc0.abs().max() < 1e-10
    # a pixel only one view covers has no spread: zoom(1.2)'s border band under identity + zoom
    space = TransformSpace([Candidate(), Candidate(Zoom(1.2))], name="idzoom")
    r = SegmentationTTAWrapper(conv_model(), space, coverage="zero").run(smooth_images(1))
    _, unc1 = SegmentationTTAWrapper(conv_model(), space, coverage="zero").forward_with_uncertainty(smooth_images(1))
    one = r["coverage"] == 1
    assert one.any() and torch.all(unc1[one] == 0) and (unc1[~one] > 0).any()


@pytest.mark.parametrize("k", [1, 2])
def test_channels_last_input_gives_channels_last_views_on_cpu(k):
    """A channels-last batch (e.g. uint8 HWC images permuted to NCHW) reaches the model in the
    same layout inside the wrapper (one call per rank), with the same values as a contiguous batch."""
    space = ti.get_space("paper12")
    images = smooth_images(4, 16)
    cl = images.contiguous(memory_format=torch.channels_last)
    index = torch.tensor([[0, 3], [5, 2], [8, 8], [11, 4]])
    views = space.apply(cl, index)
    assert views.is_contiguous(memory_format=torch.channels_last) and not views.is_contiguous()
    torch.testing.assert_close(views, space.apply(images, index), atol=1e-6, rtol=0)
    assert space.apply(images, index).is_contiguous()
    model = Spy(lambda x: x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    w = LossGuidedSegmentationWrapper(model, prefer(space, "rotate(20)", "zoom(0.8)"), k=k)
    with torch.no_grad():
        out_cl, out = w(cl), w(images)
    assert model.seen == [True] * k + [False] * k
    torch.testing.assert_close(out_cl, out, atol=1e-5, rtol=0)


def test_random_k_distinct_reproducible_and_reset():
    space = ti.get_space("paper12")
    model = pointwise_model()
    images = torch.rand(5, 3, 16, 16)
    w = RandomKSegmentationWrapper(model, space, k=3, seed=1)
    a = w.run(images)["selection"].index
    assert a.shape == (5, 3) and all(len(set(row)) == 3 for row in a.tolist())
    assert torch.equal(a, ti.select_random(5, len(space), 3, generator=torch.Generator().manual_seed(1)))
    b = w.run(images)["selection"].index  # every forward advances the generator
    assert not torch.equal(a, b)
    w.reset()
    assert torch.equal(w.run(images)["selection"].index, a)
    assert torch.equal(RandomKSegmentationWrapper(model, space, k=3, seed=1).run(images)["selection"].index, a)
    w.reset(2)
    assert torch.equal(w.run(images)["selection"].index,
                       RandomKSegmentationWrapper(model, space, k=3, seed=2).run(images)["selection"].index)


def _two_class_case(seed):
    """paper12, a small 3x3-conv two-class model (not equivariant), 3 random images and masks."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1)).eval()
    return ti.get_space("paper12"), model, torch.rand(3, 3, 16, 16), (torch.rand(3, 16, 16) > 0.5).long()


def test_oracle_picks_lowest_true_loss():
    space, model, images, target = _two_class_case(0)
    losses = view_losses(model, space, images, target)
    # independent reference: each candidate on its own, through Candidate.apply/deaugment
    checked = 0
    for t, cand in enumerate(space):
        with torch.no_grad():
            back, valid = cand.deaugment(model(cand.apply(images)))
        if valid.min() == 1:
            torch.testing.assert_close(losses[:, t], segmentation_loss(back, target), atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked >= 8
    w = OracleKSegmentationWrapper(model, space, k=1)
    r = w.run(images, target)
    assert torch.equal(r["selection"].index[:, 0], losses.argmin(1))
    torch.testing.assert_close(r["selection"].true_losses, losses, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="target"):
        w(images)
    with pytest.raises(ValueError, match="target"):
        w(images, target[:2])


def test_view_losses_with_pixel_accuracy():
    space, model, images, target = _two_class_case(1)
    target[0, :4] = 255  # ignored pixels do not count
    target[2] = 255  # an image with no labelled pixel scores 0
    losses, acc = view_losses(model, space, images, target, return_accuracy=True)
    torch.testing.assert_close(losses, view_losses(model, space, images, target))
    assert acc.shape == (3, len(space)) and float(acc[2].abs().max()) == 0.0
    for t, cand in enumerate(space):
        with torch.no_grad():
            back, valid = cand.deaugment(model(cand.apply(images)))
        if valid.min() == 1:
            keep = target[:2] != 255
            ref = ((back[:2].argmax(1) == target[:2]) & keep).flatten(1).sum(1) / keep.flatten(1).sum(1)
            torch.testing.assert_close(acc[:2, t], ref.float())
    # the label generator's task computes the same losses from the views themselves
    index = torch.arange(len(space)).expand(3, -1)
    with torch.no_grad():
        task_losses = SegmentationTask().view_losses(model, space.apply(images, index), target, space, index)
    torch.testing.assert_close(task_losses, losses, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("coverage", ["extrapolate", "identity", "zero"])
def test_view_losses_fill_uncovered_pixels_as_the_k1_wrapper(coverage):
    """view_losses[:, j] is the loss of the k=1 wrapper that picks candidate j, per coverage."""
    space, model, images, target = _two_class_case(2)
    losses = view_losses(model, space, images, target, coverage=coverage)
    for name in ("zoom(1.2)", "rotate(-20)"):
        with torch.no_grad():
            out = LossGuidedSegmentationWrapper(model, prefer(space, name), k=1, coverage=coverage,
                                                merge_space="logits")(images)
        torch.testing.assert_close(segmentation_loss(out, target), losses[:, space.index_of(name)],
                                   atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- losses, metrics


def test_ce_loss_per_image_with_ignore_index():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, :2] = 255
    got = segmentation_loss(logits, target)
    for i in range(2):
        ref = TF.cross_entropy(logits[i : i + 1], target[i : i + 1], ignore_index=255)
        torch.testing.assert_close(got[i], ref)
    all_ignored = torch.full((1, 4, 4), 255)
    assert float(segmentation_loss(logits[:1], all_ignored)) == 0.0


def test_dice_loss_hand_computed():
    # 1x2 image, 2 classes; logits so that p(class 1) = [1, 0] (near-hard), target [1, 1].
    logits = torch.tensor([[[[-50.0, 50.0]], [[50.0, -50.0]]]])
    target = torch.tensor([[[1, 1]]])
    # class 0: inter 0, |p| = 1, |y| = 0 -> (0 + 1) / (1 + 1) = 0.5
    # class 1: inter 1, |p| = 1, |y| = 2 -> (2 + 1) / (3 + 1) = 0.75
    expected = 1 - (0.5 + 0.75) / 2
    assert float(segmentation_loss(logits, target, kind="dice")) == pytest.approx(expected, abs=1e-6)


def test_metrics_hand_computed():
    pred = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    tgt = torch.tensor([[0, 1, 1, 1], [1, 255, 0, 0]])
    m = segmentation_metrics(pred, tgt, num_classes=2)
    # kept pixels: (t,p) = (0,0) (1,0) (1,1) (1,1) (1,1) (0,1) (0,0) -> tp0 = 2, tp1 = 3
    # class 0: union = 2 + 1 (t1 p0) + 1 (t0 p1) = 4 -> 0.5 ; class 1: 3 + 1 + 1 = 5 -> 0.6
    assert m["iou"] == pytest.approx([0.5, 0.6])
    assert m["miou"] == pytest.approx(0.55)
    assert m["pixel_acc"] == pytest.approx(5 / 7)
    cm = ConfusionMatrix(2).update(pred[:1], tgt[:1]).update(pred[1:], tgt[1:])
    assert cm.metrics()["miou"] == pytest.approx(0.55)


# --------------------------------------------------------------------------- validation


_MODEL = pointwise_model()
_BAD = TransformSpace([Candidate(), Candidate(CallableOp("warp", lambda x: x, geometric=True))], name="bad")
_P12 = ti.get_space("paper12")
BAD_ARGUMENTS = [
    # (id, callable, exception type, pattern the message must match)
    ("no inverse", lambda: SegmentationTTAWrapper(_MODEL, _BAD), ValueError, "inverse"),
    ("no inverse, loss-guided", lambda: LossGuidedSegmentationWrapper(_MODEL, FixedPredictor(_BAD, torch.zeros(2))),
     ValueError, "inverse"),
    ("k", lambda: LossGuidedSegmentationWrapper(_MODEL, FixedPredictor(_P12, torch.zeros(12)), k=13), ValueError,
     "k must be in"),
    ("space mismatch", lambda: LossGuidedSegmentationWrapper(_MODEL, FixedPredictor(_P12, torch.zeros(12)), space="d4"),
     ValueError, "fingerprint"),
    ("coverage", lambda: SegmentationTTAWrapper(_MODEL, "d4", coverage="fill"), ValueError, "coverage"),
    ("interpolation", lambda: SegmentationTTAWrapper(_MODEL, "d4", interpolation="bicubic"), ValueError,
     "interpolation"),
    ("uncertainty", lambda: SegmentationTTAWrapper(_MODEL, "d4", uncertainty="std"), ValueError, "uncertainty"),
    ("merge_space", lambda: SegmentationTTAWrapper(_MODEL, "d4", merge_space="softmax"), ValueError, "merge_space"),
    ("weighted without losses", lambda: SegmentationTTAWrapper(_MODEL, "d4", merge_mode="weighted"), ValueError,
     "weighted"),
    ("seed", lambda: RandomKSegmentationWrapper(_MODEL, "d4", seed="a"), TypeError, "seed"),
    ("space type", lambda: SegmentationTTAWrapper(_MODEL, 3), TypeError, "space"),
    ("uint8 images", lambda: SegmentationTTAWrapper(_MODEL, "d4")(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)),
     TypeError, "floating-point"),
    ("label output", lambda: SegmentationTTAWrapper(lambda x: x.argmax(1, keepdim=True), "flips")(torch.rand(1, 3, 8, 8)),
     ValueError, "float tensor"),
    ("predictor output", lambda: LossGuidedSegmentationWrapper(_MODEL, lambda x: torch.zeros(x.shape[0], 3),
                                                               space=_P12)(torch.rand(1, 3, 8, 8)),
     ValueError, "predictor"),
    ("loss kind", lambda: segmentation_loss(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long),
                                            kind="focal"), ValueError, "kind"),
    ("loss target", lambda: segmentation_loss(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long)),
     ValueError, "target"),
]


@pytest.mark.parametrize("fn, exc, pattern", [c[1:] for c in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_arguments(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def test_ttach_compose_space():
    import ttach as tta

    model = conv_model()
    images = torch.rand(2, 3, 16, 16)
    ours = SegmentationTTAWrapper(model, tta.aliases.d4_transform(), merge_space="logits")(images)
    theirs = tta.SegmentationTTAWrapper(model, tta.aliases.d4_transform(), merge_mode="mean")(images)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
@pytest.mark.parametrize("space_name", ["paper12", "d4", "five_crops"])
def test_cuda_matches_cpu(space_name):
    space = ti.get_space(space_name)
    model = pointwise_model()
    images = smooth_images(4)
    scores = torch.linspace(0, 1, len(space))
    cpu = LossGuidedSegmentationWrapper(model, FixedPredictor(space, scores), k=2).run(images)
    gpu = LossGuidedSegmentationWrapper(model.cuda(), FixedPredictor(space, scores), k=2).run(images.cuda())
    assert gpu["output"].device.type == "cuda"
    assert torch.equal(gpu["selection"].index.cpu(), cpu["selection"].index)
    torch.testing.assert_close(gpu["output"].cpu(), cpu["output"], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(gpu["validity"].cpu(), cpu["validity"], atol=0, rtol=0)


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
@pytest.mark.parametrize("space_name", ["paper12", "d4", "five_crops"])
@pytest.mark.parametrize("coverage", ["extrapolate", "identity"])
def test_cuda_forward_does_not_synchronise(space_name, coverage):
    space = ti.get_space(space_name)
    model = pointwise_model().cuda()
    predictor = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, len(space))).cuda()
    predictor.space = space
    w = LossGuidedSegmentationWrapper(model, predictor, k=2, coverage=coverage)
    images = torch.rand(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        w(images)  # warm-up: builds the cached inverse-map tables on the device
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = w(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (4, 4, 32, 32)


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
def test_sync_debug_mode_catches_a_synchronising_forward():
    """The sync-free test above can fail: a model that calls ``.item()`` in its forward is
    caught by the same ``set_sync_debug_mode("error")`` check."""

    class Syncing(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = pointwise_model()

        def forward(self, x):
            out = self.conv(x)
            return out * (1 + 0 * out.sum().item())

    space = ti.get_space("flips")
    w = SegmentationTTAWrapper(Syncing().cuda(), space)
    images = torch.rand(2, 3, 16, 16, device="cuda")
    with torch.no_grad():
        w(images)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pytest.raises(RuntimeError, match="synchroniz"):
                w(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")
