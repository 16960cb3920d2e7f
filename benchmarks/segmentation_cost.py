"""Cost of segmentation TTA around a U-Net: de-augmentation + merge as a fraction of the model.

For a compact U-Net (the one of examples/segmentation_tinyimagenet.py, random weights) at
256x256, batch 8, it times, per configuration (space, k views per image):

* ``model``:   the model forward on the ``B * k`` views alone;
* ``deaug+merge``: :func:`deaugment_views` + :func:`merge_views` on those outputs;
* ``wrapper``: the whole wrapper forward (views + model + de-augmentation + merge), and its
  ratio to one plain forward of the batch;
* ttach's ``SegmentationTTAWrapper`` with ``d4_transform`` (8 forwards in a Python loop).

Medians of ``--repeats`` runs. Run:  ``python benchmarks/segmentation_cost.py --threads 1``
(and ``--device cuda`` where a GPU is present).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import ttach_instance as ti  # noqa: E402
from ttach_instance.segmentation import (  # noqa: E402
    LossGuidedSegmentationWrapper,
    SegmentationTTAWrapper,
    deaugment_views,
    merge_views,
)
from segmentation_tinyimagenet import UNet  # noqa: E402


class _Fixed(torch.nn.Module):
    """Predictor stand-in with fixed scores (the predictor's own cost is benchmarked elsewhere)."""

    def __init__(self, space, best):
        super().__init__()
        self.space = space
        self.register_buffer("scores", torch.ones(len(space)))
        self.scores[best] = 0

    def forward(self, x):
        return self.scores.expand(x.shape[0], -1)


def timeit(fn, repeats, device):
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])  # first run is warm-up


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = UNet(width=args.width).to(device).eval()
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)

    print(f"# device {device}, threads {args.threads}, U-Net width {args.width}, batch {args.batch}, {args.size}x{args.size}")
    with torch.no_grad():
        base = timeit(lambda: model(images), args.repeats, device)
        print(f"plain forward: {base * 1e3:.0f} ms")
        print("| configuration | views/img | model on views (ms) | deaug+merge (ms) | deaug+merge / model | wrapper / plain forward |")
        print("|---|---|---|---|---|---|")
        paper12 = ti.get_space("paper12")
        configs = [
            ("Ours k=1, rotate(20) chosen", LossGuidedSegmentationWrapper(model, _Fixed(paper12, 2), k=1), paper12, [[2]]),
            ("Ours k=1, zoom(1.2), coverage=identity", LossGuidedSegmentationWrapper(model, _Fixed(paper12, 4), k=1, coverage="identity"), paper12, [[4]]),
            ("Ours k=2 (rotate(20), zoom(1.2))", LossGuidedSegmentationWrapper(model, _Fixed(paper12, [2, 4]), k=2), paper12, [[2, 4]]),
            ("flips (4 views)", SegmentationTTAWrapper(model, "flips"), ti.get_space("flips"), [list(range(4))]),
            ("d4 (8 views)", SegmentationTTAWrapper(model, "d4"), ti.get_space("d4"), [list(range(8))]),
            ("five_crops (5 views)", SegmentationTTAWrapper(model, "five_crops"), ti.get_space("five_crops"), [list(range(5))]),
            ("paper12 full mean (12 views)", SegmentationTTAWrapper(model, "paper12"), paper12, [list(range(12))]),
        ]
        try:  # the real predictor (random weights): its own cost is part of the wrapper's
            from ttach_instance.predictor import LossPredictor

            real = LossPredictor(paper12, input_size=64, pretrained=False).to(device).eval()
            configs.insert(2, (f"Ours k=1, LossPredictor ({real.backbone_name}, 64 px)",
                               LossGuidedSegmentationWrapper(model, real, k=1), paper12, None))
        except ImportError:
            pass
        for name, wrapper, space, idx in configs:
            if idx is None:
                index = wrapper.predictor(images).topk(wrapper.k, 1, largest=False).indices
            else:
                index = torch.tensor(idx, device=device).expand(args.batch, -1)
            k = index.shape[1]
            views = space.apply(images, index)
            if getattr(wrapper, "coverage", "") == "identity":
                views_in = torch.cat([views, images])
            else:
                views_in = views
            t_model = timeit(lambda: model(views_in), args.repeats, device)
            out = model(views)
            fill = "border" if wrapper.coverage == "extrapolate" else "zero"

            def post():
                back, valid = deaugment_views(out, space, index, fill=fill, tables=wrapper._tables)
                back = back.reshape((args.batch, k) + back.shape[1:])
                valid = valid.reshape((args.batch, k) + valid.shape[1:])
                return merge_views(back, valid, fallback=back.mean(1))

            t_post = timeit(post, args.repeats, device)
            t_wrap = timeit(lambda: wrapper(images), args.repeats, device)
            print(f"| {name} | {k + (wrapper.coverage == 'identity')} | {t_model * 1e3:.0f} | {t_post * 1e3:.1f} | "
                  f"{t_post / t_model:.3f} | {t_wrap / base:.2f}x |")
        import ttach as tta

        tt = tta.SegmentationTTAWrapper(model, tta.aliases.d4_transform(), merge_mode="mean")
        t_tt = timeit(lambda: tt(images), args.repeats, device)
        print(f"| ttach SegmentationTTAWrapper d4 | 8 | - | - | - | {t_tt / base:.2f}x |")


if __name__ == "__main__":
    main()
