"""Learned fusion weights against the uniform mean on the Tiny ImageNet classification benchmark.

Fit the weights with the product CLI (``ttach-instance fuse weights``), then run this driver: every
fusion file's space through ``FullSpaceWrapper`` with its uniform mean and with the learned
weights (``fusion=``), and the plain model, on the clean val images and on corrupted copies
(severity ``--severity``; cached under ``--out``). Prints and writes (``--out/results.json``)
top-1 error and NLL per set, and the learned-vs-mean error difference with a 95 % paired
bootstrap interval over the images.

``--predictor FILE`` (a predictor with a temperature from ``ttach-instance fuse temperature``) adds Ours
``--k`` with the mean, the weighted merge at temperature 1 and at the fitted temperature.

``--exclude-every N``: leave out val images 0, N, 2N, ... (those ``fuse --split val --limit M``
fitted on, when N = len(val) // M), so weights fitted on a val half are judged on the rest.

    python research/fusion_tinyimagenet.py --data ../shared/data/tinyimagenet-dev20 \\
        --target runs/tinyimagenet/target.safetensors --out runs/fusion/eval \\
        --fusion runs/fusion/flips_train100.safetensors runs/fusion/paper12_train100.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ttach_instance.data import build_model, load_dataset, model_mean_std
from ttach_instance.evaluation import corrupted_set
from ttach_instance.fusion import load_fusion
from ttach_instance.normalization import to_model_input
from ttach_instance.space import Candidate, TransformSpace
from ttach_instance.training.labels import dataset_fingerprint
from ttach_instance.wrappers import FullSpaceWrapper

CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression")


@torch.no_grad()
def outputs_of(wrapper, images, mean, std, batch=100):
    return torch.cat([wrapper(to_model_input(images[i:i + batch].float() / 255, mean, std))
                      for i in range(0, images.shape[0], batch)])


def bootstrap(diff, reps=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = diff.shape[0]
    means = torch.stack([diff[torch.randint(0, n, (n,), generator=g)].mean() for _ in range(reps)])
    return float(torch.quantile(means, 0.025)), float(torch.quantile(means, 0.975))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--target", required=True, help="the small_resnet target's weights")
    ap.add_argument("--fusion", nargs="*", default=[], help="fusion weights files (ttach-instance fuse weights)")
    ap.add_argument("--predictor", default=None,
                    help="a predictor with a fitted temperature (ttach-instance fuse temperature): adds Ours --k with "
                         "the mean, the weighted merge at temperature 1 and at the fitted temperature")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated; 'none' for clean only")
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--exclude-every", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data, split="val")
    rows = [i for i in range(len(ds)) if args.exclude_every is None or i % args.exclude_every]
    ds = ds.subset(rows)
    model = build_model("ttach_instance.models:small_resnet", num_classes=len(ds.classes), weights=args.target).eval()
    mean, std = model_mean_std(model)
    fusions = {os.path.basename(p).removesuffix(".safetensors"): load_fusion(p, num_classes=len(ds.classes))
               for p in args.fusion}
    wrappers = {"identity": FullSpaceWrapper(model, TransformSpace([Candidate()], name="identity"), mean=mean, std=std)}
    for name, fusion in fusions.items():
        wrappers.setdefault(f"mean:{fusion.space.name}", FullSpaceWrapper(model, fusion.space, mean=mean, std=std))
        wrappers[f"fused:{name}"] = FullSpaceWrapper(model, fusion.space, fusion=fusion, mean=mean, std=std)
    if args.predictor:
        from ttach_instance.predictors import load_predictor
        from ttach_instance.wrappers import LossGuidedWrapper

        predictor = load_predictor(args.predictor).eval()
        kw = dict(k=args.k, mean=mean, std=std)
        wrappers[f"ours_k{args.k}:mean"] = LossGuidedWrapper(model, predictor, **kw)
        wrappers[f"ours_k{args.k}:weighted_t1"] = LossGuidedWrapper(model, predictor, merge_mode="weighted",
                                                                   temperature=1.0, **kw)
        fitted = LossGuidedWrapper(model, predictor, merge_mode="weighted", **kw)
        if fitted.temperature_source != "fitted":
            raise SystemExit(f"{args.predictor} records no temperature for k={args.k}: run fuse temperature first")
        wrappers[f"ours_k{args.k}:weighted_fitted"] = fitted
        print(f"fitted temperature {fitted.temperature:.4g}")
    names = [None] + ([] if args.corruptions == "none" else args.corruptions.split(","))
    fingerprint = dataset_fingerprint(ds.images, ds.labels)
    results = {"n": len(ds), "severity": args.severity, "excluded_every": args.exclude_every,
               "weights": {n: f.view_weights().tolist() for n, f in fusions.items()},
               "fit": {n: f.fit_info for n, f in fusions.items()}, "sets": {}}
    t0 = time.perf_counter()
    for corruption in names:
        images = corrupted_set(ds.images, corruption, args.severity, args.size, os.path.join(args.out, "data"),
                               0, fingerprint)
        key = corruption or "clean"
        res, wrong = {}, {}
        for m, wrapper in wrappers.items():
            out = outputs_of(wrapper, images, mean, std).float()
            wrong[m] = (out.argmax(1) != ds.labels).float()
            res[m] = {"error": 100 * float(wrong[m].mean()),
                      "nll": float(torch.nn.functional.cross_entropy(out, ds.labels))}
        for name, fusion in fusions.items():
            diff = 100 * (wrong[f"fused:{name}"] - wrong[f"mean:{fusion.space.name}"])
            res[f"fused:{name}"]["vs_mean"] = {"diff": float(diff.mean()), "ci95": bootstrap(diff)}
        if args.predictor:
            diff = 100 * (wrong[f"ours_k{args.k}:weighted_fitted"] - wrong[f"ours_k{args.k}:mean"])
            res[f"ours_k{args.k}:weighted_fitted"]["vs_mean"] = {"diff": float(diff.mean()), "ci95": bootstrap(diff)}
        results["sets"][key] = res
        print(f"{key}: " + "; ".join(f"{m} {r['error']:.2f} % (NLL {r['nll']:.3f})" for m, r in res.items()), flush=True)
    for m in wrappers:
        sets = [s for s in results["sets"] if s != "clean"]
        if sets:
            results.setdefault("corrupted_mean", {})[m] = sum(results["sets"][s][m]["error"] for s in sets) / len(sets)
    results["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps({"corrupted_mean": results.get("corrupted_mean"), "seconds": results["seconds"]}, indent=1))


if __name__ == "__main__":
    main()
