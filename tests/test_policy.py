"""Policy files (ttach_instance.policy) and space references (get_space / --space): a real
`ttach-instance search gps` output read back and made a space, checked against the pool's own
candidates; GPS repeats kept so the plain mean over the space is the ensemble GPS scored
(checked against log-mean-softmax of a plain loop over the chosen candidates); every defect
of a file refused naming the file and the field."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

import ttach_instance as ti
from ttach_instance import FullSpaceWrapper
from ttach_instance.cli import main
from ttach_instance.policy import FORMAT, KIND, PolicyError, load_policy, policy_space, read_policy, repeat_names
from ttach_instance.registry import get_space, parse_space_reference
from ttach_instance.search import SearchResult, greedy_policy_search, policy_document
from ttach_instance.wrappers import resolve_space

from _tiny import tiny_data, tiny_model
from test_cli import FACTORY, folder  # noqa: F401 - the image folder fixture
from test_cli_search import weights16  # noqa: F401 - the model weights fixture


def manifest(pool):
    """What a prediction cache's manifest records of its pool, model and data (policy_document's input)."""
    return {"candidate_names": pool.names, "candidate_specs": pool.spec(), "space": pool.name, "space_params": {},
            "space_fingerprint": pool.fingerprint, "model": {"class": "tiny"}, "dataset": "d", "num_images": 4,
            "size": 32, "source_size": [32, 32]}


def gps_document(indices, pool=None):
    pool = pool or get_space("paper12")
    n = len(indices)
    result = SearchResult(list(indices), [-1.0 + 0.1 * i for i in range(n)], [1.0 + 0.5 * i for i in range(n)])
    return policy_document(result, "gps", manifest(pool), {"n": n, "temperature": "fit"})


def write(tmp_path, doc, name="policy.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return str(path)


# ------------------------------------------------------------------------------ a real search
def test_a_real_gps_search_round_trips_to_its_pool_candidates(folder, weights16, tmp_path, capsys):  # noqa: F811
    preds, out = str(tmp_path / "preds"), str(tmp_path / "gps.json")
    assert main(["search", "gps", "--predictions", preds, "--out", out, "--model", FACTORY, "--weights", weights16,
                 "--data", folder, "--space", "paper12", "--n", "3", "--shard-size", "4"]) == 0
    capsys.readouterr()
    doc = json.load(open(out))
    pool = get_space("paper12")
    policy = load_policy(out)
    assert policy.source == f"policy file {out!r}" and policy.format == FORMAT == doc["format"]
    assert (policy.search, policy.method, policy.objective) == ("gps", "greedy", "log_likelihood")
    assert policy.indices == doc["indices"] and len(policy) == 3
    assert policy.scores == [s["score"] for s in doc["steps"]]
    assert policy.pool.name == "paper12" and policy.pool.fingerprint == pool.fingerprint
    assert list(policy.pool.candidate_names) == pool.names
    assert policy.model == doc["model"] and policy.data == doc["data"] and policy.settings == {"n": 3,
                                                                                              "temperature": "fit"}
    space = policy_space(out)
    expected = [pool.candidates[i] for i in doc["indices"]]  # the pool's own candidates, by the searched index
    assert space.names == repeat_names([c.name for c in expected])
    assert [c.ops for c in space.candidates] == [c.ops for c in expected]
    assert space.name == "policy" and space.params == {"path": os.path.abspath(out)}
    # the same space by reference, and a prefix; the recorded name and params rebuild it
    for ref in (out, Path(out), os.path.relpath(out)):
        assert get_space(ref).fingerprint == space.fingerprint
        assert resolve_space(ref).fingerprint == space.fingerprint
    first2 = get_space(f"{out}:n=2")
    assert first2.names == space.names[:2] and first2.params == {"path": os.path.abspath(out), "n": 2}
    assert get_space(first2.name, **first2.params).fingerprint == first2.fingerprint
    assert get_space("policy", path=out, n=1).names == space.names[:1]
    # --space takes it: render draws the policy's candidates
    png = str(tmp_path / "grid.png")
    assert main(["render", "--space", f"{out}:n=2", "--output", png, "--size", "32"]) == 0
    assert os.path.getsize(png) > 0


def test_repeats_are_kept_so_the_full_space_mean_is_the_gps_ensemble():
    pool = get_space("paper12").subset([0, 3, 10], name="three")
    model = tiny_model(3)
    images, labels = tiny_data(12, size=32)
    x = images.float() / 255
    with torch.no_grad():  # every candidate's log-softmax, a plain loop (the reference)
        log_probs = torch.stack([torch.log_softmax(model(c.apply(x)), -1) for c in pool.candidates])
    result = greedy_policy_search(log_probs, labels, 6)  # 6 steps over 3 candidates: repeats for sure
    assert len(set(result.indices)) < len(result.indices)
    doc = policy_document(result, "gps", manifest(pool), {"n": 6})
    space = policy_space(doc)
    # names: the k-th occurrence of a candidate is "name#k"
    counts = {}
    for i, name in zip(result.indices, space.names):
        counts[i] = counts.get(i, 0) + 1
        assert name == (pool.names[i] if counts[i] == 1 else f"{pool.names[i]}#{counts[i]}")
    assert space.params == {} and len(space) == 6
    with torch.no_grad():
        out = FullSpaceWrapper(model, space)(x)
        for n in (1, 4, 6):
            ensemble = torch.logsumexp(log_probs[result.indices[:n]], 0) - math.log(n)  # what GPS scored
            got = FullSpaceWrapper(model, policy_space(doc, n))(x)
            torch.testing.assert_close(got, ensemble, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, torch.logsumexp(log_probs[result.indices], 0) - math.log(6), atol=1e-5, rtol=0)


def test_repeat_names_by_occurrence():
    assert repeat_names(["a", "b", "a", "a", "b"]) == ["a", "b", "a#2", "a#3", "b#2"]


# ------------------------------------------------------------------------------ references
def test_space_references_name_parameters_and_paths(tmp_path):
    path = write(tmp_path, gps_document([3, 5]))
    assert parse_space_reference("paper12") == ("paper12", {})
    assert parse_space_reference("builtin:paper12") == ("builtin:paper12", {})
    assert parse_space_reference("five_crops:crop_size=0.5") == ("five_crops", {"crop_size": 0.5})
    assert parse_space_reference("builtin:five_crops:crop_size=[20, 24]") == ("builtin:five_crops",
                                                                             {"crop_size": [20, 24]})
    assert parse_space_reference('x:a=1,b="t,u",c=[1,2],d=true,e=word,f=null') == (
        "x", {"a": 1, "b": "t,u", "c": [1, 2], "d": True, "e": "word", "f": None})
    assert parse_space_reference("gps:path=runs/p.json,n=3") == ("gps", {"path": "runs/p.json", "n": 3})
    assert parse_space_reference("gps", {"policy": "tiny"}) == ("gps", {"policy": "tiny"})
    assert parse_space_reference(path) == ("policy", {"path": path})
    assert parse_space_reference(f"{path}:n=1") == ("policy", {"path": path, "n": 1})
    assert parse_space_reference("rel/P.JSON") == ("policy", {"path": os.path.abspath("rel/P.JSON")})
    assert parse_space_reference("p.json:n=2") == ("policy", {"path": os.path.abspath("p.json"), "n": 2})
    assert parse_space_reference(Path(path), {"n": 2}) == ("policy", {"path": path, "n": 2})
    # parameters by reference build what keyword arguments build
    assert get_space("five_crops:crop_size=0.5").fingerprint == get_space("five_crops", crop_size=0.5).fingerprint
    assert get_space("five_crops:crop_size=0.5").fingerprint != get_space("five_crops").fingerprint
    assert ti.get_space(f"{path}:n=1").names == ["zoom(0.8)"]
    assert get_space(path, n=2).names == ["zoom(0.8)", "autocontrast"]
    for ref, params, words in [
        ("five_crops:crop_size=0.5,oops", {}, "parameters must be key=value pairs separated by commas"),
        ("five_crops:crop_size", {}, "unknown space 'five_crops:crop_size'"),  # plugin:name, not a parameter
        ("five_crops:crop_size=0.5,crop_size=0.6", {}, "parameter 'crop_size' is given twice"),
        ("five_crops:crop_size=0.5", {"crop_size": 0.6}, "given both in the reference and as keyword arguments"),
        (f"{path}:n=1", {"n": 2}, "given both in the reference and as keyword arguments"),
        ("five_crops:size=3", {}, "bad parameters ['size']"),
    ]:
        with pytest.raises((ValueError, TypeError)) as exc:
            get_space(ref, **params)
        assert words in str(exc.value), (ref, str(exc.value))
    with pytest.raises(FileNotFoundError, match=r"policy file '.*missing\.json' does not exist"):
        get_space(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"space 'runs/gps\.txt' is neither a registered name nor a policy file: a "
                                         r"policy file's path ends in \.json"):
        get_space("runs/gps.txt")
    with pytest.raises(TypeError, match="space must be a TransformSpace, a space name"):
        parse_space_reference(3.5)


def test_cli_space_help_names_the_reference_forms(capsys):
    for command in ("labels", "eval", "search", "render", "fit"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "name:key=value" in text and "FILE.json" in text, command


# ------------------------------------------------------------------------------ broken files
def broken(doc, edit):
    doc = json.loads(json.dumps(doc))
    edit(doc)
    return doc


@pytest.mark.parametrize("edit, field, words", [
    (lambda d: d.pop("steps"), "steps", "is missing"),
    (lambda d: d.pop("candidates"), "candidates", "is missing"),
    (lambda d: d["pool"].pop("fingerprint"), "pool.fingerprint", "is missing"),
    (lambda d: d.update(candidates=[]), "candidates", "is empty"),
    (lambda d: d.update(candidates={"a": 1}), "candidates", "must be a list, got a JSON object"),
    (lambda d: d.update(objective=3), "objective", "must be a non-empty string, got 3"),
    (lambda d: d.update(model=[]), "model", "must be an object, got a JSON array"),
    (lambda d: d["steps"][1].update(score="high"), "steps[1].score", "must be a number, got 'high'"),
    (lambda d: d["steps"][0].update(temperature=0), "steps[0].temperature", "must be > 0"),
    (lambda d: d["candidates"][1]["ops"].append("rotate"), "candidates[1].ops[1]", "must be an op spec"),
    (lambda d: d["candidates"][0].update(name="rotate(-20)"), "steps[0].candidate", "they must agree"),
    (lambda d: d.update(indices=[3, 12]), "indices[1]", "must be an index into the pool's 12 candidates"),
    (lambda d: d.update(indices=[3]), "indices", "lists 1 entries for 2 candidates"),
    (lambda d: d["steps"][1].update(index=4), "steps[1].index", "is 4 but indices[1] is 5"),
    (lambda d: d.update(predictions="dir"), "predictions", "must be an object or null"),
])
def test_a_broken_field_is_named_with_the_file(tmp_path, capsys, edit, field, words):
    path = write(tmp_path, broken(gps_document([3, 5]), edit))
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert exc.value.field == field
    message = f"policy file {path!r}: field {field!r} "
    assert str(exc.value).startswith(message) and words in str(exc.value)
    # the same error through every door: a reference, a wrapper, the CLI (one line, exit status 2)
    with pytest.raises(PolicyError, match=re.escape(message)):
        get_space(path)
    with pytest.raises(PolicyError, match=re.escape(message)):
        FullSpaceWrapper(tiny_model(), path)
    with pytest.raises(SystemExit) as code:
        main(["render", "--space", path, "--output", str(tmp_path / "x.png")])
    assert code.value.code == 2 and f"ttach-instance render: error: {message}" in capsys.readouterr().err


def test_format_kind_and_json_are_refused_clearly(tmp_path):
    good = gps_document([3, 5])
    assert good["kind"] == KIND and good["format"] == FORMAT
    cases = [
        ("{not json", None, "is not JSON (line 1, column 2"),
        ("[1, 2]", None, "is not a ttach-instance policy (a JSON object), got a JSON array"),
        ("{}", "kind", "field 'kind' is missing, not 'ttach-instance policy': this is not a policy file"),
        (broken(good, lambda d: d.update(format=FORMAT + 1)), "format",
         f"field 'format' is {FORMAT + 1}, which is not supported: this ttach-instance reads format {FORMAT} only (the file was "
         f"written by a newer version"),
        (broken(good, lambda d: d.update(format=0)), "format", "written by an older version"),
        (broken(good, lambda d: d.pop("format")), "format", f"must be the integer format version {FORMAT}, got None"),
        (broken(good, lambda d: d.update(format="1")), "format", "got '1'"),
        (broken(good, lambda d: d.update(kind="predictions")), "kind",
         "field 'kind' is 'predictions', not 'ttach-instance policy': this is not a policy file"),
        (manifest(get_space("paper12")), "kind", "it looks like a label or prediction cache's manifest"),
    ]
    for doc, field, words in cases:
        path = write(tmp_path, doc)
        with pytest.raises(PolicyError) as exc:
            load_policy(path)
        assert exc.value.field == field and path in str(exc.value) and words in str(exc.value), str(exc.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "nothing.json")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_policy(tmp_path)


def test_unknown_op_and_bad_parameters_name_the_candidate(tmp_path):
    doc = broken(gps_document([3, 5]), lambda d: d["candidates"][1]["ops"][0].update(op="warp"))
    path = write(tmp_path, doc)
    load_policy(path)  # the document is well-formed; the op is refused when the space is built
    with pytest.raises(PolicyError) as exc:
        policy_space(path)
    assert exc.value.field == "candidates[1].ops[0]"
    assert "field 'candidates[1].ops[0]' (candidate 'autocontrast', op 'warp') cannot be built: unknown op 'warp'" in str(exc.value)
    doc = broken(gps_document([3, 5]), lambda d: d["candidates"][0]["ops"][0].update(angle=3))
    with pytest.raises(PolicyError, match=r"field 'candidates\[0\]\.ops\[0\]' \(candidate 'zoom\(0\.8\)', op 'zoom'\) cannot be built: .*angle"):
        policy_space(write(tmp_path, doc))


def test_n_out_of_range_is_refused(tmp_path):
    path = write(tmp_path, gps_document([3, 5, 3]))
    assert policy_space(path, 3).names == ["zoom(0.8)", "autocontrast", "zoom(0.8)#2"]
    for n in (0, 4, -1, True, 1.5, "2"):
        with pytest.raises(PolicyError, match=rf"policy file '.*policy\.json': n must be an integer in 1\.\.3 "
                                              rf"\(the policy's candidates\), got {n!r}"):
            policy_space(path, n)
    with pytest.raises(PolicyError, match=r"n must be an integer in 1\.\.3"):
        get_space(f"{path}:n=4")
    with pytest.raises(TypeError, match="policy must be a policy file path, a policy document"):
        policy_space(3)


def test_a_document_reads_like_its_file():
    doc = gps_document([0, 9])
    policy = read_policy(doc)
    assert policy.source == "policy document" and policy.names == ["identity", "sharpness(4.0)"]
    assert policy.space().names == policy.names and policy_space(policy, 1).names == ["identity"]
    with pytest.raises(PolicyError, match="^policy document: field 'steps' is missing$"):
        read_policy(broken(doc, lambda d: d.pop("steps")))
