"""Cost of segmentation TTA around a U-Net: de-augmentation + merge as a fraction of the model.

For a compact U-Net (the architecture of research/segmentation_tinyimagenet.py, random weights)
at 256x256, batch 8, it times, per configuration (space, k views per image):

* ``model``:   the model forward on the ``B * k`` views alone;
* ``deaug+merge``: ``space.deaugment`` + ``merge_outputs`` (validity as weights) on those outputs;
* ``wrapper``: the whole wrapper forward (views + model + de-augmentation + merge), and its
  ratio to one plain forward of the batch;
* ttach's ``SegmentationTTAWrapper`` with ``d4_transform`` (8 forwards in a Python loop).

Medians of ``--repeats`` runs. Run:  ``python benchmarks/segmentation_cost.py --threads 1``
(and ``--device cuda`` where a GPU is present).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import ttach_instance as ti
from ttach_instance.merge import merge_outputs
from ttach_instance.wrappers import LossGuidedSegmentationWrapper, SegmentationTTAWrapper


def _convs(cin: int, cout: int) -> nn.Sequential:
    layers = []
    for c in (cin, cout):
        layers += [nn.Conv2d(c, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """A compact U-Net on pixels in [0, 1]: ``depth`` levels, widths ``width * 2 ** level``,
    max-pool down, transposed-conv up, 2 classes at the input resolution."""

    def __init__(self, width: int = 16, depth: int = 3, classes: int = 2):
        super().__init__()
        w = [width * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([_convs(3 if i == 0 else w[i - 1], w[i]) for i in range(depth + 1)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in range(depth)])
        self.dec = nn.ModuleList([_convs(2 * w[i], w[i]) for i in range(depth)])
        self.head = nn.Conv2d(w[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips.pop()], 1))
        return self.head(x)


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
            from ttach_instance.predictors import create_predictor

            real = create_predictor("timm", paper12, input_size=64).to(device).eval()
            configs.insert(2, (f"Ours k=1, timm predictor ({real.config().get('backbone')}, 64 px)",
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
                back, valid = space.deaugment(out, index, fill=fill)
                back = back.reshape((args.batch, k) + back.shape[1:])
                valid = valid.reshape((args.batch, k) + valid.shape[1:])
                return merge_outputs(back, weights=valid, merge_space=wrapper.merge_space)

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
