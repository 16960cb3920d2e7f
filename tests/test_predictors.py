"""Loss predictors: contract (shape, dtype, lower = better), resize, level drop, checkpoints,
the registry, errors, the identity calibration slot, and the combinators."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import ttach_instance.predictors.registry as registry_module
from ttach_instance.predictors import (FORMAT_VERSION, Field, FlipAveragedPredictor, IdentityCalibration, LossPredictor,
                                       LossPredictorBase, PredictorEnsemble, SmallLossPredictor, create_predictor,
                                       list_predictors, load_predictor, read_checkpoint_metadata, register_predictor)
from ttach_instance.predictors.timm_backbone import DEFAULT_BACKBONE
from ttach_instance.registry import get_space

TINY = dict(backbone="mobilenetv3_small_050", input_size=32)


@pytest.fixture(scope="module")
def space():
    return get_space("paper12")


@pytest.fixture(scope="module")
def predictor(space):
    torch.manual_seed(0)
    return LossPredictor(space, **TINY).eval()


def read_meta(path):
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["meta"])


def rewrite(path, out, meta=None, tensors=None):
    """``path``'s checkpoint written to ``out`` with other metadata and/or tensors."""
    save_file(load_file(path) if tensors is None else tensors, out,
              metadata={"meta": json.dumps(read_meta(path) if meta is None else meta)})
    return out


def test_output_contract(predictor, space):
    x = torch.rand(3, 3, 32, 32)
    out = predictor(x)
    assert out.shape == (3, len(space)) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert predictor.architecture == "timm" and predictor.candidate_names == space.names
    assert predictor.space_fingerprint == space.fingerprint and predictor.input_size == 32
    assert predictor.backbone_name == "mobilenetv3_small_050"
    assert "lower = better" in LossPredictor.__doc__
    # forward = the named ranking head on the features, nothing after it while uncalibrated
    assert isinstance(predictor.head, nn.Linear) and predictor.head.out_features == len(space)
    assert predictor.calibration is None
    with torch.no_grad():
        feats = predictor.features(x)
        assert feats.shape == (3, predictor.head.in_features) == (3, sum(predictor.channels))
        assert torch.equal(out, feats @ predictor.head.weight.T + predictor.head.bias)
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
    p.level_drop = 1.0  # every level dropped: only the head's bias is left
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
    q = load_predictor(path, architecture=LossPredictor)
    x = torch.rand(2, 3, 32, 32)
    assert not q.training and torch.equal(predictor(x), q(x))
    assert q.candidate_names == space.names and q.backbone_name == predictor.backbone_name
    meta = read_meta(path)
    assert meta["kind"] == "ttach_instance.loss_predictor" and meta["format_version"] == FORMAT_VERSION == 2
    assert meta["architecture"] == "timm" and meta["space"] == "paper12" and meta["space_params"] == {}
    assert meta["space_fingerprint"] == space.fingerprint and meta["candidate_names"] == space.names
    assert meta["config"] == {"backbone": "mobilenetv3_small_050", "input_size": 32, "out_indices": None,
                              "level_drop": 0.2, "dropout": 0.3, "mean": [0.485, 0.456, 0.406],
                              "std": [0.229, 0.224, 0.225]}
    assert meta["calibration"] is None and meta["model_image_size"] is None
    assert {"ttach_instance", "torch"} <= set(meta["versions"])
    assert read_checkpoint_metadata(path) == meta
    assert set(load_file(path)) == set(predictor.state_dict())  # the weights, nothing else
    r = load_predictor(path)
    assert type(r) is LossPredictor and torch.equal(r(x), q(x))
    by_name = load_predictor(path, space="paper12", architecture=LossPredictor)
    assert by_name.space_fingerprint == space.fingerprint
    assert q.model_image_size is None  # never fitted: unknown


def test_out_indices_round_trip(tmp_path, space):
    torch.manual_seed(0)
    p = LossPredictor(space, **TINY, out_indices=[1, 3]).eval()
    assert len(p.channels) == 2 and p.head.in_features == sum(p.channels)
    path = str(tmp_path / "o.safetensors")
    p.save(path)
    q = load_predictor(path)
    x = torch.rand(2, 3, 32, 32)
    assert q.out_indices == [1, 3] and torch.equal(q(x), p(x))


def test_model_image_size_round_trips_and_is_checked(tmp_path, predictor, space):
    for p in (predictor, SmallLossPredictor(space, width=4, input_size=16)):
        p.model_image_size = (48, 40)
        path = str(tmp_path / f"{p.architecture}.safetensors")
        p.save(path)
        q = load_predictor(path)
        assert q.model_image_size == (48, 40) and FlipAveragedPredictor(q).model_image_size == (48, 40)
        meta = read_meta(path)
        assert meta["model_image_size"] == [48, 40]
        with pytest.raises(ValueError, match="model_image_size"):
            load_predictor(rewrite(path, str(tmp_path / "bad.safetensors"), {**meta, "model_image_size": [48]}))
        p.model_image_size = None


def test_load_errors(tmp_path, predictor, space):
    path = str(tmp_path / "p.safetensors")
    predictor.save(path)
    flips = get_space("flips")
    with pytest.raises(ValueError, match="flips") as e:
        load_predictor(path, space=flips, architecture=LossPredictor)
    assert space.fingerprint in str(e.value) and flips.fingerprint in str(e.value) and "paper12" in str(e.value)

    data = open(path, "rb").read()
    cut = str(tmp_path / "cut.safetensors")
    open(cut, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_predictor(cut, architecture=LossPredictor)
    with pytest.raises(ValueError, match="does not exist"):
        load_predictor(str(tmp_path / "absent.safetensors"), architecture=LossPredictor)

    tensors, meta = load_file(path), read_meta(path)
    bad = str(tmp_path / "bad.safetensors")
    rewrite(path, bad, tensors=dict(tensors, **{"head.weight": torch.zeros(12, 3)}))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*head\.weight \(12, 3\).*expected \(12, 352\)"):
        load_predictor(bad, architecture=LossPredictor)
    rewrite(path, bad, tensors={k: v for k, v in tensors.items() if k != "head.bias"})
    with pytest.raises(ValueError, match=r"missing tensors \['head.bias'\]"):
        load_predictor(bad, architecture=LossPredictor)
    rewrite(path, bad, tensors=dict(tensors, extra=torch.zeros(1)))
    with pytest.raises(ValueError, match=r"unexpected tensors \['extra'\]"):
        load_predictor(bad, architecture=LossPredictor)
    rewrite(path, bad, meta=dict(meta, kind="small-loss-predictor"))
    with pytest.raises(ValueError, match="not a ttach-instance loss predictor checkpoint.*'small-loss-predictor'"):
        load_predictor(bad, architecture=LossPredictor)
    rewrite(path, bad, meta=dict(meta, space_fingerprint="0" * 16))
    with pytest.raises(ValueError, match="0000000000000000"):
        load_predictor(bad, architecture=LossPredictor)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        predictor.save(str(tmp_path / "p.pt"))
    with pytest.raises(ValueError, match=r"must be a \.safetensors file"):
        load_predictor(str(tmp_path / "p.pt"))


def test_a_small_checkpoint_is_not_a_loss_predictor(tmp_path, space):
    path = str(tmp_path / "s.safetensors")
    SmallLossPredictor(space, width=4, input_size=16).save(path)
    with pytest.raises(ValueError, match=r"s\.safetensors' holds a SmallLossPredictor \('small'\), not a "):
        load_predictor(path, architecture=LossPredictor)
    assert type(load_predictor(path, architecture=LossPredictorBase)) is SmallLossPredictor  # the base admits any


def test_calibration_moves_only_the_identity_and_none_is_uncalibrated(predictor, space):
    import copy

    p = copy.deepcopy(predictor)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = p(x)
        assert torch.equal(plain, p.head(p.features(x)))
        p.calibration = IdentityCalibration(space.index_of("identity"), 0.75)
        calibrated = p(x)
        p.calibration = None
        again = p(x)
    assert space.index_of("identity") == 0
    expected = plain.clone()
    expected[:, 0] -= 0.75
    assert torch.equal(calibrated, expected)  # scores - 0.75 on the identity's column, exactly
    assert torch.equal(again, plain)  # removed: the uncalibrated scores, bit for bit
    assert torch.equal(p.head.bias, predictor.head.bias)  # nothing was folded into the head


def test_gated_calibration_round_trips(tmp_path, space):
    torch.manual_seed(0)
    p = LossPredictor(space, **TINY).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        plain = p(x)
        cal = IdentityCalibration(0, 0.7, p.head.in_features)
        cal.gate_weight.normal_()
        cal.gate_bias.fill_(-0.2)
        p.calibration = cal
        gated = p(x)
        feats = p.features(x)
        prob = torch.sigmoid(feats @ cal.gate_weight - 0.2)
    assert torch.allclose(gated[:, 0], plain[:, 0] - 0.7 * prob) and torch.equal(gated[:, 1:], plain[:, 1:])
    assert not torch.allclose(prob, prob[:1].expand(4))  # the gate differs per image
    path = str(tmp_path / "gated.safetensors")
    p.save(path)
    assert read_meta(path)["calibration"] == {"identity": 0, "num_features": p.head.in_features}
    assert {"calibration.margin", "calibration.gate_weight", "calibration.gate_bias"} <= set(load_file(path))
    q = load_predictor(path, architecture=LossPredictor)
    with torch.no_grad():
        assert torch.equal(q(x), gated)
        q.calibration = None
        assert torch.equal(q(x), plain)


def test_bad_inputs(predictor, space):
    with pytest.raises(TypeError, match="pixels must be a torch.Tensor"):
        predictor([[0.0]])
    with pytest.raises(TypeError, match="pixels must be a floating tensor.*uint8"):
        predictor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"pixels must have shape \(B, 3, H, W\).*\(3, 32, 32\)"):
        predictor(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"pixels must have shape.*\(1, 1, 32, 32\)"):
        predictor(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="at least one image"):
        predictor(torch.rand(0, 3, 32, 32))
    with pytest.raises(ValueError, match="input_size"):
        LossPredictor(space, input_size=4)
    with pytest.raises(ValueError, match="input_size"):
        LossPredictor(space, input_size=10**6)
    with pytest.raises(ValueError, match="level_drop"):
        LossPredictor(space, level_drop=1.5)
    with pytest.raises(ValueError, match="dropout"):
        LossPredictor(space, dropout=1.0)
    with pytest.raises(ValueError, match="backbone must be a timm model name.*'no_such_net'"):
        LossPredictor(space, backbone="no_such_net")
    with pytest.raises(ValueError, match="std"):
        LossPredictor(space, **TINY, std=(0.2, 0.0, 0.2))
    with pytest.raises(TypeError, match="space must be"):
        LossPredictor(12)
    with pytest.raises(ValueError, match="backbone must be a timm model name.*'nope:thing'.*register_predictor"):
        LossPredictor(space, backbone="nope:thing")
    with pytest.raises(ValueError, match="width must be an int in"):
        SmallLossPredictor(space, width=0)


def test_small_predictor_rejects_bad_pixels_like_loss_predictor(space):
    torch.manual_seed(0)
    p = SmallLossPredictor(space, width=4, input_size=16).eval()
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


def test_small_predictor_resizes_like_pil_free_antialiased_bilinear(space):
    torch.manual_seed(0)
    p = SmallLossPredictor(space, width=4, input_size=16).eval()
    big = torch.rand(2, 3, 40, 40)
    small = nn.functional.interpolate(big, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        assert torch.equal(p(big), p(small))
        assert p(big).shape == (2, 12) and p.features(big).shape == (2, 16)


def test_load_predictor_rejects_truncated_and_missing_files(tmp_path, predictor):
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
        self.model_image_size = None
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return x[:, 0, 0, :].clone()


def test_flip_averaged_predictor_hand_values():
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
    with pytest.raises(ValueError, match="mirror"):
        FlipAveragedPredictor(_FirstRow(get_space("five_crops")))
    with pytest.raises(TypeError, match=r"\.space"):
        FlipAveragedPredictor(torch.nn.Identity())


def test_predictor_ensemble_means_scores_and_checks_spaces():
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
    from ttach_instance.wrappers import LossGuidedWrapper

    torch.manual_seed(0)
    space = get_space("paper12")
    scorer = PredictorEnsemble([FlipAveragedPredictor(LossPredictor(space, **TINY)),
                                LossPredictor(space, **TINY)]).eval()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        out, sel = LossGuidedWrapper(model, scorer, k=2, mean=(0, 0, 0), std=(1, 1, 1), return_selection=True)(x)
        scores = scorer(x)
    assert out.shape == (4, 5)
    torch.testing.assert_close(sel.predicted_losses, scores)
    assert torch.equal(sel.index, torch.sort(scores, dim=1, stable=True).indices[:, :2])


def test_small_predictor_load_rejects_altered_and_truncated_files(tmp_path, space):
    path = str(tmp_path / "s.safetensors")
    SmallLossPredictor(space, width=4, input_size=16).save(path)
    tensors, meta = load_file(path), read_meta(path)
    bad = str(tmp_path / "bad.safetensors")
    first = sorted(tensors)[0]
    rewrite(path, bad, tensors={k: v for k, v in tensors.items() if k != first})
    with pytest.raises(ValueError, match=rf"bad.safetensors.*missing tensors \['{first}'\]"):
        load_predictor(bad, architecture=SmallLossPredictor)
    rewrite(path, bad, meta={**meta, "config": {"width": 8, "input_size": 16}})  # weights no longer fit
    with pytest.raises(ValueError, match=r"bad.safetensors' does not match SmallLossPredictor.*mismatched"):
        load_predictor(bad, architecture=SmallLossPredictor)
    rewrite(path, bad, meta={**meta, "config": {"input_size": 16}})
    with pytest.raises(ValueError, match=r"bad.safetensors.*missing \['width'\]"):
        load_predictor(bad, architecture=SmallLossPredictor)
    with open(path, "rb") as f:
        blob = f.read()
    with open(bad, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"bad.safetensors.*(unreadable|not a readable)"):
        load_predictor(bad, architecture=SmallLossPredictor)
    with pytest.raises(ValueError, match="fingerprint"):
        load_predictor(path, space="flips", architecture=SmallLossPredictor)


def test_small_predictor_init_from_a_small_resnet_classifier(tmp_path):
    from ttach_instance.models import SmallResNet

    torch.manual_seed(0)
    classifier = SmallResNet(5, widths=(4, 8, 16), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)).eval()
    for m in classifier.modules():  # non-trivial BN statistics, as a trained model has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    pred = SmallLossPredictor(get_space("paper12"), width=4, input_size=16)
    head = pred.head.weight.detach().clone()
    assert pred.init_from(classifier) is pred
    pred.eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expect = classifier.layers(classifier.stem((x - torch.tensor(classifier.mean).view(1, 3, 1, 1))
                                                   / torch.tensor(classifier.std).view(1, 3, 1, 1))).mean((2, 3))
        assert torch.allclose(pred.features(x), expect, atol=1e-6)  # the classifier's own features
        torch.testing.assert_close(pred(x), expect @ pred.head.weight.T + pred.head.bias)
    assert torch.equal(pred.head.weight, head)  # a fresh ranking head, not the class head
    path = str(tmp_path / "p.safetensors")
    pred.save(path)
    again = load_predictor(path, architecture=SmallLossPredictor)
    with torch.no_grad():
        assert torch.allclose(again(x), pred(x), atol=1e-6)  # the normalisation travels with it
    with pytest.raises(ValueError, match=r"stage widths \[4, 8, 16\].*width=8"):
        SmallLossPredictor(get_space("paper12"), width=8).init_from(classifier)
    with pytest.raises(TypeError, match="SmallResNet"):
        SmallLossPredictor(get_space("paper12"), width=4).init_from(torch.nn.Linear(2, 2))


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
    again = load_predictor(path, architecture=LossPredictor)
    with torch.no_grad():
        assert torch.allclose(again(x), pred(x), atol=1e-5)
    with pytest.raises(ValueError, match="same-named, same-shaped.*'lcnet_050'"):
        LossPredictor(get_space("paper12"), backbone="lcnet_050").init_from(timm.create_model("resnet10t"))


# -- the registry ---------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    """The predictor registry, restored after the test (user classes registered in it vanish)."""
    table = dict(registry_module._REGISTRY)
    monkeypatch.setattr(registry_module, "_REGISTRY", table)
    return table


class MeanColour(LossPredictorBase):
    """A user architecture: the image's mean colour, scaled, through the ranking head."""

    config_schema = {"input_size": Field("int", 8, 64), "gain": Field("float", 0.0, 10.0)}

    def __init__(self, space, input_size=8, gain=1.0):
        super().__init__(space, input_size)
        self.gain = float(gain)
        self.head = nn.Linear(3, len(self.space))

    def features(self, pixels):
        return pixels.mean((2, 3)) * self.gain

    def config(self):
        return {"input_size": self.input_size, "gain": self.gain}


def test_builtin_architectures_are_registered():
    names = list_predictors()
    assert {"small", "timm"} <= set(names) and names == sorted(names)
    assert type(create_predictor("small", "paper12", width=4, input_size=16)) is SmallLossPredictor
    timm_pred = create_predictor("timm", "flips", **TINY)
    assert type(timm_pred) is LossPredictor and timm_pred.candidate_names == get_space("flips").names
    assert SmallLossPredictor.architecture == "small" and LossPredictor.architecture == "timm"


def test_create_predictor_unknown_name_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown predictor architecture 'resnet'.*'small'.*'timm'.*register_pred"):
        create_predictor("resnet", "paper12")
    with pytest.raises(ValueError, match="unknown predictor architecture 'os:system'"):
        create_predictor("os:system", "paper12")


def test_register_a_user_architecture_and_round_trip(tmp_path, registry):
    assert register_predictor("mean_colour")(MeanColour) is MeanColour
    assert "mean_colour" in list_predictors() and MeanColour.architecture == "mean_colour"
    assert register_predictor("mean_colour")(MeanColour) is MeanColour  # the same class again: a no-op
    torch.manual_seed(0)
    p = create_predictor("mean_colour", "paper12", gain=2.5).eval()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(p(x), (x.mean((2, 3)) * 2.5) @ p.head.weight.T + p.head.bias)
    path = str(tmp_path / "user.safetensors")
    p.save(path)
    assert read_meta(path)["architecture"] == "mean_colour" and read_meta(path)["config"] == {"input_size": 8,
                                                                                              "gain": 2.5}
    q = load_predictor(path)
    assert type(q) is MeanColour and q.gain == 2.5
    with torch.no_grad():
        assert torch.equal(q(x), p(x))
    with pytest.raises(ValueError, match=r"bad.safetensors.*gain must be a float in \[0.0, 10.0\]"):
        load_predictor(rewrite(path, str(tmp_path / "bad.safetensors"),
                               {**read_meta(path), "config": {"input_size": 8, "gain": 11}}))
    with pytest.raises(ValueError, match="holds a MeanColour"):
        load_predictor(path, architecture=SmallLossPredictor)


def test_registering_a_taken_name_or_a_non_predictor_is_refused(tmp_path, registry):
    class Other(MeanColour):
        pass

    with pytest.raises(ValueError, match="'small' is already registered.*SmallLossPredictor"):
        register_predictor("small")(Other)
    assert registry_module._REGISTRY["small"] is SmallLossPredictor
    with pytest.raises(TypeError, match="LossPredictorBase subclass"):
        register_predictor("linear")(nn.Linear)
    with pytest.raises(ValueError, match="identifier-like"):
        register_predictor("os:system")
    with pytest.raises(ValueError, match="identifier-like"):
        register_predictor("../x")
    # a subclass of a registered architecture is not that architecture: saving it is refused
    # (its checkpoint would load as the parent class)
    register_predictor("mean_colour")(MeanColour)
    with pytest.raises(TypeError, match="Other is not registered"):
        Other("paper12").save(str(tmp_path / "never.safetensors"))

    class MySmall(SmallLossPredictor):
        pass

    with pytest.raises(TypeError, match="MySmall is not registered"):
        MySmall("paper12", width=4).save(str(tmp_path / "never.safetensors"))
    assert not (tmp_path / "never.safetensors").exists()


def test_a_user_checkpoint_loads_only_once_its_architecture_is_registered(tmp_path, registry):
    class Later(MeanColour):
        pass

    register_predictor("later_net")(Later)
    path = str(tmp_path / "later.safetensors")
    Later("paper12").save(path)
    del registry["later_net"]  # a fresh process that has not registered it
    with pytest.raises(ValueError, match=r"later.safetensors.*unknown predictor architecture 'later_net'.*"
                                         r"register_predictor"):
        load_predictor(path)
    register_predictor("later_net")(Later)
    assert type(load_predictor(path)) is Later
