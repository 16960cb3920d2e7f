"""Wall-time cost of LossGuidedWrapper against the plain model (CPU, one thread).

    python benchmarks/wrapper_cost.py                       # timm resnet50 @224, batch 8, the timm predictor
    python benchmarks/wrapper_cost.py --predictor small     # the small predictor instead

Everything runs in one process under ``torch.no_grad``; every round times each item once, in
an order rotated from round to round (interleaved, so drifts in machine load hit all items
alike), and the table reports medians. Goals: k=1 <= 1.03x and k=2 <= 2.05x the plain model.

The breakdown times the pieces of one k=1 forward on the same batch: normalised input ->
pixels, the predictor alone (its resize included), the resize alone, top-k selection, view
building (grouping by candidate, the candidate ops, back to model input) and the merge.
Weights are random (``pretrained=False``): which candidates an untrained predictor picks is
arbitrary, so the views' cost is also reported for the most expensive candidate (every sample
on it), which bounds what a trained predictor's choices can cost.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from typing import Callable, Dict, List

import torch
import torch.nn.functional as TF

from ttach_instance.merge import merge_outputs
from ttach_instance.normalization import to_model_input, to_pixels
from ttach_instance.registry import get_space
from ttach_instance.selection import select_topk
from ttach_instance.wrappers import LossGuidedWrapper


def build_predictor(kind: str, space):
    from ttach_instance.predictors import create_predictor

    return create_predictor("small" if kind == "small" else "timm", space).eval()


def interleaved(items: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, List[float]]:
    names = list(items)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for fn in items.values():  # warm-up: caches, allocator, one-time kernels
        fn()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            items[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50", help="timm model name (pretrained=False)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=41,
                    help="interleaved rounds (medians reported); the plain forward varies by ~15%% between rounds "
                         "even on an idle CPU, so 15 rounds do not resolve a 3%% effect (docs/BENCHMARKS.md)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--space", default="paper12")
    ap.add_argument("--predictor", choices=("default", "small"), default="default",
                    help="default: the timm predictor (create_predictor('timm')); small: create_predictor('small')")
    args = ap.parse_args(argv)

    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    space = get_space(args.space)
    model = timm.create_model(args.model, pretrained=False).eval()
    predictor = build_predictor(args.predictor, space)
    w1 = LossGuidedWrapper(model, predictor, k=1)
    w2 = LossGuidedWrapper(model, predictor, k=2)
    mean, std = w1.mean, w1.std
    pixels = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    x = to_model_input(pixels, mean, std)

    with torch.no_grad():
        scores = predictor(pixels)
        index1 = select_topk(scores, 1)
        index2 = select_topk(scores, 2)
        per_view = model(x)[:, None]
        slowest = max(range(len(space)), key=lambda c: _time(lambda: space.candidates[c].apply(pixels), 2))
        index_slowest = torch.full((args.batch, 1), slowest, dtype=torch.long)
        psize = getattr(predictor, "input_size", 64)
        forced = LossGuidedWrapper(model, _Forced(predictor, slowest), k=1)
        items = {
            "plain model": lambda: model(x),
            "LossGuidedWrapper k=1": lambda: w1(x),
            "LossGuidedWrapper k=2": lambda: w2(x),
            f"LossGuidedWrapper k=1, slowest candidate forced ({space.candidates[slowest].name})": lambda: forced(x),
            "  to pixels": lambda: to_pixels(x, mean, std),
            "  predictor alone (incl. resize)": lambda: predictor(pixels),
            f"  resize alone ({args.size}->{psize}, antialiased)": lambda: TF.interpolate(
                pixels, size=(psize, psize), mode="bilinear", antialias=True, align_corners=False),
            "  selection (top-k)": lambda: select_topk(scores, 1),
            "  views, chosen candidates (grouping + ops + to model input)": lambda: w1._model_inputs(x, pixels, index1),
            f"  views, slowest candidate for all ({space.candidates[slowest].name})":
                lambda: w1._model_inputs(x, pixels, index_slowest),
            "  merge": lambda: merge_outputs(per_view, "mean"),
        }
        times = interleaved(items, args.rounds)

    med = {n: statistics.median(t) for n, t in times.items()}
    base = med["plain model"]
    picks1 = Counter(space.names[i] for i in index1[:, 0].tolist())
    picks2 = Counter(space.names[i] for i in index2.reshape(-1).tolist())
    print(f"# {args.model} (pretrained=False) @ {args.size}px, batch {args.batch}, {args.threads} thread(s), "
          f"torch {torch.__version__}; predictor: {type(predictor).__name__}"
          f"{' (' + predictor.config()['backbone'] + ', ' + str(psize) + ' px)' if 'backbone' in predictor.config() else ''}; "
          f"space {space.name} ({len(space)}); medians of {args.rounds} interleaved rounds")
    print(f"# k=1 picks: {dict(picks1)}; k=2 picks: {dict(picks2)}")
    plain = times["plain model"]
    print("| item | median ms | median / plain median | median of per-round ratios | min..max ms |")
    print("|---|---:|---:|---:|---:|")
    ratio = {}
    for n, t in times.items():
        ratio[n] = statistics.median(a / b for a, b in zip(t, plain))
        label = "&nbsp;&nbsp;" + n.strip() if n.startswith("  ") else n
        print(f"| {label} | {med[n] * 1e3:.1f} | {med[n] / base:.3f}x | {ratio[n]:.3f}x | "
              f"{min(t) * 1e3:.1f}..{max(t) * 1e3:.1f} |")
    r1, r2 = ratio["LossGuidedWrapper k=1"], ratio["LossGuidedWrapper k=2"]
    rf = next(v for n, v in ratio.items() if n.startswith("LossGuidedWrapper k=1, slowest"))
    print(f"\nmedian per-round ratios -- k=1: {r1:.3f}x, k=1 slowest candidate: {rf:.3f}x "
          f"(goal <= 1.03x: {'met' if max(r1, rf) <= 1.03 else 'MISSED'}); "
          f"k=2: {r2:.3f}x (goal <= 2.05x: {'met' if r2 <= 2.05 else 'MISSED'})")
    parts = ["  to pixels", "  predictor alone (incl. resize)", "  selection (top-k)", "  merge"]
    fixed = sum(med[p] for p in parts) / base
    views = [n for n in med if n.startswith("  views")]
    print("bottom-up k=1 overhead (to pixels + predictor + selection + merge + views): "
          + ", ".join(f"{fixed + med[v] / base:.3f}x with {v.strip()[7:]}" for v in views))


class _Forced(torch.nn.Module):
    """The predictor, run as usual, with its scores shifted so that candidate ``c`` wins."""

    def __init__(self, predictor, c: int):
        super().__init__()
        self.predictor, self.space, self.c = predictor, predictor.space, c

    def forward(self, pixels):
        scores = self.predictor(pixels)
        bonus = torch.zeros_like(scores)
        bonus[:, self.c] = scores.max() - scores.min() + 1
        return scores - bonus


def _time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


if __name__ == "__main__":
    main()
