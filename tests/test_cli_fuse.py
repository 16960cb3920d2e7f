"""The ``fuse`` command: learned fusion weights and the weighted merge's temperature fitted from
the CLI equal the library's fits on views computed here."""

import json

import pytest
import torch

from _tiny import TinyPredictor, two_class_folder
from ttach_instance.cli import main
from ttach_instance.data import build_model, load_dataset
from ttach_instance.fusion import collect_views, fit_fusion, fit_weighted_temperature, fitted_temperature, load_fusion
from ttach_instance.normalization import to_model_input
from ttach_instance.predictors import load_predictor
from ttach_instance.registry import get_space
from ttach_instance.wrappers import FullSpaceWrapper, LossGuidedWrapper

FLIPS = get_space("flips")

FACTORY = "ttach_instance.models:small_resnet"


@pytest.fixture()
def folder(tmp_path):
    return two_class_folder(tmp_path, {"val": 5}, size=16)


def test_cli_fuse_weights_and_temperature(tmp_path, folder, capsys):
    torch.manual_seed(0)
    model = build_model(FACTORY, num_classes=2, kwargs={"width": 4}).eval()
    weights = str(tmp_path / "w.pt")
    torch.save(model.state_dict(), weights)
    common = ["--model", FACTORY, "--model-kwargs", '{"width": 4}', "--weights", weights, "--data", folder,
              "--split", "val", "--limit", "6"]
    out = str(tmp_path / "fusion.safetensors")
    assert main(["fuse", "weights", *common, "--space", "flips", "--out", out]) == 0
    assert "wrote" in capsys.readouterr().out
    # the same fit on views computed here: the 6 evenly spaced images, ImageNet normalisation
    ds = load_dataset(folder, split="val")
    rows = list(range(0, 10, 10 // 6))[:6]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = to_model_input(ds.images[rows].float() / 255, mean, std)
    views = collect_views(FullSpaceWrapper(model, FLIPS, mean=mean, std=std), [x])["views"]
    expected = fit_fusion(views, ds.labels[rows], FLIPS)
    assert torch.allclose(load_fusion(out, space="flips").weight, expected.weight, atol=1e-6)

    predictor = TinyPredictor(12)
    ppath = str(tmp_path / "p.safetensors")
    predictor.save(ppath)
    tout = str(tmp_path / "pt.safetensors")
    assert main(["fuse", "temperature", *common, "--predictor", ppath, "--k", "2", "--out", tout]) == 0
    got = collect_views(LossGuidedWrapper(model, predictor.eval(), k=2, merge_mode="weighted", mean=mean, std=std), [x])
    t, _ = fit_weighted_temperature(got["views"], got["losses"], ds.labels[rows])
    assert fitted_temperature(load_predictor(tout), 2) == pytest.approx(t, rel=1e-6)
    with pytest.raises(SystemExit):
        main(["fuse", "weights", *common, "--predictor", ppath, "--out", out])
    assert "are `fuse temperature` options" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fuse", "temperature", *common, "--out", tout])
    assert "needs --predictor" in capsys.readouterr().err


def test_cli_eval_fusion_row(tmp_path, folder, capsys):
    torch.manual_seed(0)
    model = build_model(FACTORY, num_classes=2, kwargs={"width": 4}).eval()
    weights = str(tmp_path / "w.pt")
    torch.save(model.state_dict(), weights)
    fusion = fit_fusion(*hand_views(), FLIPS)
    path = str(tmp_path / "fusion.safetensors")
    fusion.save(path)
    out = str(tmp_path / "eval")
    args = ["eval", "--model", FACTORY, "--model-kwargs", '{"width": 4}', "--weights", weights, "--data", folder,
            "--split", "val", "--methods", "identity", "--corruptions", "none", "--held-out", "none",
            "--severities", "1", "--cost-images", "0", "--out", out]
    assert main([*args, "--fusion", path]) == 0
    assert "Learned fusion (flips)" in capsys.readouterr().out
    res = json.load(open(f"{out}/results.json"))
    assert res["methods"] == ["identity", "fusion"] and res["model_calls"]["fusion"] == 4
    ds = load_dataset(folder, split="val")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = to_model_input(ds.images.float() / 255, mean, std)
    with torch.no_grad():
        views = torch.stack([model(x), model(x.flip(-1)), model(x.flip(-2)), model(x.flip(-1).flip(-2))], 1)
    fused = (fusion.view_weights()[None, :, None] * views.softmax(2)).sum(1)
    assert res["clean"]["fusion"] == pytest.approx(100 * float((fused.argmax(1) != ds.labels).float().mean()))
    # other weights are another evaluation: the folder refuses them
    with torch.no_grad():
        fusion.weight.add_(1.0 * torch.arange(4))
    fusion.save(path)
    with pytest.raises(SystemExit):
        main([*args, "--fusion", path])
    assert "holds the results of another evaluation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--fusion", str(tmp_path / "missing.safetensors")])
    assert "--fusion: no fusion weights file" in capsys.readouterr().err


def hand_views():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (20,), generator=g)
    return torch.randn(20, 4, 2, generator=g), y


def test_cli_fuse_weights_segmentation(tmp_path, capsys):
    from test_segmentation_workflow import _make_folder, tiny_segmenter

    from ttach_instance.data import load_segmentation_dataset
    from ttach_instance.wrappers import SegmentationTTAWrapper

    _make_folder(tmp_path / "ds" / "val", 6, seed=1)
    out = str(tmp_path / "seg.safetensors")
    assert main(["fuse", "weights", "--task", "segmentation", "--model", "test_segmentation_workflow:tiny_segmenter",
                 "--data", str(tmp_path / "ds"), "--split", "val", "--space", "flips", "--out", out]) == 0
    assert "pixel accuracy" in capsys.readouterr().out
    ds = load_segmentation_dataset(str(tmp_path / "ds"), split="val", progress=False)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    wrapper = SegmentationTTAWrapper(tiny_segmenter(2), FLIPS, mean=mean, std=std)
    got = collect_views(wrapper, [to_model_input(ds.images.float() / 255, mean, std)])
    assert got["validity"] is not None and got["views"].shape == (6, 4, 2, 32, 32)
    expected = fit_fusion(got["views"], ds.masks.long(), FLIPS, validity=got["validity"], ignore_index=255)
    fitted = load_fusion(out)
    assert fitted.fit_info["task"] == "segmentation" and fitted.fit_info["images"] == 6
    assert torch.allclose(fitted.weight, expected.weight, atol=1e-6)
