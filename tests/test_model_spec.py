"""Weights saved with their model spec (issue 17 item 5): --model can be omitted for them, only
allow-listed factories are honoured from a file, and an explicit --model works as before.
(The tampered files: tests/test_checkpoint_tampering.py.)"""

import json
import os

import pytest
import timm
import torch
from safetensors import safe_open

from ttach_instance.cli import main
from ttach_instance.data import build_model
from ttach_instance.io import atomic_save_tensors
from ttach_instance.model_spec import MODEL_SPEC_FORMAT, MODEL_SPEC_KIND, load_model, read_model_spec, save_model
from ttach_instance.training.labels import LabelCache
from _tiny import two_class_folder

FACTORY = "ttach_instance.models:small_resnet"


@pytest.fixture()
def folder(tmp_path):
    return two_class_folder(tmp_path, {"train": 3, "val": 2}, size=16)


def _small(tmp_path, width=4, classes=2, name="target.safetensors"):
    torch.manual_seed(0)
    model = build_model(FACTORY, num_classes=classes, kwargs={"width": width})
    path = str(tmp_path / name)
    save_model(path, model, FACTORY, {"width": width, "num_classes": classes}, {"size": 16})
    return model, path


def test_the_spec_is_in_the_safetensors_metadata_and_rebuilds_the_model(tmp_path):
    model, path = _small(tmp_path, width=3, classes=5)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta["size"] == 16
    assert meta["model_spec"] == {"kind": MODEL_SPEC_KIND, "format_version": MODEL_SPEC_FORMAT, "factory": FACTORY,
                                  "kwargs": {"width": 3, "num_classes": 5}}
    loaded, spec = load_model(path)
    assert spec == {"factory": FACTORY, "kwargs": {"width": 3, "num_classes": 5}}
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ValueError, match=r"5 classes, not the 7"):
        load_model(path, num_classes=7)


def test_a_timm_spec_is_built_without_pretrained_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3)
    path = str(tmp_path / "timm.safetensors")
    save_model(path, model, "timm:resnet10t", {"num_classes": 3})
    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    loaded, _ = load_model(path)
    assert calls and all(k.get("pretrained") is False for _, k in calls)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_saving_refuses_a_spec_that_would_not_load_back(tmp_path):
    model = build_model(FACTORY, num_classes=2, kwargs={"width": 4})
    for factory, kwargs, match in (("mypkg.models:net", {}, "not an allow-listed"),
                                   (FACTORY, {"width": 4, "pretrained": True}, r"keys \['pretrained'\]"),
                                   (FACTORY, {"width": 0}, r"model_spec.kwargs.width must be")):
        with pytest.raises(ValueError, match=match):
            save_model(str(tmp_path / "x.safetensors"), model, factory, kwargs)
    assert not os.path.exists(tmp_path / "x.safetensors")
    plain = str(tmp_path / "plain.safetensors")
    atomic_save_tensors(plain, model.state_dict(), {"width": 4})
    assert read_model_spec(plain) is None
    with pytest.raises(ValueError, match="records no model spec"):
        load_model(plain)


def test_cli_labels_eval_and_predict_without_model(folder, tmp_path, capsys):
    model, path = _small(tmp_path)
    labels = str(tmp_path / "labels")
    assert main(["labels", "--weights", path, "--data", folder, "--out", labels, "--corruptions", "none",
                 "--corruption-p", "0", "--space", "hflip"]) == 0
    manifest = LabelCache(labels).manifest()
    assert manifest["model"]["spec"] == {"model": FACTORY, "num_classes": 2, "kwargs": {"width": 4}}
    # the same labels made with the explicit --model: same model, same losses
    explicit = str(tmp_path / "labels_explicit")
    assert main(["labels", "--model", FACTORY, "--model-kwargs", '{"width": 4}', "--weights", path, "--data", folder,
                 "--out", explicit, "--corruptions", "none", "--corruption-p", "0", "--space", "hflip"]) == 0
    assert manifest["model"]["weights_sha256"] == LabelCache(explicit).manifest()["model"]["weights_sha256"]
    assert torch.equal(LabelCache(labels).load()["losses"], LabelCache(explicit).load()["losses"])
    capsys.readouterr()
    from ttach_instance.predictors import create_predictor

    pred = str(tmp_path / "p.safetensors")
    create_predictor("small", "hflip", width=2, input_size=8).save(pred)
    img = os.path.join(folder, "val", "bees", "0.png")
    assert main(["predict", "--weights", path, "--predictor", pred, "--size", "16", img]) == 0
    out = capsys.readouterr().out
    assert out.startswith(img + ": class ")
    for argv, match in ((["--num-classes", "3"], "holds a model of 2 classes"),
                        (["--model-kwargs", '{"width": 4}'], "--model-kwargs goes with --model")):
        with pytest.raises(SystemExit) as exc:
            main(["predict", "--weights", path, "--predictor", pred, "--size", "16", *argv, img])
        assert exc.value.code == 2 and match in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--predictor", pred, "--size", "16", img])
    assert "--model is required" in capsys.readouterr().err


def test_a_file_naming_other_code_is_refused_but_explicit_model_still_works(folder, tmp_path, capsys):
    model, path = _small(tmp_path)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    meta["model_spec"]["factory"] = "ttach_instance.data:build_model"  # importable, but not allow-listed
    forged = str(tmp_path / "forged.safetensors")
    atomic_save_tensors(forged, model.state_dict(), meta)
    argv = ["labels", "--data", folder, "--out", str(tmp_path / "l"), "--corruptions", "none", "--corruption-p", "0",
            "--space", "hflip"]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--weights", forged])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and forged in err and "model_spec.factory" in err and "allow-listed" in err
    # the user's own --model is their choice: used as today, the file's spec ignored
    assert main(argv + ["--weights", forged, "--model", FACTORY, "--model-kwargs", '{"width": 4}']) == 0


def test_weights_files_and_predictor_checkpoints_share_one_header_reader(tmp_path, monkeypatch):
    """read_model_spec and read_checkpoint_metadata read the header through ttach_instance.io.read_meta:
    the same refusals (unreadable, not JSON, over the size limit), each naming its file, and one
    limit for both."""
    import ttach_instance.io as tio
    from ttach_instance.predictors import read_checkpoint_metadata

    def write(name, raw):
        path = str(tmp_path / name)
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, path, metadata={"meta": raw})
        return path

    def refusals(path):
        out = []
        for reader, where in ((read_model_spec, "weights file"), (read_checkpoint_metadata, "predictor checkpoint")):
            with pytest.raises(ValueError) as exc:
                reader(path)
            assert str(exc.value).startswith(f"{where} {path!r}")
            out.append(str(exc.value)[len(f"{where} {path!r}"):])
        return out

    bad_json = write("bad.safetensors", "{not json")
    first, second = refusals(bad_json)
    assert first == second and first.startswith(": metadata is not valid JSON")
    garbage = str(tmp_path / "garbage.safetensors")
    with open(garbage, "wb") as f:
        f.write(b"\x08" + b"\x00" * 7 + b"{}garbage")
    first, second = refusals(garbage)
    assert first == second and first.startswith(" is not a readable safetensors file")
    spec = json.dumps({"model_spec": {"kind": MODEL_SPEC_KIND, "format_version": MODEL_SPEC_FORMAT,
                                      "factory": FACTORY, "kwargs": {"width": 4}}})
    path = write("spec.safetensors", spec)
    assert read_model_spec(path) == {"factory": FACTORY, "kwargs": {"width": 4}}
    monkeypatch.setattr(tio, "MAX_METADATA_BYTES", len(spec) - 1)  # one limit, read where it is used
    first, second = refusals(path)
    assert first == second == f": metadata of {len(spec)} bytes (at most {len(spec) - 1})"
