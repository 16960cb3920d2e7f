"""fit --recipe (shipped recipes, files, auto), early stopping, and the predictor's backbone
started from --backbone-weights or --pretrained (issue 17 items 2 and 4)."""

import json
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from ttach_instance import recipes
from ttach_instance.cli import main
from ttach_instance.data import build_model
from ttach_instance.model_spec import save_model
from ttach_instance.predictors import LossPredictor, SmallLossPredictor
from ttach_instance.training import trainer
from ttach_instance.training.labels import LabelCache
from _tiny import two_class_folder

FACTORY = "ttach_instance.models:small_resnet"


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    """``{"small": (labels, target), "timm": (labels, None)}``: hflip label caches of 12 images (32 px) made
    by a small_resnet (width 4, saved with its spec) and by a timm resnet10t."""
    root = tmp_path_factory.mktemp("recipes")
    two_class_folder(root, {"train": 6})
    torch.manual_seed(0)
    target = str(root / "target.safetensors")
    save_model(target, build_model(FACTORY, num_classes=2, kwargs={"width": 4}), FACTORY,
               {"width": 4, "num_classes": 2})
    common = ["--data", str(root / "ds"), "--space", "hflip", "--corruption-p", "0.5", "--corruptions",
              "gaussian_noise,contrast", "--draws", "2"]
    out = {"small": (str(root / "labels_small"), target), "timm": (str(root / "labels_timm"), None)}
    assert main(["labels", "--weights", target, "--out", out["small"][0], *common]) == 0
    assert main(["labels", "--model", "resnet10t", "--num-classes", "2", "--out", out["timm"][0], *common]) == 0
    return out


@pytest.fixture()
def captured(monkeypatch):
    """fit's trainer replaced by one that records the predictor and config it is handed: what
    the CLI resolved, before any training step."""
    seen = {}

    def fake(predictor, data, out_dir, config, **kwargs):
        seen.update(predictor=predictor, config=config,
                    state={k: v.clone() for k, v in predictor.state_dict().items()})
        return {"final": {}}

    monkeypatch.setattr(trainer, "fit_predictor", fake)
    return seen


def test_shipped_recipes_load_and_list():
    assert {"tinyimagenet-cut", "tinyimagenet-in24-d270", "tinyimagenet-in24-gate-e3", "segmentation-small24",
            "demo", "tinyimagenet-resnet18"} <= set(recipes.list_recipes())
    cut = recipes.load_recipe("tinyimagenet-cut")
    # the flags of the headline run (docs/BENCHMARKS.md), as data
    assert cut["predictor"] == {"architecture": "small", "width": 16, "input_size": 24, "init_from": "target"}
    assert cut["fit"]["epochs"] == 3 and cut["fit"]["identity_gate"] and cut["fit"]["clean_tolerance"] == 0.1
    # the second target's: what auto resolved to for a timm resnet18 at 32 px, pinned by name
    r18 = recipes.load_recipe("tinyimagenet-resnet18")
    assert r18["predictor"] == {"architecture": "small", "width": 16, "input_size": 32, "init_from": None}
    assert (r18["fit"]["select_by"], r18["fit"]["patience"], r18["fit"]["epochs"]) == ("k1_accuracy", 10, 30)


def test_flags_given_override_the_recipe_which_overrides_the_defaults(labels, tmp_path, captured, capsys):
    lab, target = labels["small"]
    assert main(["fit", "--labels", lab, "--out", str(tmp_path / "f"), "--recipe", "tinyimagenet-cut",
                 "--init-weights", target, "--width", "4", "--input-size", "8", "--epochs", "1", "--no-flip",
                 "--lr", "0.01"]) == 0
    cfg, pred = captured["config"], captured["predictor"]
    assert (cfg.epochs, cfg.lr, cfg.flip_permutation) == (1, 0.01, None)  # flags
    assert (cfg.optimizer, cfg.weight_decay, cfg.ema_decay, cfg.spearman_weight) == ("adamw", 1e-5, 0.995, 2.0)
    assert cfg.identity_gate and cfg.clean_tolerance == 0.1  # recipe
    assert (cfg.batch_size, cfg.cutout, cfg.warmup_steps) == (128, 0.5, 200)  # defaults
    assert isinstance(pred, SmallLossPredictor) and (pred.width, pred.input_size) == (4, 8)
    out = capsys.readouterr().out
    assert "resolved recipe (tinyimagenet-cut):" in out
    for line in ('fit.epochs = 1  (flag)', 'fit.optimizer = "adamw"  (recipe)', 'fit.flip = false  (flag)',
                 'predictor.init_from = "target"  (recipe)', 'fit.cutout = 0.5  (default)'):
        assert line in out, line
    # started from the target (the recipe's init_from), whose weights the labels were made with
    target_state = build_model(FACTORY, num_classes=2, kwargs={"width": 4}, weights=target).state_dict()
    assert torch.equal(captured["state"]["stem.0.weight"], target_state["stem.0.weight"])


def test_without_a_recipe_fit_keeps_its_defaults(labels, tmp_path, captured):
    assert main(["fit", "--labels", labels["timm"][0], "--out", str(tmp_path / "f"), "--backbone", "lcnet_050"]) == 0
    cfg = captured["config"]
    assert cfg == trainer.FitConfig()  # today's defaults: 60 epochs of RMSprop, no flips, no calibration
    assert isinstance(captured["predictor"], LossPredictor) and captured["predictor"].input_size == 32


def test_unknown_recipes_and_broken_files_are_refused_by_name(labels, tmp_path, capsys):
    lab = labels["timm"][0]
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--labels", lab, "--out", str(tmp_path / "f"), "--recipe", "nope"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown recipe 'nope'; known: demo, " in err and "tinyimagenet-cut" in err \
        and "auto" in err
    good = json.loads(open(os.path.join(os.path.dirname(recipes.__file__), "demo.json")).read())
    for change, match in ((lambda d: d["fit"].update(lr="fast"), r"fit\.lr must be a finite float"),
                          (lambda d: d["fit"].update(lrr=0.1), r"unknown fit fields \['lrr'\]"),
                          (lambda d: d["predictor"].update(init_from="os:system"), r"predictor\.init_from must be one"),
                          (lambda d: d["predictor"].update(architecture="evil"), r"predictor\.architecture must be"),
                          (lambda d: d.update(format_version=2), r"format_version is 2"),
                          (lambda d: d["fit"].update(identity_gate="yes"), r"fit\.identity_gate must be true or false")):
        doc = json.loads(json.dumps(good))
        change(doc)
        path = str(tmp_path / "broken.json")
        with open(path, "w") as f:
            json.dump(doc, f)
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--labels", lab, "--out", str(tmp_path / "f"), "--recipe", path])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and path in err, err
        assert __import__("re").search(match, err), (match, err)


def test_auto_picks_the_predictor_from_the_target_model(labels, tmp_path, captured, capsys):
    # a small_resnet target: the small predictor of its width, started from it, 3/4 of the side
    lab, target = labels["small"]
    assert main(["fit", "--labels", lab, "--out", str(tmp_path / "a"), "--recipe", "auto",
                 "--init-weights", target]) == 0
    cfg, pred = captured["config"], captured["predictor"]
    assert isinstance(pred, SmallLossPredictor) and (pred.width, pred.input_size) == (4, 24)
    assert (cfg.epochs, cfg.patience, cfg.select_by) == (30, 10, "k1_accuracy")
    assert cfg.clean_tolerance == 0.1 and cfg.identity_gate and cfg.flip_permutation == [0, 1]
    assert cfg.distill_weight == 1.0 and cfg.optimizer == "adamw"
    assert "resolved recipe (auto):" in capsys.readouterr().out
    # a timm target: the small predictor of width 16 from scratch, the same optimiser (a CPU can fit it)
    assert main(["fit", "--labels", labels["timm"][0], "--out", str(tmp_path / "b"), "--recipe", "auto"]) == 0
    cfg, pred = captured["config"], captured["predictor"]
    assert isinstance(pred, SmallLossPredictor) and (pred.width, pred.input_size) == (16, 32)
    assert (cfg.optimizer, cfg.patience, cfg.identity_gate) == ("adamw", 10, True)
    # ... and a flag still overrides it: the timm predictor with its default optimiser
    assert main(["fit", "--labels", labels["timm"][0], "--out", str(tmp_path / "c"), "--recipe", "auto",
                 "--predictor", "timm", "--backbone", "lcnet_050", "--optimizer", "rmsprop",
                 "--select-by", "spearman", "--patience", "2"]) == 0
    cfg, pred = captured["config"], captured["predictor"]
    assert isinstance(pred, LossPredictor) and pred.input_size == 32 and pred.backbone_name == "lcnet_050"
    assert (cfg.optimizer, cfg.select_by, cfg.patience) == ("rmsprop", "spearman", 2)
    # auto's decisions from the manifests alone: a small_resnet target 3/4 of the side, within
    # 16..64; any other the whole side, at most 64
    for cache, sizes in ((lab, ((32, 24), (64, 48), (224, 64), (12, 12))),
                         (labels["timm"][0], ((32, 32), (64, 64), (224, 64), (12, 12)))):
        manifest = LabelCache(cache).manifest()
        for side, expected in sizes:
            doc = recipes.auto_recipe({**manifest, "size": side}, {"images": torch.zeros(1, 3, side, side)})
            assert doc["predictor"]["input_size"] == expected, (cache, side)


def test_init_from_target_refuses_weights_that_did_not_make_the_labels(labels, tmp_path, capsys):
    lab, _ = labels["small"]
    other = str(tmp_path / "other.safetensors")
    torch.manual_seed(5)
    save_model(other, build_model(FACTORY, num_classes=2, kwargs={"width": 4}), FACTORY, {"width": 4, "num_classes": 2})
    with pytest.raises(SystemExit):
        main(["fit", "--labels", lab, "--out", str(tmp_path / "f"), "--recipe", "auto", "--init-weights", other])
    assert "is not the model the labels were made with" in capsys.readouterr().err


def test_early_stopping_ends_the_fit_when_the_held_out_metric_stalls(labels, tmp_path):
    data = LabelCache(labels["timm"][0]).load()
    from ttach_instance.predictors import create_predictor

    torch.manual_seed(0)
    pred = create_predictor("small", "hflip", width=2, input_size=8)
    # lr ~ 0: every epoch scores as the first (ties keep the earlier epoch), so patience 2 stops after 3
    cfg = trainer.FitConfig(epochs=10, batch_size=8, lr=1e-12, patience=2, val_fraction=0.25, warmup_steps=1)
    res = trainer.fit_predictor(pred, data, str(tmp_path / "es"), cfg, num_images=12, progress=False,
                                log=lambda m: None)
    assert len(res["history"]) == 3 and res["complete"] and res["selected_epoch"] == 1
    # resumed from its checkpoint, the stopped fit stays stopped
    res2 = trainer.fit_predictor(create_predictor("small", "hflip", width=2, input_size=8), data,
                                 str(tmp_path / "es"), cfg, num_images=12, progress=False, log=lambda m: None)
    assert len(res2["history"]) == 3
    with pytest.raises(ValueError, match="patience"):
        trainer.FitConfig(patience=0)


# -- the predictor's backbone from a local weights file or the hub ---------------------------------------

def test_backbone_weights_file_is_loaded_before_training(labels, tmp_path, captured):
    torch.manual_seed(3)
    full = timm.create_model("lcnet_050")  # a classifier's state dict, as timm publishes it
    path = str(tmp_path / "lcnet_050.safetensors")
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, path)
    assert main(["fit", "--labels", labels["timm"][0], "--out", str(tmp_path / "f"), "--backbone", "lcnet_050",
                 "--backbone-weights", path]) == 0
    backbone = {k[len("backbone."):]: v for k, v in captured["state"].items() if k.startswith("backbone.")}
    reference = full.state_dict()
    assert backbone and all(torch.equal(v, reference[k]) for k, v in backbone.items())
    assert not torch.equal(backbone["conv_stem.weight"], timm.create_model("lcnet_050").state_dict()["conv_stem.weight"])


def test_a_mismatched_backbone_weights_file_is_named_with_its_keys_and_shapes(labels, tmp_path, capsys):
    lab = labels["timm"][0]
    other = str(tmp_path / "resnet10t.safetensors")
    save_file(timm.create_model("resnet10t").state_dict(), other)
    state = timm.create_model("lcnet_050").state_dict()
    state["conv_stem.weight"] = torch.zeros(4, 3, 3, 3)
    reshaped = str(tmp_path / "reshaped.safetensors")
    save_file(state, reshaped)
    for path, match in ((other, "tensors missing (first: ['conv_stem.weight'"),
                        (reshaped, "conv_stem.weight (4, 3, 3, 3) (expected (8, 3, 3, 3))")):
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--labels", lab, "--out", str(tmp_path / "f"), "--backbone", "lcnet_050",
                  "--backbone-weights", path])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and path in err and "lcnet_050" in err and match in err, err
    with pytest.raises(SystemExit):
        main(["fit", "--labels", lab, "--out", str(tmp_path / "f"), "--predictor", "small", "--backbone-weights", other])
    assert "--predictor timm options" in capsys.readouterr().err


def test_pretrained_offline_says_so_and_suggests_backbone_weights(labels, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # this machine has no hub; never wait on retries
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--labels", labels["timm"][0], "--out", str(tmp_path / "f"), "--backbone", "lcnet_050",
              "--pretrained"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "pretrained weights of timm backbone 'lcnet_050' could not be loaded" in err
    assert "offline" in err and "--backbone-weights" in err


def test_select_by_choices_are_the_trainers_selectable_metrics_and_the_recipe_schemas():
    import argparse
    from ttach_instance.cli import build_parser

    fit = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["fit"]
    flag = next(a for a in fit._actions if a.dest == "select_by")
    assert set(flag.choices) == set(trainer.SELECTABLE_METRICS) == set(recipes.SCHEMA["fit"]["select_by"]) - {None}
