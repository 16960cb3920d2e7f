"""IdentityCalibration and its fitting: hand-computed scores, a margin chosen by held-out accuracy,
a gate checked against an independently fitted logistic regression, tensors that round-trip."""

import math

import pytest
import torch
from _tiny import TinyPredictor

from ttach_instance.predictors import IdentityCalibration, load_predictor
from ttach_instance.predictors.calibration import (calibrate_identity_margin, fit_gate, fit_identity_calibration,
                                                   identity_index)
from ttach_instance.registry import get_space


def test_constant_margin_moves_only_the_identity_by_the_margin():
    cal = IdentityCalibration(2, 0.75)
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -0.5, 0.25, 0.0]])
    out = cal(scores, torch.zeros(2, 7))  # the features are not read without a gate
    assert torch.equal(out, torch.tensor([[1.0, 2.0, 2.25, 4.0], [0.5, -0.5, -0.5, 0.0]]))
    assert torch.equal(cal.clean_probability(torch.zeros(2, 7)), torch.ones(2))
    assert cal.config() == {"identity": 2, "num_features": None} and not cal.gated
    assert torch.equal(IdentityCalibration(0)(scores, torch.zeros(2, 7)), scores)  # margin 0: nothing moves
    with pytest.raises(ValueError, match="calibration identity 5 is outside the 4 candidates"):
        IdentityCalibration(5, 1.0)(scores, torch.zeros(2, 7))


def test_identity_gate_hand_computed():
    cal = IdentityCalibration(1, 2.0, num_features=2)
    with torch.no_grad():
        cal.gate_weight.copy_(torch.tensor([1.0, -1.0]))
        cal.gate_bias.fill_(0.5)
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    scores = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 1.0], [3.0, 2.0, 1.0]])
    p = torch.tensor([1 / (1 + math.exp(-z)) for z in (0.5, 2.5, -2.5)])  # sigmoid(w . f + b), by hand
    out = cal(scores, features)
    torch.testing.assert_close(cal.clean_probability(features), p)
    torch.testing.assert_close(out[:, 1], scores[:, 1] - 2.0 * p)  # only the identity moves, by margin x p
    assert torch.equal(out[:, [0, 2]], scores[:, [0, 2]])
    assert cal.config() == {"identity": 1, "num_features": 2} and cal.gated


def test_calibration_arguments_are_checked():
    with pytest.raises(ValueError, match="identity must be a candidate index"):
        IdentityCalibration(-1)
    with pytest.raises(ValueError, match="identity must be a candidate index"):
        IdentityCalibration(True)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        IdentityCalibration(0, 1.0, 0)


def test_identity_margin_hand_computed():
    # rows 0,1 clean, row 2 corrupted; candidate 1 is predicted slightly better on clean rows (wrongly)
    # and much better on the corrupted row (rightly)
    pred = torch.tensor([[0.10, 0.05], [0.10, 0.08], [1.00, 0.00]])
    correct = torch.tensor([[1, 0], [1, 0], [0, 1]])
    clean = torch.tensor([True, True, False])
    grid = [0.0, 0.03, 0.06, 2.0]
    # 0.03 fixes row 1 only, 0.06 both clean rows; 2.0 also sends row 2 back to the (wrong) identity
    m, info = calibrate_identity_margin(pred, correct, clean, 0.0, grid=grid)
    assert m == 0.06 and info == {"accuracy": 1.0, "clean": 1.0, "identity_clean": 1.0}
    m0, _ = calibrate_identity_margin(pred, correct, clean, 100.0, grid=grid)
    assert m0 == 0.06  # 0.06 is strictly best on accuracy, whatever the tolerance
    # equal accuracy: the smaller margin
    m1, _ = calibrate_identity_margin(pred, correct, clean, 0.0, grid=[2.0, 0.07, 0.06])
    assert m1 == 0.06
    # the identity elsewhere: the margin goes to its column
    swapped = pred[:, [1, 0]]
    m2, info2 = calibrate_identity_margin(swapped, correct[:, [1, 0]], clean, 0.0, identity=1, grid=grid)
    assert m2 == 0.06 and info2["accuracy"] == 1.0


def test_tolerance_lets_clean_accuracy_fall_by_at_most_that_many_points():
    # 4 clean rows, the predictor wrongly prefers candidate 1 on one of them by 0.1; 1 corrupted row
    # prefers 1 rightly by 0.05. Saving the clean row costs the corrupted one.
    pred = torch.tensor([[1.0, 0.9]] + [[0.0, 1.0]] * 3 + [[1.0, 0.95]])
    correct = torch.tensor([[1, 0]] * 4 + [[0, 1]])
    clean = torch.tensor([True] * 4 + [False])
    m, info = calibrate_identity_margin(pred, correct, clean, 0.0, grid=[0.0, 0.2])
    assert m == 0.2 and info["clean"] == 1.0 and info["accuracy"] == pytest.approx(0.8)
    m, info = calibrate_identity_margin(pred, correct, clean, 25.0, grid=[0.0, 0.2])  # 75 % clean is allowed
    assert m == 0.0 and info["clean"] == 0.75 and info["accuracy"] == pytest.approx(0.8)  # a tie: the smaller margin
    m, info = calibrate_identity_margin(pred, correct, clean, 24.0, grid=[0.0, 0.2])
    assert m == 0.2


def test_gated_margin_keeps_the_corrupted_rows_gain_hand_computed():
    # row 0 clean: candidate 1 predicted better by 0.10, wrongly; row 1 corrupted: candidate 1
    # predicted better by 0.05, rightly. A constant margin that saves row 0 (> 0.10) also sends
    # row 1 back to the identity; a gate that says "row 0 is clean, row 1 is not" does not.
    pred = torch.tensor([[1.0, 0.90], [1.0, 0.95]])
    correct = torch.tensor([[1, 0], [0, 1]])
    clean = torch.tensor([True, False])
    grid = [0.0, 0.2]
    m, info = calibrate_identity_margin(pred, correct, clean, 0.0, grid=grid)
    assert m == 0.2 and info["accuracy"] == 0.5 and info["clean"] == 1.0
    m, info = calibrate_identity_margin(pred, correct, clean, 0.0, grid=grid, gate=torch.tensor([1.0, 0.0]))
    assert m == 0.2 and info["accuracy"] == 1.0 and info["clean"] == 1.0


def _newton_logistic(x, y, l2):
    """Reference: minimise mean BCE(x @ w + b, y) + l2 * |w|^2 over standardised x (float64, Newton
    steps to convergence); returns the weights for the *raw* features and the bias."""
    mean, std = x.mean(0), x.std(0)
    z = torch.cat([(x - mean) / std, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    theta = torch.zeros(z.shape[1], dtype=x.dtype)
    penalty = torch.full((z.shape[1],), 2 * l2, dtype=x.dtype)
    penalty[-1] = 0.0  # the bias is not penalised
    for _ in range(50):
        p = torch.sigmoid(z @ theta)
        grad = z.T @ (p - y) / len(y) + penalty * theta
        hess = (z * (p * (1 - p))[:, None]).T @ z / len(y) + torch.diag(penalty)
        theta = theta - torch.linalg.solve(hess, grad)
    w, b = theta[:-1], theta[-1]
    return w / std, b - (w * mean / std).sum()


def test_fit_gate_equals_an_independently_fitted_logistic_regression():
    g = torch.Generator().manual_seed(0)
    n = 2000
    # features of very different scales and offsets; labels drawn from a logistic model (not separable)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([0.01, 5.0, 1.0], dtype=torch.float64) \
        + torch.tensor([3.0, -20.0, 0.5], dtype=torch.float64)
    logit = 150 * (x[:, 0] - 3.0) + 0.2 * (x[:, 1] + 20) - 1.0 * (x[:, 2] - 0.5) + 0.3
    y = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(logit)
    weight, bias = fit_gate(x.float(), y)
    assert weight.dtype == bias.dtype == torch.float32 and weight.shape == (3,) and bias.shape == ()
    ref_w, ref_b = _newton_logistic(x, y.double(), 1e-4)
    torch.testing.assert_close(weight.double(), ref_w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias.double(), ref_b, rtol=1e-4, atol=1e-4)
    # the recovered model is the one the labels were drawn from, roughly
    torch.testing.assert_close(weight.double(), torch.tensor([150.0, 0.2, -1.0], dtype=torch.float64), rtol=0.25,
                               atol=0.1)


def _controlled_predictor(t=2):
    """A TinyPredictor whose head reads features 0 and 1 as the scores of candidates 0 and 1."""
    pred = TinyPredictor(t).eval()
    with torch.no_grad():
        pred.head.weight.zero_()
        pred.head.bias.zero_()
        pred.head.weight[0, 0] = 1.0
        pred.head.weight[1, 1] = 1.0
    return pred


def _rows(n, clean_gap, corrupted_gap, g):
    """``n`` clean then ``n`` corrupted rows of 24 features: f0 - f1 = the gap (candidate 1 looks
    better by it), f2 = 1 on clean rows, 0 on corrupted ones (plus noise); only the identity is
    right on clean rows, only candidate 1 on corrupted ones."""
    f = torch.randn(2 * n, 24, generator=g) * 0.01
    f[:n, 0] += clean_gap
    f[n:, 0] += corrupted_gap
    f[:n, 2] += 1.0
    clean = torch.arange(2 * n) < n
    correct = torch.stack([clean, ~clean], 1).to(torch.uint8)
    return f, correct, clean


def test_fit_identity_calibration_gated_keeps_what_the_constant_margin_gives_away(tmp_path):
    g = torch.Generator().manual_seed(0)
    val_f, val_correct, val_clean = _rows(50, 0.10, 0.05, g)
    train_f, _, train_clean = _rows(200, 0.10, 0.05, g)
    constant = _controlled_predictor()
    info = fit_identity_calibration(constant, val_f, val_correct, val_clean, 0.0)
    # to keep the clean rows (gap 0.10 +- noise) the constant margin must exceed every clean gap,
    # so it sends every corrupted row (gap 0.05) back to the identity too
    assert info["clean"] == 1.0 and info["accuracy"] == 0.5 and "gate_accuracy" not in info
    assert not constant.calibration.gated and constant.calibration.identity == 0
    assert float(constant.calibration.margin) == info["margin"] > float(val_f[:50, 0].max())
    gated = _controlled_predictor()
    info = fit_identity_calibration(gated, val_f, val_correct, val_clean, 0.0, train_f, train_clean)
    assert info["gate_accuracy"] == 1.0 and info["clean"] == 1.0 and info["accuracy"] == 1.0
    assert gated.calibration.gated and float(gated.calibration.margin) == info["margin"]
    # what the predictor now does on the held-out rows is what the calibration promised
    with torch.no_grad():
        picks = gated.head_scores(val_f).argmin(1)
    assert torch.equal(picks, (~val_clean).long())
    # saved as its own tensors and reloaded bit for bit
    path = str(tmp_path / "gated.safetensors")
    gated.save(path)
    again = load_predictor(path, space=gated.space)
    for name in ("margin", "gate_weight", "gate_bias"):
        assert torch.equal(getattr(again.calibration, name), getattr(gated.calibration, name)), name
    assert again.calibration.identity == 0
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(x), gated(x))
    path = str(tmp_path / "constant.safetensors")
    constant.save(path)
    again = load_predictor(path, space=constant.space)
    assert not again.calibration.gated and torch.equal(again.calibration.margin, constant.calibration.margin)


def test_fit_identity_calibration_replaces_the_previous_one_and_needs_an_identity():
    g = torch.Generator().manual_seed(1)
    val_f, val_correct, val_clean = _rows(20, 0.10, 0.05, g)
    fresh = _controlled_predictor()
    expected = fit_identity_calibration(fresh, val_f, val_correct, val_clean, 0.0)
    refit = _controlled_predictor()
    refit.calibration = IdentityCalibration(1, 50.0)  # would make candidate 1 win everywhere
    assert fit_identity_calibration(refit, val_f, val_correct, val_clean, 0.0) == expected
    assert refit.calibration.identity == 0  # the space's identity, not the old calibration's
    with pytest.raises(ValueError, match="clean and corrupted training rows"):
        fit_identity_calibration(refit, val_f, val_correct, val_clean, 0.0, val_f, torch.ones(40, dtype=torch.bool))
    crops = TinyPredictor(get_space("five_crops"))
    assert identity_index(crops.space) is None
    with pytest.raises(ValueError, match="'five_crops' has no identity candidate"):
        fit_identity_calibration(crops, torch.zeros(4, 24), torch.zeros(4, 5), torch.ones(4, dtype=torch.bool), 0.0)
    assert identity_index(get_space("paper12").subset([3, 2, 0])) == 2
