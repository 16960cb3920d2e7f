"""Prediction caches (ttach_instance.training.predictions): values against a per-candidate loop,
kill-and-resume equality, refusal of another model / data / pool / settings, damaged shards,
torchrun-style rank sharding, and the search reading a cache."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from ttach_instance.data import normalizer
from ttach_instance.io import tensors_sha256
from ttach_instance.search import greedy_policy_search
from ttach_instance.training import distributed
from ttach_instance.training.labels import generate_labels
from ttach_instance.training.predictions import PredictionCache, generate_predictions, load_predictions

from _tiny import space, tiny_data, tiny_model


def reference_log_probs(model, images_u8, pool):
    """One image and one candidate at a time: (candidates, samples, classes)."""
    norm = normalizer(model)
    out = []
    with torch.no_grad():
        for cand in pool.candidates:
            rows = [torch.log_softmax(model(norm(cand.apply(images_u8[i:i + 1].float() / 255))), 1)[0]
                    for i in range(images_u8.shape[0])]
            out.append(torch.stack(rows))
    return torch.stack(out)


def test_log_probs_match_a_per_candidate_loop(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(7)
    cache = generate_predictions(model, images, labels, space(), str(tmp_path / "p"), shard_size=3, batch_size=2,
                                 progress=False)
    data = cache.load()
    assert cache.complete and len(cache.done_shards()) == 3
    assert data["log_probs"].shape == (12, 7, 3) and data["log_probs"].dtype == torch.float32
    assert torch.equal(data["labels"], labels) and torch.equal(data["rows"], torch.arange(7))
    assert torch.allclose(data["log_probs"], reference_log_probs(model, images, space()), atol=1e-5)
    m = cache.manifest()
    assert m["candidate_names"] == space().names and m["space_fingerprint"] == space().fingerprint
    assert m["candidate_specs"] == space().spec()
    half = generate_predictions(model, images, labels, space(), str(tmp_path / "h"), dtype="float16",
                                progress=False).load()["log_probs"]
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), data["log_probs"], atol=2e-3, rtol=1e-3)


def test_stopped_after_one_shard_resumes_to_the_one_shot_cache(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(8)
    kw = dict(shard_size=3, progress=False)
    one = generate_predictions(model, images, labels, space(), str(tmp_path / "one"), **kw).load()
    part = generate_predictions(model, images, labels, space(), str(tmp_path / "two"), max_shards=1, **kw)
    assert part.done_shards() == [0] and not part.complete
    with pytest.raises(ValueError, match="incomplete: 2 of 3 shards missing"):
        part.load()
    first = os.path.getmtime(part.shard_path(0))
    two = generate_predictions(model, images, labels, space(), str(tmp_path / "two"), **kw)
    assert os.path.getmtime(two.shard_path(0)) == first  # the finished shard was kept, not recomputed
    for key, value in two.load().items():
        assert torch.equal(one[key], value), key
    assert load_predictions(str(tmp_path / "two"))["identity"] == PredictionCache(str(tmp_path / "one")).identity()


def test_another_model_data_pool_or_setting_is_refused_naming_what_differs(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(4)
    d = str(tmp_path / "c")
    kw = dict(shard_size=2, progress=False, model_spec={"model": "tiny", "num_classes": 3})
    generate_predictions(model, images, labels, space(), d, max_shards=1, **kw)
    other = tiny_model()
    with torch.no_grad():
        other[0].bias[0] += 1e-3
    moved = images.clone()
    moved[3, 0, 0, 0] ^= 1
    relabelled = labels.clone()
    relabelled[2] = (relabelled[2] + 1) % 3
    old_hash, new_hash = tensors_sha256(model.state_dict())[:12], tensors_sha256(other.state_dict())[:12]
    cases = [
        (dict(model=other), re.escape(f'model.weights_sha256: "{old_hash}..." -> "{new_hash}...')),
        (dict(images=moved), "dataset: "),
        (dict(labels=relabelled), "dataset: "),
        (dict(space=space().subset([0, 1, 2])), "space_fingerprint: "),
        (dict(model_spec={"model": "tiny", "num_classes": 4}), r"model\.spec\.num_classes: 3 -> 4"),
        (dict(dtype="float16"), 'dtype: "float32" -> "float16"'),
        (dict(size=16), "size: 32 -> 16"),
    ]
    for change, words in cases:
        args = {"model": model, "images": images, "labels": labels, "space": space(), **kw, **change}
        with pytest.raises(ValueError, match="holds a prediction cache made with other settings or another model/data.*" + words):
            generate_predictions(args.pop("model"), args.pop("images"), args.pop("labels"), args.pop("space"), d,
                                 **args)
    assert PredictionCache(d).done_shards() == [0]  # the refused runs wrote nothing
    assert generate_predictions(tiny_model(), images, labels, space(), d, **kw).complete  # same weights continue


def test_damaged_shard_is_refused_then_recomputed(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(5)
    d = str(tmp_path / "c")
    cache = generate_predictions(model, images, labels, space(), d, shard_size=2, progress=False)
    good = cache.load()
    with open(cache.shard_path(1), "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ValueError, match=r"damaged shard.*shard_00001\.safetensors altered"):
        cache.load()
    messages = []
    generate_predictions(model, images, labels, space(), d, shard_size=2, progress=False, log=messages.append)
    assert any("shard_00001.safetensors is altered" in m for m in messages)
    for key, value in cache.load().items():
        assert torch.equal(good[key], value), key


def test_rank_sharding_like_torchrun(tmp_path, monkeypatch):
    # two "ranks" in turn (barriers are no-ops here): rank 0 writes the even shards and the
    # manifest, rank 1 the odd ones in its own record file; a later run merges them untouched
    model = tiny_model()
    images, labels = tiny_data(9)
    d = str(tmp_path / "c")
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "is_main", lambda r=r: r == 0)
        cache = generate_predictions(model, images, labels, space(), d, shard_size=2, progress=False)
    assert os.path.isfile(os.path.join(d, "shards.rank1.json"))
    assert sorted(json.load(open(cache.manifest_path))["shards"]) == ["0", "2", "4"]
    assert cache.complete  # the rank file's records count
    monkeypatch.undo()
    finished = generate_predictions(model, images, labels, space(), d, shard_size=2, progress=False)
    assert sorted(json.load(open(finished.manifest_path))["shards"], key=int) == ["0", "1", "2", "3", "4"]
    assert not os.path.exists(os.path.join(d, "shards.rank1.json"))
    ref = generate_predictions(model, images, labels, space(), str(tmp_path / "ref"), progress=False).load()
    for key, value in finished.load().items():
        assert torch.equal(ref[key], value), key


def test_a_label_cache_or_foreign_directory_is_not_a_prediction_cache(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(3)
    labels_dir = str(tmp_path / "labels")
    generate_labels(model, images, labels, space(), labels_dir, progress=False)
    with pytest.raises(ValueError, match="does not hold a prediction cache"):
        PredictionCache(labels_dir).load()
    with pytest.raises(ValueError, match="does not hold a prediction cache"):
        generate_predictions(model, images, labels, space(), labels_dir, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty and holds no prediction cache"):
        generate_predictions(model, images, labels, space(), str(other), progress=False)
    d = str(tmp_path / "old")
    cache = generate_predictions(model, images, labels, space(), d, progress=False)
    m = json.load(open(cache.manifest_path))
    m["format"] = 0
    json.dump(m, open(cache.manifest_path, "w"))
    with pytest.raises(ValueError, match="older ttach-instance"):
        cache.load()


def test_bad_arguments(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(3)
    d = str(tmp_path / "c")
    cases = [
        (dict(images=images.float()), "images must be a uint8"),
        (dict(labels=labels[:2]), "labels must be an integer tensor with one class index per image"),
        (dict(labels=labels.float()), "labels must be an integer"),
        (dict(labels=labels - 5), "labels must be class indices"),
        (dict(shard_size=0), "shard_size"),
        (dict(batch_size=-1), "batch_size"),
        (dict(size=0), "size"),
        (dict(dtype="bfloat16"), "dtype"),
    ]
    for change, words in cases:
        args = {"images": images, "labels": labels, **change}
        with pytest.raises((TypeError, ValueError), match=words):
            generate_predictions(model, args.pop("images"), args.pop("labels"), space(), d, progress=False, **args)
    assert not os.path.exists(d)


def test_search_reads_the_cache(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(5)
    data = load_predictions(str(generate_predictions(model, images, labels, space(), str(tmp_path / "p"),
                                                     progress=False).directory))
    res = greedy_policy_search(data["log_probs"], data["labels"], 3)
    ref = greedy_policy_search(reference_log_probs(model, images, space()), labels, 3)
    assert res.indices == ref.indices
    assert res.scores == pytest.approx(ref.scores, abs=1e-5)
