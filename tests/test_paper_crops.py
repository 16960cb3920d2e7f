"""The paper's crop protocol (resize by 1/0.875, windows of the input size, no resize back)
against torchvision's Resize + FiveCrop on PIL images and PIL's own float resize."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import ttach_instance as ti
from ttach_instance import functional as F
from ttach_instance.ops import ResizeCrop

#: torchvision's FiveCrop order (tl, tr, bl, br, centre) by our position names.
TV_ORDER = {"left_top": 0, "right_top": 1, "left_bottom": 2, "right_bottom": 3, "center": 4}


def _uint8_batch(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (64, 64)])
def test_paper_crops_equal_torchvision_resize_five_crop_on_pil(size):
    """Each ``five_crops_paper`` / ``ten_crops_paper`` view is torchvision's ``Resize((floor(h /
    0.875), floor(w / 0.875)))`` then ``FiveCrop((h, w))`` of the PIL image (then PIL's mirror for
    the flipped half), within PIL's uint8 rounding."""
    h, w = size
    resized = (int(h / 0.875), int(w / 0.875))  # 32 -> 36, 24 -> 27, 40 -> 45, 64 -> 73
    u8 = _uint8_batch(2, h, w)
    x = u8.float() / 255
    ten = ti.get_space("ten_crops_paper")
    views = ten.apply_all(x).view(2, 10, 3, h, w)
    for i in range(2):
        pil = Image.fromarray(u8[i].permute(1, 2, 0).numpy())
        crops = v2.FiveCrop((h, w))(v2.Resize(resized)(pil))
        for c, cand in enumerate(ten):
            ref = crops[TV_ORDER[cand.ops[0].params["position"]]]
            if c >= 5:
                ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
            ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255
            torch.testing.assert_close(views[i, c], ref, atol=1.01 / 255, rtol=0, msg=lambda m: f"{cand.name}: {m}")
    five = ti.get_space("five_crops_paper")
    assert five.names == ten.names[:5]
    assert torch.equal(five.apply_all(x), views[:, :5].flatten(0, 1))
    centre = ti.get_space("center_crop_paper")
    assert centre.names == ["resize_crop_center(0.875)"]
    assert torch.equal(centre.apply_all(x), views[:, 4])


def test_resize_crop_equals_pil_float_resize_then_crop():
    """In PIL's float mode (no uint8 rounding) the view is PIL's bilinear resize + crop to
    float rounding, for every position and another fraction; boxes computed here by hand."""
    x = torch.rand(1, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    for fraction, side in ((0.875, 34), (0.75, 40)):
        offsets = {"left_top": (0, 0), "left_bottom": (0, side - 30), "right_bottom": (side - 30, side - 30),
                   "right_top": (side - 30, 0), "center": ((side - 30) // 2, (side - 30) // 2)}
        for position, (left, top) in offsets.items():
            ref = torch.stack([torch.from_numpy(np.array(
                Image.fromarray(x[0, c].numpy(), mode="F").resize((side, side), Image.BILINEAR)
                .crop((left, top, left + 30, top + 30)))) for c in range(3)])
            out = ResizeCrop(position, fraction).apply(x)[0]
            torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


def test_resize_crop_theta_is_the_views_map():
    """The view of a linear ramp is the ramp read through ``theta`` (bilinear resampling of a
    linear function is exact away from the clamped border), so ``theta`` is the view's map and
    de-augmentation puts a view's pixels back where they came from."""
    h, w = 32, 40
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h * 2 - 1, (torch.arange(w) + 0.5) / w * 2 - 1, indexing="ij")
    ramp = torch.stack([0.5 + 0.3 * xs, 0.5 + 0.2 * ys, 0.4 + 0.1 * xs + 0.2 * ys])[None]
    for position in ("left_top", "right_bottom", "center"):
        op = ResizeCrop(position)
        view = op.apply(ramp)[0]
        theta = op.theta(h, w).float()
        gx = theta[0, 0] * xs + theta[0, 1] * ys + theta[0, 2]
        gy = theta[1, 0] * xs + theta[1, 1] * ys + theta[1, 2]
        expected = torch.stack([0.5 + 0.3 * gx, 0.5 + 0.2 * gy, 0.4 + 0.1 * gx + 0.2 * gy])
        # away from the border, where PIL/torch clamp the sample to the first/last pixel
        inside = (gx.abs() <= 1 - 1 / w) & (gy.abs() <= 1 - 1 / h)
        assert inside.float().mean() > 0.8
        torch.testing.assert_close(view[:, inside], expected[:, inside], atol=1e-5, rtol=0)
        # the window covers 1/1.143 of each side: its map shrinks by fraction and stays inside
        assert theta[0, 0] == pytest.approx(w / int(w / 0.875)) and theta[1, 1] == pytest.approx(h / int(h / 0.875))
        back, valid = F.deaugment_dense(view[None], op.theta(h, w))
        inv = F.invert_theta(op.theta(h, w)).float()  # input -> view: keep input pixels read well inside the view
        vx, vy = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2], inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
        seen = valid[0, 0].bool() & (vx.abs() <= 1 - 3 / w) & (vy.abs() <= 1 - 3 / h)
        assert seen.float().mean() > 0.5
        torch.testing.assert_close(back[0][:, seen], ramp[0][:, seen], atol=1e-4, rtol=0)
        assert 0.6 < valid.mean() < 0.9  # the input pixels outside the window are not seen


def test_resize_crop_is_not_the_resize_back_crop():
    """``center_crop_paper`` keeps the input's pixel scale times 1/0.875; the resize-back
    ``five_crops`` centre upsamples a 0.875 crop: the same region, different views."""
    x = torch.rand(1, 3, 32, 32)
    paper = ti.get_space("center_crop_paper").apply_all(x)
    back = ti.get_space("five_crops")[4].apply(x)
    assert paper.shape == back.shape == x.shape and not torch.allclose(paper, back, atol=1e-3)


def test_resize_crop_spec_round_trip_and_errors():
    sp = ti.get_space("ten_crops_paper", fraction=0.8)
    again = ti.space_from_specs(sp.spec(), name="again")
    assert again.fingerprint == sp.fingerprint and again.names[0] == "resize_crop_left_top(0.8)"
    assert sp.fingerprint != ti.get_space("ten_crops_paper").fingerprint
    with pytest.raises(ValueError, match="position must be one of"):
        ResizeCrop("middle")
    with pytest.raises(ValueError, match=r"fraction \(crop side / resized side\) must be in \(0, 1\], got 1.5"):
        ResizeCrop("center", 1.5)
    with pytest.raises(TypeError, match="fraction must be a finite number"):
        ResizeCrop("center", "0.875")
    assert ResizeCrop("center", 1.0).apply(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8, 8)


class _BrightnessPredictor(torch.nn.Module):
    """Scores paper12 by each input's own mean brightness (lower = better), so the choice
    changes with the crop it is shown."""

    space = ti.get_space("paper12")

    def forward(self, pixels):
        best = (pixels.mean((1, 2, 3)) * 997).long() % 12
        scores = torch.full((pixels.shape[0], 12), 5.0)
        scores[torch.arange(pixels.shape[0]), best] = 0.0
        scores[torch.arange(pixels.shape[0]), (best + 5) % 12] = 1.0
        return scores


def test_ours_k2_five_crops_selects_per_crop():
    """``Ours k=2 + 5-Crops`` (Table 4): each of the paper's five crops is shown to the
    predictor, its two best candidates are applied to that crop, and the ten views' softmax
    probabilities are averaged -- computed here crop by crop, view by view."""
    from _tiny import tiny_model

    from ttach_instance.evaluation import LABELS, MODEL_CALLS, build_method
    from ttach_instance.normalization import to_model_input

    model, pred = tiny_model(3), _BrightnessPredictor()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    paper12 = ti.get_space("paper12")
    with torch.no_grad():
        out, selection = build_method("ours_k2_five_crops", model, paper12, pred, mean=mean, std=std)(
            to_model_input(pixels, mean, std))
        expected, chosen = torch.zeros(6, 3), set()
        for position in ("left_top", "left_bottom", "right_bottom", "right_top", "center"):
            crop = ResizeCrop(position).apply(pixels)
            for i in range(6):
                best = int((crop[i].mean() * 997).long() % 12)
                for c in (best, (best + 5) % 12):
                    chosen.add((i, c))
                    view = paper12[c].apply(crop[i:i + 1])
                    expected[i] += model(to_model_input(view, mean, std)).softmax(1)[0] / 10
    torch.testing.assert_close(out.exp(), expected, atol=1e-5, rtol=0)
    assert len(chosen) > 12  # the crops changed some image's choice: selection is per crop
    assert selection.index.shape == (6, 5)  # the outer wrapper's choice: every crop
    assert LABELS["ours_k2_five_crops"] == "Ours k=2 + 5-Crops" and MODEL_CALLS["ours_k2_five_crops"] == 10


@pytest.mark.parametrize("method, space", [("hflip_logits", "hflip"), ("five_crops_paper_logits", "five_crops_paper"),
                                           ("ten_crops_logits", "ten_crops"), ("center_crop_paper", "center_crop_paper"),
                                           ("ten_crops_paper", "ten_crops_paper")])
def test_crop_and_logit_rows_against_a_loop(method, space):
    """The logits rows average the views' raw outputs (ttach's merge); the probability rows
    average softmax probabilities (returned as their log)."""
    from _tiny import tiny_model

    from ttach_instance.evaluation import build_method
    from ttach_instance.normalization import to_model_input

    model = tiny_model(3)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    sp = ti.get_space(space)
    with torch.no_grad():
        out = build_method(method, model, ti.get_space("paper12"), mean=mean, std=std)(to_model_input(pixels, mean, std))
        logits = torch.stack([model(to_model_input(c.apply(pixels), mean, std)) for c in sp])
    if method.endswith("_logits"):
        torch.testing.assert_close(out, logits.mean(0), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(out.exp(), logits.softmax(-1).mean(0), atol=1e-5, rtol=0)
