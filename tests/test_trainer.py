import math
import os

import pytest
import torch
from _tiny import TinyPredictor

from ttach_instance.training.losses import spearman
from ttach_instance.training.trainer import FitConfig, _ema_update, fit_predictor, predict_losses, split_rows


def synthetic(n=480, t=4, seed=0):
    """Losses that are a fixed linear function of the channel means: learnable from pixels."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 3, 1, 1), generator=g).float()
    noise = torch.randint(-20, 21, (n, 3, 8, 8), generator=g).float()
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    w = torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.0, 1.0, -1.0, 0.5], [-0.5, 0.0, 1.0, -1.0]])[:, :t]
    losses = (images.float().mean((2, 3)) / 255) @ w * 4
    return {"images": images, "losses": losses, "rows": torch.arange(n)}


def cfg(**kw):
    base = dict(epochs=12, batch_size=32, optimizer="adamw", lr=0.01, warmup_steps=10, ema_decay=0.9, cutout=0.0,
                weight_decay=0.0)
    base.update(kw)
    return FitConfig(**base)


def test_fit_learns_the_ranking_on_held_out_images(tmp_path):
    torch.manual_seed(0)
    data = synthetic()
    pred = TinyPredictor(4)
    _, val = split_rows(data["rows"], 480, 0.2, 0)
    before = spearman(predict_losses(pred, data["images"][val]), data["losses"][val]).mean().item()
    out = fit_predictor(pred, data, str(tmp_path), cfg(), progress=False, log=lambda m: None)
    after = out["final"]["val_spearman"]
    assert after > 0.8 and after > before + 0.3
    assert out["final"]["val_top1_hit"] > 0.6
    assert pred.model_image_size == (8, 8)  # the labels' image size, for whoever deploys it
    assert os.path.isfile(tmp_path / "checkpoint.safetensors") and os.path.isfile(tmp_path / "history.json")
    # the returned module holds the EMA weights, which is what the metrics were computed with
    again = spearman(predict_losses(pred, data["images"][val]), data["losses"][val]).mean().item()
    assert again == pytest.approx(after, abs=1e-6)


def test_resume_equals_uninterrupted(tmp_path):
    data = synthetic(160)
    c = cfg(epochs=3, cutout=0.5)
    a = TinyPredictor(4)
    fit_predictor(a, data, str(tmp_path / "a"), c, progress=False, log=lambda m: None)
    b = TinyPredictor(4)
    first = fit_predictor(b, data, str(tmp_path / "b"), c, progress=False, log=lambda m: None, max_epochs_this_run=2)
    assert not first["complete"] and len(first["history"]) == 2
    # a checkpoint made before an option existed (here identity_gate) resumes under its default
    from ttach_instance.io import atomic_save_tensors, load_tensors

    ckpt = str(tmp_path / "b" / "checkpoint.safetensors")
    tensors, meta = load_tensors(ckpt)
    del meta["config"]["identity_gate"]
    atomic_save_tensors(ckpt, tensors, meta)
    b2 = TinyPredictor(4)  # a fresh process: everything comes from the checkpoint
    second = fit_predictor(b2, data, str(tmp_path / "b"), c, progress=False, log=lambda m: None)
    assert second["complete"] and len(second["history"]) == 3
    for (k, va), vb in zip(a.state_dict().items(), b2.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    with pytest.raises(ValueError, match="another configuration"):
        fit_predictor(TinyPredictor(4), data, str(tmp_path / "b"), cfg(epochs=4), progress=False)


def test_ema_update_hand_computed():
    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        a.weight.fill_(1.0), a.bias.fill_(0.0), b.weight.fill_(3.0), b.bias.fill_(2.0)
    _ema_update(a, b, 0.75)
    assert a.weight.item() == pytest.approx(0.75 * 1 + 0.25 * 3)
    assert a.bias.item() == pytest.approx(0.5)


def test_split_is_by_image():
    rows = torch.arange(30)  # 3 draws of 10 images
    train, val = split_rows(rows, 10, 0.2, 0)
    assert val.sum() == 6
    val_images = set((rows[val] % 10).tolist())
    assert len(val_images) == 2 and not val_images & set((rows[train] % 10).tolist())


def test_bad_config():
    with pytest.raises(ValueError, match="optimizer"):
        FitConfig(optimizer="lion")
    with pytest.raises(ValueError, match="val_fraction"):
        FitConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="images"):
        fit_predictor(TinyPredictor(4), {"losses": torch.zeros(2, 4), "rows": torch.arange(2)})


def test_flip_permutation_swaps_rotations_only():
    from ttach_instance.registry import get_space
    from ttach_instance.training.trainer import flip_permutation

    assert flip_permutation(get_space("paper12")) == [0, 2, 1] + list(range(3, 12))
    assert flip_permutation(get_space("five_crops")) is None  # left crops have no mirror in the space


def test_fit_ends_with_the_selected_epochs_weights(tmp_path):
    # lr so high that the ranking degrades after the first epochs: the fit must hand back the
    # EMA weights of the best held-out epoch, not the last, and say which it was
    data = synthetic(160)
    _, val = split_rows(data["rows"], 160, 0.2, 0)
    c = cfg(epochs=4, ema_decay=0.0, lr=0.5, warmup_steps=1)
    torch.manual_seed(0)
    pred = TinyPredictor(4)
    out = fit_predictor(pred, data, str(tmp_path / "s"), c, progress=False, log=lambda m: None)
    scores = [h["val_spearman"] for h in out["history"]]
    best = max(range(4), key=lambda i: (scores[i], -i)) + 1
    assert best < 4 and scores[best - 1] > scores[-1]  # the set-up must make last != best
    assert out["selected_epoch"] == best and out["final"] is out["history"][best - 1]
    again = spearman(predict_losses(pred, data["images"][val]), data["losses"][val]).mean().item()
    assert again == pytest.approx(scores[best - 1], abs=1e-6)
    # select_by=None keeps the last epoch's; the two fits share every epoch (same seeds)
    torch.manual_seed(0)
    last = TinyPredictor(4)
    out_last = fit_predictor(last, data, str(tmp_path / "l"), cfg(epochs=4, ema_decay=0.0, lr=0.5, warmup_steps=1,
                                                                  select_by=None), progress=False, log=lambda m: None)
    assert [h["val_spearman"] for h in out_last["history"]] == pytest.approx(scores)
    assert out_last["selected_epoch"] == 4
    got = spearman(predict_losses(last, data["images"][val]), data["losses"][val]).mean().item()
    assert got == pytest.approx(scores[-1], abs=1e-6)
    # a resumed fit selects among all epochs, those before the kill included
    torch.manual_seed(0)
    part = TinyPredictor(4)
    fit_predictor(part, data, str(tmp_path / "r"), c, progress=False, log=lambda m: None, max_epochs_this_run=best)
    resumed = TinyPredictor(4)
    out_r = fit_predictor(resumed, data, str(tmp_path / "r"), c, progress=False, log=lambda m: None)
    assert out_r["selected_epoch"] == best
    for (k, va), vb in zip(pred.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    with pytest.raises(ValueError, match="select_by"):
        FitConfig(select_by="accuracy")


def test_corruption_groups_hand_computed():
    from ttach_instance.training.trainer import NUM_CORRUPTION_GROUPS, corruption_groups

    corruption = torch.tensor([-1, 0, 0, 3, 18])
    severity = torch.tensor([0, 1, 5, 2, 5])
    assert corruption_groups(corruption, severity).tolist() == [0, 1, 5, 1 + 15 + 1, 95]
    assert NUM_CORRUPTION_GROUPS == 96


def with_groups(data, seed=0):
    """``data`` plus corruption/severity columns that a linear head on the channel means can read:
    the group is the dominant channel (0 clean, 1..3 a corruption)."""
    dominant = data["images"].float().mean((2, 3)).argmax(1)
    data = dict(data)
    data["corruption"] = torch.where(dominant == 0, torch.full_like(dominant, -1), dominant - 1)
    data["severity"] = torch.where(dominant == 0, torch.zeros_like(dominant), torch.full_like(dominant, 3))
    return data


def fit_fresh(data, c, out_dir):
    """A TinyPredictor (init seed 0) fitted with ``c``: ``(predictor, fit result)``; its state
    keeps exactly its own keys (temporary heads are not part of the predictor)."""
    torch.manual_seed(0)
    pred = TinyPredictor(4)
    keys = set(pred.state_dict())
    out = fit_predictor(pred, data, out_dir, c, progress=False, log=lambda m: None)
    assert set(pred.state_dict()) == keys
    return pred, out


def assert_resumed_fit_matches(fitted, data, c, out_dir):
    """A fit (from init seed 0) killed after 2 epochs and continued ends where ``fitted`` (the
    uninterrupted one) did, auxiliary heads included (they live in the checkpoint)."""
    torch.manual_seed(0)
    part = TinyPredictor(4)
    fit_predictor(part, data, out_dir, c, progress=False, log=lambda m: None, max_epochs_this_run=2)
    resumed = TinyPredictor(4)
    fit_predictor(resumed, data, out_dir, c, progress=False, log=lambda m: None)
    for (k, va), vb in zip(fitted.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_group_term_learns_the_corruption_and_leaves_the_saved_predictor_alone(tmp_path):
    from ttach_instance.training.trainer import NUM_CORRUPTION_GROUPS

    data = with_groups(synthetic(320))
    c = cfg(epochs=6, lr=0.03, group_weight=1.0)
    pred, out = fit_fresh(data, c, str(tmp_path / "g"))
    group_losses = [h["train_group_loss"] for h in out["history"]]
    # from chance over 96 classes to below log 3, what knowing only the 3 groups' frequencies
    # gives: the features tell the groups apart
    assert group_losses[0] > 3.0 and group_losses[-1] < 0.6 < math.log(3)
    assert NUM_CORRUPTION_GROUPS == 96
    assert_resumed_fit_matches(pred, data, c, str(tmp_path / "r"))
    with pytest.raises(ValueError, match="'corruption'"):
        fit_predictor(TinyPredictor(4), synthetic(64), None, c, progress=False, log=lambda m: None)
    with pytest.raises(ValueError, match="group_weight"):
        FitConfig(group_weight=-1)


def with_teacher(data):
    """``data`` plus ``input_logits`` that a linear head on the channel means can match: a
    3-class "target model" whose logits are the scaled channel means."""
    data = dict(data)
    data["input_logits"] = (data["images"].float().mean((2, 3)) / 255 * 8).to(torch.float16)
    return data


def test_distill_term_matches_the_target_models_outputs_and_leaves_the_saved_predictor_alone(tmp_path):
    data = with_teacher(synthetic(320))
    c = cfg(epochs=6, lr=0.03, distill_weight=1.0)
    pred, out = fit_fresh(data, c, str(tmp_path / "d"))
    kl = [h["train_distill_loss"] for h in out["history"]]
    # KL to the teacher's softmax: from what a random head gives to a small fraction of it
    assert kl[-1] < 0.25 * kl[0]
    assert out["final"]["val_spearman"] > 0.8  # and the ranking is still learnt
    assert_resumed_fit_matches(pred, data, c, str(tmp_path / "r"))
    with pytest.raises(ValueError, match="distill_weight needs the label cache's 'input_logits'.*identity"):
        fit_predictor(TinyPredictor(4), synthetic(64), None, c, progress=False, log=lambda m: None)
    bad = with_teacher(synthetic(64))
    bad["input_logits"] = bad["input_logits"][:10]
    with pytest.raises(ValueError, match=r"input_logits'\] must be \(N, C\) with N = 64"):
        fit_predictor(TinyPredictor(4), bad, None, c, progress=False, log=lambda m: None)
    with pytest.raises(ValueError, match="distill_weight"):
        FitConfig(distill_weight=-0.5)


def test_fit_with_identity_gate_saves_a_gate_that_keeps_clean_rows_and_round_trips(tmp_path):
    from ttach_instance.predictors import IdentityCalibration, SmallLossPredictor, load_predictor
    from ttach_instance.predictors.calibration import fit_identity_calibration
    from ttach_instance.registry import get_space
    from ttach_instance.training.trainer import predict_features

    space = get_space("paper12").subset([0, 1, 2, 3])
    data = with_groups(synthetic(480))
    # only the identity is right on clean rows, only the lowest-loss candidate on corrupted ones
    # (almost never the identity): the predictor's clean picks must be overruled, its corrupted
    # picks kept
    clean_rows = data["corruption"] < 0
    data["correct"] = torch.where(clean_rows[:, None], torch.eye(4, dtype=torch.long)[0],
                                  torch.nn.functional.one_hot(data["losses"].argmin(1), 4)).to(torch.uint8)

    def held_out_k1(out, pred):
        val = out["val_rows"]
        choice = predict_losses(pred, data["images"][val]).argmin(1)
        picked = data["correct"][val].gather(1, choice[:, None]).squeeze(1).float()
        clean = data["corruption"][val] < 0
        return picked.mean().item(), picked[clean].mean().item(), data["correct"][val][clean, 0].float().mean().item()

    results = {}
    for gated in (False, True):
        torch.manual_seed(0)
        pred = SmallLossPredictor(space, width=4, input_size=8)
        out = fit_predictor(pred, data, str(tmp_path) if gated else None,
                            cfg(epochs=4, clean_tolerance=0.0, identity_gate=gated), progress=False, log=lambda m: None)
        results[gated] = held_out_k1(out, pred)
        assert isinstance(pred.calibration, IdentityCalibration) and pred.calibration.gated == gated
    (constant, constant_clean, identity_clean), (gated, gated_clean, _) = results[False], results[True]
    # both keep every clean row right (tolerance 0); the constant margin does it by sending the
    # corrupted rows back to the identity too (measured 0.47 overall), the gate does not (0.82)
    assert identity_clean == 1.0 and constant_clean == 1.0 and gated_clean == 1.0
    assert gated > constant + 0.2
    rec = out["final"]
    assert rec["identity_gate_accuracy"] > 0.9  # the dominant channel is readable from the features
    calibration = pred.calibration
    assert float(calibration.margin) == rec["identity_margin"] == out["identity_margin"] > 0
    assert calibration.identity == 0 and calibration.gate_weight.shape == (16,)
    # nothing folded into the head: without the calibration the fitted predictor is its plain ranking
    x = data["images"][:16].float() / 255
    with torch.no_grad():
        calibrated = pred(x)
        plain = pred.head(pred.features(x)).float()
        expected = plain.clone()
        expected[:, 0] -= calibration.margin * calibration.clean_probability(pred.features(x))
        torch.testing.assert_close(calibrated, expected, rtol=0, atol=1e-6)
        assert torch.equal(calibrated[:, 1:], plain[:, 1:])
    # saved with the calibration, loaded with it: the same scores, bit for bit
    loaded = load_predictor(str(tmp_path / "predictor.safetensors"), space)
    assert loaded.calibration.gated and torch.equal(loaded.calibration.gate_weight, calibration.gate_weight)
    with torch.no_grad():
        assert torch.equal(loaded(x), calibrated)
    # refitting replaces the calibration (the margin is chosen on the plain scores)
    features = predict_features(loaded, data["images"])
    info = fit_identity_calibration(loaded, features[200:], data["correct"][200:], clean_rows[200:], 0.0,
                                    features[:200], clean_rows[:200])
    assert loaded.calibration is not calibration and float(loaded.calibration.margin) == info["margin"]
    with pytest.raises(ValueError, match="identity_gate=True needs clean_tolerance"):
        FitConfig(identity_gate=True)
    with pytest.raises(ValueError, match="clean and corrupted training rows"):
        fit_identity_calibration(loaded, features[8:16], data["correct"][8:16], torch.ones(8, dtype=torch.bool), 0.0,
                                 features[:8], torch.ones(8, dtype=torch.bool))


class _PlainModule(torch.nn.Module):
    """A scorer that is no LossPredictorBase: it has no calibration slot."""

    def __init__(self):
        super().__init__()
        self.inner = TinyPredictor(4)

    def forward(self, x):
        return self.inner(x)


def test_calibration_needs_a_loss_predictor_base():
    data = with_groups(synthetic(64))
    data["correct"] = torch.nn.functional.one_hot(data["losses"].argmin(1), 4).to(torch.uint8)
    with pytest.raises(TypeError, match="clean_tolerance calibrates a LossPredictorBase.*_PlainModule"):
        fit_predictor(_PlainModule(), data, None, cfg(epochs=1, clean_tolerance=0.0), progress=False,
                      log=lambda m: None)
    # the registered TinyPredictor is one: its fit ends calibrated
    pred = TinyPredictor(4)
    out = fit_predictor(pred, data, None, cfg(epochs=1, clean_tolerance=100.0), progress=False, log=lambda m: None)
    assert pred.calibration is not None and float(pred.calibration.margin) == out["identity_margin"]


def test_gated_checkpoint_with_a_wrong_gate_is_rejected(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from ttach_instance.predictors import IdentityCalibration, SmallLossPredictor, load_predictor
    from ttach_instance.registry import get_space

    space = get_space("paper12")
    p = SmallLossPredictor(space, width=4, input_size=8)
    p.calibration = IdentityCalibration(0, 0.5, 16)
    path = str(tmp_path / "p.safetensors")
    p.save(path)
    tensors = load_file(path)
    assert {"calibration.margin", "calibration.gate_weight", "calibration.gate_bias"} <= set(tensors)
    assert load_predictor(path).calibration.gate_weight.shape == (16,)
    with safe_open(path, framework="pt") as f:
        header = f.metadata()
    bad = str(tmp_path / "bad.safetensors")
    save_file(dict(tensors, **{"calibration.gate_weight": torch.zeros(5)}), bad, metadata=header)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*calibration\.gate_weight \(5,\).*expected \(16,\)"):
        load_predictor(bad)
    # a gate's tensors under a constant calibration's metadata: refused, not ignored
    import json

    meta = json.loads(header["meta"])
    meta["calibration"]["num_features"] = None
    save_file(tensors, bad, metadata={"meta": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"unexpected tensors \['calibration.gate_bias', 'calibration.gate_weight'\]"):
        load_predictor(bad)
    meta["calibration"] = None  # calibration tensors without a calibration
    save_file(tensors, bad, metadata={"meta": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"unexpected tensors \['calibration.gate_bias'"):
        load_predictor(bad)


def test_identity_margin_goes_to_the_spaces_identity_and_is_skipped_without_one():
    from ttach_instance.predictors import SmallLossPredictor
    from ttach_instance.registry import get_space

    data = with_groups(synthetic(480))
    clean_rows = data["corruption"] < 0
    # the identity is candidate 1 here; only it is right on clean rows
    data["correct"] = torch.where(clean_rows[:, None], torch.eye(4, dtype=torch.long)[1],
                                  torch.nn.functional.one_hot(data["losses"].argmin(1), 4)).to(torch.uint8)
    moved = get_space("paper12").subset([3, 0, 1, 2])
    assert [c.is_identity for c in moved] == [False, True, False, False]
    for gated in (False, True):
        torch.manual_seed(0)
        pred = SmallLossPredictor(moved, width=4, input_size=8)
        out = fit_predictor(pred, data, None, cfg(epochs=3, clean_tolerance=0.0, identity_gate=gated),
                            progress=False, log=lambda m: None)
        val = out["val_rows"][clean_rows[out["val_rows"]]]
        assert out["final"]["identity_margin"] > 0 and pred.calibration.identity == 1
        assert (predict_losses(pred, data["images"][val]).argmin(1) == 1).all()  # clean rows keep the identity
    crops = get_space("five_crops", crop_size=4).subset([0, 1, 2, 3])
    assert not any(c.is_identity for c in crops)
    torch.manual_seed(0)
    pred, logged = SmallLossPredictor(crops, width=4, input_size=8), []
    out = fit_predictor(pred, data, None, cfg(epochs=1, clean_tolerance=0.0, identity_gate=True),
                        progress=False, log=logged.append)
    assert "no identity calibration: space" in " ".join(logged) and "identity_margin" not in out["final"]
    assert pred.calibration is None and out["identity_margin"] is None


def test_calibration_none_gives_back_the_plain_ranking():
    from ttach_instance.predictors import IdentityCalibration, SmallLossPredictor
    from ttach_instance.registry import get_space

    space = get_space("paper12").subset([3, 0, 1, 2])  # the identity is candidate 1
    torch.manual_seed(0)
    p = SmallLossPredictor(space, width=4, input_size=8).eval()
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        plain = p(x)
        assert torch.equal(plain, p.head(p.features(x)).float())
        for gate in (None, 16):
            p.calibration = IdentityCalibration(1, 3.0, gate)
            if gate:
                p.calibration.gate_weight.normal_()
            assert not torch.allclose(p(x), plain, atol=1e-3) and torch.equal(p(x)[:, [0, 2, 3]], plain[:, [0, 2, 3]])
            p.calibration = None
            assert torch.equal(p(x), plain)  # bit for bit: nothing of it stayed in the head
