import math
import os

import pytest
import torch
import ttach
from torch import nn

import ttach_instance
from ttach_instance.merge import merge_outputs
from ttach_instance.normalization import resolve_mean_std, to_model_input, to_pixels
from ttach_instance.registry import get_space
from ttach_instance.evaluation import OracleKWrapper
from ttach_instance.wrappers import FullSpaceWrapper, LossGuidedWrapper, RandomKWrapper, Selection

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PAPER12 = get_space("paper12")


class Net(nn.Module):
    """A small deterministic classifier; optional ``mean``/``std`` attributes and output shapes."""

    def __init__(self, classes=5, mean=None, std=None, out="logits"):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(16, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if mean is not None:
            self.mean, self.std = mean, std
        self.out = out

    def forward(self, x, scale=1.0):
        h = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        y = self.fc(h) * scale
        if self.out == "vector":
            return y[:, 0]
        if self.out == "dict":
            return {"logits": y, "aux": y.sum(1)}
        if self.out == "probs":
            return y.softmax(1)
        return y


class FixedPredictor(nn.Module):
    """Returns given per-sample scores (B, T); records what it was called with."""

    def __init__(self, space, scores):
        super().__init__()
        self.space = space
        self.scores = torch.as_tensor(scores, dtype=torch.float32)
        self.seen = []

    def forward(self, pixels):
        self.seen.append((pixels.clone(), torch.is_grad_enabled()))
        return self.scores[: pixels.shape[0]].clone()


def scores_for(choices, t=12):
    """Scores whose top-k order is ``choices`` per sample (first = lowest)."""
    s = torch.full((len(choices), t), 10.0)
    for i, row in enumerate(choices):
        for rank, c in enumerate(row):
            s[i, c] = float(rank)
    return s


def images(b=3, size=16, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Recorder:
    def __init__(self, module):
        self.inputs = []
        self.handle = module.register_forward_hook(lambda m, i, o: self.inputs.append(i[0].detach().clone()))

    @property
    def calls(self):
        return len(self.inputs)


def view_input(space, pixels_i, c, mean=None, std=None):
    cand = space.candidates[c]
    return to_model_input(cand.apply(pixels_i), mean, std)


# --------------------------------------------------------------------------- grouping and merge


def test_grouping_order_matches_a_per_sample_loop():
    model = Net()
    x = images(3)
    choices = [[5, 0, 9], [1, 3, 11], [5, 9, 0]]
    wrapper = LossGuidedWrapper(model, FixedPredictor(PAPER12, scores_for(choices)), k=3, return_selection=True)
    rec = Recorder(model)
    out, sel = wrapper(x)
    assert sel.index.tolist() == choices
    batch = torch.cat(rec.inputs)
    assert batch.shape == (9, 3, 16, 16) and rec.calls == 3  # k calls of B rows
    expected_outputs = torch.zeros(3, 3, 5)
    for i in range(3):
        for j, c in enumerate(choices[i]):
            v = view_input(PAPER12, x[i:i + 1], c)
            assert torch.allclose(batch[j * 3 + i], v[0], atol=1e-6), (i, j)  # call j holds every sample's j-th view
            expected_outputs[i, j] = model(v)[0]
    # the default merge: the mean of the views' softmax probabilities, returned as its logarithm
    assert torch.allclose(out, expected_outputs.softmax(-1).mean(1).log(), atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "max", "min", "sum", "gmean", "tsharpen"])
def test_merge_modes_over_the_chosen_views(mode):
    model = Net(out="probs")
    x = images(2)
    choices = [[3, 7], [10, 0]]
    wrapper = LossGuidedWrapper(model, FixedPredictor(PAPER12, scores_for(choices)), k=2, merge_mode=mode,
                                merge_space="logits")
    per_view = torch.stack([torch.cat([model(view_input(PAPER12, x[i:i + 1], c)) for c in choices[i]])
                            for i in range(2)])
    assert torch.allclose(wrapper(x), merge_outputs(per_view, mode), atol=1e-6)


def test_weighted_merge_hand_computed_softmax():
    model = Net()
    x = images(1)
    scores = torch.full((1, 12), 5.0)
    scores[0, 4], scores[0, 8] = 0.2, 0.7
    out = LossGuidedWrapper(model, FixedPredictor(PAPER12, scores), k=2, merge_mode="weighted", temperature=0.5,
                            merge_space="logits")(x)
    w4 = math.exp(-0.2 / 0.5) / (math.exp(-0.2 / 0.5) + math.exp(-0.7 / 0.5))
    a, b = model(view_input(PAPER12, x, 4)), model(view_input(PAPER12, x, 8))
    assert torch.allclose(out, w4 * a + (1 - w4) * b, atol=1e-6)
    probs = LossGuidedWrapper(model, FixedPredictor(PAPER12, scores), k=2, merge_mode="weighted", temperature=0.5)(x)
    assert torch.allclose(probs, (w4 * a.softmax(1) + (1 - w4) * b.softmax(1)).log(), atol=1e-6)


def test_deterministic_and_no_forced_no_grad():
    model = Net()
    predictor = FixedPredictor(PAPER12, scores_for([[2, 6], [11, 1]]))
    wrapper = LossGuidedWrapper(model, predictor, k=2)
    x = images(2).requires_grad_()
    a, b = wrapper(x), wrapper(x)
    assert torch.equal(a, b)
    assert a.requires_grad  # the model branch keeps the caller's gradient ...
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert predictor.seen[0][1] is False  # ... the predictor ran without one
    with torch.no_grad():
        assert not wrapper(x).requires_grad


# --------------------------------------------------------------------------- outputs and inputs


def test_same_output_shape_vector_and_dict_outputs():
    x = images(4)
    predictor = FixedPredictor(PAPER12, scores_for([[1, 2]] * 4))
    vec = Net(out="vector")
    out = LossGuidedWrapper(vec, predictor, k=2, merge_space="logits")(x)
    assert out.shape == vec(x).shape == (4,)
    with pytest.raises(ValueError, match="merge_space 'probs' needs outputs"):
        LossGuidedWrapper(vec, predictor, k=2)(x)  # no class dim to take a softmax over
    d = Net(out="dict")
    out = LossGuidedWrapper(d, predictor, k=2, output_label_key="logits")(x)
    assert set(out) == {"logits"} and out["logits"].shape == (4, 5)
    with pytest.raises(TypeError, match="output_label_key="):
        LossGuidedWrapper(d, predictor, k=2)(x)
    with pytest.raises(KeyError, match="'nope' is not among the model's outputs"):
        LossGuidedWrapper(d, predictor, k=2, output_label_key="nope")(x)


def test_extra_args_are_forwarded():
    model = Net()
    x = images(2)
    predictor = FixedPredictor(PAPER12, scores_for([[0], [0]]))
    assert torch.equal(LossGuidedWrapper(model, predictor, merge_space="logits")(x, 3.0), model(x, 3.0))


def test_k1_identity_is_the_model_exactly_with_normalisation():
    model = Net(mean=MEAN, std=STD)  # attributes: the wrapper resolves them
    x = (images(3) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    predictor = FixedPredictor(PAPER12, scores_for([[0]] * 3))
    wrapper = LossGuidedWrapper(model, predictor, merge_space="logits")
    assert wrapper.mean == MEAN and wrapper.std == STD
    rec = Recorder(model)
    out = wrapper(x)
    assert rec.inputs[0].data_ptr() != 0 and torch.equal(rec.inputs[0], x)  # no round trip
    assert torch.equal(out, model(x))
    # The predictor saw pixels, not the normalised input.
    assert torch.allclose(predictor.seen[0][0], x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1))


def test_normalisation_round_trip_for_a_non_identity_view():
    model = Net(mean=MEAN, std=STD)
    pixels = images(2)
    x = to_model_input(pixels, MEAN, STD)
    rec = Recorder(model)
    LossGuidedWrapper(model, FixedPredictor(PAPER12, scores_for([[10], [10]])))(x)
    expected = to_model_input(PAPER12.candidates[10].apply(pixels), MEAN, STD)
    assert torch.allclose(rec.inputs[0], expected, atol=1e-5)


def test_resolve_mean_std_precedence():
    plain = nn.Conv2d(3, 3, 1)
    assert resolve_mean_std(plain) == (None, None)  # no ImageNet default for a plain module
    assert resolve_mean_std(Net(mean=MEAN, std=STD)) == (MEAN, STD)
    assert resolve_mean_std(Net(mean=MEAN, std=STD), mean=0.5, std=0.25) == ((0.5,), (0.25,))
    timm_like = nn.Conv2d(3, 3, 1)
    timm_like.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, 8, 8)}
    assert resolve_mean_std(timm_like) == ((0.5,) * 3, (0.5,) * 3)
    assert resolve_mean_std(nn.DataParallel(Net(mean=MEAN, std=STD))) == (MEAN, STD)
    with pytest.raises(ValueError, match="together"):
        resolve_mean_std(plain, mean=MEAN)
    with pytest.raises(ValueError, match="std must be positive"):
        resolve_mean_std(plain, mean=MEAN, std=(1.0, 0.0, 1.0))


def test_to_pixels_and_back():
    x = torch.randn(2, 3, 4, 4)
    assert to_pixels(x, None, None) is x and to_model_input(x, None, None) is x
    back = to_model_input(to_pixels(x, MEAN, STD), MEAN, STD)
    assert torch.allclose(back, x, atol=1e-6)
    with pytest.raises(ValueError, match="2 values but the images have 3 channels"):
        to_pixels(x, (0.1, 0.2), (1.0, 1.0))


def test_flip_is_the_mean_of_view_and_flipped_view():
    model = Net()
    x = images(2)
    choices = [[11], [6]]
    out, sel = LossGuidedWrapper(model, FixedPredictor(PAPER12, scores_for(choices)), flip=True,
                                 return_selection=True, merge_space="logits")(x)
    assert sel.flip
    for i in range(2):
        v = view_input(PAPER12, x[i:i + 1], choices[i][0])
        assert torch.allclose(out[i], ((model(v) + model(v.flip(-1))) / 2)[0], atol=1e-6)


def test_chunk_size_changes_calls_not_results():
    model = Net()
    x = images(4)
    predictor = FixedPredictor(PAPER12, scores_for([[1, 4], [4, 1], [0, 11], [7, 3]]))
    results = {}
    for chunk, calls in ((None, 2), (1, 8), (3, 3), (100, 1)):
        rec = Recorder(model)
        results[chunk] = LossGuidedWrapper(model, predictor, k=2, chunk_size=chunk)(x)
        rec.handle.remove()
        assert rec.calls == calls, chunk
    for out in results.values():
        assert torch.allclose(out, results[None], atol=1e-6)
    rec = Recorder(model)
    LossGuidedWrapper(model, predictor, k=2, flip=True)(x)
    assert rec.calls == 4


# --------------------------------------------------------------------------- baselines


def test_random_k_reproducible_with_seed():
    model = Net()
    x = images(6)
    a = RandomKWrapper(model, PAPER12, k=2, seed=0, return_selection=True)
    b = RandomKWrapper(model, PAPER12, k=2, seed=0, return_selection=True)
    c = RandomKWrapper(model, PAPER12, k=2, seed=1, return_selection=True)
    (oa, sa), (ob, sb), (_, sc) = a(x), b(x), c(x)
    assert torch.equal(oa, ob) and torch.equal(sa.index, sb.index)
    assert not torch.equal(sa.index, sc.index)
    assert (sa.index[:, 0] != sa.index[:, 1]).all()
    _, second = a(x)
    assert not torch.equal(second.index, sa.index)  # the stream advanced
    a.reset()
    again, s_again = a(x)
    assert torch.equal(again, oa) and torch.equal(s_again.index, sa.index)
    with pytest.raises(ValueError, match="weighted"):
        RandomKWrapper(model, PAPER12, k=2, merge_mode="weighted")


class QuadrantNet(nn.Module):
    """Logit of class q = 10 x mean brightness of quadrant q (TL, TR, BL, BR)."""

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        quads = [x[..., :h, :w], x[..., :h, w:], x[..., h:, :w], x[..., h:, w:]]
        return torch.stack([10 * q.mean((1, 2, 3)) for q in quads], 1)


def test_oracle_picks_the_true_lowest_loss_candidate():
    space = get_space("flips")  # identity, hflip, vflip, hflip+vflip
    x = torch.zeros(4, 3, 8, 8)
    x[:, :, :4, :4] = 1.0  # bright top-left: candidate c moves it to quadrant c
    target = torch.tensor([0, 3, 1, 2])
    model = QuadrantNet()
    rec = Recorder(model)
    out, sel = OracleKWrapper(model, space, k=1, return_selection=True, merge_space="logits")(x, target)
    assert sel.index[:, 0].tolist() == [0, 3, 1, 2]
    assert torch.equal(sel.true_losses.argmin(1), target)
    assert rec.calls == 4  # |T| calls of B rows
    assert torch.equal(out.argmax(1), target)
    expected = torch.stack([model(space.candidates[int(c)].apply(x[i:i + 1]))[0] for i, c in enumerate(target)])
    assert torch.allclose(out, expected)
    with pytest.raises(ValueError, match="reduction='none'"):
        OracleKWrapper(model, space, loss_fn=nn.functional.cross_entropy)(x, target)


@pytest.mark.parametrize("mode", ["mean", "max", "min", "sum", "gmean", "tsharpen"])
def test_full_space_equals_ttach_over_to_ttach(mode):
    model = Net(out="probs")
    space = get_space("flips")
    x = images(3)
    ours = FullSpaceWrapper(model, space, merge_mode=mode, merge_space="logits")(x)
    theirs = ttach.ClassificationTTAWrapper(model, space.to_ttach(), merge_mode=mode)(x)
    assert torch.allclose(ours, theirs, atol=1e-6)
    # And ttach's own flip transforms (another order: the same mean).
    if mode == "mean":
        ref = ttach.ClassificationTTAWrapper(model, ttach.aliases.flip_transform())(x)
        assert torch.allclose(ours, ref, atol=1e-6)


def test_full_space_accepts_names_and_ttach_compose():
    model = Net()
    x = images(2)
    a = FullSpaceWrapper(model, "hflip", merge_space="logits")(x)
    b = FullSpaceWrapper(model, ttach.Compose([ttach.HorizontalFlip()]), merge_space="logits")(x)
    assert torch.allclose(a, (model(x) + model(x.flip(-1))) / 2, atol=1e-6) and torch.allclose(a, b)


# --------------------------------------------------------------------------- errors


def test_construction_errors():
    model = Net()
    predictor = FixedPredictor(PAPER12, torch.zeros(1, 12))
    with pytest.raises(ValueError, match=r"k=13 but the space 'paper12' has 12 candidates"):
        LossGuidedWrapper(model, predictor, k=13)
    flips = get_space("flips")
    with pytest.raises(ValueError, match=rf"'paper12' \(fingerprint {PAPER12.fingerprint}\).*'flips' \(fingerprint {flips.fingerprint}\)"):
        LossGuidedWrapper(model, predictor, space=flips)
    with pytest.raises(ValueError, match="valid modes: mean, gmean, sum, max, min, tsharpen, weighted"):
        LossGuidedWrapper(model, predictor, merge_mode="median")
    with pytest.raises(ValueError, match="temperature"):
        LossGuidedWrapper(model, predictor, merge_mode="weighted", temperature=0.0)
    with pytest.raises(ValueError, match="space= is required"):
        LossGuidedWrapper(model, lambda p: p)
    with pytest.raises(ValueError, match="chunk_size"):
        LossGuidedWrapper(model, predictor, chunk_size=0)
    # The same space object under the predictor is fine; a space without a fingerprint check too.
    LossGuidedWrapper(model, predictor, space=get_space("paper12"))


def test_forward_errors():
    model = Net(mean=MEAN, std=STD)
    wrapper = LossGuidedWrapper(model, FixedPredictor(PAPER12, torch.zeros(4, 12)))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\), got a 3-d tensor"):
        wrapper(torch.zeros(3, 16, 16))
    with pytest.raises(TypeError, match="floating-point images.*uint8"):
        wrapper(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 channels but the model's normalisation mean has 3 values"):
        wrapper(torch.zeros(1, 1, 16, 16))
    bad = LossGuidedWrapper(Net(), FixedPredictor(PAPER12, torch.zeros(4, 11)), space=None)
    with pytest.raises(ValueError, match=r"shape \(B, 12\) for space 'paper12'"):
        bad(images(2))


@pytest.mark.parametrize("case", ["0-255", "unnormalised", "nan", "inf"])
def test_input_that_is_not_normalised_pixels_is_refused(case):
    model = Net(mean=MEAN, std=STD)
    pixels = images(2, seed=3)
    x = to_model_input(pixels, MEAN, STD)
    bad = {"0-255": to_model_input(pixels * 255, MEAN, STD),  # uint8-range pixels, normalised
           "unnormalised": pixels * 4 - 2,  # not what a normalised image in [0, 1] can be
           "nan": x.clone().index_fill_(2, torch.tensor([0]), float("nan")),
           "inf": x.clone().index_fill_(3, torch.tensor([5]), float("inf"))}[case]
    predictor = FixedPredictor(PAPER12, scores_for([[3], [5]]))
    for wrapper in (LossGuidedWrapper(model, predictor), RandomKWrapper(model, PAPER12),
                    FullSpaceWrapper(model, "hflip")):
        with pytest.raises(ValueError, match=r"not finite pixels in \[0, 1\]"):
            wrapper(bad)
        wrapper(x)  # the same wrapper takes properly normalised input


def test_selection_mapping_and_package_exports():
    sel = Selection(index=torch.zeros(1, 1, dtype=torch.long))
    assert sel["index"] is sel.index and sel["predicted_losses"] is None
    with pytest.raises(KeyError):
        sel["nope"]
    for name in ("LossGuidedWrapper", "RandomKWrapper", "FullSpaceWrapper", "LossGuidedSegmentationWrapper",
                 "SegmentationTTAWrapper", "RandomKSegmentationWrapper", "TTAWrapper", "select_topk",
                 "select_random", "select_oracle", "merge_outputs", "create_predictor", "load_predictor"):
        assert hasattr(ttach_instance, name)


def test_lazy_loss_predictor_export(monkeypatch):
    monkeypatch.setitem(ttach_instance._LAZY, "Missing", "no_such_module_here")
    assert not hasattr(ttach_instance, "Missing")  # an absent module never breaks the package
    with pytest.raises(AttributeError, match="no_such_module_here"):
        ttach_instance.Missing
    import ttach_instance.predictors as predictors

    assert ttach_instance.LossPredictor is predictors.LossPredictor


def test_empty_batch_keeps_the_model_output_shape():
    model = Net()
    wrapper = LossGuidedWrapper(model, FixedPredictor(PAPER12, torch.zeros(0, 12)), k=2)
    assert wrapper(torch.zeros(0, 3, 16, 16)).shape == (0, 5)


# --------------------------------------------------------------------------- accelerators

DEVICE = os.environ.get("TTACH_INSTANCE_TEST_DEVICE", "cuda")


@pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("flip", [False, True])
def test_device_forward_agrees_with_cpu_without_host_sync(flip):
    model = Net(mean=MEAN, std=STD)
    pixels = images(4)
    x = to_model_input(pixels, MEAN, STD)
    choices = [[0, 3], [1, 11], [6, 0], [4, 9]]
    cpu = LossGuidedWrapper(model, FixedPredictor(PAPER12, scores_for(choices)), k=2, flip=True)
    wrapper = LossGuidedWrapper(model, FixedPredictor(PAPER12, scores_for(choices)), k=2, flip=flip,
                                merge_mode="weighted", return_selection=True).to(DEVICE)
    wrapper.predictor.scores = wrapper.predictor.scores.to(DEVICE)
    xd = x.to(DEVICE)
    wrapper(xd)  # warm-up: per-device tables
    sync = torch.cuda.is_available() and xd.device.type == "cuda"
    if sync:
        torch.cuda.set_sync_debug_mode("error")
    try:
        out, sel = wrapper(xd)
    finally:
        if sync:
            torch.cuda.set_sync_debug_mode("default")
    assert out.device == xd.device and sel.index.device == xd.device
    cpu.merge_mode = "weighted"
    cpu.flip = flip
    assert torch.allclose(out.cpu(), cpu(x), atol=1e-4)
