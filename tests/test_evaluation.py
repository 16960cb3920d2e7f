import json
import pytest
import torch
from torch import nn

from ttach_instance.data import normalizer
from ttach_instance.evaluation import (METHODS, corrupted_set, evaluate, evaluate_arrays, markdown_table,
                                         measure_cost)

from _tiny import space, tiny_data, tiny_model


class FixedPredictor(nn.Module):
    """Always predicts candidate ``best`` lowest, then ``second``."""

    def __init__(self, t, best, second):
        super().__init__()
        self.t, self.best, self.second = t, best, second

    def forward(self, x):
        s = torch.arange(self.t, dtype=torch.float32).repeat(x.shape[0], 1) + 10
        s[:, self.best] = 0.0
        s[:, self.second] = 1.0
        return s


def err(probs, y):
    return 100.0 * (1 - (probs.argmax(1) == y).float().mean().item())


def test_methods_against_direct_computation():
    model = tiny_model(3)
    images, labels = tiny_data(23, size=32)
    sp = space()
    norm = normalizer(model)
    res = evaluate_arrays(model, images, labels, sp, FixedPredictor(len(sp), 5, 9), batch_size=7)
    x = images.float() / 255
    with torch.no_grad():
        p = lambda v: torch.softmax(model(norm(v)), -1)  # noqa: E731
        views = [p(c.apply(x)) for c in sp.candidates]
        flip = p(x.flip(-1))
        from ttach_instance.registry import get_space

        crops = [p(c.apply(x)) for c in get_space("ten_crops").candidates]
    e = res["errors"]
    assert e["identity"] == pytest.approx(err(views[0], labels))
    assert e["hflip"] == pytest.approx(err((views[0] + flip) / 2, labels))
    assert e["full_mean"] == pytest.approx(err(torch.stack(views).mean(0), labels))
    assert e["five_crops"] == pytest.approx(err(torch.stack(crops[:5]).mean(0), labels))
    assert e["ten_crops"] == pytest.approx(err(torch.stack(crops).mean(0), labels))
    assert e["ours_k1"] == pytest.approx(err(views[5], labels))
    assert e["ours_k2"] == pytest.approx(err((views[5] + views[9]) / 2, labels))
    with torch.no_grad():
        f5 = p(sp.candidates[5].apply(x).flip(-1))
        f9 = p(sp.candidates[9].apply(x).flip(-1))
    assert e["ours_k1_hflip"] == pytest.approx(err((views[5] + f5) / 2, labels))
    assert e["ours_k2_hflip"] == pytest.approx(err((views[5] + views[9] + f5 + f9) / 4, labels))
    true = torch.stack([-torch.log(v.gather(1, labels[:, None]).squeeze(1)) for v in views], 1)
    assert torch.allclose(res["true"], true, atol=1e-5)
    oracle = torch.stack(views, 1)[torch.arange(23), true.argmin(1)]
    assert e["oracle_k1"] == pytest.approx(err(oracle, labels))
    assert e["oracle_k1"] <= min(e[m] for m in ("identity", "ours_k1", "random_k1"))
    assert res["choices"] == [23 if j == 5 else 0 for j in range(len(sp))]
    # without a predictor the predictor methods are left out
    assert "ours_k1" not in evaluate_arrays(model, images, labels, sp, None)["errors"]


def test_ours_hflip_is_what_the_flip_wrapper_deploys():
    """Ours k + H-Flip = the chosen views and their mirrors (LossGuidedWrapper(flip=True)), which
    differs from the candidate of the mirrored input for rotations: pick rotate(-20) to see it."""
    from ttach_instance.data import model_mean_std
    from ttach_instance.evaluation import _method_forward
    from ttach_instance.wrappers import LossGuidedWrapper

    model = tiny_model(3)
    images, _ = tiny_data(40, size=32)
    sp = space()
    pred = FixedPredictor(len(sp), 1, 9)
    pred.space = sp
    norm = normalizer(model)
    mean, std = model_mean_std(model)
    x = images.float() / 255
    with torch.no_grad():
        p = lambda v: torch.softmax(model(norm(v)), -1)  # noqa: E731
        rot = sp.candidates[1].apply(x)
        mirrored_view = (p(rot) + p(rot.flip(-1))) / 2
        view_of_mirror = (p(rot) + p(sp.candidates[1].apply(x.flip(-1)))) / 2
        probs_model = nn.Sequential(model, nn.Softmax(-1))  # the wrapper's mean of probabilities
        for k in (1, 2):
            deployed = LossGuidedWrapper(probs_model, pred, k=k, flip=True, mean=mean, std=std)(norm(x))
            forward = _method_forward(f"ours_k{k}_hflip", model, pred, sp, None, norm, x, torch.Generator())
            assert torch.allclose(forward, deployed, atol=1e-6), k
            if k == 1:
                assert torch.allclose(forward, mirrored_view, atol=1e-6)
    assert not torch.allclose(mirrored_view, view_of_mirror, atol=1e-3)  # the two readings differ here


def test_random_k_is_reproducible_and_distinct():
    model = tiny_model(3)
    images, labels = tiny_data(30, size=32)
    a = evaluate_arrays(model, images, labels, space(), None, methods=["random_k1", "random_k4"], seed=1)
    b = evaluate_arrays(model, images, labels, space(), None, methods=["random_k1", "random_k4"], seed=1)
    assert a["errors"] == b["errors"]


def test_evaluate_writes_outputs_and_resumes(tmp_path):
    model = tiny_model(3)
    images, labels = tiny_data(12, size=32)
    kw = dict(predictor=FixedPredictor(12, 3, 0), size=32, corruptions=["contrast"], held_out=["saturate"],
              severities=[2], cost_images=0, progress=False, log=lambda m: None)
    res = evaluate(model, images, labels, space(), str(tmp_path), **kw)
    for f in ("results.json", "table.md", "selection_rates.png", "pred_vs_true.png"):
        assert os.path.isfile(tmp_path / f), f
    assert os.path.isfile(tmp_path / "data" / "contrast_2.safetensors")
    with open(tmp_path / "results.json") as f:
        on_disk = json.load(f)
    assert on_disk["common_mean"] == res["common_mean"]
    assert res["common_mean"]["identity"] == pytest.approx(on_disk["per_corruption"]["contrast"]["identity"])
    assert res["selection_rates"]["contrast_2"][3] == 1.0
    # corrupted set equals corrupting directly; the cache is reused on the second run
    direct = corrupted_set(images, "contrast", 2, 32, None)
    res2 = evaluate_arrays(model, direct, labels, space(), FixedPredictor(12, 3, 0))
    assert res2["errors"]["ours_k1"] == pytest.approx(res["per_corruption"]["contrast"]["ours_k1"])
    os.remove(tmp_path / "data" / "contrast_2.safetensors")
    again = evaluate(model, images, labels, space(), str(tmp_path), **kw)
    assert again["common_mean"] == res["common_mean"]
    assert not os.path.isfile(tmp_path / "data" / "contrast_2.safetensors")  # per-set result was reused
    table = markdown_table(res)
    assert "| Ours k=1 |" in table and "| Oracle k=1 |" in table and "| 10-Crops |" in table


def test_bad_arguments(tmp_path):
    model = tiny_model(3)
    images, labels = tiny_data(4, size=32)
    with pytest.raises(ValueError, match="methods"):
        evaluate_arrays(model, images, labels, space(), None, methods=["magic"])
    with pytest.raises(ValueError, match="corruptions"):
        evaluate(model, images, labels, space(), str(tmp_path), corruptions=["nope"])
    with pytest.raises(ValueError, match="severities"):
        evaluate(model, images, labels, space(), str(tmp_path), severities=[7])
    assert len(METHODS) == 13


def test_measure_cost_counts_model_calls_and_matches_errors():
    model = tiny_model(3)
    images, labels = tiny_data(10, size=32)
    pred = FixedPredictor(12, 4, 7)
    cost = measure_cost(model, pred, space(), images, repeats=1, batch_size=4)
    expected = {"identity": 1, "hflip": 2, "five_crops": 5, "ten_crops": 10, "random_k1": 1, "random_k2": 2,
                "random_k4": 4, "full_mean": 12, "ours_k1": 1, "ours_k2": 2, "ours_k1_hflip": 2, "ours_k2_hflip": 4,
                "oracle_k1": 12}
    assert {m: c["model_calls_per_image"] for m, c in cost.items()} == expected
    assert cost["identity"]["relative_time"] == 1.0
    # the deployable forwards give the same predictions as the shared-view evaluation
    from ttach_instance.data import normalizer
    from ttach_instance.evaluation import _method_forward
    from ttach_instance.registry import get_space

    res = evaluate_arrays(model, images, labels, space(), pred)
    for m in ("identity", "hflip", "five_crops", "ten_crops", "full_mean", "ours_k1", "ours_k2", "ours_k2_hflip"):
        probs = _method_forward(m, model, pred, space(), get_space("ten_crops"), normalizer(model),
                                images.float() / 255, torch.Generator())
        assert err(probs, labels) == pytest.approx(res["errors"][m]), m
