"""Learned fusion weights against the uniform mean on the Tiny ImageNet segmentation benchmark.

The target is the segmentation study's U-Net (``research/segmentation_tinyimagenet.py --stage train``;
box masks from ``boxes.tsv``). Fit the weights with the product CLI, the model given as a
``module:factory``: the study's ``unet`` (its U-Net with the ``mean``/``std`` of a model that takes pixels
in [0, 1]: it normalises internally, and without them the CLI would feed it ImageNet-normalised input)::

    PYTHONPATH=research ttach-instance fuse weights --task segmentation --model segmentation_tinyimagenet:unet \\
        --weights RUNS/unet.safetensors --data DATA --split train --limit 100 --space flips --out FLIPS.safetensors

then run this driver: every fusion file's space through ``SegmentationTTAWrapper`` once per batch
(``run``: the views, their validity and the uniform mean) and its learned merge of the same views
(the fused wrapper's ``merge``; checked against its ``forward`` on the first batch), and the plain
model, on the clean val images and on corrupted copies (severity ``--severity``; cached under
``--out``). Prints and writes ``--out/results.json``: mIoU and pixel accuracy per set, and the
fused-minus-mean mIoU with a 95 % paired bootstrap interval over the images (the "corrupted" row:
the mean over the corruptions, each image resampled with all its corrupted copies).
``--exclude-every N``: leave out val images 0, N, 2N, ... (weights fitted on them with ``--split val``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression")


def counts(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """Per image ``(B, 3, classes)``: intersection, union and target pixels of each class."""
    out = []
    for c in range(classes):
        p, t = pred == c, target == c
        out.append(torch.stack([(p & t).flatten(1).sum(1), (p | t).flatten(1).sum(1), t.flatten(1).sum(1)], 1))
    return torch.stack(out, 2)


def miou(c: torch.Tensor) -> torch.Tensor:
    """mIoU pooled over the images (dim -3) of ``(..., N, 3, classes)`` counts."""
    s = c.sum(-3).double()
    return (s[..., 0, :] / s[..., 1, :].clamp_min(1)).mean(-1)


def pixel_acc(c: torch.Tensor) -> float:
    s = c.sum(0).double()
    return float(s[0].sum() / s[2].sum())


def bootstrap(a: torch.Tensor, b: torch.Tensor, reps: int = 2000, seed: int = 0):
    """mIoU(a) - mIoU(b) in points, each a mean over the sets of ``(S, N, 3, K)`` counts, and its 95 %
    interval resampling the N images (the same resample for both, and for every set)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.shape[1], (reps, a.shape[1]), generator=g)
    diffs = torch.stack([(miou(a[:, i]) - miou(b[:, i])).mean() for i in idx]) * 100
    lo, hi = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float((miou(a) - miou(b)).mean() * 100), (lo, hi)


@torch.no_grad()
def main() -> None:
    from ttach_instance.data import build_model, load_segmentation_dataset, model_mean_std
    from ttach_instance.evaluation import corrupted_set
    from ttach_instance.fusion import load_fusion
    from ttach_instance.normalization import to_model_input
    from ttach_instance.training.labels import dataset_fingerprint
    from ttach_instance.wrappers import SegmentationTTAWrapper

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a boxes.tsv folder (box masks)")
    ap.add_argument("--model", default="segmentation_tinyimagenet:unet",
                    help="module:factory of the model, as the CLI's --model (default: the study's U-Net; importable "
                         "because this script's folder is on the path when it runs)")
    ap.add_argument("--target", required=True, help="the model's weights (the study's unet.safetensors)")
    ap.add_argument("--fusion", nargs="+", required=True, help="fusion weights files (ttach-instance fuse weights)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None, help="the first N val images")
    ap.add_argument("--exclude-every", type=int, default=None,
                    help="leave out val images 0, N, 2N, ... (those `fuse --split val --limit M` fitted on, N = 1000 // M)")
    ap.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated; 'none' for clean only")
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_segmentation_dataset(args.data, split="val", progress=False)
    if args.limit:
        ds = ds.subset(list(range(min(args.limit, len(ds)))))
    if args.exclude_every:
        ds = ds.subset([i for i in range(len(ds)) if i % args.exclude_every])
    k = ds.num_classes
    model = build_model(args.model, num_classes=k, weights=args.target).eval()
    mean, std = model_mean_std(model)
    fusions = {os.path.basename(p).removesuffix(".safetensors"): load_fusion(p, num_classes=k) for p in args.fusion}
    pairs = {name: (SegmentationTTAWrapper(model, f.space, mean=mean, std=std, chunk_size=args.batch * 4),
                    SegmentationTTAWrapper(model, f.space, mean=mean, std=std, fusion=f, chunk_size=args.batch * 4))
             for name, f in fusions.items()}
    methods = ["identity"] + [m for name in fusions for m in (f"mean:{name}", f"fused:{name}")]
    conditions = [None] + ([] if args.corruptions == "none" else args.corruptions.split(","))
    fingerprint = dataset_fingerprint(ds.images, ds.masks)
    results = {"n": len(ds), "severity": args.severity, "excluded_every": args.exclude_every,
               "weights": {n: dict(zip(f.space.names, f.view_weights().tolist())) for n, f in fusions.items()},
               "fit": {n: f.fit_info for n, f in fusions.items()}, "sets": {}}
    per_set = {}
    t0 = time.perf_counter()
    checked = False
    for corruption in conditions:
        images = corrupted_set(ds.images, corruption, args.severity, None, os.path.join(args.out, "data"), 0,
                               fingerprint)
        key = corruption or "clean"
        got = {m: [] for m in methods}
        for s in range(0, len(ds), args.batch):
            x = to_model_input(images[s:s + args.batch].float() / 255, mean, std)
            y = ds.masks[s:s + args.batch].long()
            got["identity"].append(counts(model(x).argmax(1), y, k))
            for name, (plain, fused) in pairs.items():
                r = plain.run(x)
                merged = fused.merge(r["views"], r["validity"], None, x)[0]
                if not checked:  # the shared views give exactly what the fused wrapper's forward gives
                    torch.testing.assert_close(merged[:8], fused(x[:8]), rtol=1e-4, atol=1e-5)
                got[f"mean:{name}"].append(counts(r["output"].argmax(1), y, k))
                got[f"fused:{name}"].append(counts(merged.argmax(1), y, k))
            checked = True
        per_set[key] = {m: torch.cat(v) for m, v in got.items()}
        res = {m: {"miou": 100 * float(miou(c)), "pixel_acc": 100 * pixel_acc(c)} for m, c in per_set[key].items()}
        for name in fusions:
            d, ci = bootstrap(per_set[key][f"fused:{name}"][None], per_set[key][f"mean:{name}"][None])
            res[f"fused:{name}"]["vs_mean"] = {"diff": d, "ci95": ci}
        results["sets"][key] = res
        print(f"{key} ({time.perf_counter() - t0:.0f} s): "
              + "; ".join(f"{m} {r['miou']:.2f} / {r['pixel_acc']:.2f}" for m, r in res.items()), flush=True)
    corrupted = [c for c in per_set if c != "clean"]
    if corrupted:
        summary = {m: {"miou": sum(results["sets"][c][m]["miou"] for c in corrupted) / len(corrupted),
                       "pixel_acc": sum(results["sets"][c][m]["pixel_acc"] for c in corrupted) / len(corrupted)}
                   for m in methods}
        stack = {m: torch.stack([per_set[c][m] for c in corrupted]) for m in methods}
        for name in fusions:
            d, ci = bootstrap(stack[f"fused:{name}"], stack[f"mean:{name}"])
            summary[f"fused:{name}"]["vs_mean"] = {"diff": d, "ci95": ci}
        results["corrupted_mean"] = summary
    results["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps({"clean": results["sets"]["clean"], "corrupted_mean": results.get("corrupted_mean"),
                      "seconds": results["seconds"]}, indent=1))


if __name__ == "__main__":
    main()
