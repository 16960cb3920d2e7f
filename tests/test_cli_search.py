"""`ttach-instance search {gps,budget}`: the prediction cache it makes, the policy file it writes
(checked against the search functions run on the same cache and the pool's own specs), and its
argument errors."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from ttach_instance.cli import main
from ttach_instance.data import build_model
from ttach_instance.registry import get_space
from ttach_instance.search import budget_policy_search, greedy_policy_search
from ttach_instance.training.predictions import load_predictions

from test_cli import FACTORY, _val_pixels, folder  # noqa: F401 - the image folder fixture


@pytest.fixture()
def weights16(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "w16.pt")
    torch.save(build_model(FACTORY, num_classes=2).state_dict(), path)
    return path


def test_search_gps_then_budget_on_the_same_cache(folder, weights16, tmp_path, capsys):  # noqa: F811
    preds, gps_file, budget_file = str(tmp_path / "preds"), str(tmp_path / "gps.json"), str(tmp_path / "budget.json")
    assert main(["search", "gps", "--predictions", preds, "--out", gps_file, "--model", FACTORY, "--weights", weights16,
                 "--data", folder, "--space", "paper12", "--n", "3", "--shard-size", "4"]) == 0
    out = capsys.readouterr().out
    cache = load_predictions(preds)
    pool = get_space("paper12")
    assert cache["log_probs"].shape == (12, 6, 2) and cache["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    ref = greedy_policy_search(cache["log_probs"], cache["labels"], 3)
    doc = json.load(open(gps_file))
    assert doc["kind"] == "ttach-instance policy" and doc["format"] == 1 and doc["search"] == "gps"
    assert doc["indices"] == ref.indices
    assert doc["candidates"] == [pool.spec()[i] for i in ref.indices]
    assert [s["score"] for s in doc["steps"]] == pytest.approx(ref.scores, abs=1e-12)
    assert [s["temperature"] for s in doc["steps"]] == pytest.approx(ref.temperatures, rel=1e-9)
    assert doc["pool"] == {"name": "paper12", "params": {}, "fingerprint": pool.fingerprint,
                           "candidate_names": pool.names}
    assert doc["model"] == cache["manifest"]["model"] and doc["model"]["spec"]["model"] == FACTORY
    assert doc["data"]["dataset"] == cache["manifest"]["dataset"] and doc["data"]["num_images"] == 6
    assert doc["predictions"]["identity"] == cache["identity"]
    for step, i in enumerate(ref.indices, 1):  # one printed line per step: candidate and score
        assert any(line.split()[:1] == [str(step)] and pool.names[i] in line and f"{ref.scores[step - 1]:.6f}" in line
                   for line in out.splitlines()), out
    # budget on the cache alone (no model): the original first, the best 3-subset by NLL
    assert main(["search", "budget", "--predictions", preds, "--out", budget_file, "--budget", "3",
                 "--objective", "nll"]) == 0
    ref = budget_policy_search(cache["log_probs"], cache["labels"], 3, identity=pool.names.index("identity"),
                               objective="nll")
    doc = json.load(open(budget_file))
    assert doc["indices"] == ref.indices and doc["indices"][0] == pool.names.index("identity")
    assert doc["method"] == "exhaustive" and doc["objective"] == "nll"
    assert doc["settings"] == {"budget": 3, "identity": 0, "objective": "nll", "exhaustive_limit": 20000}
    # another model's weights do not continue this cache
    torch.manual_seed(1)
    other = str(tmp_path / "other.pt")
    torch.save(build_model(FACTORY, num_classes=2).state_dict(), other)
    with pytest.raises(SystemExit) as exc:
        main(["search", "gps", "--predictions", preds, "--out", gps_file, "--model", FACTORY, "--weights", other,
              "--data", folder])
    assert exc.value.code == 2
    assert "model.weights_sha256" in capsys.readouterr().err


def test_search_arguments_are_validated(folder, tmp_path, capsys):  # noqa: F811
    base = ["search", "gps", "--predictions", str(tmp_path / "none"), "--out", str(tmp_path / "p.json")]
    for extra, words in [
        (["--n", "0"], "argument --n: must be a positive integer"),
        (["--n", "two"], "argument --n: must be an integer"),
        (["--temperature", "-1"], "argument --temperature: must be a number > 0"),
        (["--exhaustive-limit", "-3"], "argument --exhaustive-limit"),
        (["--model", FACTORY], "--model and --data go together"),
        ([], "--predictions: directory .* is not a prediction cache"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert re.search(words, err), (extra, err)
    with pytest.raises(SystemExit):
        main(["search", "budget", "--predictions", str(tmp_path / "none"), "--out", "x", "--budget", "0"])
    assert "argument --budget: must be a positive integer" in capsys.readouterr().err


def test_budget_flags_checked_against_the_pool(folder, weights16, tmp_path, capsys):  # noqa: F811
    preds = str(tmp_path / "preds")
    common = ["--predictions", preds, "--out", str(tmp_path / "p.json"), "--model", FACTORY, "--weights", weights16,
              "--data", folder, "--space", "five_crops"]
    for extra, words in [([], "--identity is required: pool 'five_crops' has no candidate without ops"),
                         (["--budget", "6"], "--budget must be at most the pool's 5 candidates, got 6"),
                         (["--identity", "nope"], "--identity must be a candidate name or an index in 0..4"),
                         (["--identity", "5"], "--identity must be a candidate name or an index in 0..4")]:
        with pytest.raises(SystemExit):
            main(["search", "budget", *common, *extra])
        assert words in capsys.readouterr().err
    assert main(["search", "budget", *common, "--budget", "2", "--identity", "1"]) == 0
    assert json.load(open(tmp_path / "p.json"))["indices"][0] == 1


@pytest.fixture()
def split16(folder, tmp_path):  # noqa: F811
    """Weights of a model whose candidates disagree: a fresh model puts every image in one class,
    so its class-1 bias is moved to the median margin of paper12's views of the val images."""
    torch.manual_seed(0)
    model = build_model(FACTORY, num_classes=2)
    x, _ = _val_pixels(folder)
    mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        z = torch.cat([model((c.apply(x) - mean) / std) for c in get_space("paper12").candidates])
        model.head.bias[1] -= (z[:, 1] - z[:, 0]).median()
    path = str(tmp_path / "split.pt")
    torch.save(model.state_dict(), path)
    return path


def test_eval_policy_rows_from_searched_files(folder, split16, tmp_path, capsys):  # noqa: F811
    """search gps / budget, then ``eval --policy``: the rows' clean errors are those of the mean
    probability of the policy's candidates read from the prediction cache (same images, same
    model; an independent path: the cache runs every candidate, the rows run the wrappers)."""
    preds, gps_file, budget_file = str(tmp_path / "preds"), str(tmp_path / "gps.json"), str(tmp_path / "b2.json")
    assert main(["search", "gps", "--predictions", preds, "--out", gps_file, "--model", FACTORY, "--weights", split16,
                 "--data", folder, "--n", "5", "--temperature", "none"]) == 0
    assert main(["search", "budget", "--predictions", preds, "--out", budget_file, "--budget", "2"]) == 0
    out = str(tmp_path / "eval")
    assert main(["eval", "--model", FACTORY, "--weights", split16, "--data", folder, "--out", out,
                 "--corruptions", "contrast", "--held-out", "saturate", "--severities", "1", "--methods", "identity",
                 "--cost-images", "0", "--policy", f"gps={gps_file}", "--policy", f"budget2={budget_file}"]) == 0
    text = capsys.readouterr().out
    res = json.load(open(f"{out}/results.json"))
    gps, budget = json.load(open(gps_file))["indices"], json.load(open(budget_file))["indices"]
    rows = {f"gps_n{n}": gps[:n] for n in (1, 2, 4, 5)}
    rows["budget2"] = budget
    assert res["methods"] == ["identity", *rows]
    assert [res["labels"][m] for m in rows] == ["GPS n=1", "GPS n=2", "GPS n=4", "GPS n=5", "Budget N=2"]
    cache = load_predictions(preds)
    probs, y = cache["log_probs"].double().exp(), cache["labels"]
    for m, idx in {"identity": [0], **rows}.items():
        wrong = (probs[idx].mean(0).argmax(1) != y).double().mean()
        assert res["clean"][m] == pytest.approx(100 * float(wrong)), m
        assert f"| {res['labels'][m]} |" in text
    assert len({res["clean"][m] for m in rows}) > 1, res["clean"]  # the set-up tells the rows apart
    # bad --policy values are named
    for extra, words in [(["--policy", "gps"], "--policy must be NAME=FILE"),
                         (["--policy", f"gps={tmp_path / 'none.json'}"], "--policy gps: no policy file"),
                         (["--policy", f"gps={gps_file}", "--policy", f"gps={budget_file}"], "given twice"),
                         (["--policy", f"hflip={gps_file}"], "built-in method")]:
        with pytest.raises(SystemExit) as exc:
            main(["eval", "--model", FACTORY, "--weights", split16, "--data", folder, "--out",
                  str(tmp_path / "e2"), *extra])
        assert exc.value.code == 2
        assert words in capsys.readouterr().err, extra


def test_eval_ours_over_a_gps_space(folder, split16, tmp_path, capsys):  # noqa: F811
    """The paper's Fig. 7: ``eval --space gps.json`` runs the loss-guided rows over the GPS
    policy's candidates (repeats kept), beside the GPS rows; Ours k=1's clean error is that of
    ``LossGuidedWrapper`` called alone on the same images with the same predictor."""
    from ttach_instance.data import load_dataset, model_mean_std
    from ttach_instance.normalization import to_model_input
    from ttach_instance.policy import policy_space
    from ttach_instance.predictors import create_predictor
    from ttach_instance.wrappers import LossGuidedWrapper

    preds, gps_file = str(tmp_path / "preds"), str(tmp_path / "gps.json")
    assert main(["search", "gps", "--predictions", preds, "--out", gps_file, "--model", FACTORY, "--weights", split16,
                 "--data", folder, "--n", "4", "--temperature", "none"]) == 0
    space = policy_space(gps_file)
    torch.manual_seed(3)
    predictor = create_predictor("small", space, width=4, input_size=16).eval()
    pred_file = str(tmp_path / "pred.safetensors")
    predictor.save(pred_file)
    out = str(tmp_path / "eval")
    assert main(["eval", "--model", FACTORY, "--weights", split16, "--data", folder, "--out", out, "--space", gps_file,
                 "--predictor", pred_file, "--policy", f"gps={gps_file}", "--methods", "identity,ours_k1,ours_k2",
                 "--corruptions", "contrast", "--held-out", "saturate", "--severities", "1", "--cost-images", "0"]) == 0
    res = json.load(open(f"{out}/results.json"))
    assert res["methods"] == ["identity", "ours_k1", "ours_k2", "gps_n1", "gps_n2", "gps_n4"]
    assert res["candidate_names"] == space.names
    model = build_model(FACTORY, num_classes=2, weights=split16).eval()
    ds = load_dataset(folder, split="val")
    mean, std = model_mean_std(model)
    x = to_model_input(ds.images.float() / 255, mean, std)
    with torch.no_grad():
        for m, k in (("ours_k1", 1), ("ours_k2", 2)):
            alone = LossGuidedWrapper(model, predictor, k=k, mean=mean, std=std)(x)
            assert res["clean"][m] == pytest.approx(100 * float((alone.argmax(1) != ds.labels).double().mean())), m
    assert res["clean"]["ours_k1"] != res["clean"]["identity"]  # the set-up tells the picks apart
    selected = torch.tensor(res["selection_rates"]["clean_0"])
    assert selected.shape == (len(space),) and float(selected.sum()) == pytest.approx(1.0)


def test_search_staged_end_to_end(folder, split16, tmp_path, capsys):  # noqa: F811
    """``search staged``: stages a and b on the prediction cache, the composites of the family
    winners predicted by the model into a second cache (checked against the model run on each
    composite's ops applied in order), the policy equal to ``staged_budget_search`` on the same
    tensors, written as a policy file that loads as a space; then the same search from the caches
    alone, without stage c, and its refusals."""
    from ttach_instance.data import load_dataset, model_mean_std
    from ttach_instance.policy import load_policy, policy_space
    from ttach_instance.staged_search import composite_specs, op_families, staged_budget_search

    preds, out = str(tmp_path / "preds"), str(tmp_path / "staged.json")
    assert main(["search", "staged", "--predictions", preds, "--out", out, "--model", FACTORY, "--weights", split16,
                 "--data", folder, "--budget", "3", "--objective", "nll"]) == 0
    text = capsys.readouterr().out
    pool = get_space("paper12")
    cache, composites = load_predictions(preds), load_predictions(preds + "-composites")
    families = op_families(pool.spec())
    assert sorted({f for f in families if f}) == ["autocontrast", "color", "rotate", "sharpness", "zoom"]
    doc = json.load(open(out))
    pairs = [tuple(p) for p in doc["details"]["composites"]]
    assert len(pairs) == 10  # 5 family winners, every pair
    assert composites["manifest"]["candidate_specs"] == composite_specs(pool.spec(), pairs)
    # the composites' predictions: candidate i's ops, then j's, through the model
    model = build_model(FACTORY, num_classes=2, weights=split16).eval()
    ds = load_dataset(folder, split="val")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in model_mean_std(model))
    x = ds.images.float() / 255
    with torch.no_grad():
        direct = torch.stack([torch.log_softmax(model((pool[j].apply(pool[i].apply(x)) - mean) / std), 1)
                              for i, j in pairs])
    torch.testing.assert_close(composites["log_probs"], direct, atol=1e-5, rtol=0)
    ref = staged_budget_search(cache["log_probs"], cache["labels"], 3, families, objective="nll",
                               composite_log_probs=lambda p: composites["log_probs"])
    assert doc["search"] == doc["method"] == "staged" and doc["indices"] == ref.indices
    assert [s["score"] for s in doc["steps"]] == pytest.approx(ref.scores, abs=1e-12)
    assert doc["details"]["stages"]["sweep"] == json.loads(json.dumps(ref.details["stages"]["sweep"]))
    names = pool.names + [s["name"] for s in composite_specs(pool.spec(), pairs)]
    assert doc["pool"]["candidate_names"] == names and doc["pool"]["params"]["base"]["fingerprint"] == pool.fingerprint
    assert "stage a, magnitude sweep" in text and "stage c, composites of 16" in text
    # it loads as a space: the chosen candidates, composites as their ops in order
    policy = load_policy(out)
    space = policy_space(out)
    assert space.names == [names[i] for i in ref.indices] and policy.search == "staged"
    assert space.spec() == [(pool.spec() + composite_specs(pool.spec(), pairs))[i] for i in ref.indices]
    # from the caches alone (no model): the same policy
    again = str(tmp_path / "again.json")
    assert main(["search", "staged", "--predictions", preds, "--out", again, "--budget", "3", "--objective", "nll"]) == 0
    assert json.load(open(again))["indices"] == ref.indices
    # without stage c: stage b's choice, no composite cache needed
    plain = str(tmp_path / "plain.json")
    assert main(["search", "staged", "--predictions", preds, "--out", plain, "--budget", "3", "--objective", "nll",
                 "--no-composites", "--composite-predictions", str(tmp_path / "none")]) == 0
    nocomp = staged_budget_search(cache["log_probs"], cache["labels"], 3, families, objective="nll")
    assert json.load(open(plain))["indices"] == nocomp.indices and all(i < 12 for i in nocomp.indices)
    capsys.readouterr()
    for extra, words in [
        (["--composite-predictions", str(tmp_path / "none")], "give --model and --data"),
        (["--composite-pool", "2"], "holds other composites than the 1"),
        (["--budget", "17"], "budget must be at most the 16 candidates"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["search", "staged", "--predictions", preds, "--out", str(tmp_path / "x.json"), *extra])
        assert exc.value.code == 2
        assert words in capsys.readouterr().err, extra
    with pytest.raises(SystemExit):
        main(["search", "gps", "--predictions", preds, "--out", str(tmp_path / "x.json"), "--no-composites"])
    assert "are `search staged` options" in capsys.readouterr().err


def test_caches_record_the_space_reference_so_fit_and_search_rebuild_it(folder, weights16, tmp_path, capsys):  # noqa: F811
    """A policy file as --space is the built-in space 'policy' with its path and n: the label and
    prediction caches record those parameters, so ``fit`` (no --space) and a continued ``search``
    (no --space; the default would be paper12) rebuild exactly that space."""
    from ttach_instance.predictors import load_predictor
    from ttach_instance.training.labels import LabelCache

    preds, gps_file = str(tmp_path / "preds"), str(tmp_path / "gps.json")
    model = ["--model", FACTORY, "--weights", weights16, "--data", folder]
    assert main(["search", "gps", "--predictions", preds, "--out", gps_file, *model, "--n", "3"]) == 0
    ref = f"{gps_file}:n=2"
    space = get_space(ref)
    assert space.name == "policy" and space.params == {"path": gps_file, "n": 2}
    labels, fit = str(tmp_path / "labels"), str(tmp_path / "fit")
    assert main(["labels", *model, "--out", labels, "--space", ref, "--corruptions", "none",
                 "--corruption-p", "0"]) == 0
    manifest = LabelCache(labels).manifest()
    assert (manifest["space"], manifest["space_params"]) == ("policy", {"path": gps_file, "n": 2})
    assert main(["fit", "--labels", labels, "--out", fit, "--predictor", "small", "--width", "4", "--epochs", "1",
                 "--batch-size", "4", "--val-fraction", "0.25"]) == 0
    predictor = load_predictor(f"{fit}/predictor.safetensors")  # rebuilt from the checkpoint's own record
    assert predictor.space.fingerprint == space.fingerprint and predictor.space.params == {"path": gps_file, "n": 2}
    # a prediction cache of the policy's candidates, continued without --space
    pool_preds = str(tmp_path / "pool_preds")
    assert main(["search", "gps", "--predictions", pool_preds, "--out", str(tmp_path / "p.json"), *model,
                 "--space", ref, "--n", "2", "--shard-size", "4"]) == 0
    assert main(["search", "gps", "--predictions", pool_preds, "--out", str(tmp_path / "p.json"), *model,
                 "--n", "2", "--shard-size", "4"]) == 0
    assert load_predictions(pool_preds)["manifest"]["space_params"] == {"path": gps_file, "n": 2}
    capsys.readouterr()
    # a recorded space the registry cannot rebuild any more: named, with the way out
    os.remove(gps_file)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--labels", labels, "--out", fit + "2", "--predictor", "small", "--width", "4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cannot rebuild its space 'policy'" in err and "give --space" in err and labels in err
