"""Segmentation TTA: de-augmentation, validity-weighted merge, coverage, wrappers, losses."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

import ttach_instance as ti
from ttach_instance import functional as F
from ttach_instance.ops import CallableOp, CropResize, Rotate, Zoom
from ttach_instance.segmentation import (
    ConfusionMatrix,
    LossGuidedSegmentationWrapper,
    OracleKSegmentationWrapper,
    RandomKSegmentationWrapper,
    SegmentationTask,
    SegmentationTTAWrapper,
    apply_views,
    deaugment_views,
    merge_views,
    segmentation_loss,
    segmentation_metrics,
    view_losses,
)
from ttach_instance.space import Candidate, TransformSpace

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


class FixedPredictor(nn.Module):
    """Returns given scores (lower = better) and carries its space like a LossPredictor."""

    def __init__(self, space, scores):
        super().__init__()
        self.space = space
        self.scores = scores

    def forward(self, pixels):
        return self.scores.to(pixels.device).expand(pixels.shape[0], -1)


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
            # (up to float rounding: the batched call of 12 views may take another conv kernel).
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
    assert torch.all(r["validity"] == 1)
    for t in range(len(space)):
        torch.testing.assert_close(r["views"][:, t], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(r["output"], ref, atol=1e-5, rtol=0)


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
        out = SegmentationTTAWrapper(model, space2)(images)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_deaugment_views_matches_functional_reference_with_nearest():
    """Nearest-neighbour de-augmentation has no blending, so our batched path (border
    padding, cached inverses) must equal functional.deaugment_dense wherever it is valid."""
    space = ti.get_space("paper12").product(ti.get_space("hflip"))
    outputs = torch.randn(2 * 3, 5, 24, 24)
    index = torch.tensor([[1, 6, 8], [9, 2, 23]])
    back, valid = deaugment_views(outputs, space, index, interpolation="nearest", fill="zero")
    ref_back, ref_valid = space.deaugment(outputs, index, mode="nearest", grouped=True)
    torch.testing.assert_close(valid, ref_valid.to(valid.dtype))
    torch.testing.assert_close(back * valid, ref_back * ref_valid, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fill", ["zero", "border"])
def test_cpu_deaugment_warps_only_moved_rows_with_the_same_values(fill):
    """The CPU path resamples only geometric rows; it must give what one grid_sample over all
    rows with a per-row choice (the accelerator path) gives, bilinear, mixed candidates."""
    space = ti.get_space("paper12")
    outputs = torch.randn(4 * 3, 2, 20, 20)
    index = torch.tensor([[0, 1, 5], [3, 3, 4], [6, 2, 11], [0, 7, 10]])
    back, valid = deaugment_views(outputs, space, index, fill=fill)
    inverse, moved = ti.segmentation._DeaugTables(space).get(20, 20, outputs.device)
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
    b0, v0 = deaugment_views(outputs[:2], space, torch.tensor([[0], [5]]), fill=fill)
    assert torch.equal(b0, outputs[:2]) and bool((v0 == 1).all())


def test_loss_guided_k1_output_is_the_merge_of_its_one_view():
    """k=1 with coverage="extrapolate" skips merge_views: the result must be what it gives."""
    space = ti.get_space("paper12")
    scores = torch.rand(3, len(space))

    class PerImage(nn.Module):
        def __init__(self):
            super().__init__()
            self.space = space

        def forward(self, pixels):
            return scores[: pixels.shape[0]]

    for merge_mode in ("mean", "probs"):
        w = LossGuidedSegmentationWrapper(pointwise_model(), PerImage(), k=1, merge_mode=merge_mode)
        with torch.no_grad():
            r = w.run(smooth_images(3, 24))
        merged, cov = merge_views(r["views"], r["validity"], None, r["views"].mean(1))
        torch.testing.assert_close(r["output"], merged, atol=0, rtol=0)
        torch.testing.assert_close(r["coverage"], cov, atol=0, rtol=0)


def test_bilinear_on_logits_is_linear_so_constant_logits_survive():
    space = ti.get_space("paper12")
    outputs = torch.full((12, 3, 20, 20), 2.5)
    back, valid = deaugment_views(outputs, space, torch.arange(12)[None], fill="border")
    assert torch.allclose(back, torch.full_like(back, 2.5))
    back0, valid0 = deaugment_views(outputs, space, torch.arange(12)[None], fill="zero")
    assert torch.allclose(back0, 2.5 * valid0)
    assert (valid0 == 0).any()


def test_lower_resolution_outputs_use_the_image_geometry():
    """A stride-2 head: maps come from the 16x16 image and apply to the 8x8 logits."""
    class Stride2(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = pointwise_model()

        def forward(self, x):
            return TF.avg_pool2d(self.net(x), 2)

    model = Stride2()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(images)
        out = SegmentationTTAWrapper(model, "d4")(images)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    r = SegmentationTTAWrapper(model, TransformSpace([CropResize("left_top", 8)], name="c")).run(images)
    assert r["validity"][0, 0, 0].sum() == 16  # the crop is the top-left quarter: 4x4 of 8x8


# --------------------------------------------------------------------------- merge


def test_merge_views_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]).reshape(1, 2, 1, 1, 4)
    v = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]).reshape(1, 2, 1, 1, 4)
    merged, cov = merge_views(x, v)
    assert merged.flatten().tolist() == [3.0, 6.0, 3.0, 0.0]
    assert cov.flatten().tolist() == [2.0, 1.0, 1.0, 0.0]
    fb = torch.full((1, 1, 1, 4), -9.0)
    merged, _ = merge_views(x, v, fallback=fb)
    assert merged.flatten().tolist() == [3.0, 6.0, 3.0, -9.0]
    merged, _ = merge_views(x, v, weights=torch.tensor([[3.0, 1.0]]))
    assert merged.flatten().tolist() == [(3 * 1 + 5) / 4, 6.0, 3.0, 0.0]


def test_wrapper_merge_hand_computed_with_crop():
    """Identity + a 2x2 top-left crop of a 4x4 image, model = per-image mean broadcast: the
    crop's de-augmented output is its own mean on the top-left 2x2 block only, so the merged
    output is (m_id + m_crop) / 2 there and m_id elsewhere."""
    class MeanModel(nn.Module):
        def forward(self, x):
            return x.mean((1, 2, 3), keepdim=True).expand(-1, 2, 4, 4).contiguous()

    space = TransformSpace([Candidate(), Candidate(CropResize("left_top", 2))], name="idcrop")
    img = torch.rand(1, 3, 4, 4)
    m_id = float(img.mean())
    m_crop = float(F.crop_resize(img, (0, 0, 2, 2)).mean())
    out = SegmentationTTAWrapper(MeanModel(), space)(img)
    expected = torch.full((1, 2, 4, 4), m_id)
    expected[..., :2, :2] = (m_id + m_crop) / 2
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("coverage", ["extrapolate", "identity", "zero"])
def test_loss_guided_k1_zoom_in_coverage_modes(coverage):
    space = ti.get_space("paper12")
    zoom = space.index_of("zoom(1.2)")
    scores = torch.ones(len(space))
    scores[zoom] = 0.0
    model = Spy(lambda x: x.shape[0])
    calls = model.seen
    images = smooth_images(2, 32)
    w = LossGuidedSegmentationWrapper(model, FixedPredictor(space, scores), k=1, coverage=coverage)
    with torch.no_grad():
        r = w.run(images)
        ref = model.net(images)
        zoomed = model.net(space[zoom].apply(images))
    assert r["index"].tolist() == [[zoom], [zoom]]
    assert calls == ([4] if coverage == "identity" else [2])  # one model call
    out, valid = r["output"], r["validity"][:, 0]
    inside, outside = valid > 0, valid == 0
    assert outside.any() and inside.any()
    # Inside: the zoom view's de-augmented output.
    assert ((out - ref).abs() * inside).max() / ref.abs().max() < 0.02
    assert torch.equal(r["coverage"] > 0, inside)
    o = outside.expand_as(out)
    if coverage == "identity":
        torch.testing.assert_close(out[o], ref[o])
    elif coverage == "zero":
        assert torch.all(out[o] == 0)
    else:
        # nearest covered value: the view's edge pixels, i.e. row 0 / column 0 of its output.
        top_left = out[:, :, 0, 0]
        torch.testing.assert_close(top_left, zoomed[:, :, 0, 0], atol=1e-5, rtol=0)
        right_edge = out[:, :, 16, -1]
        torch.testing.assert_close(right_edge, zoomed[:, :, 16, -1], atol=0.05, rtol=0)


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
    assert r["index"].tolist() == [[11, 10]] * 3
    # both are photometric (color 2.0, color 0.5): plain mean of the two views' outputs
    with torch.no_grad():
        expected = (model(space[11].apply(images)) + model(space[10].apply(images))) / 2
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_normalised_model_input_with_mean_std():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    space = ti.get_space("paper12")
    scores = torch.ones(12)
    scores[space.index_of("color(2.0)")] = 0
    model = pointwise_model()
    images = smooth_images()
    w = LossGuidedSegmentationWrapper(model, FixedPredictor(space, scores), mean=mean, std=std)
    with torch.no_grad():
        out = w((images - m) / s)
        expected = model((F.color(images, 2.0) - m) / s)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


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
    with pytest.raises(ValueError, match="output_mask_key"):
        SegmentationTTAWrapper(dm, "flips")(images)
    with pytest.raises(KeyError, match="logits"):
        SegmentationTTAWrapper(dm, "flips", output_mask_key="logits")(images)
    with pytest.raises(TypeError, match="output_mask_key"):
        SegmentationTTAWrapper(dm.net, "flips", output_mask_key="mask")(images)


def test_uncertainty_hand_computed_two_views():
    """hflip space; the model outputs logits [x, 0] where x is the column coordinate, so the
    flipped view disagrees: probabilities p and 1 - p -> variance per class ((p - q) / 2)^2."""
    class Ramp(nn.Module):
        def forward(self, x):
            b, _, h, w = x.shape
            col = torch.linspace(-2, 2, w).expand(b, 1, h, w)
            return torch.cat([col, torch.zeros_like(col)], 1)

    images = torch.rand(1, 3, 4, 6)
    w = SegmentationTTAWrapper(Ramp(), "hflip", uncertainty="variance")
    out, unc = w.forward_with_uncertainty(images)
    col = torch.linspace(-2, 2, 6)
    p = torch.sigmoid(col)  # class-0 probability of the identity view
    q = torch.sigmoid(col.flip(0))  # after de-flipping the flipped view
    expected = 2 * ((p - q) / 2) ** 2
    torch.testing.assert_close(unc[0, 0, 0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 0, 0], (col + col.flip(0)) / 2, atol=1e-6, rtol=0)
    _, ent = SegmentationTTAWrapper(Ramp(), "hflip", uncertainty="entropy").forward_with_uncertainty(images)
    assert torch.allclose(ent, torch.full_like(ent, math.log(2)), atol=1e-6)  # merged logits 0 -> 50/50
    # an equivariant model: no disagreement at all
    _, unc0 = SegmentationTTAWrapper(pointwise_model(), "d4").forward_with_uncertainty(torch.rand(2, 3, 8, 8))
    assert unc0.abs().max() < 1e-10


def test_channels_last_input_gives_channels_last_views_on_cpu():
    """A channels-last batch (e.g. uint8 HWC images permuted to NCHW) reaches the model in the
    same layout inside the wrapper, with the same values as a contiguous batch."""
    space = ti.get_space("paper12")
    images = smooth_images(4, 16)
    cl = images.contiguous(memory_format=torch.channels_last)
    index = torch.tensor([[0, 3], [5, 2], [8, 8], [11, 4]])
    views = apply_views(space, cl, index)
    assert views.is_contiguous(memory_format=torch.channels_last) and not views.is_contiguous()
    torch.testing.assert_close(views, apply_views(space, images, index), atol=1e-6, rtol=0)
    assert apply_views(space, images, index).is_contiguous()
    model = Spy(lambda x: x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    scores = torch.ones(len(space))
    scores[space.index_of("rotate(20)")] = 0.0
    w = LossGuidedSegmentationWrapper(model, FixedPredictor(space, scores), k=1)
    with torch.no_grad():
        out_cl, out = w(cl), w(images)
    assert model.seen == [True, False]
    torch.testing.assert_close(out_cl, out, atol=1e-5, rtol=0)


def test_random_k_distinct_and_reproducible():
    space = ti.get_space("paper12")
    model = pointwise_model()
    images = torch.rand(5, 3, 16, 16)
    a = RandomKSegmentationWrapper(model, space, k=3, generator=torch.Generator().manual_seed(1)).run(images)["index"]
    b = RandomKSegmentationWrapper(model, space, k=3, generator=torch.Generator().manual_seed(1)).run(images)["index"]
    assert torch.equal(a, b) and a.shape == (5, 3)
    assert all(len(set(row)) == 3 for row in a.tolist())


def _two_class_case(seed):
    """paper12, a small 3x3-conv two-class model (not equivariant), 3 random images and masks."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1)).eval()
    return ti.get_space("paper12"), model, torch.rand(3, 3, 16, 16), (torch.rand(3, 16, 16) > 0.5).long()


def test_oracle_picks_lowest_true_loss():
    space, model, images, target = _two_class_case(0)
    losses = view_losses(model, space, images, target)
    # independent reference: each candidate on its own, through Candidate.apply/deaugment
    for t, cand in enumerate(space):
        with torch.no_grad():
            back, valid = cand.deaugment(model(cand.apply(images)))
        if valid.min() == 1:
            torch.testing.assert_close(losses[:, t], segmentation_loss(back, target), atol=1e-4, rtol=1e-4)
    w = OracleKSegmentationWrapper(model, space, k=1)
    r = w.run(images, target=target)
    assert torch.equal(r["index"][:, 0], losses.argmin(1))
    with pytest.raises(ValueError, match="target"):
        w(images)


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
    task_losses, task_acc = SegmentationTask().view_losses(model, space, images, target, return_accuracy=True)
    torch.testing.assert_close(task_acc, acc)
    torch.testing.assert_close(task_losses, losses)


def test_segmentation_task_interface():
    task = SegmentationTask(loss="dice")
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    torch.testing.assert_close(task.loss(logits, target), segmentation_loss(logits, target, kind="dice"))
    out = task.view_losses(pointwise_model(3), "flips", torch.rand(2, 3, 8, 8), target)
    assert out.shape == (2, 4)


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


def test_bad_arguments():
    model = pointwise_model()
    bad = TransformSpace([Candidate(), Candidate(CallableOp("warp", lambda x: x, geometric=True))], name="bad")
    with pytest.raises(ValueError, match="inverse"):
        SegmentationTTAWrapper(model, bad)
    with pytest.raises(ValueError, match="inverse"):
        LossGuidedSegmentationWrapper(model, FixedPredictor(bad, torch.zeros(2)))
    space = ti.get_space("paper12")
    with pytest.raises(ValueError, match="k must"):
        LossGuidedSegmentationWrapper(model, FixedPredictor(space, torch.zeros(12)), k=13)
    with pytest.raises(ValueError, match="differs"):
        LossGuidedSegmentationWrapper(model, FixedPredictor(space, torch.zeros(12)), space="d4")
    with pytest.raises(ValueError, match="coverage"):
        SegmentationTTAWrapper(model, "d4", coverage="fill")
    with pytest.raises(ValueError, match="interpolation"):
        SegmentationTTAWrapper(model, "d4", interpolation="bicubic")
    with pytest.raises(TypeError, match="space"):
        SegmentationTTAWrapper(model, 3)
    with pytest.raises(TypeError, match="images"):
        SegmentationTTAWrapper(model, "d4")(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="logits"):
        SegmentationTTAWrapper(lambda x: x.argmax(1, keepdim=True), "flips")(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="predictor"):
        LossGuidedSegmentationWrapper(model, lambda x: torch.zeros(x.shape[0], 3), space=space)(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="kind"):
        segmentation_loss(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), kind="focal")
    with pytest.raises(ValueError, match="target"):
        segmentation_loss(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))


def test_ttach_compose_space():
    import ttach as tta

    model = pointwise_model()
    images = torch.rand(2, 3, 16, 16)
    ours = SegmentationTTAWrapper(model, tta.aliases.d4_transform())(images)
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
    assert torch.equal(gpu["index"].cpu(), cpu["index"])
    torch.testing.assert_close(gpu["output"].cpu(), cpu["output"], atol=2e-3, rtol=1e-3)


@pytest.mark.skipif(not CUDA, reason="CUDA not available")
@pytest.mark.parametrize("space_name", ["paper12", "d4", "five_crops"])
def test_cuda_forward_does_not_synchronise(space_name):
    space = ti.get_space(space_name)
    model = pointwise_model().cuda()
    predictor = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, len(space))).cuda()
    predictor.space = space
    w = LossGuidedSegmentationWrapper(model, predictor, k=2)
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
