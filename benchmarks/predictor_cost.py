"""Loss predictor cost vs a plain timm ResNet-50 forward, to choose the default backbone.

    python benchmarks/predictor_cost.py [--backbones a,b,c] [--repeats 9] [--threads 1]

Product goal: the loss-guided wrapper with k=1 costs <= 1.03 x a plain ``resnet50`` at 224 px,
batch 8, 1 CPU thread; the predictor (at ``--input-size``), the 224 -> 64 antialiased resize and
the top-k selection must fit in that ~3 %. For every backbone this prints the ``LossPredictor``
forward on images already at the input size and on 224-px images (resize included), each as a
fraction of the ResNet-50 forward, plus parameters and MACs (torch's FlopCounterMode / 2).
All timings are medians of interleaved repeats in one process (the machine may be busy: every
repeat times every model back to back, so the ratios stay fair).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ttach_instance.predictors import create_predictor
from ttach_instance.predictors.timm_backbone import DEFAULT_BACKBONE
from ttach_instance.registry import get_space

CANDIDATES = ("mobilenetv3_small_050", "lcnet_050", "mobilenetv3_small_075", "lcnet_075", "mobilenetv3_small_100",
              "lcnet_100", "mobilenetv3_large_075", "mobilenetv4_conv_small", "resnet10t", "efficientnet_b0")


def _macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2


def _time(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", default=",".join(CANDIDATES))
    p.add_argument("--reference", default="resnet50")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    space = get_space("paper12")
    ref = timm.create_model(args.reference, pretrained=False).eval()
    names = [n for n in args.backbones.split(",") if n]
    preds = {n: create_predictor("timm", space, backbone=n, input_size=args.input_size).eval() for n in names}
    big = torch.rand(args.batch, 3, args.image_size, args.image_size)
    small = torch.nn.functional.interpolate(big, size=(args.input_size,) * 2, mode="bilinear", antialias=True)

    def resize(x):
        return torch.nn.functional.interpolate(x, size=(args.input_size,) * 2, mode="bilinear", antialias=True)

    jobs = {"ref": (ref, big), "resize": (resize, big)}
    for n, m in preds.items():
        jobs[f"{n}@{args.input_size}"] = (m, small)
        jobs[f"{n}@{args.image_size}"] = (m, big)
    times = {k: [] for k in jobs}
    with torch.inference_mode():
        for fn, x in jobs.values():  # warm-up
            fn(x)
        for _ in range(args.repeats):
            for k, (fn, x) in jobs.items():
                times[k].append(_time(fn, x))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["ref"]
    print(f"# torch {torch.__version__}, timm {timm.__version__}, {args.threads} thread(s), batch {args.batch}, "
          f"{args.repeats} interleaved repeats (medians)")
    print(f"# reference: {args.reference} @ {args.image_size} px: {1000 * base:.1f} ms/batch, "
          f"{_macs(ref, big[:1]) / 1e9:.2f} GMAC/image")
    print(f"# antialiased resize {args.image_size} -> {args.input_size}: {1000 * med['resize']:.2f} ms "
          f"({100 * med['resize'] / base:.2f} %)")
    print()
    print(f"| backbone | params (M) | MMAC/image @{args.input_size} | ms @{args.input_size} | "
          f"% of {args.reference} @{args.input_size} | % incl. resize from {args.image_size} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for n, m in preds.items():
        params = sum(t.numel() for t in m.parameters()) / 1e6
        macs = _macs(m, small[:1]) / 1e6
        t_small, t_big = med[f"{n}@{args.input_size}"], med[f"{n}@{args.image_size}"]
        mark = " (default)" if n == DEFAULT_BACKBONE else ""
        print(f"| {n}{mark} | {params:.2f} | {macs:.1f} | {1000 * t_small:.2f} | {100 * t_small / base:.2f} | "
              f"{100 * t_big / base:.2f} |")


if __name__ == "__main__":
    main()
