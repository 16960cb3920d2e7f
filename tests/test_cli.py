import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ttach_instance.cli import main
from ttach_instance.data import build_model, load_dataset, load_image_folder
from ttach_instance.training.labels import LabelCache
from _tiny import two_class_folder

FACTORY = "ttach_instance.models:small_resnet"


@pytest.fixture()
def folder(tmp_path):
    return two_class_folder(tmp_path, {"train": 4, "val": 3})


@pytest.fixture()
def weights(tmp_path):
    torch.manual_seed(0)
    model = build_model(FACTORY, num_classes=2, kwargs={"width": 4})
    path = str(tmp_path / "w.pt")
    torch.save(model.state_dict(), path)
    return path


def test_image_folder_loading(folder):
    ds = load_dataset(folder, split="val")
    assert ds.classes == ["ants", "bees"] and ds.images.shape == (6, 3, 32, 32) and ds.labels.tolist() == [0] * 3 + [1] * 3
    arr = np.array(Image.open(os.path.join(folder, "val", "bees", "0.png")))
    assert torch.equal(ds.images[3].permute(1, 2, 0), torch.from_numpy(arr))
    assert load_image_folder(os.path.join(folder, "train"), size=16).images.shape == (8, 3, 16, 16)
    with pytest.raises(ValueError, match="root"):
        load_image_folder(os.path.join(folder, "missing"))


def test_weights_formats_and_model_specs(tmp_path, weights):
    torch.manual_seed(1)
    a = build_model(FACTORY, num_classes=2, weights=weights, kwargs={"width": 4})
    from safetensors.torch import save_file

    st = str(tmp_path / "w.safetensors")
    save_file(a.state_dict(), st)
    b = build_model(FACTORY, num_classes=2, weights=st, kwargs={"width": 4})
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(a(x), b(x))
    assert build_model("resnet18", num_classes=3)(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="cannot import"):
        build_model("no_such_module:f")
    with pytest.raises(ValueError, match="timm"):
        build_model("definitely_not_a_model")
    with pytest.raises(ValueError, match="do not fit"):
        build_model(FACTORY, num_classes=5, weights=weights, kwargs={"width": 4})


def test_labels_command_and_resume(folder, tmp_path, capsys):
    # small_resnet's default width (16) does not match the width-4 weights: use a width-16 file
    torch.manual_seed(0)
    w = str(tmp_path / "w16.pt")
    torch.save(build_model(FACTORY, num_classes=2).state_dict(), w)
    out = str(tmp_path / "labels")
    args = ["labels", "--model", FACTORY, "--weights", w, "--data", folder, "--out", out, "--draws", "2",
            "--corruption-p", "0.5", "--corruptions", "contrast,fog", "--shard-size", "5"]
    assert main(args) == 0
    assert "4/4 shards, 16 rows" in capsys.readouterr().out
    data = LabelCache(out).load()
    assert data["losses"].shape == (16, 12)
    os.remove(LabelCache(out).shard_path(2))
    assert main(args) == 0
    again = LabelCache(out).load()
    assert torch.equal(again["losses"], data["losses"])
    # --deform: every row's image deformed first; bare --deform takes the paper-like defaults
    deformed = str(tmp_path / "deformed")
    assert main(["labels", "--model", FACTORY, "--weights", w, "--data", folder, "--out", deformed, "--draws", "2",
                 "--corruption-p", "0", "--deform"]) == 0
    assert LabelCache(deformed).manifest()["deformation"] == {"rotate": 10.0, "zoom": 0.1, "brightness": 0.15}
    images = LabelCache(deformed).load()["images"]
    assert not (images[:8] == images[8:]).flatten(1).all(1).any()  # two draws of a clean image differ
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["labels", "--model", FACTORY, "--weights", w, "--data", folder, "--out", deformed + "2", "--deform", "5"])
    assert "--deform must be ROTATE,ZOOM,BRIGHTNESS" in capsys.readouterr().err


def _val_pixels(folder):
    """The val split read with PIL, class by class: ``(pixels in [0, 1] (N, 3, H, W), labels)``."""
    files = [(c, os.path.join(folder, "val", cls, f)) for c, cls in enumerate(("ants", "bees"))
             for f in sorted(os.listdir(os.path.join(folder, "val", cls)))]
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for _, p in files])
    return x.float() / 255, [c for c, _ in files]


def test_eval_command_baselines(folder, tmp_path, weights, capsys):
    # a fresh model puts every image in one class (every method then errs on half of them): its
    # class-1 bias is moved so that the ants' decision is split, and the methods can differ
    torch.manual_seed(0)
    model = build_model(FACTORY, num_classes=2)
    mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
    x, y = _val_pixels(folder)
    with torch.no_grad():
        z = model((x - mean) / std)
        model.head.bias[1] -= (z[:, 1] - z[:, 0])[torch.tensor(y) == 0].mean()
    w = str(tmp_path / "w16.pt")
    torch.save(model.state_dict(), w)
    out = str(tmp_path / "eval")
    assert main(["eval", "--model", FACTORY, "--weights", w, "--data", folder, "--out", out, "--corruptions",
                 "contrast", "--held-out", "saturate", "--severities", "1", "--methods",
                 "identity,hflip,full_mean,oracle_k1", "--cost-images", "0"]) == 0
    text = capsys.readouterr().out
    assert "| Identity |" in text and "| H-Flip |" in text
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert set(res["methods"]) == {"identity", "hflip", "full_mean", "oracle_k1"}
    # the clean errors against a plain loop: the model on each image (normalised by its own
    # mean/std), with its mirror (probabilities averaged), and every candidate for the oracle
    from ttach_instance.registry import get_space

    model = build_model(FACTORY, num_classes=2, weights=w)
    wrong = {"identity": 0, "hflip": 0, "oracle_k1": 0}
    with torch.no_grad():
        for i, label in enumerate(y):
            xi = x[i:i + 1]
            wrong["identity"] += int(model((xi - mean) / std)[0].argmax()) != label
            both = model((xi - mean) / std)[0].softmax(0) + model((xi.flip(-1) - mean) / std)[0].softmax(0)
            wrong["hflip"] += int(both.argmax()) != label
            logits = [model((cand.apply(xi) - mean) / std)[0] for cand in get_space("paper12").candidates]
            losses = [float(-torch.log_softmax(v, 0)[label]) for v in logits]
            wrong["oracle_k1"] += int(logits[int(np.argmin(losses))].argmax()) != label
    assert res["n"] == len(y) == 6
    for method, n_wrong in wrong.items():
        assert res["clean"][method] == pytest.approx(100.0 * n_wrong / len(y)), method
    assert len({res["clean"][m] for m in wrong}) > 1  # the set-up tells the methods apart


def test_cli_errors_name_the_argument(folder, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["labels", "--model", FACTORY, "--data", folder, "--out", "x", "--corruptions", "lava"])
    assert exc.value.code == 2
    assert "--corruptions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", FACTORY, "--data", folder, "--out", "x", "--methods", "magic"])
    assert "methods" in capsys.readouterr().err


def _clean_labels(folder, tmp_path, *extra):
    """Weights of a fresh FACTORY model and a clean label cache made with them (``extra``: more
    ``labels`` arguments): ``(weights path, cache dir)``."""
    torch.manual_seed(0)
    w = str(tmp_path / "w16.pt")
    torch.save(build_model(FACTORY, num_classes=2).state_dict(), w)
    labels = str(tmp_path / "labels")
    assert main(["labels", "--model", FACTORY, "--weights", w, "--data", folder, "--out", labels, *extra,
                 "--corruptions", "none", "--corruption-p", "0"]) == 0
    return w, labels


def test_fit_and_predict_commands(folder, tmp_path, capsys):
    w, labels = _clean_labels(folder, tmp_path, "--draws", "3")
    fit = str(tmp_path / "fit")
    # a light LossPredictor backbone keeps this test fast on busy CPUs
    assert main(["fit", "--labels", labels, "--out", fit, "--backbone", "lcnet_050", "--epochs", "2",
                 "--batch-size", "8", "--optimizer", "adamw", "--lr", "0.001", "--val-fraction", "0.25", "--flip",
                 "--clean-tolerance", "0.5"]) == 0
    assert "held-out spearman" in capsys.readouterr().out
    pred = os.path.join(fit, "predictor.safetensors")
    assert os.path.isfile(pred)
    # the light CNN predictor
    small = str(tmp_path / "fit_small")
    assert main(["fit", "--labels", labels, "--out", small, "--predictor", "small", "--width", "4",
                 "--epochs", "1", "--batch-size", "8", "--optimizer", "adamw",
                 "--val-fraction", "0.25", "--distill-weight", "0.5"]) == 0
    with open(os.path.join(small, "history.json")) as f:
        assert json.load(f)[0]["train_distill_loss"] > 0  # from the labels' input_logits
    from ttach_instance.predictors import SmallLossPredictor, load_predictor

    loaded = load_predictor(os.path.join(small, "predictor.safetensors"))
    assert isinstance(loaded, SmallLossPredictor) and loaded.width == 4 and loaded.head.in_features == 16
    assert "held-out spearman" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--labels", labels, "--out", small + "2", "--predictor", "small", "--backbone", "lcnet_050"])
    assert "--width" in capsys.readouterr().err
    for removed in (["--levels", "all"], ["--detail-channels", "2"], ["--unshuffle", "2"], ["--pretrain-epochs", "1"]):
        with pytest.raises(SystemExit):  # measured as no gain: the options are gone
            main(["fit", "--labels", labels, "--out", small + "2", *removed])
        assert "unrecognized arguments" in capsys.readouterr().err
    # started from the labels' model (a SmallResNet of width 16 at 8 px)
    started = str(tmp_path / "fit_started")
    assert main(["fit", "--labels", labels, "--out", started, "--predictor", "small", "--width", "16",
                 "--input-size", "8", "--init-from", FACTORY, "--init-weights", w,
                 "--init-num-classes", "2", "--epochs", "1", "--batch-size", "8", "--optimizer", "adamw",
                 "--val-fraction", "0.25"]) == 0
    loaded = load_predictor(os.path.join(started, "predictor.safetensors"))
    assert loaded.input_size == 8 and loaded.width == 16
    assert "held-out spearman" in capsys.readouterr().out
    img = os.path.join(folder, "val", "bees", "0.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("ants\nbees\n")
    assert main(["predict", "--model", FACTORY, "--weights", w, "--num-classes", "2", "--predictor", pred,
                 "--k", "2", "--classes", str(classes), img]) == 0
    line = capsys.readouterr().out.strip()
    # the line computed by hand: the image at the labels' size, the predictor's two lowest-scored
    # candidates applied to it, the model's probabilities on those views averaged
    loaded = load_predictor(pred)
    model = build_model(FACTORY, num_classes=2, weights=w)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.mean, model.std))
    h, wd = loaded.model_image_size
    with Image.open(img) as im:
        x = torch.from_numpy(np.array(im.convert("RGB").resize((wd, h), Image.BICUBIC))).permute(2, 0, 1)[None] / 255
    with torch.no_grad():
        chosen = loaded(x)[0].argsort()[:2].tolist()
        probs = torch.stack([model((loaded.space.candidates[j].apply(x) - mean) / std)[0].softmax(0)
                             for j in chosen]).mean(0)
    cls = int(probs.argmax())
    assert line == (f"{img}: class {('ants', 'bees')[cls]} (p={float(probs[cls]):.3f}); views: "
                    + ", ".join(loaded.candidate_names[j] for j in chosen))
    with pytest.raises(SystemExit):
        main(["predict", "--model", FACTORY, "--weights", w, "--num-classes", "2", "--predictor", pred, "--k", "13", img])
    assert "--k" in capsys.readouterr().err
    # --predictor-flip: the views are the k lowest of the flip-averaged scores

    from ttach_instance.predictors import FlipAveragedPredictor, load_predictor

    loaded = load_predictor(pred)
    with Image.open(img) as im:
        im = im.convert("RGB").resize((loaded.input_size, loaded.input_size), Image.BICUBIC)
        x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        order = FlipAveragedPredictor(loaded)(x)[0].argsort()[:3].tolist()
    assert main(["predict", "--model", FACTORY, "--weights", w, "--num-classes", "2", "--predictor", pred,
                 "--predictor-flip", "--k", "3", img]) == 0
    views = capsys.readouterr().out.strip().split("views: ")[1]
    assert views == ", ".join(loaded.candidate_names[j] for j in order)


def test_predict_resizes_to_the_labels_image_size_not_the_predictors(folder, tmp_path, capsys, monkeypatch):
    w, labels = _clean_labels(folder, tmp_path, "--size", "24")
    fit = str(tmp_path / "fit")
    assert main(["fit", "--labels", labels, "--out", fit, "--predictor", "small", "--width", "4", "--input-size",
                 "16", "--epochs", "1", "--batch-size", "8", "--optimizer", "adamw", "--val-fraction", "0.25"]) == 0
    from ttach_instance.predictors import load_predictor
    from ttach_instance.wrappers import LossGuidedWrapper

    pred = os.path.join(fit, "predictor.safetensors")
    loaded = load_predictor(pred)
    assert loaded.input_size == 16 and loaded.model_image_size == (24, 24)
    seen = []
    forward = LossGuidedWrapper.forward
    monkeypatch.setattr(LossGuidedWrapper, "forward", lambda self, x: seen.append(tuple(x.shape)) or forward(self, x))
    img = os.path.join(folder, "val", "bees", "0.png")
    common = ["predict", "--model", FACTORY, "--weights", w, "--num-classes", "2", "--predictor", pred]
    assert main(common + [img]) == 0
    assert seen[-1] == (1, 3, 24, 24)  # the model's size, not the predictor's 16
    assert main(common + ["--size", "20", img]) == 0
    assert seen[-1] == (1, 3, 20, 20)
    # a checkpoint that does not record it (fitted before it was) and a model without a timm
    # data config: the error asks for --size
    loaded.model_image_size = None
    old = str(tmp_path / "old.safetensors")
    loaded.save(old)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["predict", "--model", FACTORY, "--weights", w, "--num-classes", "2", "--predictor", old, img])
    assert "--size" in capsys.readouterr().err


TINY = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyimagenet-dev20")


@pytest.mark.skipif(not os.path.isdir(TINY), reason="shared Tiny ImageNet dev split not present")
def test_tinyimagenet_folder_loads():
    ds = load_image_folder(os.path.join(TINY, "val"), limit_per_class=2, progress=False)
    assert len(ds.classes) == 20 and ds.images.shape == (40, 3, 64, 64)
    assert ds.labels.tolist() == [c for c in range(20) for _ in range(2)]


def test_small_predictor_round_trip_and_space_check(tmp_path):
    from ttach_instance.predictors import SmallLossPredictor, load_predictor
    from ttach_instance.registry import get_space

    p = SmallLossPredictor(get_space("paper12"), width=4, input_size=16)
    x = torch.rand(2, 3, 32, 32)
    path = str(tmp_path / "p.safetensors")
    p.eval().save(path)
    q = load_predictor(path)
    assert torch.equal(p(x), q(x)) and q.candidate_names == get_space("paper12").names and q.input_size == 16
    with pytest.raises(ValueError, match="not the space"):
        load_predictor(path, space=get_space("flips"))
    with pytest.raises(ValueError, match="safetensors"):
        load_predictor(str(tmp_path / "p.pt"))


def test_demo_task_from_bundled_photos():
    from ttach_instance.demo_run import DEMO_PHOTOS, photo_patch_task

    train, val = photo_patch_task(n_train=3, n_val=2, size=40, seed=1)
    assert train.images.shape == (3 * len(DEMO_PHOTOS), 3, 40, 40) and val.images.shape == (2 * len(DEMO_PHOTOS), 3, 40, 40)
    assert train.labels.tolist() == [c for c in range(len(DEMO_PHOTOS)) for _ in range(3)]
    assert train.classes == list(DEMO_PHOTOS)
    again, _ = photo_patch_task(n_train=3, n_val=2, size=40, seed=1)
    assert torch.equal(again.images, train.images)  # reproducible, nothing downloaded


def test_predict_size_falls_back_to_the_timm_data_config():
    import timm

    from ttach_instance.cli import _predict_image_size

    model = torch.nn.DataParallel(timm.create_model("resnet18", pretrained=False, num_classes=3))

    class Unfitted:
        model_image_size = None

    assert _predict_image_size(None, Unfitted(), model) == (224, 224)  # through the wrapper, timm's input_size
    assert _predict_image_size(48, Unfitted(), model) == (48, 48)
    with pytest.raises(ValueError, match="--size is required"):
        _predict_image_size(None, Unfitted(), torch.nn.Linear(2, 2))


def test_fit_init_from_the_target_model(folder, tmp_path, capsys):
    w, labels = _clean_labels(folder, tmp_path)
    fit = str(tmp_path / "fit_init")
    # the labels' model is a width-16 small_resnet: a width-16 SmallLossPredictor starts from it;
    # its class count comes from the labels' input_logits
    assert main(["fit", "--labels", labels, "--out", fit, "--predictor", "small", "--width", "16", "--input-size",
                 "16", "--epochs", "1", "--batch-size", "8", "--optimizer", "adamw", "--lr", "1e-9",
                 "--val-fraction", "0.25", "--init-from", FACTORY, "--init-weights", w]) == 0
    from ttach_instance.predictors import load_predictor

    target = torch.load(w, weights_only=True)
    pred = load_predictor(os.path.join(fit, "predictor.safetensors"))
    # lr ~0: the stem is still the target's (up to the EMA of almost-unchanged weights)
    assert torch.allclose(pred.stem[0].weight, target["stem.0.weight"], atol=1e-6)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "--labels", labels, "--out", fit + "2", "--predictor", "small", "--width", "8",
              "--epochs", "1", "--init-from", FACTORY, "--init-weights", w])
    assert "stage widths [16, 32, 64]" in capsys.readouterr().err


def test_fit_on_several_label_caches(folder, tmp_path, capsys):
    w, labels = _clean_labels(folder, tmp_path, "--draws", "2")
    seed1 = str(tmp_path / "labels_seed1")
    assert main(["labels", "--model", FACTORY, "--weights", w, "--data", folder, "--out", seed1, "--seed", "1",
                 "--corruptions", "contrast", "--corruption-p", "1"]) == 0
    fit = str(tmp_path / "fit")
    args = ["--out", fit, "--predictor", "small", "--width", "4", "--epochs", "1", "--batch-size", "8",
            "--optimizer", "adamw", "--val-fraction", "0.25"]
    assert main(["fit", "--labels", labels, seed1, *args]) == 0
    with open(os.path.join(fit, "history.json")) as f:
        record = json.load(f)[0]
    # 8 images, 2 of them held out: their 2 clean draws and 1 corrupted draw
    assert record["val_n"] == 2 * 3
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "--labels", labels, labels, *args[:1], fit + "2", *args[2:]])
    assert "--labels: label cache" in capsys.readouterr().err


def test_fit_with_an_identity_gate(folder, tmp_path, capsys):
    torch.manual_seed(0)
    w = str(tmp_path / "w.pt")
    torch.save(build_model(FACTORY, num_classes=2).state_dict(), w)
    labels = str(tmp_path / "labels")
    # the gate learns clean vs corrupted: labels with both
    assert main(["labels", "--model", FACTORY, "--weights", w, "--data", folder, "--out", labels, "--draws", "4",
                 "--corruptions", "contrast,gaussian_noise", "--corruption-p", "0.5"]) == 0
    with pytest.raises(SystemExit):
        main(["fit", "--labels", labels, "--out", str(tmp_path / "x"), "--predictor", "small", "--identity-gate"])
    assert "--identity-gate needs --clean-tolerance" in capsys.readouterr().err
    fit = str(tmp_path / "fit")
    assert main(["fit", "--labels", labels, "--out", fit, "--predictor", "small", "--width", "4", "--epochs", "1",
                 "--batch-size", "8", "--optimizer", "adamw", "--val-fraction", "0.25", "--clean-tolerance", "0.5",
                 "--identity-gate"]) == 0
    assert "gated (clean/corrupted told apart on" in capsys.readouterr().out
    from ttach_instance.predictors import load_predictor

    loaded = load_predictor(os.path.join(fit, "predictor.safetensors"))
    with open(os.path.join(fit, "history.json")) as f:
        selected = [h for h in json.load(f) if h.get("selected")][0]
    assert loaded.calibration is not None and loaded.calibration.gated
    assert float(loaded.calibration.margin) == selected["identity_margin"]  # the float32 margin, saved as applied
    # the gate's accuracy on the held-out rows, recomputed independently from the saved gate
    from ttach_instance.predictors.calibration import identity_index

    assert identity_index(loaded.space) == loaded.calibration.identity == 0
    from ttach_instance.training.labels import LabelCache
    from ttach_instance.training.trainer import split_rows

    data = LabelCache(labels).load()
    _, val = split_rows(data["rows"], 8, 0.25, 0)  # 8 train images, the fit's seed 0
    with torch.no_grad():
        p = loaded.calibration.clean_probability(loaded.eval().features(data["images"][val].float() / 255))
    told_apart = ((p > 0.5) == (data["corruption"][val] < 0)).float().mean().item()
    assert selected["val_n"] == int(val.sum()) == 8
    assert selected["identity_gate_accuracy"] == pytest.approx(told_apart, abs=1e-9)
