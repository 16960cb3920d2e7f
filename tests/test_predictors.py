"""LossPredictor: contract (shape, dtype, lower = better), resize, level drop, checkpoints, errors."""

import json

import pytest
import torch
from torch import nn

from ttach_instance.predictor import DEFAULT_BACKBONE, LossPredictor
from ttach_instance.registry import get_space

TINY = dict(backbone="mobilenetv3_small_050", input_size=32)


def tiny_features(pretrained=False, width=4):
    """A ``module:factory`` backbone: two levels, no timm ``feature_info``."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, width, 3, 2, 1)
            self.b = nn.Conv2d(width, 2 * width, 3, 2, 1)

        def forward(self, x):
            a = torch.relu(self.a(x))
            return [a, torch.relu(self.b(a))]

    return Two()


@pytest.fixture(scope="module")
def space():
    return get_space("paper12")


@pytest.fixture(scope="module")
def predictor(space):
    torch.manual_seed(0)
    return LossPredictor(space, **TINY).eval()


def test_output_contract(predictor, space):
    x = torch.rand(3, 3, 32, 32)
    out = predictor(x)
    assert out.shape == (3, len(space)) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert predictor.kind == "loss-predictor" and predictor.candidate_names == space.names
    assert predictor.space_fingerprint == space.fingerprint and predictor.input_size == 32
    assert predictor.backbone_name == "mobilenetv3_small_050"
    assert "lower = better" in LossPredictor.__doc__
    # the final registered module is the scoring nn.Linear with a bias (apply_identity_margin relies on it)
    last = list(predictor.modules())[-1]
    assert isinstance(last, nn.Linear) and last.bias is not None and last.out_features == len(space)
    assert predictor(x.double()).dtype == torch.float32
    half = predictor(x.half())
    assert half.dtype == torch.float32 and torch.allclose(half, out, atol=1e-2)


def test_default_backbone_and_space_by_name(space):
    p = LossPredictor("paper12", input_size=32)
    assert p.backbone_name == DEFAULT_BACKBONE and p.space_fingerprint == space.fingerprint
    assert p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)  # the backbone's own normalisation


def test_resize_path(predictor, monkeypatch):
    for shape in ((2, 3, 16, 16), (2, 3, 64, 48), (1, 3, 224, 224)):
        out = predictor(torch.rand(shape))
        assert out.shape == (shape[0], 12) and torch.isfinite(out).all()
    x = torch.rand(2, 3, 64, 64)
    small = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(predictor(x), predictor(small), atol=1e-5)
    calls = []
    real = nn.functional.interpolate
    monkeypatch.setattr(nn.functional, "interpolate", lambda *a, **k: calls.append(k) or real(*a, **k))
    predictor(torch.rand(2, 3, 32, 32))
    assert calls == []  # already at input_size: untouched
    predictor(torch.rand(2, 3, 40, 40))
    assert calls and calls[0]["antialias"] is True and calls[0]["mode"] == "bilinear"


def test_32px_last_level_is_1x1(space):
    p = LossPredictor(space, backbone="mobilenetv3_small_050", input_size=32).eval()
    feats = p.backbone(torch.rand(1, 3, 32, 32))
    assert feats[-1].shape[-2:] == (1, 1)
    assert torch.isfinite(p(torch.rand(2, 3, 32, 32))).all()


def test_level_drop_only_in_training(space):
    torch.manual_seed(0)
    p = LossPredictor(space, **TINY, level_drop=0.9, dropout=0.0)
    x = torch.rand(4, 3, 32, 32)
    p.eval()
    assert torch.equal(p(x), p(x))
    p.train()  # batch norm uses batch statistics (deterministic); only the level drop is random
    torch.manual_seed(1)
    a = p(x)
    torch.manual_seed(2)
    b = p(x)
    assert not torch.allclose(a, b)
    p.level_drop = 0.0
    assert torch.equal(p(x), p(x))
    p.level_drop = 1.0  # every level dropped: only the final bias is left
    assert torch.allclose(p(x), p.head.bias.expand(4, -1))
    vectors = [torch.ones(1000, 5), torch.ones(1000, 3)]
    p.level_drop = 0.25
    dropped = p._drop_levels(vectors)
    for v in dropped:  # whole vectors dropped per sample, kept ones rescaled by 1 / (1 - p)
        rows = v[:, 0]
        assert ((rows == 0) | torch.isclose(rows, torch.tensor(1 / 0.75))).all() and (v == rows[:, None]).all()
        assert 0.15 < float((rows == 0).float().mean()) < 0.35


def test_round_trip(tmp_path, predictor, space):
    path = str(tmp_path / "p.safetensors")
    predictor.save(path)
    q = LossPredictor.load(path)
    x = torch.rand(2, 3, 32, 32)
    assert not q.training and torch.equal(predictor(x), q(x))
    assert q.candidate_names == space.names and q.backbone_name == predictor.backbone_name
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta["kind"] == "loss-predictor" and meta["space"] == "paper12" and meta["space_params"] == {}
    assert meta["space_fingerprint"] == space.fingerprint and meta["input_size"] == 32
    assert meta["config"]["level_drop"] == 0.2 and meta["config"]["mean"] == [0.485, 0.456, 0.406]
    assert {"ttach_instance", "torch", "timm"} <= set(meta["versions"])
    from ttach_instance.models import load_predictor

    r = load_predictor(path)
    assert isinstance(r, LossPredictor) and torch.equal(r(x), q(x))
    assert LossPredictor.load(path, space="paper12").space_fingerprint == space.fingerprint
    assert q.model_image_size is None  # never fitted: unknown


def test_model_image_size_round_trips_and_is_checked(tmp_path, predictor, space):
    from ttach_instance.models import SmallLossPredictor, load_predictor
    from ttach_instance.predictor import FlipAveragedPredictor
    from ttach_instance.io import atomic_save_tensors, load_tensors

    for p in (predictor, SmallLossPredictor(space, width=4, input_size=16)):
        p.model_image_size = (48, 40)
        path = str(tmp_path / f"{p.kind}.safetensors")
        p.save(path)
        q = load_predictor(path)
        assert q.model_image_size == (48, 40) and FlipAveragedPredictor(q).model_image_size == (48, 40)
        tensors, meta = load_tensors(path)
        atomic_save_tensors(path, tensors, {**meta, "model_image_size": [48]})
        with pytest.raises(ValueError, match="model_image_size"):
            load_predictor(path)


def test_module_factory_backbone(tmp_path, space):
    p = LossPredictor(space, backbone="test_predictor:tiny_features", input_size=16,
                      backbone_kwargs={"width": 3}, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    assert p.channels == [3, 6]
    path = str(tmp_path / "f.safetensors")
    p.save(path)
    x = torch.rand(2, 3, 20, 20)
    assert torch.equal(LossPredictor.load(path)(x), p(x))


def test_load_errors(tmp_path, predictor, space):
    path = str(tmp_path / "p.safetensors")
    predictor.save(path)
    flips = get_space("flips")
    with pytest.raises(ValueError, match="flips") as e:
        LossPredictor.load(path, space=flips)
    assert space.fingerprint in str(e.value) and flips.fingerprint in str(e.value) and "paper12" in str(e.value)

    data = open(path, "rb").read()
    cut = str(tmp_path / "cut.safetensors")
    open(cut, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        LossPredictor.load(cut)
    with pytest.raises(ValueError, match="does not exist"):
        LossPredictor.load(str(tmp_path / "absent.safetensors"))

    from safetensors import safe_open
    from ttach_instance.io import atomic_save_tensors, load_tensors

    tensors, meta = load_tensors(path)
    altered = dict(tensors, **{"head.weight": torch.zeros(12, 3)})
    bad = str(tmp_path / "bad.safetensors")
    atomic_save_tensors(bad, altered, meta)
    with pytest.raises(ValueError, match=r"head\.weight"):
        LossPredictor.load(bad)
    missing = {k: v for k, v in tensors.items() if k != "head.bias"}
    atomic_save_tensors(bad, missing, meta)
    with pytest.raises(ValueError, match=r"missing keys \['head.bias'\]"):
        LossPredictor.load(bad)
    atomic_save_tensors(bad, dict(tensors, extra=torch.zeros(1)), meta)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        LossPredictor.load(bad)
    atomic_save_tensors(bad, tensors, dict(meta, kind="small-loss-predictor"))
    with pytest.raises(ValueError, match="not a LossPredictor checkpoint"):
        LossPredictor.load(bad)
    atomic_save_tensors(bad, tensors, dict(meta, space_fingerprint="0" * 16))
    with pytest.raises(ValueError, match="0000000000000000"):
        LossPredictor.load(bad)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        predictor.save(str(tmp_path / "p.pt"))
    del safe_open


def test_small_predictor_checkpoint_rejected(tmp_path, space):
    from ttach_instance.models import SmallLossPredictor

    path = str(tmp_path / "s.safetensors")
    SmallLossPredictor(space, width=4, input_size=16).save(path)
    with pytest.raises(ValueError, match="small-loss-predictor"):
        LossPredictor.load(path)


def test_small_predictor_unshuffle_sees_every_pixel_and_round_trips(tmp_path, space):
    import torch.nn.functional as TF

    from ttach_instance.models import SmallLossPredictor, load_predictor

    torch.manual_seed(0)
    p = SmallLossPredictor(space, width=4, input_size=8, unshuffle=4).eval()
    assert p.pixel_size == 32 and p.net.stem[0].in_channels == 48
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = p(x)
        ref = p.net(TF.pixel_unshuffle((x - p.pix_mean) / p.pix_std, 4))  # no resize at 32 px
        assert out.shape == (3, len(space))
        torch.testing.assert_close(out, ref)
        # one pixel changed changes the scores: nothing is averaged away before the net
        y = x.clone()
        y[0, :, 5, 7] = 1 - y[0, :, 5, 7]
        assert not torch.allclose(p(y)[0], out[0])
        # other sizes are resized to 32 px first
        big = torch.rand(3, 3, 48, 48)
        small = TF.interpolate(big, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(p(big), p(small))
    path = str(tmp_path / "u.safetensors")
    p.save(path)
    q = load_predictor(path)
    assert q.unshuffle == 4 and q.input_size == 8
    with torch.no_grad():
        torch.testing.assert_close(q(x), out)
    # checkpoints from before the option load as unshuffle=1
    plain = SmallLossPredictor(space, width=4, input_size=16)
    assert plain.unshuffle == 1 and plain.pixel_size == 16
    with pytest.raises(ValueError, match="unshuffle"):
        SmallLossPredictor(space, unshuffle=0)


def test_identity_margin_lowers_only_identity(predictor, space):
    import copy

    from ttach_instance.training.trainer import apply_identity_margin

    p = copy.deepcopy(predictor)
    x = torch.rand(2, 3, 32, 32)
    before = p(x)
    apply_identity_margin(p, 0.75)
    expected = before.clone()
    expected[:, space.index_of("identity")] -= 0.75
    assert space.index_of("identity") == 0
    assert torch.allclose(p(x), expected, atol=1e-6)
    assert torch.equal(p(x)[:, 1:], before[:, 1:])


def test_bad_inputs(predictor, space):
    with pytest.raises(TypeError, match="pixels must be a torch.Tensor"):
        predictor([[0.0]])
    with pytest.raises(TypeError, match="pixels must be a floating tensor.*uint8"):
        predictor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"pixels must have shape \(B, 3, H, W\).*\(3, 32, 32\)"):
        predictor(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"pixels must have shape.*\(1, 1, 32, 32\)"):
        predictor(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="input_size"):
        LossPredictor(space, input_size=4)
    with pytest.raises(ValueError, match="level_drop"):
        LossPredictor(space, level_drop=1.5)
    with pytest.raises(ValueError, match="not a timm model"):
        LossPredictor(space, backbone="no_such_net")
    with pytest.raises(ValueError, match="std"):
        LossPredictor(space, **TINY, std=(0.2, 0.0, 0.2))
    with pytest.raises(TypeError, match="space must be"):
        LossPredictor(12)
    with pytest.raises(ValueError, match="backbone 'nope:thing'"):
        LossPredictor(space, backbone="nope:thing")


@pytest.mark.parametrize("options", [{}, {"unshuffle": 2}, {"detail_channels": 4}])
def test_small_predictor_rejects_bad_pixels_like_loss_predictor(space, options):
    from ttach_instance.models import SmallLossPredictor

    torch.manual_seed(0)
    p = SmallLossPredictor(space, width=4, input_size=16, **options).eval()
    with pytest.raises(TypeError, match="pixels must be a torch.Tensor"):
        p([[0.0]])
    with pytest.raises(TypeError, match="pixels must be a floating tensor.*uint8"):
        p(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))  # 0..255 would pass as garbage pixel values
    with pytest.raises(ValueError, match=r"pixels must have shape \(B, 3, H, W\).*\(1, 1, 32, 32\)"):
        p(torch.rand(1, 1, 32, 32))  # would broadcast against the 3-channel mean
    with pytest.raises(ValueError, match=r"pixels must have shape.*\(3, 32, 32\)"):
        p(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="at least one image"):
        p(torch.rand(0, 3, 32, 32))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = p(x)
        # float64 and half pixels run through the float32 net: same scores up to the input's rounding
        assert torch.allclose(p(x.double()), ref, atol=1e-5)
        assert p(x.half()).dtype == torch.float32 and torch.allclose(p(x.half()), ref, atol=2e-2)


def test_load_predictor_dispatch_rejects_truncated_and_missing_files(tmp_path, predictor):
    from ttach_instance.models import load_predictor

    path = str(tmp_path / "p.safetensors")
    predictor.save(path)
    assert type(load_predictor(path)) is LossPredictor
    blob = open(path, "rb").read()
    cut = str(tmp_path / "cut.safetensors")
    with open(cut, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="cut.safetensors.*not a readable safetensors"):
        load_predictor(cut)
    with pytest.raises(ValueError, match="does not exist"):
        load_predictor(str(tmp_path / "absent.safetensors"))


class _FirstRow(torch.nn.Module):
    """Stub predictor: the scores are the first row of the red channel (width = |T|)."""

    def __init__(self, space):
        super().__init__()
        self.space = space
        self.space_fingerprint = space.fingerprint
        self.candidate_names = space.names
        self.input_size = 12
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return x[:, 0, 0, :].clone()


def test_flip_averaged_predictor_hand_values():
    from ttach_instance.predictor import FlipAveragedPredictor

    stub = _FirstRow(get_space("paper12"))
    pred = FlipAveragedPredictor(stub)
    x = torch.zeros(1, 3, 4, 12)
    x[0, 0, 0] = torch.arange(12.0)
    out = pred(x)
    # mirrored row = 11..0; candidates 1 and 2 (rotate -20 / +20) swap, all others map to themselves
    expected = torch.tensor([[5.5, 5.0, 6.0] + [5.5] * 9])
    assert torch.equal(out, expected)
    assert stub.calls == [2]  # one call on the image and its mirror together
    assert pred.space is stub.space and pred.candidate_names == stub.candidate_names and pred.input_size == 12


def test_flip_averaged_predictor_is_mirror_consistent():
    from ttach_instance.predictor import FlipAveragedPredictor
    from ttach_instance.space import flip_permutation

    torch.manual_seed(0)
    space = get_space("paper12")
    pred = FlipAveragedPredictor(LossPredictor(space, **TINY)).eval()
    x = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        a, b = pred(x), pred(x.flip(-1))
    perm = flip_permutation(space)
    assert torch.allclose(b, a[:, perm], atol=1e-5)
    assert not torch.allclose(a[:, 1], a[:, 2], atol=1e-3)  # the swap is not vacuous


def test_flip_averaged_predictor_rejects_unmirrored_space_and_non_predictor():
    from ttach_instance.predictor import FlipAveragedPredictor

    with pytest.raises(ValueError, match="mirror"):
        FlipAveragedPredictor(_FirstRow(get_space("five_crops")))
    with pytest.raises(TypeError, match=r"\.space"):
        FlipAveragedPredictor(torch.nn.Identity())


def test_predictor_ensemble_means_scores_and_checks_spaces():
    from ttach_instance.predictor import FlipAveragedPredictor, PredictorEnsemble

    space = get_space("paper12")
    a, b = _FirstRow(space), _FirstRow(space)
    x = torch.zeros(2, 3, 4, 12)
    x[:, 0, 0] = torch.arange(12.0)
    x[1, 0, 0] = 1.0
    ens = PredictorEnsemble([a, FlipAveragedPredictor(b)])
    out = ens(x)
    flipped = torch.tensor([5.5, 5.0, 6.0] + [5.5] * 9)
    assert torch.equal(out[0], (torch.arange(12.0) + flipped) / 2)
    assert torch.equal(out[1], torch.ones(12))
    assert ens.space is space and ens.input_size == 12 and ens.candidate_names == space.names
    with pytest.raises(ValueError, match="one space"):
        PredictorEnsemble([a, _FirstRow(get_space("flips"))])
    with pytest.raises(ValueError, match="at least one"):
        PredictorEnsemble([])
    with pytest.raises(TypeError, match=r"predictors\[1\]"):
        PredictorEnsemble([a, torch.nn.Identity()])


def test_combined_predictors_drive_the_wrapper():
    from ttach_instance.predictor import FlipAveragedPredictor, PredictorEnsemble
    from ttach_instance.wrappers import LossGuidedWrapper

    torch.manual_seed(0)
    space = get_space("paper12")
    scorer = PredictorEnsemble([FlipAveragedPredictor(LossPredictor(space, **TINY)), LossPredictor(space, **TINY)]).eval()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        out, sel = LossGuidedWrapper(model, scorer, k=2, mean=(0, 0, 0), std=(1, 1, 1), return_selection=True)(x)
        scores = scorer(x)
    assert out.shape == (4, 5)
    torch.testing.assert_close(sel.predicted_losses, scores)
    assert torch.equal(sel.index, torch.sort(scores, dim=1, stable=True).indices[:, :2])


def test_small_predictor_load_rejects_altered_and_truncated_files(tmp_path, space):
    from ttach_instance.models import SmallLossPredictor
    from ttach_instance.io import atomic_save_tensors, load_tensors

    path = str(tmp_path / "s.safetensors")
    SmallLossPredictor(space, width=4, input_size=16).save(path)
    tensors, meta = load_tensors(path)
    bad = str(tmp_path / "bad.safetensors")
    first = sorted(tensors)[0]
    atomic_save_tensors(bad, {k: v for k, v in tensors.items() if k != first}, meta)
    with pytest.raises(ValueError, match=rf"bad.safetensors.*missing keys \['{first}'\]"):
        SmallLossPredictor.load(bad)
    atomic_save_tensors(bad, tensors, dict(meta, width=8))  # metadata altered: weights no longer fit
    with pytest.raises(ValueError, match="shape mismatch"):
        SmallLossPredictor.load(bad)
    atomic_save_tensors(bad, tensors, {k: v for k, v in meta.items() if k != "width"})
    with pytest.raises(ValueError, match="lacks metadata 'width'"):
        SmallLossPredictor.load(bad)
    with open(path, "rb") as f:
        blob = f.read()
    with open(bad, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="unreadable"):
        SmallLossPredictor.load(bad)
    with pytest.raises(ValueError, match="fingerprint"):
        SmallLossPredictor.load(path, space="flips")


def test_small_predictor_init_from_a_small_resnet_classifier(tmp_path):
    from ttach_instance.models import SmallLossPredictor, SmallResNet

    torch.manual_seed(0)
    classifier = SmallResNet(5, widths=(4, 8, 16), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)).eval()
    for m in classifier.modules():  # non-trivial BN statistics, as a trained model has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    pred = SmallLossPredictor(get_space("paper12"), width=4, input_size=16)
    head = pred.net.head.weight.detach().clone()
    assert pred.init_from(classifier) is pred
    pred.eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expect = classifier.layers(classifier.stem((x - torch.tensor(classifier.mean).view(1, 3, 1, 1))
                                                   / torch.tensor(classifier.std).view(1, 3, 1, 1))).mean((2, 3))
        assert torch.allclose(pred.features(x), expect, atol=1e-6)  # the classifier's own features
    assert torch.equal(pred.net.head.weight, head)  # a fresh ranking head, not the class head
    path = str(tmp_path / "p.safetensors")
    pred.save(path)
    again = SmallLossPredictor.load(path)
    with torch.no_grad():
        assert torch.allclose(again(x), pred(x), atol=1e-6)  # the normalisation travels with it
    with pytest.raises(ValueError, match=r"stage widths \[4, 8, 16\].*width=8"):
        SmallLossPredictor(get_space("paper12"), width=8).init_from(classifier)
    with pytest.raises(TypeError, match="SmallResNet"):
        SmallLossPredictor(get_space("paper12"), width=4).init_from(torch.nn.Linear(2, 2))
    # unshuffle=2: the stem starts as the classifier's stem at full resolution, average-pooled 2x2
    folded = SmallLossPredictor(get_space("paper12"), width=4, input_size=8, unshuffle=2).init_from(classifier).eval()
    xn = (x - folded.pix_mean) / folded.pix_std
    with torch.no_grad():
        expect = torch.nn.functional.avg_pool2d(classifier.stem[1](classifier.stem[0](xn)), 2)  # conv + BN, pooled
        got = folded.net.stem[1](folded.net.stem[0](torch.nn.functional.pixel_unshuffle(xn, 2)))
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(folded.net.layers[2].conv2.weight, classifier.layers[2].conv2.weight)


@pytest.mark.parametrize("factor", [2, 3])
def test_unshuffled_stem_weight_equals_full_resolution_conv_then_average_pool(factor):
    import torch.nn.functional as TF

    from ttach_instance.models import unshuffled_stem_weight

    torch.manual_seed(factor)
    weight, x = torch.randn(5, 3, 3, 3), torch.randn(2, 3, 6 * factor, 4 * factor)
    expect = TF.avg_pool2d(TF.conv2d(x, weight, padding=1), factor)  # zero padding at every border too
    got = TF.conv2d(TF.pixel_unshuffle(x, factor), unshuffled_stem_weight(weight, factor), padding=1)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="3x3"):
        unshuffled_stem_weight(torch.randn(5, 3, 5, 5), 2)


def test_loss_predictor_init_from_a_timm_classifier_of_its_architecture(tmp_path):
    import timm

    torch.manual_seed(0)
    classifier = timm.create_model("lcnet_050", pretrained=False, num_classes=7).eval()
    pred = LossPredictor(get_space("paper12"), backbone="lcnet_050", input_size=32)
    head = pred.head.weight.detach().clone()
    assert pred.init_from(classifier) is pred
    theirs = classifier.state_dict()
    for k, v in pred.backbone.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    assert torch.equal(pred.head.weight, head)  # the ranking head stays fresh
    cfg = timm.data.resolve_data_config({}, model=classifier)
    assert pred.mean == tuple(cfg["mean"]) and torch.allclose(pred.pix_std.flatten(), torch.tensor(cfg["std"]))
    # the copied layers compute the classifier's own features
    pred.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        normed = (x - pred.pix_mean) / pred.pix_std
        levels = pred.backbone(normed)
        expect = classifier.forward_intermediates(normed, intermediates_only=True)
    assert len(levels) == len(expect) == 5
    for got, ref in zip(levels, expect):
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)
    path = str(tmp_path / "p.safetensors")
    pred.save(path)
    again = LossPredictor.load(path)
    with torch.no_grad():
        assert torch.allclose(again(x), pred(x), atol=1e-5)
    with pytest.raises(ValueError, match="same-named, same-shaped.*'lcnet_050'"):
        LossPredictor(get_space("paper12"), backbone="lcnet_050").init_from(timm.create_model("resnet10t"))


def test_small_predictor_levels_all_reads_every_stage(tmp_path):
    from ttach_instance.models import SmallLossPredictor, SmallResNet, load_predictor
    from ttach_instance.io import atomic_save_tensors, load_tensors

    torch.manual_seed(0)
    classifier = SmallResNet(5, widths=(4, 8, 16)).eval()
    space = get_space("paper12")
    pred = SmallLossPredictor(space, width=4, input_size=16, levels="all").init_from(classifier).eval()
    assert pred.net.head.in_features == 4 + 8 + 16
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        h = classifier.stem((x - torch.tensor(classifier.mean).view(1, 3, 1, 1))
                            / torch.tensor(classifier.std).view(1, 3, 1, 1))
        expect = []
        for layer in classifier.layers:  # the classifier's stages, pooled one by one
            h = layer(h)
            expect.append(h.mean((2, 3)))
        torch.testing.assert_close(pred.features(x), torch.cat(expect, 1))
        torch.testing.assert_close(pred(x), torch.cat(expect, 1) @ pred.net.head.weight.T + pred.net.head.bias)
    path = str(tmp_path / "all.safetensors")
    pred.save(path)
    again = load_predictor(path)
    assert again.levels == "all"
    with torch.no_grad():
        torch.testing.assert_close(again(x), pred(x))
    # a checkpoint written before the option existed (no "levels" key) is the last-stage predictor
    plain = str(tmp_path / "plain.safetensors")
    SmallLossPredictor(space, width=4, input_size=16).save(plain)
    tensors, meta = load_tensors(plain)
    old = str(tmp_path / "old.safetensors")
    atomic_save_tensors(old, tensors, {k: v for k, v in meta.items()
                                       if k not in ("levels", "detail_channels", "detail_size")})
    assert load_predictor(old).levels == "last" and load_predictor(old).detail_channels == 0
    # metadata claiming every level over last-level weights: the head's shape names the mismatch
    atomic_save_tensors(old, tensors, dict(meta, levels="all"))
    with pytest.raises(ValueError, match=r"levels='all'.*net.head.weight \(12, 16\) \(expected \(12, 28\)\)"):
        load_predictor(old)
    atomic_save_tensors(old, tensors, dict(meta, levels="middle"))
    with pytest.raises(ValueError, match="old.safetensors.*levels must be"):
        load_predictor(old)
    with pytest.raises(ValueError, match="levels must be 'last'.*'middle'"):
        SmallLossPredictor(space, levels="middle")


def test_small_predictor_detail_branch_reads_band_pass_energy_at_full_size(tmp_path):
    import numpy as np

    from ttach_instance.models import SmallLossPredictor, load_predictor

    space = get_space("paper12")
    pred = SmallLossPredictor(space, width=4, input_size=8, detail_channels=2).eval()
    assert pred.detail_size == 16 and pred.net.head.in_features == 16 + 2 * 2
    with torch.no_grad():  # filter 0: the red channel as it is; filter 1: a horizontal difference of green
        w = torch.zeros(2, 3, 3, 3)
        w[0, 0, 1, 1] = 1.0
        w[1, 1, 1, 1], w[1, 1, 1, 2] = 1.0, -1.0
        pred.detail[0].weight.copy_(w)
    rng = np.random.default_rng(0)
    img = rng.random((2, 3, 16, 16)).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
    norm = (img - mean) / std
    red = norm[:, 0]
    green = np.pad(norm[:, 1], ((0, 0), (0, 0), (0, 1)))  # zero padding at the right border, as the conv's
    diff = green[:, :, :-1] - green[:, :, 1:]
    expect = np.stack([np.maximum(red, 0).mean((1, 2)), np.maximum(diff, 0).mean((1, 2)),
                       red.reshape(2, -1).std(1), diff.reshape(2, -1).std(1)], 1)
    with torch.no_grad():
        got = pred.features(torch.from_numpy(img))[:, 16:]  # BN at its initial identity statistics
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-4, atol=1e-5)
    # the branch sees what the 8-px backbone input cannot: fine texture changes only its features
    flat = torch.full((1, 3, 16, 16), 0.5)
    checker = flat + 0.2 * (torch.arange(16).view(1, 16) + torch.arange(16).view(16, 1)).remainder(2).sub(0.5)
    with torch.no_grad():
        a, b = pred.features(flat), pred.features(checker)
    torch.testing.assert_close(a[:, :16], b[:, :16], atol=1e-2, rtol=0)   # the antialiased 8-px images ~ agree
    assert (b[:, 16:] - a[:, 16:]).abs().max() > 0.5
    path = str(tmp_path / "d.safetensors")
    pred.save(path)
    again = load_predictor(path)
    assert (again.detail_channels, again.detail_size) == (2, 16)
    x = torch.rand(2, 3, 24, 24)  # another size: both the backbone and the branch resize
    with torch.no_grad():
        torch.testing.assert_close(again(x), pred(x))
    with pytest.raises(ValueError, match="detail_channels must be an int >= 0"):
        SmallLossPredictor(space, detail_channels=-1)


def test_loss_predictor_takes_an_identity_gate_and_round_trips(tmp_path, space):
    from ttach_instance.predictor import IdentityGate

    torch.manual_seed(0)
    p = LossPredictor(space, **TINY).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        plain = p(x)
        gate = IdentityGate(p.head.in_features)
        gate.weight.normal_()
        gate.margin.fill_(0.7)
        p.identity_gate = gate
        gated = p(x)
        prob = gate.clean_probability(p.features(x))
    assert torch.allclose(gated[:, 0], plain[:, 0] - 0.7 * prob) and torch.equal(gated[:, 1:], plain[:, 1:])
    path = str(tmp_path / "gated.safetensors")
    p.save(path)
    with torch.no_grad():
        assert torch.equal(LossPredictor.load(path)(x), gated)
