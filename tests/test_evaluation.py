import json
import os

import pytest
import torch
from torch import nn

from ttach_instance.data import model_mean_std, normalizer
from ttach_instance.evaluation import (METHODS, PREDICTOR_METHODS, ViewMemo, build_method, corrupted_set, evaluate,
                                       evaluate_arrays, markdown_table, measure_cost)
from ttach_instance.normalization import to_model_input
from ttach_instance.registry import get_space
from ttach_instance.selection import select_random

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
        crops = [p(c.apply(x)) for c in get_space("ten_crops").candidates]
        f5 = p(sp.candidates[5].apply(x).flip(-1))
        f9 = p(sp.candidates[9].apply(x).flip(-1))
    e = res["errors"]
    assert e["identity"] == pytest.approx(err(views[0], labels))
    assert e["hflip"] == pytest.approx(err((views[0] + flip) / 2, labels))
    assert e["full_mean"] == pytest.approx(err(torch.stack(views).mean(0), labels))
    assert e["five_crops"] == pytest.approx(err(torch.stack(crops[:5]).mean(0), labels))
    assert e["ten_crops"] == pytest.approx(err(torch.stack(crops).mean(0), labels))
    assert e["ours_k1"] == pytest.approx(err(views[5], labels))
    assert e["ours_k2"] == pytest.approx(err((views[5] + views[9]) / 2, labels))
    assert e["ours_k1_hflip"] == pytest.approx(err((views[5] + f5) / 2, labels))
    assert e["ours_k2_hflip"] == pytest.approx(err((views[5] + views[9] + f5 + f9) / 4, labels))
    true = torch.stack([-torch.log(v.gather(1, labels[:, None]).squeeze(1)) for v in views], 1)
    assert torch.allclose(res["true"], true, atol=1e-5)
    oracle = torch.stack(views, 1)[torch.arange(23), true.argmin(1)]
    assert e["oracle_k1"] == pytest.approx(err(oracle, labels))
    assert res["choices"] == [23 if j == 5 else 0 for j in range(len(sp))]
    # the random baselines: k distinct candidates per image, drawn as select_random draws with seed 0
    # per batch of 7 (one generator per wrapper, advancing over the batches)
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([select_random(min(7, 23 - i), len(sp), 4, generator=g) for i in range(0, 23, 7)])
    assert (idx.sort(1).values.diff(dim=1) > 0).all()
    random4 = torch.stack([torch.stack(views, 1)[i, idx[i]].mean(0) for i in range(23)])
    assert e["random_k4"] == pytest.approx(err(random4, labels))
    # without a predictor the predictor methods are left out
    assert "ours_k1" not in evaluate_arrays(model, images, labels, sp, None)["errors"]


def test_ours_hflip_is_the_view_and_its_mirror_not_the_candidate_of_the_mirror():
    """Ours k + H-Flip = the chosen views and their mirrors (LossGuidedWrapper(flip=True)), which
    differs from the candidate of the mirrored input for rotations: pick rotate(-20) to see it."""
    model = tiny_model(3)
    images, labels = tiny_data(40, size=32)
    sp = space()
    norm = normalizer(model)
    x = images.float() / 255
    with torch.no_grad():
        p = lambda v: torch.softmax(model(norm(v)), -1)  # noqa: E731
        rot = sp.candidates[1].apply(x)
        mirrored_view = (p(rot) + p(rot.flip(-1))) / 2
        view_of_mirror = (p(rot) + p(sp.candidates[1].apply(x.flip(-1)))) / 2
    res = evaluate_arrays(model, images, labels, sp, FixedPredictor(len(sp), 1, 9), methods=["ours_k1_hflip"])
    assert res["errors"]["ours_k1_hflip"] == pytest.approx(err(mirrored_view, labels))
    assert not torch.allclose(mirrored_view, view_of_mirror, atol=1e-3)  # the two readings differ here


def test_harness_equals_each_methods_wrapper():
    """The harness shares views between methods (ViewMemo); each method's numbers must be those
    of its wrapper called alone, as a user calls it."""
    model = tiny_model(3)
    images, labels = tiny_data(18, size=32)
    sp = space()
    pred = FixedPredictor(len(sp), 4, 7)
    res = evaluate_arrays(model, images, labels, sp, pred, batch_size=6)
    mean, std = model_mean_std(model)
    x = to_model_input(images.float() / 255, mean, std)
    memo = ViewMemo(model)
    for m in METHODS:
        alone = build_method(m, model, sp, pred, mean=mean, std=std)
        shared = build_method(m, memo, sp, pred, mean=mean, std=std)
        outs = []
        with torch.no_grad():
            for w in (alone, shared):
                parts = []
                for i in range(0, 18, 6):
                    out = w(x[i:i + 6], labels[i:i + 6]) if m == "oracle_k1" else w(x[i:i + 6])
                    parts.append(out[0] if isinstance(out, tuple) else out)
                outs.append(torch.cat(parts))
        torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=0, msg=lambda s, m=m: f"{m}: {s}")
        assert res["errors"][m] == pytest.approx(err(outs[0], labels)), m
    assert memo._cache  # the memo served rows


def test_view_memo_runs_each_distinct_row_once():
    calls = []
    model = nn.Linear(4, 2)
    model.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    memo = ViewMemo(model)
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    out = memo(torch.cat([a, b, a]))
    assert calls == [2] and torch.equal(out[0], out[2])
    again = memo(torch.cat([b, a]))
    assert calls == [2] and torch.equal(again, out[[1, 0]])
    memo.clear()
    memo(a)
    assert calls == [2, 1]


def test_evaluate_writes_outputs_and_resumes(tmp_path):
    model = tiny_model(3)
    images, labels = tiny_data(12, size=32)
    kw = dict(predictor=FixedPredictor(12, 3, 0), size=32, corruptions=["contrast"], held_out=["saturate"],
              severities=[2], cost_images=0, progress=False, log=lambda m: None)
    res = evaluate(model, images, labels, space(), str(tmp_path), **kw)
    for f in ("results.json", "table.md", "selection_rates.png", "pred_vs_true.png", "run.json"):
        assert os.path.isfile(tmp_path / f), f
    assert os.path.isfile(tmp_path / "data" / "contrast_2.safetensors")
    with open(tmp_path / "results.json") as f:
        on_disk = json.load(f)
    assert on_disk["common_mean"] == res["common_mean"]
    assert res["common_mean"]["identity"] == pytest.approx(on_disk["per_corruption"]["contrast"]["identity"])
    assert res["selection_rates"]["contrast_2"][3] == 1.0
    direct = corrupted_set(images, "contrast", 2, 32, None)
    res2 = evaluate_arrays(model, direct, labels, space(), FixedPredictor(12, 3, 0))
    assert res2["errors"]["ours_k1"] == pytest.approx(res["per_corruption"]["contrast"]["ours_k1"])
    # the same evaluation again: per-set results are reused (their corrupted set is not rebuilt)
    os.remove(tmp_path / "data" / "contrast_2.safetensors")
    again = evaluate(model, images, labels, space(), str(tmp_path), **kw)
    assert again["common_mean"] == res["common_mean"]
    assert not os.path.isfile(tmp_path / "data" / "contrast_2.safetensors")
    table = markdown_table(res)
    assert "| Ours k=1 |" in table and "| Oracle k=1 |" in table and "| 10-Crops |" in table


def test_evaluate_refuses_a_folder_of_another_run(tmp_path):
    """Stale results are never shown: other weights, other data of the same size, other methods."""
    model = tiny_model(3)
    images, labels = tiny_data(8, size=32)
    kw = dict(size=32, corruptions=["contrast"], held_out=[], severities=[1], cost_images=0, progress=False,
              methods=["identity", "hflip"])
    evaluate(model, images, labels, space(), str(tmp_path), **kw)
    other = tiny_model(3)
    with torch.no_grad():
        other[0].weight.add_(0.1)
    with pytest.raises(ValueError, match=r"another evaluation \(model\.weights_sha256"):
        evaluate(other, images, labels, space(), str(tmp_path), **kw)
    with pytest.raises(ValueError, match=r"another evaluation \(data"):
        evaluate(model, images.flip(-1), labels, space(), str(tmp_path), **kw)
    with pytest.raises(ValueError, match=r"methods"):
        evaluate(model, images, labels, space(), str(tmp_path), **dict(kw, methods=["identity", "hflip", "full_mean"]))
    with pytest.raises(ValueError, match=r"predictor"):
        evaluate(model, images, labels, space(), str(tmp_path), predictor=FixedPredictor(12, 1, 2), **kw)
    # a corrupted-set cache of other data is rebuilt, not reused
    a = corrupted_set(images, "contrast", 1, 32, str(tmp_path / "c"))
    b = corrupted_set(images.flip(-1), "contrast", 1, 32, str(tmp_path / "c"))
    assert torch.equal(b, corrupted_set(images.flip(-1), "contrast", 1, 32, None)) and not torch.equal(a, b)


def test_bad_arguments(tmp_path):
    model = tiny_model(3)
    images, labels = tiny_data(4, size=32)
    with pytest.raises(ValueError, match="methods"):
        evaluate_arrays(model, images, labels, space(), None, methods=["magic"])
    with pytest.raises(ValueError, match="corruptions"):
        evaluate(model, images, labels, space(), str(tmp_path), corruptions=["nope"])
    with pytest.raises(ValueError, match="severities"):
        evaluate(model, images, labels, space(), str(tmp_path / "b"), severities=[7])
    with pytest.raises(ValueError, match="needs a loss predictor"):
        build_method("ours_k1", model, space())
    assert len(METHODS) == 23 and set(PREDICTOR_METHODS) == {m for m in METHODS if m.startswith("ours")}


def test_measure_cost_counts_model_calls():
    model = tiny_model(3)
    images, _ = tiny_data(10, size=32)
    cost = measure_cost(model, FixedPredictor(12, 4, 7), space(), images, repeats=1, batch_size=4)
    expected = {"identity": 1, "hflip": 2, "five_crops": 5, "ten_crops": 10, "random_k1": 1, "random_k2": 2,
                "random_k4": 4, "full_mean": 12, "ours_k1": 1, "ours_k2": 2, "ours_k1_hflip": 2, "ours_k2_hflip": 4,
                "center_crop_paper": 1, "five_crops_paper": 5, "ten_crops_paper": 10, "ours_k2_five_crops": 10,
                "hflip_logits": 2, "five_crops_logits": 5, "ten_crops_logits": 10, "five_crops_paper_logits": 5,
                "ten_crops_paper_logits": 10, "full_mean_logits": 12}
    assert {m: c["model_calls_per_image"] for m, c in cost.items()} == expected
    assert cost["identity"]["relative_time"] == 1.0


def test_crops_resized_back_are_left_out_below_16_px_whatever_their_merge():
    """Below 16 px every method whose fixed space blows a crop back up (five_crops, ten_crops and
    their logit-averaging twins) is left out; the paper crops (an input-size window) and the rest
    stay. The reference: each method's space read from its wrapper, its ops' names."""
    from ttach_instance.evaluation import build_method

    model = tiny_model(3)
    fixed = ["hflip", "five_crops", "five_crops_logits", "ten_crops_logits", "five_crops_paper",
             "ten_crops_paper_logits", "center_crop_paper"]
    spaces = {m: build_method(m, model, space()).space for m in fixed}
    resized_back = {m for m, sp in spaces.items() if any(n.startswith("crop_") for n in sp.names)}
    assert resized_back == {"five_crops", "five_crops_logits", "ten_crops_logits"}
    for side in (8, 16):
        images, labels = tiny_data(4, size=side)
        errors = evaluate_arrays(model, images, labels, space(), None, methods=fixed)["errors"]
        assert set(errors) == (set(fixed) - resized_back if side < 16 else set(fixed)), side
