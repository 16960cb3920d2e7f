import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ttach_instance.data import normalizer
from ttach_instance.io import tensors_sha256
from ttach_instance.training.corruptions import ALL, COMMON, HELD_OUT, corrupt_one, draw_recipes
from ttach_instance.training.labels import LabelCache, generate_labels
from ttach_instance.training.tasks import ClassificationTask

from _tiny import space, tiny_data, tiny_model


def reference_losses(model, images_u8, labels):
    """One candidate at a time, one image at a time: an independent loop."""
    sp = space()
    norm = normalizer(model)
    out = torch.zeros(images_u8.shape[0], len(sp))
    with torch.no_grad():
        for i in range(images_u8.shape[0]):
            x = images_u8[i:i + 1].float() / 255
            for c, cand in enumerate(sp.candidates):
                out[i, c] = F.cross_entropy(model(norm(cand.apply(x))), labels[i:i + 1])
    return out


def test_clean_labels_match_per_candidate_reference(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(7)
    cache = generate_labels(model, images, labels, space(), str(tmp_path / "c"), shard_size=3, batch_size=2,
                            progress=False)
    data = cache.load()
    assert cache.complete and len(cache.done_shards()) == 3
    assert torch.equal(data["rows"], torch.arange(7))
    assert torch.equal(data["images"], images)  # p = 0: untouched
    assert torch.equal(data["labels"], labels)
    assert (data["corruption"] == -1).all() and (data["severity"] == 0).all()
    ref = reference_losses(model, images, labels)
    assert torch.allclose(data["losses"], ref, atol=1e-5)
    # correct flags agree with the losses' logits: loss < log(2) implies the class won
    assert ((data["losses"] < 0.69) <= data["correct"].bool()).all()


def test_draws_corruptions_and_custom_loss(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(5, size=32)
    cache = generate_labels(model, images, labels, space(), str(tmp_path / "c"), size=16, draws=2, corruption_p=1.0,
                            corruptions=["contrast", "pixelate"], severities=[2, 5], seed=3, shard_size=4,
                            progress=False)
    data = cache.load()
    assert data["images"].shape == (10, 3, 16, 16)
    assert torch.equal(data["labels"], labels.repeat(2))  # row r is image r % N
    names = {ALL[int(i)] for i in data["corruption"]}
    assert names <= {"contrast", "pixelate"} and set(data["severity"].tolist()) <= {2, 5}
    # each stored image is exactly its recipe: corrupt at source size, then resize
    from ttach_instance.data import resize_uint8

    recipes = draw_recipes(range(10), 3, 1.0, ["contrast", "pixelate"], [2, 5])
    for r, (name, sev, seed) in enumerate(recipes):
        src = images[r % 5].permute(1, 2, 0).numpy()
        expect = resize_uint8(torch.from_numpy(corrupt_one(src, name, sev, seed)).permute(2, 0, 1)[None], 16)[0]
        assert torch.equal(data["images"][r], expect)
        assert ALL[int(data["corruption"][r])] == name and int(data["severity"][r]) == sev
    # a pluggable loss: 0/1 error per view
    task = ClassificationTask(loss_fn=lambda logits, y: (logits.argmax(1) != y).float())
    c2 = generate_labels(model, images, labels, space(), str(tmp_path / "c2"), task=task, progress=False)
    d2 = c2.load()
    assert torch.equal(d2["losses"], 1 - d2["correct"].float())


def test_recipes_probability_and_held_out_never_drawn():
    rec = draw_recipes(range(4000), 0, 0.4, COMMON)
    frac = sum(r[0] is not None for r in rec) / len(rec)
    assert 0.37 < frac < 0.43
    assert not {r[0] for r in rec} & set(HELD_OUT)
    assert draw_recipes([17], 0, 0.4, COMMON) == [rec[17]]  # pure function of (seed, row)


def test_resume_equals_one_shot_and_config_mismatch(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(9)
    kw = dict(draws=2, corruption_p=0.5, corruptions=["gaussian_noise", "brightness"], shard_size=4, progress=False)
    one = generate_labels(model, images, labels, space(), str(tmp_path / "one"), **kw).load()
    part = generate_labels(model, images, labels, space(), str(tmp_path / "two"), max_shards=2, **kw)
    assert len(part.done_shards()) == 2 and not part.complete
    with pytest.raises(ValueError, match="incomplete"):
        part.load()
    two = generate_labels(model, images, labels, space(), str(tmp_path / "two"), **kw).load()
    for key in one:
        assert torch.equal(one[key], two[key]), key
    with pytest.raises(ValueError, match="other settings.*draws: 2 -> 3"):
        generate_labels(model, images, labels, space(), str(tmp_path / "two"), **{**kw, "draws": 3})


def test_resume_with_another_model_data_space_or_settings_is_refused_naming_what_differs(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(4)
    d = str(tmp_path / "c")
    kw = dict(shard_size=2, progress=False, model_spec={"model": "tiny", "num_classes": 3})
    generate_labels(model, images, labels, space(), d, max_shards=1, **kw)
    other = tiny_model()
    with torch.no_grad():
        other[0].bias[0] += 1e-3  # the same architecture and spec, other weights
    moved_pixel = images.clone()
    moved_pixel[3, 0, 0, 0] ^= 1  # one pixel of the last image
    relabelled = labels.clone()
    relabelled[3] = (relabelled[3] + 1) % 3
    old_hash, new_hash = tensors_sha256(model.state_dict())[:12], tensors_sha256(other.state_dict())[:12]
    cases = [
        (dict(model=other), re.escape(f'model.weights_sha256: "{old_hash}..." -> "{new_hash}...')),
        (dict(images=moved_pixel), r"dataset: "),
        (dict(labels=relabelled), r"dataset: "),
        (dict(space=space().subset([0, 1, 2, 3])), r"space_fingerprint: "),
        (dict(model_spec={"model": "tiny", "num_classes": 4}), r"model\.spec\.num_classes: 3 -> 4"),
        (dict(corruption_p=0.5, corruptions=["contrast"]), r"corruption_p: 0\.0 -> 0\.5"),
        (dict(deformation={"rotate": 5}), r"deformation: null -> "),
        (dict(seed=1), r"seed: 0 -> 1"),
    ]
    for change, words in cases:
        args = {"model": model, "images": images, "labels": labels, "space": space(), **kw, **change}
        with pytest.raises(ValueError, match="other settings or another model/data.*" + words):
            generate_labels(args.pop("model"), args.pop("images"), args.pop("labels"), args.pop("space"), d, **args)
    assert LabelCache(d).done_shards() == [0]  # nothing was written by the refused runs
    # a model rebuilt with the same weights continues the cache
    same = tiny_model()
    assert generate_labels(same, images, labels, space(), d, **kw).complete
    # caches of two models do not combine into one training set
    from ttach_instance.training.labels import load_label_caches

    e = generate_labels(other, images, labels, space(), str(tmp_path / "e"), seed=1, **kw)
    with pytest.raises(ValueError, match=r"differ in \['model'\]"):
        load_label_caches([d, e.directory])


def test_bad_arguments(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(3)
    with pytest.raises(TypeError, match="images"):
        generate_labels(model, images.float(), labels, space(), str(tmp_path))
    with pytest.raises(ValueError, match="corruptions"):
        generate_labels(model, images, labels, space(), str(tmp_path), corruptions=["nope"])
    with pytest.raises(ValueError, match="corruption_p"):
        generate_labels(model, images, labels, space(), str(tmp_path), corruption_p=1.5)
    with pytest.raises(ValueError, match="draws"):
        generate_labels(model, images, labels, space(), str(tmp_path), draws=0)
    small, _ = tiny_data(3, size=16)  # ImageNet-C refuses images under 32 px (it raised AttributeError)
    with pytest.raises(ValueError, match="at least 32x32 pixels to be corrupted.*got 16x16"):
        generate_labels(model, small, labels, space(), str(tmp_path / "s"), corruption_p=0.5)
    assert generate_labels(model, small, labels, space(), str(tmp_path / "s"), corruption_p=0.0,
                           progress=False).complete
    with pytest.raises(TypeError, match="loss_fn"):
        ClassificationTask(loss_fn=3)


JOB = r"""
import time, torch
from _tiny import tiny_model, tiny_data, space
from ttach_instance.training.labels import generate_labels
model = tiny_model()
fwd = model.forward
def slow(x):
    time.sleep({delay})
    return fwd(x)
model.forward = slow
images, labels = tiny_data(12)
generate_labels(model, images, labels, space(), {out!r}, draws=2, corruption_p=0.5,
                corruptions=["gaussian_noise", "contrast"], shard_size=3, batch_size=64, progress=False)
print("finished")
"""


def test_killed_job_resumes_without_loss_or_duplicates(tmp_path, helpers_env):
    out = str(tmp_path / "cache")
    proc = subprocess.Popen([sys.executable, "-c", JOB.format(out=out, delay=0.4)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=helpers_env)
    cache = LabelCache(out)
    deadline = time.time() + 90
    while time.time() < deadline:
        if os.path.isfile(cache.manifest_path) and len(cache.done_shards()) >= 2:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(cache.done_shards())
    assert 2 <= done_before < 8, proc.stdout.read().decode()[-2000:]
    # restart: only the missing shards are computed
    res = subprocess.run([sys.executable, "-c", JOB.format(out=out, delay=0.0)], capture_output=True,
                         text=True, timeout=120, env=helpers_env)
    assert "finished" in res.stdout, res.stderr[-2000:]
    data = cache.load()
    assert torch.equal(data["rows"], torch.arange(24))
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    ref = generate_labels(tiny_model(), *tiny_data(12), space(), str(tmp_path / "ref"), draws=2, corruption_p=0.5,
                          corruptions=["gaussian_noise", "contrast"], shard_size=3, progress=False).load()
    for key in ref:
        assert torch.allclose(ref[key].float(), data[key].float(), atol=1e-6), key


@pytest.mark.parametrize("name", ALL)
def test_corrupt_one_is_a_function_of_its_seed(name):
    # every corruption, including those with their own generators (glass_blur's numba kernel,
    # impulse_noise's skimage draw), gives the same image for the same seed
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a = corrupt_one(src, name, 3, 1234)
    np.random.seed(99)  # the global RNG's state must not matter
    b = corrupt_one(src, name, 3, 1234)
    assert a.shape == src.shape and a.dtype == np.uint8
    assert np.array_equal(a, b), name
    assert not np.array_equal(a, src), name


def test_input_logits_are_the_models_logits_on_the_stored_image(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(6, size=32)
    cache = generate_labels(model, images, labels, space(), str(tmp_path / "c"), size=16, corruption_p=1.0,
                            corruptions=["contrast"], shard_size=4, progress=False)
    data = cache.load()
    assert data["input_logits"].dtype == torch.float16
    with torch.no_grad():
        ref = model(normalizer(model)(data["images"].float() / 255))
    assert torch.allclose(data["input_logits"].float(), ref, atol=2e-3, rtol=1e-3)
    # a space without an identity candidate records none (it would cost another model call)
    from ttach_instance.space import Candidate, TransformSpace
    from ttach_instance.ops import HFlip

    no_identity = TransformSpace([Candidate(HFlip())], name="flip-only")
    c2 = generate_labels(model, images, labels, no_identity, str(tmp_path / "c2"), progress=False)
    assert "input_logits" not in c2.load()


def _damage(path, how):
    """Truncate the file to half, or flip one byte in its tensor data (same size)."""
    with open(path, "r+b") as f:
        if how == "truncate":
            f.truncate(os.path.getsize(path) // 2)
        else:
            f.seek(-5, os.SEEK_END)
            byte = f.read(1)
            f.seek(-5, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("how, problem", [("truncate", "truncated or altered"), ("flip", "altered: its sha256")])
def test_damaged_shard_is_refused_on_load_and_recomputed_on_resume(tmp_path, how, problem):
    model = tiny_model()
    images, labels = tiny_data(6)
    kw = dict(corruption_p=0.5, corruptions=["contrast"], shard_size=2, progress=False)
    cache = generate_labels(model, images, labels, space(), str(tmp_path / "c"), **kw)
    good = cache.load()
    _damage(cache.shard_path(1), how)
    with pytest.raises(ValueError, match=rf"shard_00001.safetensors {problem}.*labels step again"):
        cache.load()
    logged = []
    generate_labels(model, images, labels, space(), str(tmp_path / "c"), log=logged.append, **kw)
    assert len(logged) == 1 and "shard_00001.safetensors is " + problem in logged[0] and "recomputing" in logged[0]
    again = cache.load()
    for key in good:
        assert torch.equal(good[key], again[key]), key
    # the manifest lists every shard with the size and sha256 of its file
    records = cache.manifest()["shards"]
    assert sorted(records) == ["0", "1", "2"]
    for s, rec in records.items():
        with open(cache.shard_path(int(s)), "rb") as f:
            payload = f.read()
        assert rec == {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def test_unrecorded_shard_counts_as_missing_and_is_recomputed(tmp_path):
    """A shard file written by a job killed before it was recorded: not done, recomputed."""
    model = tiny_model()
    images, labels = tiny_data(4)
    cache = generate_labels(model, images, labels, space(), str(tmp_path / "c"), shard_size=2, progress=False)
    m = cache.manifest()
    del m["shards"]["1"]
    with open(cache.manifest_path, "w") as f:
        json.dump(m, f)
    assert cache.done_shards() == [0] and not cache.complete
    with pytest.raises(ValueError, match="incomplete"):
        cache.load()
    logged = []
    generate_labels(model, images, labels, space(), str(tmp_path / "c"), shard_size=2, progress=False,
                    log=logged.append)
    assert "shard_00001.safetensors is written but not recorded" in logged[0] and cache.complete


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_bad_batch_size_writes_nothing(tmp_path, batch_size):
    model = tiny_model()
    images, labels = tiny_data(3)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
        generate_labels(model, images, labels, space(), str(tmp_path / "c"), batch_size=batch_size, progress=False)
    assert not os.path.exists(tmp_path / "c")


def test_writes_are_fsynced_file_and_directory(tmp_path, monkeypatch):
    import stat

    import ttach_instance.io as tio

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)

    monkeypatch.setattr(tio.os, "fsync", spy)
    model = tiny_model()
    images, labels = tiny_data(2)
    generate_labels(model, images, labels, space(), str(tmp_path / "c"), shard_size=2, progress=False)
    # manifest, shard, manifest with the shard's record: each file then its directory
    assert synced == ["file", "dir"] * 3
    assert sorted(os.listdir(tmp_path / "c")) == ["manifest.json", "shard_00000.safetensors"]


def test_cache_of_an_older_format_is_refused(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(2)
    cache = generate_labels(model, images, labels, space(), str(tmp_path / "c"), progress=False)
    m = cache.manifest()
    for fmt, words in ((1, "older ttach-instance (format 1"), (None, "older ttach-instance (no format version"),
                       (99, "newer ttach-instance (format 99)")):
        with open(cache.manifest_path, "w") as f:
            json.dump({**m, "format": fmt}, f)
        for call in (cache.load, lambda: generate_labels(model, images, labels, space(), cache.directory,
                                                         progress=False)):
            with pytest.raises(ValueError, match=re.escape(words)):
                call()


def test_label_caches_combine_into_one_set_of_whole_draws(tmp_path):
    from ttach_instance.training.labels import load_label_caches

    model = tiny_model()
    images, labels = tiny_data(5)
    common = dict(corruption_p=1.0, corruptions=["contrast", "pixelate"], progress=False)
    a = generate_labels(model, images, labels, space(), str(tmp_path / "a"), draws=2, seed=0, shard_size=3, **common)
    b = generate_labels(model, images, labels, space(), str(tmp_path / "b"), draws=1, seed=1, shard_size=4,
                        deformation={"rotate": 5}, **common)
    data, manifest = load_label_caches([a.directory, b.directory])
    da, db = a.load(), b.load()
    assert torch.equal(data["rows"], torch.arange(15))  # b's rows follow a's: 10..14
    for key in da:
        assert torch.equal(data[key][:10], da[key]) and (key == "rows" or torch.equal(data[key][10:], db[key]))
    assert torch.equal(data["labels"], labels.repeat(3))  # row r is still image r % 5
    assert manifest["total_rows"] == 15 and manifest["draws"] == 3 and manifest["num_images"] == 5
    assert manifest["caches"] == [a.directory, b.directory] and "num_shards" not in manifest


def test_label_caches_that_do_not_combine_are_named(tmp_path):
    from ttach_instance.training.labels import load_label_caches

    model = tiny_model()
    images, labels = tiny_data(4)
    a = generate_labels(model, images, labels, space(), str(tmp_path / "a"), progress=False)
    more = generate_labels(model, images, labels, space(), str(tmp_path / "more"), draws=2, shard_size=3,
                           progress=False)  # seed 0 again: its first draw is a's rows
    other = generate_labels(model, images.flip(-1), labels, space(), str(tmp_path / "other"), seed=1, progress=False)
    small = generate_labels(model, images, labels, space(), str(tmp_path / "small"), size=8, seed=2, progress=False)
    with pytest.raises(ValueError, match=r"'.*other' does not fit with .*\['dataset'\]"):
        load_label_caches([a.directory, other.directory])
    with pytest.raises(ValueError, match=r"\['size'\]"):
        load_label_caches([a.directory, small.directory])
    with pytest.raises(ValueError, match="same seed and settings"):
        load_label_caches([a.directory, a.directory])
    with pytest.raises(ValueError, match=r"'.*more' has the same seed and settings as '.*a'"):
        load_label_caches([a.directory, more.directory])
    with pytest.raises(ValueError, match="non-empty list"):
        load_label_caches(a.directory)
    os.remove(more.shard_path(0))
    b = generate_labels(model, images, labels, space(), str(tmp_path / "b"), seed=5, progress=False)
    with pytest.raises(ValueError, match="incomplete"):
        load_label_caches([b.directory, more.directory])


def test_cache_made_before_space_params_were_recorded_still_resumes_and_combines(tmp_path):
    """Label caches record the space's parameters (``space_params``) since they are rebuilt from
    them; one without the field (the name alone, as before) is continued as it was made, and
    still counts as repeating a new cache of the same seed and settings."""
    from ttach_instance.registry import get_space, space_from_record
    from ttach_instance.training.labels import load_label_caches

    model = tiny_model()
    images, labels = tiny_data(4)
    kw = dict(shard_size=2, progress=False)
    crops = get_space("five_crops:crop_size=0.75")
    new = generate_labels(model, images, labels, crops, str(tmp_path / "new"), **kw)
    m = new.manifest()
    assert (m["space"], m["space_params"]) == ("five_crops", {"crop_size": 0.75})
    assert space_from_record(m, "here").fingerprint == crops.fingerprint != get_space("five_crops").fingerprint
    old = str(tmp_path / "old")
    generate_labels(model, images, labels, space(), old, max_shards=1, **kw)
    with open(os.path.join(old, "manifest.json")) as f:
        m = json.load(f)
    del m["space_params"]
    with open(os.path.join(old, "manifest.json"), "w") as f:
        json.dump(m, f)
    cache = generate_labels(model, images, labels, space(), old, **kw)
    assert cache.complete and "space_params" not in cache.manifest()
    assert space_from_record(cache.manifest(), "here").fingerprint == space().fingerprint
    again = generate_labels(model, images, labels, space(), str(tmp_path / "again"), **kw)
    with pytest.raises(ValueError, match="same seed and settings"):
        load_label_caches([old, again.directory])
