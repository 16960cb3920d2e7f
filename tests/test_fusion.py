"""Learned fusion weights and the fitted temperature of the weighted merge (ttach_instance.fusion),
checked against hand-built cases, brute-force optima and hand-computed fused outputs."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from _tiny import TinyPredictor, tiny_model
from ttach_instance.fusion import (FusionWeights, collect_views, fit_fusion, fit_weighted_temperature, fitted_temperature,
                                   fusion_nll, load_fusion, store_temperature, weighted_merge_nll)
from ttach_instance.io import atomic_save_tensors
from ttach_instance.merge import merge_outputs
from ttach_instance.predictors import load_predictor
from ttach_instance.registry import get_space
from ttach_instance.wrappers import (FullSpaceWrapper, LossGuidedWrapper, SegmentationTTAWrapper, _RandomK)

FLIPS = get_space("flips")  # identity, hflip, vflip, hflip+vflip: the recipe's views


def hand_built(n=100, classes=3, seed=0):
    """Per-view logits (n, 4, classes) for the flips space: views 0 and 1 identical (equal
    candidates), view 2 another informative view, view 3 view 0 with its classes swapped
    (class c gets what class c+1 had: a deliberately harmful candidate)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)

    def informative():
        logits = torch.randn(n, classes, generator=g)
        logits[torch.arange(n), y] += 1.5
        return logits

    a, b = informative(), informative()
    swapped = a[:, (torch.arange(classes) + 1) % classes]
    return torch.stack([a, a, b, swapped], 1), y


# ---------------------------------------------------------------------- fitting


def test_fit_down_weights_a_class_swapping_view_and_keeps_equal_views_equal():
    outputs, y = hand_built()
    fusion = fit_fusion(outputs, y, FLIPS)  # the recipe: Adam, lr 0.01, 5 epochs, 100 images, batch 1
    w = fusion.view_weights()
    assert w.shape == (4,) and float(w.sum()) == pytest.approx(1.0)
    assert float(w[3]) < 0.03  # the harmful view: from 1/4 to near zero
    assert torch.equal(w[0], w[1])  # equal candidates stay equal
    assert float(w[2]) > 0.15  # the other informative view keeps a real share
    info = fusion.fit_info
    assert info["steps"] == 500 and info["images"] == 100
    assert info["fitted"]["nll"] < info["uniform"]["nll"] - 0.1
    # the recorded NLL is the NLL of the fused probabilities, computed here by hand
    p = outputs.softmax(2)
    fused = (w[None, :, None] * p).sum(1)
    assert info["fitted"]["nll"] == pytest.approx(float(-fused[torch.arange(100), y].log().mean()), rel=1e-5)

    per_class = fit_fusion(outputs, y, FLIPS, per_class=True)
    wc = per_class.view_weights()
    assert wc.shape == (4, 3) and torch.allclose(wc.sum(0), torch.ones(3))
    assert float(wc[3].max()) < 0.06 and torch.equal(wc[0], wc[1])
    assert per_class.fit_info["fitted"]["nll"] < per_class.fit_info["uniform"]["nll"] - 0.1


def test_fit_minimises_the_nll_of_the_fused_probabilities_brute_force():
    # Two views, each right on its own half of the images: the NLL of a * p0 + (1 - a) * p1 has an
    # interior optimum, found here on a fine grid of a; minimising a cross-entropy of the fused
    # probabilities read as logits (the original recipe's loss) lands elsewhere.
    g = torch.Generator().manual_seed(3)
    n, classes = 60, 4
    y = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, 2, classes, generator=g)
    logits[torch.arange(n // 3), 0, y[:n // 3]] += 3.0  # view 0 confident and right on a third
    logits[torch.arange(n // 3, n), 1, y[n // 3:]] += 1.0  # view 1 mildly right on the rest
    space = get_space("hflip")
    fusion = fit_fusion(logits, y, space, epochs=400, lr=0.05, batch_size=n)
    p = logits.double().softmax(2)[torch.arange(n), :, y]  # (n, 2) probability of the target per view
    grid = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    nll = -(grid[:, None] * p[None, :, 0] + (1 - grid[:, None]) * p[None, :, 1]).log().mean(1)
    best = float(grid[nll.argmin()])
    assert 0.05 < best < 0.95  # interior: the test means something
    assert float(fusion.view_weights()[0]) == pytest.approx(best, abs=2e-3)
    ce_as_logits = nn.functional.cross_entropy((grid[:, None, None] * logits.double().softmax(2)[None, :, 0]
                                                + (1 - grid[:, None, None]) * logits.double().softmax(2)[None, :, 1])
                                               .flatten(0, 1), y.repeat(len(grid)), reduction="none").view(len(grid), n)
    assert abs(float(grid[ce_as_logits.mean(1).argmin()]) - best) > 0.05


def test_fit_validates_its_inputs():
    outputs, y = hand_built(n=8)
    with pytest.raises(ValueError, match=r"one view per candidate of space 'hflip' \(2\), got 4"):
        fit_fusion(outputs, y, get_space("hflip"))
    with pytest.raises(ValueError, match=r"targets must be an integer tensor of shape \(8,\)"):
        fit_fusion(outputs, y[:5], FLIPS)
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\]"):
        fit_fusion(outputs, y + 3, FLIPS)
    with pytest.raises(ValueError, match="lr must be a positive"):
        fit_fusion(outputs, y, FLIPS, lr=0)
    with pytest.raises(ValueError, match="per_class=True needs num_classes"):
        FusionWeights(FLIPS, per_class=True)


# ---------------------------------------------------------------------- the fused output


def random_weights(fusion, seed=0):
    with torch.no_grad():
        fusion.weight.copy_(torch.randn(fusion.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return fusion


def test_dense_fusion_with_validity_is_merge_outputs_weighted_merge():
    g = torch.Generator().manual_seed(1)
    outputs = torch.randn(2, 4, 3, 5, 6, generator=g)
    validity = (torch.rand(2, 4, 1, 5, 6, generator=g) > 0.4).float()
    validity[0, :, :, 0, 0] = 0  # a pixel no view saw: the view weights alone
    fusion = random_weights(FusionWeights(FLIPS))
    a = fusion.view_weights()
    expected = merge_outputs(outputs, "weighted", losses=-a.log().expand(2, 4), weights=validity, merge_space="probs")
    got = fusion(outputs, validity)
    assert torch.allclose(got, expected, atol=1e-6)
    p = outputs.softmax(2)
    assert torch.allclose(got[0, :, 0, 0].exp(), (a[:, None] * p[0, :, :, 0, 0]).sum(0), atol=1e-6)
    # one pixel by hand: the views that saw it, weighted by a and renormalised
    seen = validity[1, :, 0, 2, 3]
    hand = (a * seen)[:, None] * p[1, :, :, 2, 3]
    assert torch.allclose(got[1, :, 2, 3].exp(), hand.sum(0) / (a * seen).sum(), atol=1e-6)


def test_per_class_fusion_by_hand_with_validity():
    g = torch.Generator().manual_seed(2)
    outputs = torch.randn(1, 4, 3, 2, 2, generator=g)
    validity = torch.ones(1, 4, 1, 2, 2)
    validity[0, 3, 0, 1, 1] = 0
    fusion = random_weights(FusionWeights(FLIPS, num_classes=3, per_class=True), seed=4)
    a = fusion.view_weights().detach()  # (4, 3)
    got = fusion(outputs, validity).exp()
    p = outputs.softmax(2)
    for i in range(2):
        for j in range(2):
            fused = []
            for c in range(3):
                num = sum(float(a[t, c] * validity[0, t, 0, i, j] * p[0, t, c, i, j]) for t in range(4))
                den = sum(float(a[t, c] * validity[0, t, 0, i, j]) for t in range(4))
                fused.append(num / den)
            fused = torch.tensor(fused)
            assert torch.allclose(got[0, :, i, j], fused / fused.sum(), atol=1e-6)


def conv_model(classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, classes, 3, padding=1)).eval()


def test_segmentation_wrapper_fuses_de_augmented_views_like_a_hand_loop():
    model = conv_model()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fusion = random_weights(FusionWeights(FLIPS, num_classes=3))
    wrapper = SegmentationTTAWrapper(model, "flips", fusion=fusion, mean=(0.0,), std=(1.0,))
    with torch.no_grad():
        got = wrapper(x)
        dims = [(), (-1,), (-2,), (-1, -2)]  # each view's flips, undone on its output
        probs = [(model(x.flip(d)).flip(d) if d else model(x)).softmax(1) for d in dims]
    a = fusion.view_weights()
    expected = sum(a[t] * probs[t] for t in range(4)).log()
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, SegmentationTTAWrapper(model, "flips", mean=(0.0,), std=(1.0,))(x), atol=1e-3)


def test_segmentation_fusion_with_validity_matches_the_uniform_merge_at_zero_weights():
    model = conv_model()
    space = get_space("paper12").subset(["identity", "rotate(-20)", "rotate(20)", "zoom(1.2)"])
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    kw = dict(mean=(0.0,), std=(1.0,), coverage="zero")
    with torch.no_grad():
        plain = SegmentationTTAWrapper(model, space, **kw)
        run = plain.run(x)
        assert float(run["validity"].min()) == 0  # rotations leave pixels unseen: the validity matters
        uniform = SegmentationTTAWrapper(model, space, fusion=FusionWeights(space), **kw)(x)
        assert torch.allclose(uniform, run["output"], atol=1e-6)
        fusion = random_weights(FusionWeights(space), seed=5)
        fused = SegmentationTTAWrapper(model, space, fusion=fusion, **kw)(x)
    a = fusion.view_weights()
    expected = merge_outputs(run["views"], "weighted", losses=-a.log().expand(2, 4), weights=run["validity"],
                             merge_space="probs")
    assert torch.allclose(fused, expected, atol=1e-6)


def test_segmentation_fit_on_dense_outputs_with_validity_and_ignored_pixels():
    g = torch.Generator().manual_seed(6)
    n, classes, h, w = 100, 2, 6, 6
    y = torch.randint(0, classes, (n, h, w), generator=g)
    good = torch.randn(n, classes, h, w, generator=g)
    good.scatter_add_(1, y[:, None], torch.full((n, 1, h, w), 2.0))
    other = torch.randn(n, classes, h, w, generator=g)
    other.scatter_add_(1, y[:, None], torch.full((n, 1, h, w), 1.0))
    outputs = torch.stack([good, other, good, good.flip(1)], 1)  # view 3 swaps the two classes
    validity = torch.ones(n, 4, 1, h, w)
    validity[:, 3, :, :, :3] = 0  # the harmful view saw half of each image
    y[:, 0, 0] = 255
    fusion = fit_fusion(outputs, y, FLIPS, validity=validity, ignore_index=255)
    wv = fusion.view_weights()
    assert float(wv[3]) < 0.05 and torch.equal(wv[0], wv[2])
    # the NLL counts labelled pixels only, with the validity folded in
    stats = fusion_nll(fusion, outputs, y, validity, ignore_index=255)
    fused = fusion.fuse(outputs, validity)
    keep = y != 255
    picked = fused.gather(1, torch.where(keep, y, 0)[:, None])[:, 0]
    assert stats["nll"] == pytest.approx(float(-picked.log()[keep].mean()), rel=1e-5)
    assert stats == fusion.fit_info["fitted"] and stats["nll"] < fusion.fit_info["uniform"]["nll"] - 0.1


# ---------------------------------------------------------------------- files and wrappers


def test_round_trip_and_wrapper_from_a_file(tmp_path):
    outputs, y = hand_built(n=20)
    for per_class in (False, True):
        fusion = fit_fusion(outputs, y, FLIPS, per_class=per_class, epochs=1)
        path = str(tmp_path / f"f{per_class}.safetensors")
        fusion.save(path)
        back = load_fusion(path)
        assert torch.equal(back.weight, fusion.weight) and back.per_class == per_class and back.num_classes == 3
        assert back.space == FLIPS and back.fit_info == json.loads(json.dumps(fusion.fit_info))
    model = tiny_model(3)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        from_file = FullSpaceWrapper(model, "flips", fusion=path, mean=(0.0,), std=(1.0,))(x)
        from_module = FullSpaceWrapper(model, "flips", fusion=fusion, mean=(0.0,), std=(1.0,))(x)
        views = torch.stack([model(x), model(x.flip(-1)), model(x.flip(-2)), model(x.flip(-1).flip(-2))], 1)
    assert torch.equal(from_file, from_module)
    a = fusion.view_weights()
    hand = (a[None] * views.softmax(2)).sum(1)
    assert torch.allclose(from_file.exp(), hand / hand.sum(1, keepdim=True), atol=1e-6)


def test_files_of_another_space_shape_kind_or_version_are_refused(tmp_path):
    fusion = random_weights(FusionWeights(FLIPS, num_classes=3))
    path = str(tmp_path / "flips.safetensors")
    fusion.save(path)
    with pytest.raises(ValueError, match=r"flips\.safetensors.*fitted for space 'flips' \(4 candidates.*fingerprint "
                                         r"71277f0120f59441\); expected space 'd4' \(8 candidates"):
        load_fusion(path, space="d4")
    with pytest.raises(ValueError, match=r"flips\.safetensors.*fitted for space 'flips'.*expected space 'd4'"):
        FullSpaceWrapper(tiny_model(), "d4", fusion=path)
    with pytest.raises(ValueError, match=r"flips\.safetensors' were fitted for 3 classes; expected 5"):
        load_fusion(path, num_classes=5)
    with pytest.raises(ValueError, match=r"fitted for 3 classes, the outputs have 5"):
        FullSpaceWrapper(tiny_model(5), "flips", fusion=path, mean=(0.0,), std=(1.0,))(torch.rand(1, 3, 8, 8))
    meta = fusion.metadata()
    bad = str(tmp_path / "shape.safetensors")
    atomic_save_tensors(bad, {"weight": torch.zeros(3)}, meta)
    with pytest.raises(ValueError, match=r"shape\.safetensors.*expected one float tensor 'weight' of shape \(4,\).*"
                                         r"found \{'weight': \('float32', \(3,\)\)\}"):
        load_fusion(bad)
    atomic_save_tensors(bad, {"weight": torch.zeros(4)}, dict(meta, format_version=0))
    with pytest.raises(ValueError, match=r"format version 0; this ttach-instance reads version 1"):
        load_fusion(bad)
    atomic_save_tensors(bad, {"weight": torch.zeros(4)}, dict(meta, kind="ttach_instance.loss_predictor"))
    with pytest.raises(ValueError, match="is not a ttach-instance fusion weights file"):
        load_fusion(bad)
    atomic_save_tensors(bad, {"weight": torch.tensor([0.0, math.nan, 0, 0])}, meta)
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_fusion(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_fusion(str(tmp_path / "missing.safetensors"))


def test_wrappers_that_choose_views_or_add_flips_refuse_fusion():
    fusion = FusionWeights(FLIPS)
    with pytest.raises(ValueError, match=r"fusion= weighs every candidate of a fixed space, but _RandomK chooses 2 of 4"):
        _RandomK(tiny_model(), FLIPS, 2, fusion=fusion)
    with pytest.raises(ValueError, match="flip=True adds views"):
        FullSpaceWrapper(tiny_model(), FLIPS, flip=True, fusion=fusion)
    with pytest.raises(ValueError, match="leave merge_mode and merge_space at 'mean' and 'probs'"):
        FullSpaceWrapper(tiny_model(), FLIPS, merge_space="logits", fusion=fusion)
    with pytest.raises(ValueError, match=r"fitted for space 'flips'.*runs space 'hflip'"):
        FullSpaceWrapper(tiny_model(), "hflip", fusion=fusion)
    with pytest.raises(TypeError, match="fusion must be FusionWeights or the path"):
        FullSpaceWrapper(tiny_model(), FLIPS, fusion=torch.zeros(4))


# ---------------------------------------------------------------------- the weighted merge's temperature


def temperature_case(n=300, k=3, classes=5, seed=0):
    """Views whose lower predicted loss is more often, not always, the better view: the NLL of
    the weighted merge has an interior optimum in the temperature."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    quality = torch.randn(n, k, generator=g)
    logits = torch.randn(n, k, classes, generator=g)
    logits[torch.arange(n)[:, None], torch.arange(k)[None], y[:, None]] += 2 * quality
    losses = -quality + 0.8 * torch.randn(n, k, generator=g)
    return logits, losses, y


def brute_nll(logits, losses, y, t):
    """-mean log sum_j softmax(-losses / t)_j p_j(y), written out (float64)."""
    w = torch.softmax(-losses.double() / t, 1)
    p = logits.double().softmax(2)[torch.arange(len(y)), :, y]
    return float(-(w * p).sum(1).log().mean())


def test_fitted_temperature_matches_a_brute_force_grid_optimum():
    logits, losses, y = temperature_case()
    t, info = fit_weighted_temperature(logits, losses, y)
    grid = np.exp(np.linspace(np.log(1e-3), np.log(1e3), 8001))
    values = [brute_nll(logits, losses, y, g) for g in grid]
    best = float(grid[int(np.argmin(values))])
    assert 0.05 < best < 20 and not info["at_bound"]  # interior optimum: the test means something
    assert math.log(t) == pytest.approx(math.log(best), abs=2e-3)
    assert info["nll"] == pytest.approx(min(values), abs=1e-7)
    assert info["nll"] == pytest.approx(brute_nll(logits, losses, y, t), abs=1e-9)
    assert info["nll_at_1"] == pytest.approx(brute_nll(logits, losses, y, 1.0), abs=1e-9)
    assert info["nll"] < info["nll_at_1"] and info["nll"] < info["nll_mean"]


def test_temperature_objective_with_dense_validity():
    g = torch.Generator().manual_seed(4)
    views = torch.randn(3, 2, 2, 4, 4, generator=g)
    losses = torch.randn(3, 2, generator=g)
    validity = (torch.rand(3, 2, 1, 4, 4, generator=g) > 0.3).float()
    y = torch.randint(0, 2, (3, 4, 4), generator=g)
    y[0, 0, 0] = 255
    got = weighted_merge_nll(views, losses, y, 0.7, validity, ignore_index=255)
    w = torch.softmax(-losses / 0.7, 1)[:, :, None, None, None] * validity
    covered = w.sum(1) > 0
    p = views.softmax(2)
    fused = torch.where(covered, (w * p).sum(1) / w.sum(1).clamp_min(1e-30),
                        (torch.softmax(-losses / 0.7, 1)[:, :, None, None, None] * p).sum(1))
    keep = y != 255
    picked = fused.gather(1, torch.where(keep, y, 0)[:, None])[:, 0]
    assert got == pytest.approx(float(-picked.log()[keep].mean()), rel=1e-5)
    t, info = fit_weighted_temperature(views, losses, y, validity, ignore_index=255)
    assert info["nll"] <= got + 1e-9
    with pytest.raises(ValueError, match="k >= 2 views"):
        fit_weighted_temperature(views[:, :1], losses[:, :1], y)
    with pytest.raises(ValueError, match="equal within every row"):
        fit_weighted_temperature(views, torch.zeros(3, 2), y, ignore_index=255)


def test_fitted_temperature_is_saved_with_the_predictor_and_used_by_the_wrapper(tmp_path):
    predictor = TinyPredictor(12).eval()
    model = tiny_model(3)
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(1))
    collector = LossGuidedWrapper(model, predictor, k=2, merge_mode="weighted", mean=(0.0,), std=(1.0,))
    got = collect_views(collector, [x[:4], x[4:]])
    scores = predictor(x)
    assert torch.equal(got["losses"], scores.gather(1, got["index"]))  # the chosen views' predicted losses
    t, info = fit_weighted_temperature(got["views"], got["losses"], y)
    store_temperature(predictor, t, info, k=2)
    path = str(tmp_path / "p.safetensors")
    predictor.save(path)
    back = load_predictor(path)
    assert back.merge_temperatures == predictor.merge_temperatures and fitted_temperature(back, 2) == pytest.approx(t)
    assert fitted_temperature(back, 3) is None and fitted_temperature(back, 2, flip=True) is None
    kw = dict(merge_mode="weighted", mean=(0.0,), std=(1.0,))
    fitted = LossGuidedWrapper(model, back, k=2, **kw)
    assert fitted.temperature == pytest.approx(t) and fitted.temperature_source == "fitted"
    with torch.no_grad():
        out = fitted(x)
        assert torch.equal(out, LossGuidedWrapper(model, back, k=2, temperature=t, **kw)(x))
        assert not torch.allclose(out, LossGuidedWrapper(model, back, k=2, temperature=1.0, **kw)(x), atol=1e-4)
    other = LossGuidedWrapper(model, back, k=3, **kw)
    assert other.temperature == 1.0 and other.temperature_source == "default"
    assert LossGuidedWrapper(model, back, k=2, temperature=0.5, **kw).temperature_source == "argument"


def test_checkpoint_temperatures_are_validated(tmp_path):
    predictor = TinyPredictor(12)
    predictor.merge_temperatures = [{"k": 2, "flip": False, "merge_space": "probs", "temperature": 0.3,
                                     "objective": "nll", "images": 10, "nll": 0.9, "nll_at_1": 1.0}]
    path = str(tmp_path / "p.safetensors")
    predictor.save(path)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cases = [([dict(meta["merge_temperatures"][0], temperature=-1.0)], r"merge_temperatures\[0\]\.temperature"),
             ([dict(meta["merge_temperatures"][0], k=13)], r"merge_temperatures\[0\]\.k must be at most the space's 12"),
             ([dict(meta["merge_temperatures"][0], extra=1)], r"merge_temperatures\[0\] must be an object with the keys"),
             ([dict(meta["merge_temperatures"][0], merge_space="cubes")], "merge_space one of"),
             (meta["merge_temperatures"] * 2, "repeats the setting k=2"), ("hot", "must be null or a list")]
    for value, message in cases:
        atomic_save_tensors(path, tensors, dict(meta, merge_temperatures=value))
        with pytest.raises(ValueError, match=r"p\.safetensors.*" + message):
            load_predictor(path)
    old = dict(meta)
    del old["merge_temperatures"]  # a format-2 checkpoint saved before temperatures were recorded
    atomic_save_tensors(path, tensors, old)
    assert load_predictor(path).merge_temperatures == []


def test_fusion_files_and_predictor_checkpoints_rebuild_their_space_alike(tmp_path):
    """load_fusion and load_predictor rebuild the recorded space through one function
    (registry.space_from_record): its parameters are used, an absent ``space_params`` is the
    name alone, and a space the registry cannot build is refused with the same words."""
    crops = get_space("five_crops:crop_size=0.75")
    fusion = random_weights(FusionWeights(crops, num_classes=3))
    predictor = TinyPredictor(crops)
    paths = {"fusion": str(tmp_path / "fusion.safetensors"), "predictor": str(tmp_path / "predictor.safetensors")}
    fusion.save(paths["fusion"])
    predictor.save(paths["predictor"])
    loaders = {"fusion": load_fusion, "predictor": load_predictor}
    for kind, path in paths.items():
        back = loaders[kind](path)
        assert back.space.fingerprint == crops.fingerprint and back.space.params == {"crop_size": 0.75}
    messages = {}
    for kind, path in paths.items():
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        flips = dict(meta, space="flips", space_fingerprint=FLIPS.fingerprint)
        del flips["space_params"]  # the name alone
        atomic_save_tensors(path, tensors, dict(meta, space_params={"crop_size": "big"}))
        with pytest.raises(ValueError) as exc:
            loaders[kind](path)
        messages[kind] = str(exc.value).replace(repr(path), "FILE").split(": ", 1)[1]
        assert "cannot rebuild its space 'five_crops' with parameters {'crop_size': 'big'}" in messages[kind]
        assert messages[kind].endswith("; pass space=")
        atomic_save_tensors(path, tensors, flips)
        with pytest.raises(ValueError, match=r"of shape \(4,\) \(space 'flips'|expected \(4, 24\)"):
            loaders[kind](path)  # flips is rebuilt (its 4 candidates), then the 5 crops' tensors do not fit it
    assert messages["fusion"] == messages["predictor"]


def test_flip_averaged_predictors_and_ensembles_pass_on_a_fitted_temperature_by_rule():
    """FlipAveragedPredictor passes on its member's temperatures; PredictorEnsemble only those
    every member records with the same temperature; the wrappers use them as the predictor's."""
    from ttach_instance.predictors import FlipAveragedPredictor, PredictorEnsemble

    def entry(k, t, flip=False):
        return {"k": k, "flip": flip, "merge_space": "probs", "temperature": t, "objective": "nll", "images": 10,
                "nll": 0.5, "nll_at_1": 0.6}

    model = tiny_model(3)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(merge_mode="weighted", mean=(0.0,), std=(1.0,))
    a, b, c = TinyPredictor(12).eval(), TinyPredictor(12).eval(), TinyPredictor(12).eval()
    a.merge_temperatures = [entry(2, 0.3), entry(3, 0.7), entry(2, 0.4, flip=True)]
    b.merge_temperatures = [entry(2, 0.3), entry(3, 0.9)]  # agrees with a on k=2 only
    flipped = FlipAveragedPredictor(a)
    assert flipped.merge_temperatures == a.merge_temperatures
    wrapper = LossGuidedWrapper(model, flipped, k=2, **kw)
    assert wrapper.temperature == 0.3 and wrapper.temperature_source == "fitted"
    with torch.no_grad():
        assert torch.equal(wrapper(x), LossGuidedWrapper(model, flipped, k=2, temperature=0.3, **kw)(x))
    assert LossGuidedWrapper(model, flipped, k=2, flip=True, **kw).temperature == 0.4
    assert PredictorEnsemble([a, a]).merge_temperatures == a.merge_temperatures
    both = PredictorEnsemble([a, b])
    assert both.merge_temperatures == [entry(2, 0.3)]
    assert LossGuidedWrapper(model, both, k=2, **kw).temperature_source == "fitted"
    disagree = LossGuidedWrapper(model, both, k=3, **kw)
    assert (disagree.temperature, disagree.temperature_source) == (1.0, "default")
    assert PredictorEnsemble([a, c]).merge_temperatures == []  # c records none
    assert PredictorEnsemble([FlipAveragedPredictor(b), b]).merge_temperatures == b.merge_temperatures
    with pytest.raises(AttributeError, match="store the temperature with its member"):
        store_temperature(flipped, 0.5, {"merge_space": "probs", "k": 2, "objective": "nll", "images": 1, "nll": 0.1,
                                         "nll_at_1": 0.2}, k=2)
