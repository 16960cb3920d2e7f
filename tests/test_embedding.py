"""Mean-embedding TTA (ttach_instance.embedding) against hand-computed embeddings."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torchvision.transforms.v2 import functional as TVF

import ttach_instance as ti
from ttach_instance.embedding import EmbeddingTTAWrapper, LayerFeatures, RandomResizedCropSampler
from ttach_instance.models import small_resnet


def _resnet():
    torch.manual_seed(0)
    model = small_resnet(num_classes=5, width=4).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _pixels(n=3, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Conv(nn.Module):
    """A linear feature extractor (one 3x3 convolution, zero padding): flipping the input flips
    the features computed with the flipped kernel, so flip TTA has a closed form."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(5, generator=g))

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_identity_space_equals_the_plain_embedding():
    model = _resnet()
    x = (_pixels() - 0.45) / 0.226
    mean, std = (0.45,) * 3, (0.226,) * 3
    with torch.no_grad():
        spatial = model.layers(model.stem(x))  # (3, 16, 4, 4)
        plain = spatial.mean((2, 3))
        for layer, capture in (("layers", "output"), ("head", "input")):
            emb = EmbeddingTTAWrapper(model, "identity", layer=layer, capture=capture, mean=mean, std=std)(x)
            torch.testing.assert_close(emb, plain, atol=1e-6, rtol=0)
        logits = EmbeddingTTAWrapper(model, "identity", layer="head", mean=mean, std=std)(x)
        torch.testing.assert_close(logits, model(x), atol=1e-6, rtol=0)
        emb, var = EmbeddingTTAWrapper(model, "identity", layer="layers", return_variance=True, mean=mean, std=std)(x)
        assert torch.equal(var, torch.zeros_like(var))  # one view: no spread


@pytest.mark.parametrize("deaugment", [True, False])
def test_flips_mean_and_variance_equal_the_closed_form_of_a_linear_extractor(deaugment):
    """Over the ``flips`` space (identity, h, v, hv) the conv's pooled features of the views are
    the input's features under the correspondingly flipped kernels; their mean is the features
    under the mean kernel, and the variance is computed from the four by hand."""
    model = Conv().eval()
    x = _pixels(4, 12)
    w, b = model.conv.weight, model.conv.bias
    kernels = [w, w.flip(-1), w.flip(-2), w.flip(-1, -2)]  # flips' order: identity, hflip, vflip, both
    with torch.no_grad():
        views = torch.stack([TF.conv2d(x, k, b, padding=1).mean((2, 3)) for k in kernels], 1)  # (4, 4 views, 5)
        mean_kernel = TF.conv2d(x, sum(kernels) / 4, b, padding=1).mean((2, 3))
        variance = ((views - views.mean(1, keepdim=True)) ** 2).mean(1)
        tta = EmbeddingTTAWrapper(model, "flips", layer="conv", deaugment=deaugment, return_variance=True)
        emb, var = tta(x)
        r = tta.run(x)
    torch.testing.assert_close(emb, mean_kernel, atol=1e-5, rtol=0)
    torch.testing.assert_close(var, variance, atol=1e-5, rtol=0)
    torch.testing.assert_close(r["views"], views, atol=1e-5, rtol=0)
    assert variance.min() > 1e-4  # the views differ: the test can fail
    # the spatial de-augmentation matters before pooling only through which cells are averaged:
    # flips see every cell, so de-augmented or not, the same numbers


def test_topk_views_are_the_loss_guided_wrappers_choice():
    """With a predictor, the views are the ``k`` candidates ``LossGuidedWrapper`` picks; the
    mean embedding is the mean over those candidates, computed here view by view."""

    class Scores(nn.Module):
        space = ti.get_space("flips")

        def forward(self, pixels):  # image i prefers candidates (i % 4, (i + 1) % 4)
            s = torch.full((pixels.shape[0], 4), 9.0)
            for i in range(pixels.shape[0]):
                s[i, i % 4], s[i, (i + 1) % 4] = 0.0, 1.0
            return s

    model = Conv().eval()
    x = _pixels(4, 12)
    flips = ti.get_space("flips")
    with torch.no_grad():
        r = EmbeddingTTAWrapper(model, layer="conv", predictor=Scores(), k=2).run(x)
        expected = []
        for i in range(4):
            chosen = [i % 4, (i + 1) % 4]
            feats = [flips[c].deaugment(model.conv(flips[c].apply(x[i:i + 1])))[0].mean((2, 3)) for c in chosen]
            expected.append(torch.cat(feats).mean(0))
    assert r["selection"].index.tolist() == [[i % 4, (i + 1) % 4] for i in range(4)]
    torch.testing.assert_close(r["mean"], torch.stack(expected), atol=1e-5, rtol=0)


def test_crop_space_averages_cells_over_the_views_that_saw_them():
    """A feature map that is the image itself (layer = an identity module): the de-augmented
    mean over the paper's five crops is, cell by cell, the input where some crop saw it (a
    smooth image comes back within resampling error), pooled over the seen cells."""
    model = nn.Sequential(nn.Identity()).eval()
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 24), indexing="ij")
    x = torch.stack([0.2 + 0.6 * xs, 0.2 + 0.6 * ys, 0.5 + 0.3 * xs * ys])[None]
    tta = EmbeddingTTAWrapper(model, "five_crops_paper", layer="0")
    with torch.no_grad():
        r = tta.run(x)
    torch.testing.assert_close(r["mean"], x.mean((2, 3)), atol=2e-3, rtol=0)
    assert r["views"].shape == (1, 5, 3)
    # each view pooled over its own footprint: the corner crops read their corner's colour
    lt, rb = r["views"][0, 0], r["views"][0, 2]
    assert lt[0] < x[0, 0].mean() < rb[0] and lt[1] < x[0, 1].mean() < rb[1]
    # the centre crop alone sees input pixels 2..22 of 24 (its window: 1.78..23.11 px): the pooled
    # mean is theirs, not diluted by the cells it did not see
    with torch.no_grad():
        centre = EmbeddingTTAWrapper(model, "center_crop_paper", layer="0")(x)
    torch.testing.assert_close(centre, x[..., 2:23, 2:23].mean((2, 3)), atol=2e-3, rtol=0)


def test_sampler_is_reproducible_and_its_views_are_torchvisions():
    x = _pixels(3, 20)
    a, b = RandomResizedCropSampler(4, seed=7), RandomResizedCropSampler(4, seed=7)
    state = torch.get_rng_state()
    va, ta, pa = a.views(x)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched
    vb, tb, pb = b.views(x)
    assert torch.equal(pa, pb) and torch.equal(va, vb) and torch.equal(ta, tb)
    again = a.views(x)[2]
    assert not torch.equal(again, pa)  # every call draws anew
    a.reset()
    assert torch.equal(a.views(x)[2], pa)
    assert not torch.equal(RandomResizedCropSampler(4, seed=8).views(x)[2], pa)
    assert pa.shape == (12, 5) and va.shape == (12, 3, 20, 20)
    assert 0 < pa[:, 4].sum() < 12  # both flipped and unflipped views drawn
    for r, (top, left, h, w, flip) in enumerate(pa.tolist()):
        ref = TVF.resized_crop(x[r // 4], top, left, h, w, [20, 20], antialias=True)
        torch.testing.assert_close(va[r], (ref.flip(-1) if flip else ref).clamp(0, 1), atol=0, rtol=0)
        assert 0.08 * 400 * 0.8 <= h * w <= 400 and 0 <= top <= 20 - h and 0 <= left <= 20 - w


def test_sampled_views_come_back_to_the_input_frame():
    """The sampler's maps (crop, then flip) are the views' maps: a smooth image's views,
    de-augmented, equal the image where each view saw it."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    x = torch.stack([0.2 + 0.6 * xs, 0.2 + 0.6 * ys, 0.3 + 0.4 * xs])[None].expand(2, -1, -1, -1)
    sampler = RandomResizedCropSampler(6, scale=(0.3, 1.0), seed=1)
    views, thetas, params = sampler.views(x)
    back, valid = ti.functional.deaugment_dense(views, thetas)
    src = x.repeat_interleave(6, 0)
    inner = TF.avg_pool2d(valid, 5, 1, 2) > 0.999  # away from each footprint's edge
    assert inner.sum() > 500
    diff = (back - src).abs()[inner.expand_as(back)]
    assert diff.max() < 0.03
    # with the flip ignored the flipped views would come back mirrored, far off
    flipped = params[:, 4].bool()
    assert flipped.any()
    wrong, _ = ti.functional.deaugment_dense(views[flipped].flip(-1), thetas[flipped])
    assert ((wrong - src[flipped]).abs()[inner[flipped].expand_as(wrong)]).max() > 0.1


def test_sampler_wrapper_mean_is_the_mean_of_its_views():
    """Pooled features (``head`` input): the mean embedding of S sampled views is the mean of
    the model's embeddings of exactly those views, drawn again from the same seed."""
    model = _resnet()
    x = _pixels(2, 16)
    mean, std = (0.5,) * 3, (0.25,) * 3
    tta = EmbeddingTTAWrapper(model, RandomResizedCropSampler(5, seed=3), layer="head", capture="input",
                              mean=mean, std=std, return_variance=True)
    with torch.no_grad():
        emb, var = tta((x - 0.5) / 0.25)
        views, _, _ = RandomResizedCropSampler(5, seed=3).views(x)
        per_view = LayerFeatures(model, "head", "input")((views - 0.5) / 0.25).view(2, 5, -1)
    torch.testing.assert_close(emb, per_view.mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, per_view.var(1, unbiased=False), atol=1e-5, rtol=0)
    assert tta.n_views == 5 and tta.space is None


def test_errors_name_the_argument():
    model = _resnet()
    with pytest.raises(ValueError, match=r"layer 'layer' is not a module of SmallResNet; did you mean \['layers'"):
        EmbeddingTTAWrapper(model, "flips", layer="layer")
    with pytest.raises(TypeError, match="layer= is required"):
        EmbeddingTTAWrapper(model, "flips")
    with pytest.raises(ValueError, match="capture must be one of"):
        EmbeddingTTAWrapper(model, "flips", layer="head", capture="grad")
    with pytest.raises(ValueError, match="k= is required with a predictor"):
        EmbeddingTTAWrapper(model, layer="head", predictor=lambda p: p)
    with pytest.raises(ValueError, match="k= needs predictor="):
        EmbeddingTTAWrapper(model, "flips", layer="head", k=2)
    with pytest.raises(ValueError, match="a sampler draws its own views"):
        EmbeddingTTAWrapper(model, RandomResizedCropSampler(2), layer="head", k=1, predictor=lambda p: p)
    with pytest.raises(ValueError, match="n_views must be a positive int"):
        RandomResizedCropSampler(0)
    with pytest.raises(ValueError, match=r"scale must satisfy 0.0 < min <= max <= 1.0"):
        RandomResizedCropSampler(2, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="pixels in"):  # 0-255 input refused like the wrappers do
        EmbeddingTTAWrapper(model, "flips", layer="head", mean=(0,) * 3, std=(1,) * 3)(torch.full((1, 3, 8, 8), 200.0))

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(3, 2, 1), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(RuntimeError, match="layer 'unused' did not run"):
        EmbeddingTTAWrapper(Unused(), "hflip", layer="unused")(torch.rand(1, 3, 4, 4))

    class Tokens(nn.Module):
        def forward(self, x):
            return x.flatten(2)

    with pytest.raises(ValueError, match=r"expected pooled \(C,\) or spatial \(C, h, w\) features"):
        EmbeddingTTAWrapper(nn.Sequential(Tokens()), "hflip", layer="0")(torch.rand(1, 3, 4, 4))
