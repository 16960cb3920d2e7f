"""Table-1 rows from policy files (GPS n=1/2/4/N, Budget N) and Ours over a GPS space, against a
plain loop over the policy's candidates (softmax of each view, mean with repeats counted, argmax)
and against each row's wrapper called alone."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ttach_instance.data import model_mean_std, normalizer
from ttach_instance.evaluation import ViewMemo, build_method, evaluate, evaluate_arrays, markdown_table
from ttach_instance.evaluation.methods import load_policies, policy_methods
from ttach_instance.normalization import to_model_input
from ttach_instance.policy import policy_space
from ttach_instance.search import SearchResult, policy_document

from _tiny import space, tiny_data, tiny_model
from test_evaluation import FixedPredictor, err

#: A GPS result with a repeat (zoom(0.8) twice) and a budget policy that starts at the identity.
GPS = [3, 9, 3, 2, 7]
BUDGET = [0, 4]


def manifest(pool):
    return {"candidate_names": pool.names, "candidate_specs": pool.spec(), "space": pool.name, "space_params": {},
            "space_fingerprint": pool.fingerprint, "model": {"class": "tiny"}, "dataset": "d", "num_images": 1,
            "size": 32, "source_size": [32, 32]}


def doc(kind, indices, pool=None):
    pool = pool or space()
    result = SearchResult(list(indices), [0.0] * len(indices), [1.0] * len(indices), "log_likelihood", "greedy")
    return policy_document(result, kind, manifest(pool), {})


def policy_file(tmp_path, name, kind, indices):
    path = str(tmp_path / f"{name}.json")
    with open(path, "w") as f:
        json.dump(doc(kind, indices), f)
    return path


def balanced_model():
    """The tiny model with its class bias removed on the test images (it predicts class 2 for all
    of them otherwise), so the candidates' predictions differ and the rows can be told apart."""
    model = tiny_model(3)
    images, _ = tiny_data(23, size=32)
    with torch.no_grad():
        model[4].bias -= model(normalizer(model)(images.float() / 255)).mean(0)
    return model


def views(model, images):
    """Softmax of ``model`` on every paper12 candidate of ``images``, a plain loop: ``(T, N, C)``."""
    x, norm = images.float() / 255, normalizer(model)
    with torch.no_grad():
        return torch.stack([torch.softmax(model(norm(c.apply(x))), -1) for c in space().candidates])


def test_rows_keys_labels_and_costs(tmp_path):
    policies = load_policies({"gps": policy_file(tmp_path, "g", "gps", GPS),
                              "budget2": policy_file(tmp_path, "b", "budget", BUDGET),
                              "mine": doc("gps", GPS[:3]), "dufour": doc("budget", [0, 4, 9])})
    rows = policy_methods(policies)
    assert {k: v[:2] for k, v in rows.items()} == {
        "gps_n1": ("GPS n=1", 1), "gps_n2": ("GPS n=2", 2), "gps_n4": ("GPS n=4", 4), "gps_n5": ("GPS n=5", 5),
        "budget2": ("Budget N=2", 2), "mine_n1": ("GPS n=1 (mine)", 1), "mine_n2": ("GPS n=2 (mine)", 2),
        "mine_n3": ("GPS n=3 (mine)", 3), "dufour": ("Budget N=3 (dufour)", 3)}
    for bad, words in [({"ours_k1": doc("gps", GPS)}, "built-in method"), ({"GPS": doc("gps", GPS)}, "lowercase"),
                       ({"x": dict(doc("gps", GPS), candidates=[])}, r"policy 'x': field 'candidates' is empty"),
                       ({"x": str(tmp_path / "none.json")}, "does not exist")]:
        with pytest.raises((ValueError, FileNotFoundError), match=words):
            load_policies(bad)
    with pytest.raises(ValueError, match="classification"):
        build_method("gps_n1", tiny_model(3), space(), task="segmentation", policies=policies)


def test_policy_rows_against_a_plain_loop():
    model = balanced_model()
    images, labels = tiny_data(23, size=32)
    policies = {"gps": doc("gps", GPS), "budget2": doc("budget", BUDGET)}
    res = evaluate_arrays(model, images, labels, space(), None, methods=["identity", "gps_n1", "gps_n2", "gps_n4",
                                                                         "gps_n5", "budget2"],
                          batch_size=7, policies=policies)
    v = views(model, images)
    e = res["errors"]
    for n in (1, 2, 4, 5):
        assert e[f"gps_n{n}"] == pytest.approx(err(v[GPS[:n]].mean(0), labels)), n
    assert e["budget2"] == pytest.approx(err(v[BUDGET].mean(0), labels))
    # the repeat counts twice: n=4 weighs zoom(0.8) by 2/4, not as the mean of {3, 9, 2}
    assert e["gps_n4"] != pytest.approx(err(v[[3, 9, 2]].mean(0), labels))
    assert len({e[m] for m in e}) > 2  # the set-up tells the rows apart


def test_harness_rows_equal_their_wrapper_alone_and_ours_over_gps():
    """Every policy row, and Ours k=1 / k=2 whose space is the GPS policy's (the paper's Fig. 7),
    give in the harness (shared views) exactly what their wrapper called alone gives."""
    model = balanced_model()
    images, labels = tiny_data(18, size=32)
    policies = {"gps": doc("gps", GPS), "budget2": doc("budget", BUDGET)}
    gps_space = policy_space(policies["gps"])
    assert len(gps_space) == len(GPS) and len(set(gps_space.names)) == len(GPS)
    pred = FixedPredictor(len(gps_space), 2, 1)  # picks the repeat of zoom(0.8), then sharpness(4.0)
    methods = ["identity", "ours_k1", "ours_k2", "gps_n2", "gps_n5", "budget2"]
    res = evaluate_arrays(model, images, labels, gps_space, pred, methods=methods, batch_size=6, policies=policies)
    mean, std = model_mean_std(model)
    x = to_model_input(images.float() / 255, mean, std)
    memo = ViewMemo(model)
    for m in methods:
        alone = build_method(m, model, gps_space, pred, mean=mean, std=std, policies=policies)
        with torch.no_grad():
            outs = [torch.cat([(lambda o: o[0] if isinstance(o, tuple) else o)(w(x[i:i + 6])) for i in range(0, 18, 6)])
                    for w in (alone, build_method(m, memo, gps_space, pred, mean=mean, std=std, policies=policies))]
        torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=0, msg=lambda s, m=m: f"{m}: {s}")
        assert res["errors"][m] == pytest.approx(err(outs[0], labels)), m
    v = views(model, images)
    assert res["errors"]["ours_k1"] == pytest.approx(err(v[3], labels))
    assert res["errors"]["ours_k2"] == pytest.approx(err((v[3] + v[9]) / 2, labels))
    assert res["choices"] == [0, 0, 18, 0, 0]


def test_evaluate_with_policies_labels_costs_and_run_identity(tmp_path):
    model = tiny_model(3)
    images, labels = tiny_data(10, size=32)
    kw = dict(size=32, corruptions=["contrast"], held_out=[], severities=[1], progress=False,
              methods=["identity"], log=lambda m: None)
    out = str(tmp_path / "run")
    res = evaluate(model, images, labels, space(), out, cost_images=4,
                   policies={"gps": policy_file(tmp_path, "g", "gps", GPS),
                             "budget2": policy_file(tmp_path, "b", "budget", BUDGET)}, **kw)
    assert res["methods"] == ["identity", "gps_n1", "gps_n2", "gps_n4", "gps_n5", "budget2"]
    assert res["labels"]["gps_n4"] == "GPS n=4" and res["labels"]["budget2"] == "Budget N=2"
    assert {m: c["model_calls_per_image"] for m, c in res["cost"].items()} == {
        "identity": 1, "gps_n1": 1, "gps_n2": 2, "gps_n4": 4, "gps_n5": 5, "budget2": 2}
    table = markdown_table(res)
    assert "| GPS n=5 |" in table and "| Budget N=2 |" in table
    direct = evaluate_arrays(model, images, labels, space(), None, methods=["gps_n4"],
                             policies={"gps": doc("gps", GPS)})
    assert res["clean"]["gps_n4"] == pytest.approx(direct["errors"]["gps_n4"])
    # another GPS result under the same name is another evaluation (stale rows are never shown)
    with pytest.raises(ValueError, match=r"another evaluation \(policies"):
        evaluate(model, images, labels, space(), out, cost_images=0,
                 policies={"gps": policy_file(tmp_path, "g2", "gps", [3, 9, 3, 2, 8]),
                           "budget2": policy_file(tmp_path, "b", "budget", BUDGET)}, **kw)
    # without policies the identity has no policies key: a folder made before them still matches
    plain = str(tmp_path / "plain")
    evaluate(model, images, labels, space(), plain, cost_images=0, **kw)
    with open(os.path.join(plain, "run.json")) as f:
        assert "policies" not in json.load(f)
