"""Every wrapper's and every evaluation method's output, pinned bit for bit on CPU.

The reference file ``fixtures/pinned_outputs.safetensors`` was written by this module's
``compute_pinned()`` at commit 2b294d0 (before the pipeline was rebuilt), so a refactor that
changes any number shows up here. Intended changes are listed in ``INTENDED`` with the reason,
and those entries are compared against their new definition instead.

Regenerate (only when a change is intended and stated): ``python tests/test_pinned_outputs.py``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

import ttach_instance as ti
from ttach_instance.models import small_resnet
from ttach_instance.predictors import SmallLossPredictor

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "fixtures", "pinned_outputs.safetensors")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return _seeded(small_resnet(num_classes=5, width=4), 1)


def _segmenter() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 3, padding=1))
    net = _seeded(net, 2)
    net.mean, net.std = MEAN, STD
    return net


def _predictor(space) -> nn.Module:
    torch.manual_seed(0)
    return _seeded(SmallLossPredictor(space, width=4, input_size=16), 3)


def _inputs():
    g = torch.Generator().manual_seed(4)
    pixels = torch.rand(6, 3, 32, 32, generator=g)
    labels = torch.randint(0, 5, (6,), generator=g)
    masks = torch.randint(0, 3, (6, 32, 32), generator=g)
    return pixels, labels, masks


def _normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.no_grad()
def compute_pinned() -> dict:
    from ttach_instance.evaluation import _method_forward, evaluate_arrays, evaluate_segmentation_arrays
    from ttach_instance.data import normalizer
    from ttach_instance.segmentation import (LossGuidedSegmentationWrapper, OracleKSegmentationWrapper,
                                             RandomKSegmentationWrapper, SegmentationTTAWrapper)

    out = {}
    space = ti.get_space("paper12")
    model, predictor = _classifier(), _predictor(space)
    pixels, labels, masks = _inputs()
    x = _normalised(pixels)
    # -- classification wrappers
    for name, wrapper in {
        "lg_k1": ti.LossGuidedWrapper(model, predictor, k=1),
        "lg_k2": ti.LossGuidedWrapper(model, predictor, k=2),
        "lg_k2_flip": ti.LossGuidedWrapper(model, predictor, k=2, flip=True),
        "lg_k3_weighted": ti.LossGuidedWrapper(model, predictor, k=3, merge_mode="weighted", temperature=0.5),
        "lg_k2_gmean_chunk4": ti.LossGuidedWrapper(model, predictor, k=2, merge_mode="gmean", chunk_size=4),
        "random_k2": ti.RandomKWrapper(model, space, k=2, seed=0),
        "full_space": ti.FullSpaceWrapper(model, space),
        "full_space_crops": ti.FullSpaceWrapper(model, "five_crops"),
    }.items():
        out[f"cls/{name}"] = wrapper(x)
    oracle, selection = ti.OracleKWrapper(model, space, k=2, return_selection=True)(x, labels)
    out["cls/oracle_k2"], out["cls/oracle_k2_index"] = oracle, selection.index
    _, selection = ti.LossGuidedWrapper(model, predictor, k=2, return_selection=True)(x)
    out["cls/lg_k2_index"] = selection.index
    # -- evaluation methods (deployable forwards and the harness's errors)
    crops = ti.get_space("ten_crops")
    normalize = normalizer(model)
    for m in ("identity", "hflip", "five_crops", "ten_crops", "random_k1", "random_k2", "random_k4", "full_mean",
              "ours_k1", "ours_k2", "ours_k1_hflip", "ours_k2_hflip"):
        out[f"eval/{m}"] = _method_forward(m, model, predictor, space, crops, normalize, pixels,
                                           torch.Generator().manual_seed(0))
    images = (pixels * 255).round().to(torch.uint8)
    res = evaluate_arrays(model, images, labels, space, predictor, batch_size=4)
    for m, err in res["errors"].items():
        out[f"eval_errors/{m}"] = torch.tensor(err, dtype=torch.float64)
    # -- segmentation wrappers
    seg = _segmenter()
    seg_pred = _predictor(space)
    for name, wrapper in {
        "full_d4": SegmentationTTAWrapper(seg, "d4", mean=MEAN, std=STD),
        "full_paper12": SegmentationTTAWrapper(seg, space, mean=MEAN, std=STD),
        "full_paper12_identity_cov": SegmentationTTAWrapper(seg, space, mean=MEAN, std=STD, coverage="identity"),
        "full_paper12_zero_cov": SegmentationTTAWrapper(seg, space, mean=MEAN, std=STD, coverage="zero"),
        "full_paper12_probs": SegmentationTTAWrapper(seg, space, mean=MEAN, std=STD, merge_mode="probs"),
        "full_five_crops": SegmentationTTAWrapper(seg, "five_crops", mean=MEAN, std=STD),
        "lg_k1": LossGuidedSegmentationWrapper(seg, seg_pred, k=1, mean=MEAN, std=STD),
        "lg_k2": LossGuidedSegmentationWrapper(seg, seg_pred, k=2, mean=MEAN, std=STD),
        "lg_k2_nearest": LossGuidedSegmentationWrapper(seg, seg_pred, k=2, mean=MEAN, std=STD,
                                                       interpolation="nearest"),
        "random_k2": RandomKSegmentationWrapper(seg, space, k=2, generator=torch.Generator().manual_seed(0),
                                                mean=MEAN, std=STD),
    }.items():
        out[f"seg/{name}"] = wrapper(x)
    out["seg/oracle_k1"] = OracleKSegmentationWrapper(seg, space, k=1, mean=MEAN, std=STD)(x, target=masks)
    _, unc = SegmentationTTAWrapper(seg, space, mean=MEAN, std=STD).forward_with_uncertainty(x)
    out["seg/full_paper12_uncertainty"] = unc
    res = evaluate_segmentation_arrays(seg, images, masks, space, 3, predictor=seg_pred, batch_size=4)
    for m in res["miou"]:
        out[f"seg_eval_miou/{m}"] = torch.tensor(res["miou"][m], dtype=torch.float64)
        out[f"seg_eval_acc/{m}"] = torch.tensor(res["pixel_acc"][m], dtype=torch.float64)
    return {k: v.contiguous() for k, v in out.items()}


def test_outputs_match_the_pinned_reference():
    from safetensors.torch import load_file

    reference = load_file(REFERENCE)
    now = compute_pinned()
    assert sorted(now) == sorted(reference)
    changed = [k for k in reference if not torch.equal(now[k], reference[k])]
    assert not changed, f"outputs changed: {changed}"


if __name__ == "__main__":
    from safetensors.torch import save_file

    save_file(compute_pinned(), REFERENCE)
    print("wrote", REFERENCE)
