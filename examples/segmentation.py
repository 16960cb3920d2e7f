"""Segmentation TTA around any model: conventional (every view of a space, each output warped
back to the input frame, merged) and loss-guided (per image, the k views a loss predictor
ranks best).

    python examples/segmentation.py                        # a small conv net: seconds
    python examples/segmentation.py --model fcn_resnet50   # torchvision's FCN-ResNet50: about a CPU minute

The weights here are random, so the masks mean nothing; the code is what you keep. With your
own model, pass it with the normalisation its input carries (``mean=``/``std=``), and a fitted
predictor instead of the random one: ``ttach-instance labels`` -> ``fit``, then
``ti.load_predictor("predictor.safetensors")``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import ttach_instance as ti

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what torchvision's models expect


def build_model(name: str, num_classes: int) -> nn.Module:
    """A segmentation model returning ``{"out": logits (B, num_classes, H, W)}``, as torchvision's do."""
    if name == "fcn_resnet50":
        from torchvision.models.segmentation import fcn_resnet50

        return fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes).eval()

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=2, dilation=2),
                                      nn.ReLU(), nn.Conv2d(16, num_classes, 1))

        def forward(self, x):
            return {"out": self.body(x)}

    return Tiny().eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "fcn_resnet50"], default="tiny")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=96)
    args = p.parse_args(argv)
    torch.manual_seed(0)

    model = build_model(args.model, args.classes)
    pixels = torch.rand(args.batch, 3, args.size, args.size)  # your images, in [0, 1]
    x = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    io = dict(output_mask_key="out", mean=MEAN, std=STD)  # the model's dict output; its input normalisation

    # Conventional TTA: all 8 views of the dihedral group, de-augmented and averaged.
    d4 = ti.SegmentationTTAWrapper(model, "d4", **io)
    # Any space works, rotations, zooms and crops included: uncovered pixels are extrapolated.
    paper12 = ti.SegmentationTTAWrapper(model, "paper12", **io)
    # Loss-guided TTA: a predictor scores the 12 candidates of paper12 per image (lower = better),
    # the k best run. A random predictor here; use ti.load_predictor(path) for a fitted one.
    predictor = ti.create_predictor("small", "paper12", width=8, input_size=32).eval()
    guided = ti.LossGuidedSegmentationWrapper(model, predictor, k=1, return_selection=True, **io)
    guided2 = ti.LossGuidedSegmentationWrapper(model, predictor, k=2, **io)

    with torch.no_grad():
        runs = {"plain model": lambda: model(x), "d4 (8 views)": lambda: d4(x), "paper12 (12 views)": lambda: paper12(x),
                "loss-guided k=1": lambda: guided(x)[0], "loss-guided k=2": lambda: guided2(x)}
        plain = None
        for name, run in runs.items():
            t0 = time.perf_counter()
            out = run()["out"]
            ms = (time.perf_counter() - t0) * 1e3
            plain = out if plain is None else plain
            agree = (out.argmax(1) == plain.argmax(1)).float().mean()
            print(f"{name:20s} {tuple(out.shape)}  {ms:7.1f} ms  pixels agreeing with the plain model {agree:.1%}")

        # What the predictor chose, and a per-pixel uncertainty across the chosen views.
        _, selection = guided(x)
        print("chosen per image:", [predictor.space.names[i] for i in selection.index[:, 0].tolist()])
        merged, uncertainty = guided2.forward_with_uncertainty(x)
        print(f"uncertainty map {tuple(uncertainty.shape)}, mean {uncertainty.mean():.4f} "
              f"(validity-weighted variance of the two views' class probabilities)")


if __name__ == "__main__":
    main()
