"""Tampered predictor checkpoints: each is refused with a ValueError naming the file and the field,
and loading it imports nothing, runs nothing the file names, builds nothing it should not and
touches no other file (issue 16: a checkpoint must never run code).

A valid checkpoint is written, then its JSON metadata (the safetensors header's ``"meta"``) or
its bytes are rewritten. A guard records what loading does: modules imported, ``importlib`` /
``torch.hub`` / ``os.system`` / ``subprocess`` / ``eval`` / ``exec`` calls, ``timm.create_model``
calls and predictor constructions (with the device they ran on: the loader may build on the
``meta`` device, which allocates nothing, to check the tensors' shapes first), and whether a
sentinel file, a ``hubconf.py`` directory or the checkpoint itself changed.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ttach_instance.predictors import (IdentityCalibration, LossPredictor, LossPredictorBase, SmallLossPredictor,
                                       create_predictor, load_predictor)

class _Payload:
    """A pickle that would write the guard's marker if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- valid checkpoints to tamper with ----------------------------------------------------------------


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """``{"timm": path, "small": path}``: valid checkpoints (the small one calibrated with a gate)."""
    root = tmp_path_factory.mktemp("originals")
    torch.manual_seed(0)
    paths = {"timm": str(root / "timm.safetensors"), "small": str(root / "small.safetensors")}
    create_predictor("timm", "paper12", backbone="mobilenetv3_small_050", input_size=32).save(paths["timm"])
    small = SmallLossPredictor("paper12", width=4, input_size=16)
    small.calibration = IdentityCalibration(0, 0.5, 16)
    small.model_image_size = (32, 32)
    small.save(paths["small"])
    for path in paths.values():  # every lazy import of a good load happens here, not in the guard
        load_predictor(path)
    # a torch.save (pickle) file holding a payload that would write a file named by the test,
    # made before any guard is up (torch.save imports modules of its own)
    paths["torch_save"] = str(root / "torch_save.bin")
    torch.save({"weights": torch.zeros(2), "evil": _Payload(str(root / "unpickled"))}, paths["torch_save"])
    return paths


def meta_of(path):
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["meta"])


class Guard:
    """Records what a load does; :meth:`check` asserts it did nothing it should not have."""

    def __init__(self, monkeypatch, root):
        self.events = []
        self.builds = []  # the default device of each LossPredictorBase construction
        self.created = []  # (name, kwargs) of each timm.create_model call
        self.sentinel = root / "sentinel" / "keep.txt"
        self.sentinel.parent.mkdir()
        self.sentinel.write_text("precious")
        self.sentinel_stat = os.stat(self.sentinel)
        self.hub = root / "hub"
        self.hub.mkdir()
        self.marker = root / "sentinel" / "hubconf_ran"
        (self.hub / "hubconf.py").write_text(f"open({str(self.marker)!r}, 'w').write('ran')\n"
                                             f"def evil(**kw):\n    open({str(self.marker)!r}, 'w').write('ran')\n")
        self.modules = set(sys.modules)

        def refuse(what):
            def call(*args, **kwargs):
                self.events.append((what, args[:2]))
                raise AssertionError(f"loading a checkpoint called {what}{args[:2]}")
            return call

        monkeypatch.setattr(importlib, "import_module", refuse("importlib.import_module"))
        monkeypatch.setattr(torch.hub, "load", refuse("torch.hub.load"))
        monkeypatch.setattr(os, "system", refuse("os.system"))
        monkeypatch.setattr(os, "popen", refuse("os.popen"))
        monkeypatch.setattr(subprocess, "Popen", refuse("subprocess.Popen"))
        monkeypatch.setattr(builtins, "eval", refuse("eval"))
        monkeypatch.setattr(builtins, "exec", refuse("exec"))
        monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
        monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
        monkeypatch.setattr(torch, "load", refuse("torch.load"))
        real_create = timm.create_model

        def create_model(name, *args, **kwargs):
            self.created.append((name, dict(kwargs)))
            weights = {"pretrained_cfg_overlay", "checkpoint_path", "pretrained_cfg"} & set(kwargs)
            if kwargs.get("pretrained") or weights:
                raise AssertionError(f"timm.create_model asked for weights: {name} {kwargs}")
            return real_create(name, *args, **kwargs)

        monkeypatch.setattr(timm, "create_model", create_model)
        real_init = LossPredictorBase.__init__

        def init(module, *args, **kwargs):
            self.builds.append(torch.empty(()).device.type)
            real_init(module, *args, **kwargs)

        monkeypatch.setattr(LossPredictorBase, "__init__", init)

    def check(self, path=None, digest=None):
        assert self.events == [], self.events
        new = set(sys.modules) - self.modules
        assert not new, f"loading imported {sorted(new)}"
        assert self.sentinel.read_text() == "precious" and os.stat(self.sentinel).st_mtime_ns == \
            self.sentinel_stat.st_mtime_ns
        assert sorted(p.name for p in self.sentinel.parent.iterdir()) == ["keep.txt"]  # no marker, no new file
        assert sorted(p.name for p in self.hub.iterdir()) == ["hubconf.py"]  # hubconf never imported
        if path is not None:
            assert _sha(path) == digest, "loading changed the checkpoint file"

    def nothing_built(self):
        assert self.builds == [] and self.created == [], (self.builds, self.created)

    def built_only_on_meta(self):
        assert set(self.builds) <= {"meta"}, self.builds


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def guard(monkeypatch, tmp_path, originals):
    return Guard(monkeypatch, tmp_path)


def write(tmp_path, original, meta=None, raw=None, tensors=None, name="tampered.safetensors"):
    """``original`` rewritten to ``tmp_path/name`` with other metadata (a dict, or the raw
    ``"meta"`` string) and/or other tensors."""
    path = str(tmp_path / name)
    meta_text = raw if raw is not None else json.dumps(meta_of(original) if meta is None else meta)
    save_file(load_file(original) if tensors is None else tensors, path, metadata={"meta": meta_text})
    return path


def refused(path, guard, match, loader=load_predictor):
    """``loader(path)`` raises a ValueError naming ``path`` and matching ``match``; the guard saw nothing."""
    digest = _sha(path) if os.path.isfile(path) else None
    with pytest.raises(ValueError) as err:
        loader(path)
    message = str(err.value)
    assert path in message, message
    assert __import__("re").search(match, message), f"{match!r} not in {message!r}"
    guard.check(path if digest else None, digest)
    return message


# -- metadata: everything refused before anything is imported, called or built ------------------------

HUB = "<hub>"  # replaced by the guard's hubconf directory


def _set(key, value):
    def mutate(meta):
        meta[key] = value
        return meta
    return mutate


def _config(**changes):
    def mutate(meta):
        meta["config"].update(changes)
        return meta
    return mutate


def _drop(key, where=None):
    def mutate(meta):
        (meta if where is None else meta[where]).pop(key)
        return meta
    return mutate


NAN, INF = float("nan"), float("inf")

# (case id, which original, mutation of the metadata dict, regex the message must match)
METADATA_CASES = [
    # architectures name the registry only: no import path, no file path
    ("arch-os-system", "timm", _set("architecture", "os:system"), r"unknown predictor architecture 'os:system'"),
    ("arch-builtins-eval", "timm", _set("architecture", "builtins:eval"), r"architecture 'builtins:eval'"),
    ("arch-module-factory", "small", _set("architecture", "ttach_instance.models:small_resnet"),
     r"architecture 'ttach_instance.models:small_resnet'.*registered: \["),
    ("arch-relative-path", "small", _set("architecture", "../x"), r"architecture '\.\./x'"),
    ("arch-hubconf-dir", "small", _set("architecture", HUB + ":evil"), r"unknown predictor architecture"),
    ("arch-class-name", "small", _set("architecture", "SmallLossPredictor"), r"architecture 'SmallLossPredictor'"),
    ("arch-not-a-string", "small", _set("architecture", ["small"]), r"architecture \['small'\]"),
    ("arch-missing", "small", _drop("architecture"), r"architecture None"),
    # timm backbones: timm model names only
    ("backbone-unknown-timm", "timm", _config(backbone="no_such_net_v9"), r"backbone must be a timm model name"),
    ("backbone-module-factory", "timm", _config(backbone="module:factory"), r"backbone.*'module:factory'"),
    ("backbone-os-path-join", "timm", _config(backbone="os.path:join"), r"backbone.*'os.path:join'"),
    ("backbone-os-system", "timm", _config(backbone="os:system"), r"backbone"),
    ("backbone-hubconf-dir", "timm", _config(backbone=HUB + ":evil"), r"backbone must be a timm model name"),
    ("backbone-hubconf-dir-bare", "timm", _config(backbone=HUB), r"backbone must be a timm model name"),
    ("backbone-hf-hub", "timm", _config(backbone="hf-hub:timm/resnet18.a1_in1k"), r"backbone"),
    ("backbone-local-dir", "timm", _config(backbone="local-dir:" + HUB), r"backbone"),
    ("backbone-bad-tag", "timm", _config(backbone="resnet18.no_such_tag"), r"backbone.*resnet18.no_such_tag"),
    ("backbone-path-tag", "timm", _config(backbone="resnet18./../../etc/passwd"), r"backbone"),
    ("backbone-not-a-string", "timm", _config(backbone=7), r"backbone must be a non-empty string"),
    ("backbone-huge-string", "timm", _config(backbone="r" * 10_000), r"backbone must be a non-empty string"),
    # the config has exactly the schema's keys
    ("config-pretrained", "timm", _config(pretrained=True), r"unknown \['pretrained'\]"),
    ("config-pretrained-cfg-overlay", "timm", _config(pretrained_cfg_overlay={"file": "<sentinel>"}),
     r"unknown \['pretrained_cfg_overlay'\]"),
    ("config-checkpoint-path", "timm", _config(checkpoint_path="<sentinel>"), r"unknown \['checkpoint_path'\]"),
    ("config-backbone-kwargs", "timm", _config(backbone_kwargs={"width": 3}), r"unknown \['backbone_kwargs'\]"),
    ("config-removed-option", "small", _config(unshuffle=2), r"unknown \['unshuffle'\]"),
    ("config-dunder", "small", _config(__class__="os:system"), r"unknown \['__class__'\]"),
    ("config-missing-key", "small", _drop("width", "config"), r"missing \['width'\]"),
    ("config-missing", "small", _drop("config"), r"config must be a JSON object"),
    ("config-not-an-object", "small", _set("config", ["width", 4]), r"config must be a JSON object"),
    # values: types and bounds
    ("width-str", "small", _config(width="4"), r"width must be a finite int"),
    ("width-bool", "small", _config(width=True), r"width must be a finite int"),
    ("width-float", "small", _config(width=4.0), r"width must be a finite int"),
    ("width-nan", "small", _config(width=NAN), r"width must be a finite int"),
    ("width-inf", "small", _config(width=INF), r"width must be a finite int"),
    ("width-1e30", "small", _config(width=1e30), r"width must be a finite int"),
    ("width-huge", "small", _config(width=10**6), r"width must be a int in \[1, 512\]"),
    ("width-bigint", "small", _config(width=10**400), r"width must be a int in"),
    ("width-zero", "small", _config(width=0), r"width must be a int in"),
    ("width-negative", "small", _config(width=-4), r"width must be a int in"),
    ("input-size-huge", "small", _config(input_size=10**9), r"input_size must be a int in \[8, 4096\]"),
    ("input-size-negative", "timm", _config(input_size=-32), r"input_size must be a int in"),
    ("input-size-str", "timm", _config(input_size="32"), r"input_size must be a finite int"),
    ("input-size-null", "timm", _config(input_size=None), r"input_size must be a int value"),
    ("level-drop-str", "timm", _config(level_drop="0.2"), r"level_drop must be a finite float"),
    ("level-drop-bool", "timm", _config(level_drop=True), r"level_drop must be a finite float"),
    ("level-drop-nan", "timm", _config(level_drop=NAN), r"level_drop must be a finite float"),
    ("level-drop-above-1", "timm", _config(level_drop=2.0), r"level_drop must be a float in \[0.0, 1.0\]"),
    ("dropout-1", "timm", _config(dropout=1.0), r"dropout must be a float in"),
    ("mean-short", "timm", _config(mean=[0.5, 0.5]), r"mean must be a list of 3 float"),
    ("mean-str", "timm", _config(mean="0.5"), r"mean must be a list of floats"),
    ("mean-inf", "timm", _config(mean=[INF, 0.5, 0.5]), r"mean\[0\] must be a finite float"),
    ("std-zero", "timm", _config(std=[0.0, 0.2, 0.2]), r"std\[0\] must be a float in"),
    ("out-indices-1000", "timm", _config(out_indices=list(range(1000))), r"out_indices must be a list of at most 16"),
    ("out-indices-negative", "timm", _config(out_indices=[-1]), r"out_indices\[0\] must be a int in"),
    ("out-indices-str", "timm", _config(out_indices="0,1"), r"out_indices must be a list of ints"),
    # model_image_size
    ("image-size-huge", "small", _set("model_image_size", [100000, 100000]),
     r"model_image_size\[0\] must be a int in \[1, 4096\]"),
    ("image-size-negative", "small", _set("model_image_size", [-32, 32]), r"model_image_size\[0\]"),
    ("image-size-one", "small", _set("model_image_size", [32]), r"model_image_size must be a list of 2"),
    ("image-size-str", "small", _set("model_image_size", "32x32"), r"model_image_size must be a list"),
    ("image-size-float", "small", _set("model_image_size", [32.5, 32]), r"model_image_size\[0\] must be a finite int"),
    # calibration
    ("calibration-identity-out-of-range", "small", _set("calibration", {"identity": 12, "num_features": 16}),
     r"calibration.identity must be a int in \[0, 11\]"),
    ("calibration-identity-negative", "small", _set("calibration", {"identity": -1, "num_features": 16}),
     r"calibration.identity"),
    ("calibration-identity-str", "small", _set("calibration", {"identity": "0", "num_features": 16}),
     r"calibration.identity must be a finite int"),
    ("calibration-features-huge", "small", _set("calibration", {"identity": 0, "num_features": 10**9}),
     r"calibration.num_features must be a int in"),
    ("calibration-features-zero", "small", _set("calibration", {"identity": 0, "num_features": 0}),
     r"calibration.num_features"),
    ("calibration-extra-key", "small", _set("calibration", {"identity": 0, "num_features": 16, "margin": 9}),
     r"calibration must be null or"),
    ("calibration-not-an-object", "small", _set("calibration", "gated"), r"calibration must be null or"),
    # kind and format version
    ("kind-wrong", "small", _set("kind", "small-loss-predictor"), r"not a ttach-instance loss predictor checkpoint"),
    ("kind-missing", "small", _drop("kind"), r"not a ttach-instance loss predictor checkpoint \(kind None"),
    ("format-1", "small", _set("format_version", 1),
     r"format version 1; .*reads version 2 only: fit the predictor again"),
    ("format-3", "small", _set("format_version", 3), r"format version 3"),
    ("format-str", "small", _set("format_version", "2"), r"format version '2'"),
    ("format-float", "small", _set("format_version", 2.0), r"format version 2.0"),
    ("format-bool", "small", _set("format_version", True), r"format version True"),
    ("format-missing", "small", _drop("format_version"), r"format version None"),
    # the space: a registered name and parameters, matched by fingerprint
    ("space-unregistered", "small", _set("space", "no_such_space"), r"cannot rebuild its space 'no_such_space'"),
    ("space-import-path", "small", _set("space", "os:system"), r"cannot rebuild its space 'os:system'"),
    ("space-not-a-string", "small", _set("space", 12), r"space must be a registered space name"),
    ("space-params-bad", "small", _set("space_params", {"angle": 5}), r"cannot rebuild its space 'paper12'"),
    ("space-params-not-an-object", "small", _set("space_params", "angle=5"), r"space must be a registered space name"),
    ("space-params-dunder", "small", _set("space_params", {"__class__": "os:system"}), r"cannot rebuild its space"),
    ("space-other-space", "small", _set("space", "flips"), r"not the space the predictor .* was trained for"),
    ("space-fingerprint", "small", _set("space_fingerprint", "0" * 16), r"0000000000000000"),
    ("space-fingerprint-missing", "small", _drop("space_fingerprint"), r"lacks the space's fingerprint"),
    ("space-names-missing", "small", _drop("candidate_names"), r"lacks the space's fingerprint and candidate names"),
]


def _resolve(value, guard):
    """The case's placeholders made concrete (the guard's hub directory and sentinel file)."""
    if isinstance(value, str):
        return value.replace(HUB, str(guard.hub)).replace("<sentinel>", str(guard.sentinel))
    if isinstance(value, dict):
        return {k: _resolve(v, guard) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, guard) for v in value]
    return value


@pytest.mark.parametrize("case, which, mutate, match", METADATA_CASES, ids=[c[0] for c in METADATA_CASES])
def test_tampered_metadata_is_refused_before_anything_is_imported_or_built(tmp_path, originals, guard, case, which,
                                                                           mutate, match):
    meta = _resolve(mutate(meta_of(originals[which])), guard)
    path = write(tmp_path, originals[which], meta)
    refused(path, guard, match)
    guard.nothing_built()


@pytest.mark.parametrize("which, cls", [("timm", LossPredictor), ("small", SmallLossPredictor)])
def test_loading_for_an_architecture_refuses_the_same_files(tmp_path, originals, guard, which, cls):
    path = write(tmp_path, originals[which], _resolve(_set("architecture", "os:system")(meta_of(originals[which])),
                                                      guard))
    def loader(p):
        return load_predictor(p, architecture=cls)

    refused(path, guard, r"unknown predictor architecture 'os:system'", loader=loader)
    path = write(tmp_path, originals[which], _config(pretrained=True)(meta_of(originals[which])))
    refused(path, guard, r"unknown \['pretrained'\]", loader=loader)
    guard.nothing_built()


RAW_CASES = [
    ("not-json", "{not json", r"metadata is not valid JSON"),
    ("truncated-json", json.dumps({"kind": "ttach_instance.loss_predictor"})[:-5], r"metadata is not valid JSON"),
    ("deeply-nested", "[" * 100_000 + "]" * 100_000, r"metadata is not valid JSON"),
    ("huge-integer", '{"kind": "ttach_instance.loss_predictor", "format_version": ' + "9" * 5000 + "}",
     r"metadata is not valid JSON"),
    ("over-1-MiB", json.dumps({"kind": "ttach_instance.loss_predictor", "pad": "x" * (1 << 20)}),
     r"metadata of \d+ bytes \(at most 1048576\)"),
    ("a-list", "[1, 2]", r"not a ttach-instance loss predictor checkpoint"),
    ("a-string", '"ttach_instance.loss_predictor"', r"not a ttach-instance loss predictor checkpoint"),
    ("empty", "", r"not a ttach-instance loss predictor checkpoint"),
]


@pytest.mark.parametrize("case, raw, match", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_metadata_that_is_not_a_json_object_is_refused(tmp_path, originals, guard, case, raw, match):
    refused(write(tmp_path, originals["small"], raw=raw), guard, match)
    guard.nothing_built()


def test_metadata_key_absent_from_the_header_is_refused(tmp_path, originals, guard):
    path = str(tmp_path / "nometa.safetensors")
    save_file(load_file(originals["small"]), path)  # no metadata at all
    refused(path, guard, r"not a ttach-instance loss predictor checkpoint")
    save_file(load_file(originals["small"]), path, metadata={"other": "x"})
    refused(path, guard, r"not a ttach-instance loss predictor checkpoint")
    guard.nothing_built()


# -- bytes and tensors ---------------------------------------------------------------------------------


def test_damaged_files_are_refused_with_the_file_named(tmp_path, originals, guard):
    blob = open(originals["small"], "rb").read()
    cases = {
        "half.safetensors": blob[: len(blob) // 2],
        "header-only.safetensors": blob[: 8 + struct.unpack("<Q", blob[:8])[0]],
        "eight-bytes.safetensors": blob[:8],
        "empty.safetensors": b"",
        "huge-header-length.safetensors": struct.pack("<Q", 2**62) + blob[8:],
        "garbage.safetensors": bytes(range(256)) * 64,
        "pickle.safetensors": pickle.dumps(_Payload(str(guard.marker))),
        "torch-save.safetensors": open(originals["torch_save"], "rb").read(),
    }
    for name, data in cases.items():
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(data)
        refused(path, guard, r"readable safetensors|unreadable|truncated|not a ttach-instance")
    guard.nothing_built()
    assert not os.path.exists(os.path.join(os.path.dirname(originals["torch_save"]), "unpickled"))
    # a truncated body behind an intact header: caught when the tensors are read
    meta_len = struct.unpack("<Q", blob[:8])[0]
    cut = str(tmp_path / "body-cut.safetensors")
    with open(cut, "wb") as f:
        f.write(blob[: 8 + meta_len + 100])
    refused(cut, guard, r"readable safetensors|unreadable|truncated")
    for path, message in ((str(tmp_path / "absent.safetensors"), r"does not exist"),
                          (str(tmp_path), r"must be a \.safetensors file")):
        refused(path, guard, message)


def _tensor_cases(tensors):
    first = "stem.0.weight"
    return [
        ("shape", dict(tensors, **{first: torch.zeros(8, 3, 3, 3)}), rf"mismatched \['{first} \(8, 3, 3, 3\)"),
        ("shape-huge", dict(tensors, **{"head.weight": torch.zeros(12, 4096)}),
         r"mismatched \['head.weight \(12, 4096\)"),
        ("int-for-float", dict(tensors, **{first: tensors[first].to(torch.int32)}), rf"mismatched \['{first}.*int32"),
        ("float-for-int", dict(tensors, **{"stem.1.num_batches_tracked": torch.zeros(())}),
         r"mismatched \['stem.1.num_batches_tracked"),
        ("extra", dict(tensors, extra=torch.zeros(1)), r"unexpected tensors \['extra'\]"),
        ("missing", {k: v for k, v in tensors.items() if k != "head.bias"}, r"missing tensors \['head.bias'\]"),
        ("missing-calibration", {k: v for k, v in tensors.items() if not k.startswith("calibration.gate")},
         r"missing tensors \['calibration.gate_bias', 'calibration.gate_weight'\]"),
        ("calibration-shape", dict(tensors, **{"calibration.gate_weight": torch.zeros(10**5)}),
         r"calibration.gate_weight \(100000,\)"),
    ]


@pytest.mark.parametrize("case", ["shape", "shape-huge", "int-for-float", "float-for-int", "extra", "missing",
                                  "missing-calibration", "calibration-shape"])
def test_tensors_that_do_not_match_are_refused_before_the_model_is_allocated(tmp_path, originals, guard, case):
    tensors = load_file(originals["small"])
    (_, changed, match), = [c for c in _tensor_cases(tensors) if c[0] == case]
    path = write(tmp_path, originals["small"], tensors=changed)
    message = refused(path, guard, match)
    assert "does not match SmallLossPredictor" in message
    guard.built_only_on_meta()  # checked against a meta-device model: no real allocation happened


def test_non_finite_weights_are_refused(tmp_path, originals, guard):
    tensors = load_file(originals["small"])
    for value in (float("nan"), float("inf")):
        bad = dict(tensors, **{"head.weight": torch.full_like(tensors["head.weight"], value)})
        refused(write(tmp_path, originals["small"], tensors=bad), guard, r"\['head.weight'\] hold NaN or infinite")


def test_a_small_file_naming_a_large_timm_model_never_allocates_it(tmp_path, originals, guard):
    """A 1 MB file asking for a billion-parameter backbone: refused from the header's shapes
    after a meta-device build, without allocating the backbone."""
    meta = _config(backbone="vit_giant_patch14_clip_224", input_size=224)(meta_of(originals["timm"]))
    path = write(tmp_path, originals["timm"], meta)
    refused(path, guard, r"does not match LossPredictor.*missing tensors")
    assert [name for name, _ in guard.created] == ["vit_giant_patch14_clip_224"]
    assert guard.builds == ["meta"] and not guard.created[0][1].get("pretrained")


def test_a_config_the_architecture_cannot_build_is_a_value_error_naming_the_file(tmp_path, originals, guard):
    meta = _config(out_indices=[15])(meta_of(originals["timm"]))  # within the schema, beyond this backbone
    refused(write(tmp_path, originals["timm"], meta), guard, r"architecture 'timm' cannot be built.*out_indices")
    assert all(not kwargs.get("pretrained") for _, kwargs in guard.created)


def test_the_originals_still_load_under_the_guard(originals, guard):
    """The guard itself lets a good load through: the refusals above are the loader's, not the guard's."""
    for path in (originals["timm"], originals["small"]):
        digest = _sha(path)
        predictor = load_predictor(path)
        guard.check(path, digest)
        assert not predictor.training
    assert "meta" in guard.builds and "cpu" in guard.builds


def test_the_guard_sees_what_an_unsafe_loader_would_do(originals, guard):
    """The guard is not vacuous: the import, the calls and the file writes of a loader that
    trusted its file (what ``module:factory`` backbones did) are each caught."""
    with pytest.raises(AssertionError, match="importlib.import_module"):
        importlib.import_module("os")
    with pytest.raises(AssertionError, match="os.system"):
        os.system("true")
    with pytest.raises(AssertionError, match="importlib.import_module"):
        guard.check()
    guard.events.clear()
    for damage in (lambda: guard.marker.write_text("ran"), lambda: guard.sentinel.write_text(""),
                   lambda: (guard.hub / "__pycache__").mkdir()):
        damage()
        with pytest.raises(AssertionError):
            guard.check()
    guard.modules.discard("json")
    with pytest.raises(AssertionError, match="imported"):
        guard.check()


# -- target-model weights carrying their spec (ttach_instance.model_spec) ------------------------------
# A weights file may name a model to build; only allow-listed factories are honoured, with their
# arguments schema-checked, before anything is imported, called or built.

from ttach_instance.model_spec import load_model, save_model  # noqa: E402


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_files")
    torch.manual_seed(0)
    paths = {"small": str(root / "small.safetensors"), "timm": str(root / "timm.safetensors")}
    small = __import__("ttach_instance.models", fromlist=["small_resnet"]).small_resnet(num_classes=3, width=2)
    save_model(paths["small"], small, "ttach_instance.models:small_resnet", {"width": 2, "num_classes": 3})
    save_model(paths["timm"], timm.create_model("resnet10t", num_classes=3), "timm:resnet10t", {"num_classes": 3})
    for path in paths.values():  # every lazy import of a good load happens here
        load_model(path)
    # a module that would leave a marker if a file could make the loader import it
    plugin = root / "evil_target_module"
    plugin.mkdir()
    (plugin / "evil_target_module.py").write_text(
        f"open({str(root / 'imported')!r}, 'w').write('ran')\ndef factory(**kw):\n    raise SystemExit\n")
    paths["module_dir"], paths["marker"] = str(plugin), str(root / "imported")
    return paths


def _spec(**changes):
    def mutate(meta):
        meta["model_spec"].update(changes)
        return meta
    return mutate


def _kwargs(**changes):
    def mutate(meta):
        meta["model_spec"]["kwargs"].update(changes)
        return meta
    return mutate


MODEL_CASES = [
    ("small", _spec(factory="os:system"), r"model_spec.factory 'os:system' is not an allow-listed"),
    ("small", _spec(factory="builtins:eval"), r"model_spec.factory 'builtins:eval' is not an allow-listed"),
    ("small", _spec(factory="evil_target_module:factory"), r"model_spec.factory .* not an allow-listed"),
    ("small", _spec(factory="ttach_instance.models:SmallResNet"), r"not an allow-listed"),
    ("small", _spec(factory="timm:hf-hub:timm/resnet18.a1_in1k"), r"model_spec.factory .* not an allow-listed"),
    ("small", _spec(factory="timm:resnet18.a1_in1k"), r"not an allow-listed"),
    ("small", _spec(factory="timm:../x"), r"not an allow-listed"),
    ("small", _spec(factory="timm:no_such_model"), r"not an allow-listed"),
    ("small", _spec(factory=["os", "system"]), r"model_spec.factory must be a string"),
    ("timm", _kwargs(pretrained=True), r"model_spec.kwargs has keys \['pretrained'\]"),
    ("timm", _kwargs(pretrained_cfg_overlay={"file": "/etc/passwd"}), r"keys \['pretrained_cfg_overlay'\]"),
    ("timm", _kwargs(checkpoint_path="x.pth"), r"keys \['checkpoint_path'\]"),
    ("small", _kwargs(width="2"), r"model_spec.kwargs.width must be a finite int"),
    ("small", _kwargs(width=True), r"model_spec.kwargs.width must be"),
    ("small", _kwargs(width=10 ** 9), r"model_spec.kwargs.width must be"),
    ("small", _kwargs(num_classes=2.0), r"model_spec.kwargs.num_classes must be"),
    ("small", _spec(kwargs=[]), r"model_spec.kwargs must be a JSON object"),
    ("small", _spec(kind="ttach_instance.loss_predictor"), r"model_spec.kind must be"),
    ("small", _spec(format_version=2), r"model_spec.format_version is 2"),
    ("small", _spec(module="os"), r"model_spec has unknown fields \['module'\]"),
    ("small", _set("model_spec", "os:system"), r"model_spec must be a JSON object"),
]


@pytest.mark.parametrize("which,mutate,match", MODEL_CASES)
def test_a_weights_file_naming_code_or_bad_arguments_imports_and_builds_nothing(tmp_path, model_files, guard,
                                                                                  monkeypatch, which, mutate, match):
    monkeypatch.syspath_prepend(model_files["module_dir"])
    path = write(tmp_path, model_files[which], mutate(meta_of(model_files[which])))
    refused(path, guard, match, loader=load_model)
    assert guard.created == [] and not os.path.exists(model_files["marker"])
    assert "evil_target_module" not in sys.modules


def test_a_small_weights_file_naming_a_large_timm_model_never_allocates_it(tmp_path, model_files, guard):
    meta = _spec(factory="timm:vit_giant_patch14_clip_224")(meta_of(model_files["timm"]))
    meta["model_spec"]["kwargs"] = {"num_classes": 3}
    refused(write(tmp_path, model_files["timm"], meta), guard, r"does not hold the weights of.*missing tensors",
            loader=load_model)
    assert [(name, kwargs.get("pretrained")) for name, kwargs in guard.created] == [("vit_giant_patch14_clip_224",
                                                                                      False)]


def test_weights_that_do_not_match_their_spec_are_refused(tmp_path, model_files, guard):
    meta = _kwargs(width=3)(meta_of(model_files["small"]))  # recorded width 3, weights of width 2
    refused(write(tmp_path, model_files["small"], meta), guard, r"mismatched \['stem.0.weight", loader=load_model)


def test_good_model_files_still_load_under_the_guard(model_files, guard):
    for which in ("small", "timm"):
        digest = _sha(model_files[which])
        load_model(model_files[which])
        guard.check(model_files[which], digest)
    assert all(kwargs.get("pretrained") is False for _, kwargs in guard.created)
