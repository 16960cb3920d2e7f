"""Evaluation harness: the paper's Table 1 (methods x clean / corrupted data) for any classifier.

For every data set (clean, each corruption x severity) the target model is run once on the
union of the views the methods need — all candidates of the space, the horizontal flip, the
ten crops, and the flipped versions of the predictor's top-2 choices — and every method is
a selection + mean of softmax outputs over those views (the paper merges chosen views'
softmax outputs with equal weights). Results are identical to running each method's
method separately but cost one pass; the *cost* columns are measured by timing each method's
deployable batched inference (``measure_cost``: selection, views, one model call, merge), in
model calls per image and wall time relative to Identity.

Corrupted validation sets are generated on the fly from the source-resolution images
(corruption first, then resized to the model size) and cached on disk; per-set results
are cached too, so an interrupted evaluation continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .selection import select_random, select_topk
from .io import atomic_save_tensors, atomic_write_json
from .training.corruptions import COMMON, HELD_OUT, SEVERITIES, check_names, corrupt_batch

METHODS = ("identity", "hflip", "five_crops", "ten_crops", "random_k1", "random_k2", "random_k4", "full_mean",
           "ours_k1", "ours_k2", "ours_k1_hflip", "ours_k2_hflip", "oracle_k1")
LABELS = {
    "identity": "Identity", "hflip": "H-Flip", "five_crops": "5-Crops", "ten_crops": "10-Crops",
    "random_k1": "Random k=1", "random_k2": "Random k=2", "random_k4": "Random k=4", "full_mean": "Full-space mean",
    "ours_k1": "Ours k=1", "ours_k2": "Ours k=2", "ours_k1_hflip": "Ours k=1 + H-Flip",
    "ours_k2_hflip": "Ours k=2 + H-Flip", "oracle_k1": "Oracle k=1",
}
#: Model forwards per image of each method (the predictor's own cost is measured in wall time).
MODEL_CALLS = {"identity": 1, "hflip": 2, "five_crops": 5, "ten_crops": 10, "random_k1": 1, "random_k2": 2,
               "random_k4": 4, "ours_k1": 1, "ours_k2": 2, "ours_k1_hflip": 2, "ours_k2_hflip": 4}
PREDICTOR_METHODS = ("ours_k1", "ours_k2", "ours_k1_hflip", "ours_k2_hflip")


def check_methods(methods: Sequence[str]) -> List[str]:
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods must be among {list(METHODS)}, got unknown {bad}")
    return list(methods)


def _hflip(x: Tensor) -> Tensor:
    return x.flip(-1)


@torch.no_grad()
def _probs(model: nn.Module, x: Tensor, normalize, chunk: int = 1024) -> Tensor:
    out = [torch.softmax(model(normalize(x[i:i + chunk])).float(), -1) for i in range(0, x.shape[0], chunk)]
    return torch.cat(out)


@torch.no_grad()
def evaluate_arrays(model: nn.Module, images: Tensor, labels: Tensor, space, predictor: Optional[nn.Module] = None,
                    methods: Sequence[str] = METHODS, normalize: Optional[Callable] = None, batch_size: int = 200,
                    seed: int = 0) -> Dict:
    """Errors of every method on one uint8 set ``(N, 3, H, W)`` at the model's size.

    Returns ``{"n", "errors": {method: %}, "choices": (T,) counts of Ours k=1's picks,
    "pred": (N, T) predicted losses, "true": (N, T) true losses}`` (the last two for plots).
    """
    from .data import normalizer
    from .registry import get_space

    methods = check_methods(methods)
    if predictor is None:
        methods = [m for m in methods if m not in PREDICTOR_METHODS]
    normalize = normalize or normalizer(model)
    model.eval()
    if predictor is not None:
        predictor.eval()
    t = len(space)
    crops = get_space("ten_crops") if min(images.shape[-2:]) >= 16 else None
    if crops is None:
        methods = [m for m in methods if m not in ("five_crops", "ten_crops")]
    gen = torch.Generator().manual_seed(seed)
    correct = {m: 0 for m in methods}
    choices = torch.zeros(t, dtype=torch.long)
    preds, trues = [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].float() / 255
        y = labels[i:i + batch_size]
        b = x.shape[0]
        p_all = _probs(model, space.apply_all(x), normalize).view(b, t, -1)
        true = -torch.log(p_all.gather(2, y.view(b, 1, 1).expand(b, t, 1)).squeeze(2).clamp_min(1e-12))
        trues.append(true)
        merged: Dict[str, Tensor] = {}
        p_id = p_all[:, 0]
        if any(m in methods for m in ("hflip",)):
            merged["hflip"] = (p_id + _probs(model, _hflip(x), normalize)) / 2
        merged["identity"] = p_id
        if crops is not None and ("five_crops" in methods or "ten_crops" in methods):
            p_crops = _probs(model, crops.apply_all(x), normalize).view(b, len(crops), -1)
            merged["five_crops"] = p_crops[:, :5].mean(1)
            merged["ten_crops"] = p_crops.mean(1)
        merged["full_mean"] = p_all.mean(1)
        for k in (1, 2, 4):
            if f"random_k{k}" in methods:
                idx = select_random(b, t, min(k, t), generator=gen)
                merged[f"random_k{k}"] = p_all.gather(1, idx[:, :, None].expand(-1, -1, p_all.shape[2])).mean(1)
        best = true.argmin(1)
        merged["oracle_k1"] = p_all[torch.arange(b), best]
        if predictor is not None:
            pred = predictor(x).float()
            preds.append(pred)
            top = select_topk(pred, min(2, t))  # lowest predicted loss first, ties to the lower index
            choices += torch.bincount(top[:, 0], minlength=t)
            gathered = p_all.gather(1, top[:, :, None].expand(-1, -1, p_all.shape[2]))
            merged["ours_k1"] = gathered[:, 0]
            merged["ours_k2"] = gathered.mean(1)
            if "ours_k1_hflip" in methods or "ours_k2_hflip" in methods:
                # the mirror of each chosen view, as LossGuidedWrapper(flip=True) deploys it
                p_flip = _probs(model, _hflip(space.apply(x, top)), normalize).view(b, top.shape[1], -1)
                merged["ours_k1_hflip"] = (gathered[:, 0] + p_flip[:, 0]) / 2
                merged["ours_k2_hflip"] = (gathered.sum(1) + p_flip.sum(1)) / (2 * top.shape[1])
        for m in methods:
            correct[m] += int((merged[m].argmax(1) == y).sum())
    n = images.shape[0]
    return {
        "n": n,
        "errors": {m: 100.0 * (1 - correct[m] / n) for m in methods},
        "choices": choices.tolist(),
        "pred": torch.cat(preds) if preds else None,
        "true": torch.cat(trues),
    }


def corrupted_set(images: Tensor, name: Optional[str], severity: int, size: Optional[int], cache_dir: Optional[str],
                  seed: int = 0) -> Tensor:
    """``images`` (source resolution, uint8) corrupted by ``name`` at ``severity`` then resized to
    ``size``; cached as ``cache_dir/<name>_<severity>.safetensors``."""
    from .data import resize_uint8
    from .io import load_tensors

    key = f"{name or 'clean'}_{severity if name else 0}"
    path = os.path.join(cache_dir, f"{key}.safetensors") if cache_dir else None
    if path and os.path.isfile(path):
        tensors, meta = load_tensors(path)
        if meta.get("n") == images.shape[0] and meta.get("size") == size and meta.get("seed") == seed:
            return tensors["images"]
    n = images.shape[0]
    if name is None:
        out = images
    else:
        seeds = [seed * 1000003 + i for i in range(n)]
        out = corrupt_batch(images, [name] * n, [severity] * n, seeds)
    if size is not None and out.shape[-1] != size:
        out = resize_uint8(out, size)
    if path:
        atomic_save_tensors(path, {"images": out}, {"n": n, "size": size, "seed": seed})
    return out


def _method_forward(method: str, model: nn.Module, predictor: Optional[nn.Module], space, crops, normalize,
                    x: Tensor, gen: torch.Generator) -> Tensor:
    """One method's full inference on pixels ``x``: selection, views, model, merge (mean of softmax)."""
    b, t = x.shape[0], len(space)

    def run(views, k):
        return torch.softmax(model(normalize(views)).float(), -1).view(b, k, -1).mean(1)

    if method == "identity":
        return run(x, 1)
    if method == "hflip":
        return run(torch.stack([x, _hflip(x)], 1).flatten(0, 1), 2)
    if method in ("five_crops", "ten_crops"):
        sub = crops if method == "ten_crops" else crops.subset(range(5))
        return run(sub.apply_all(x), len(sub))
    if method == "full_mean":
        return run(space.apply_all(x), t)
    if method.startswith("random_k"):
        k = int(method[len("random_k"):])
        return run(space.apply(x, select_random(b, t, k, generator=gen)), k)
    if method.startswith("ours_k"):
        k = int(method[len("ours_k")])
        top = select_topk(predictor(x).float(), k)
        if method.endswith("hflip"):
            chosen = space.apply(x, top).view(b, k, *x.shape[1:])
            views = torch.stack([chosen, _hflip(chosen)], 1).flatten(0, 2)
            return run(views, 2 * k)
        return run(space.apply(x, top), k)
    raise ValueError(f"method {method!r} has no deployable forward (the oracle needs the labels)")


def measure_cost(model: nn.Module, predictor: Optional[nn.Module], space, images: Tensor,
                 methods: Sequence[str] = METHODS, repeats: int = 3, batch_size: int = 64,
                 normalize: Optional[Callable] = None) -> Dict[str, Dict]:
    """Wall time of each method's deployable inference on ``images`` (uint8, model size), relative
    to Identity (best of ``repeats`` rounds), and model calls per image counted by a forward hook.

    Each method runs as it would be deployed (batched: selection, view generation, one model call
    on all views, mean of softmax), predictor included for Ours. The rounds are interleaved (every
    method once per round, in turn), so a change of machine load during the measurement affects
    all methods alike instead of whichever ran at the time.
    """
    from .data import normalizer
    from .registry import get_space

    normalize = normalize or normalizer(model)
    crops = get_space("ten_crops")
    x_all = images.float() / 255
    calls = {"n": 0}

    def hook(_m, inputs, _o):
        calls["n"] += inputs[0].shape[0]

    handle = model.register_forward_hook(hook)
    timed = [m for m in methods if not (m == "oracle_k1" or (m in PREDICTOR_METHODS and predictor is None))]
    out: Dict[str, Dict] = {}
    try:
        with torch.no_grad():
            for _ in range(repeats):
                for m in timed:
                    calls["n"] = 0
                    gen = torch.Generator().manual_seed(0)
                    t0 = time.perf_counter()
                    for i in range(0, x_all.shape[0], batch_size):
                        _method_forward(m, model, predictor, space, crops, normalize, x_all[i:i + batch_size], gen)
                    seconds = time.perf_counter() - t0
                    rec = out.setdefault(m, {"seconds": float("inf")})
                    rec["seconds"] = min(rec["seconds"], seconds)
                    rec["model_calls_per_image"] = calls["n"] / x_all.shape[0]
    finally:
        handle.remove()
    base = out.get("identity", {}).get("seconds")
    for m, rec in out.items():
        rec["relative_time"] = rec["seconds"] / base if base else None
    if "oracle_k1" in methods:
        out["oracle_k1"] = {"model_calls_per_image": float(len(space)), "relative_time": None, "seconds": None}
    return out


def evaluate(model: nn.Module, val_images: Tensor, val_labels: Tensor, space, out_dir: str,
             predictor: Optional[nn.Module] = None, size: Optional[int] = None,
             corruptions: Sequence[str] = COMMON, held_out: Sequence[str] = HELD_OUT,
             severities: Sequence[int] = SEVERITIES, methods: Sequence[str] = METHODS, batch_size: int = 200,
             seed: int = 0, cost_images: int = 256, progress: bool = True, log: Callable[[str], None] = print) -> Dict:
    """Table 1 on clean, common-corrupted and held-out-corrupted versions of ``val_images``.

    Writes ``out_dir/results.json``, ``out_dir/table.md`` and PNG plots; per-set results are
    cached in ``out_dir/sets`` (resumable). Returns the results dict.
    """
    from tqdm import tqdm

    corruptions, held_out = check_names(corruptions, "corruptions"), check_names(held_out, "held_out")
    methods = check_methods(methods)
    for s in severities:
        if s not in SEVERITIES:
            raise ValueError(f"severities must be in 1..5, got {list(severities)}")
    os.makedirs(os.path.join(out_dir, "sets"), exist_ok=True)
    jobs = [(None, 0)] + [(c, s) for c in tuple(corruptions) + tuple(held_out) for s in severities]
    per_set: Dict[str, Dict] = {}
    from .training import distributed as dist

    rank, world = dist.rank(), dist.world_size()
    # Under torchrun every rank evaluates its share of the sets; rank 0 then summarises.
    for j, (name, sev) in enumerate(tqdm(jobs, desc="eval sets", disable=not progress or rank != 0)):
        key = f"{name or 'clean'}_{sev}"
        path = os.path.join(out_dir, "sets", key + ".json")
        if os.path.isfile(path) or j % world != rank:
            continue
        imgs = corrupted_set(val_images, name, sev, size, os.path.join(out_dir, "data"), seed)
        res = evaluate_arrays(model, imgs, val_labels, space, predictor, methods, batch_size=batch_size, seed=seed)
        rec = {"corruption": name, "severity": sev, "n": res["n"], "errors": res["errors"], "choices": res["choices"]}
        if res["pred"] is not None:
            from .training.losses import ranking_metrics

            rec["ranking"] = ranking_metrics(res["pred"], res["true"])
            keep = torch.arange(0, res["n"], max(1, res["n"] // 50))
            rec["scatter"] = {"pred": res["pred"][keep].tolist(), "true": res["true"][keep].tolist()}
        atomic_write_json(path, rec)
    dist.barrier()
    if rank != 0:
        return {}
    for name, sev in jobs:
        key = f"{name or 'clean'}_{sev}"
        with open(os.path.join(out_dir, "sets", key + ".json")) as f:
            per_set[key] = json.load(f)
    cost = measure_cost(model, predictor, space,
                        corrupted_set(val_images[:cost_images], None, 0, size, None), methods) if cost_images else {}
    results = summarize(per_set, methods, corruptions, held_out, severities, space.names, cost)
    atomic_write_json(os.path.join(out_dir, "results.json"), results)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown_table(results))
    try:
        plot_selection_rates(results, os.path.join(out_dir, "selection_rates.png"))
        plot_scatter(per_set, os.path.join(out_dir, "pred_vs_true.png"))
    except Exception as exc:  # plots are a convenience; never lose the table for them
        log(f"plotting failed: {exc}")
    return results


def summarize(per_set: Dict[str, Dict], methods, corruptions, held_out, severities, names, cost) -> Dict:
    present = [m for m in methods if m in per_set["clean_0"]["errors"]]

    def mean_err(cs):
        keys = [f"{c}_{s}" for c in cs for s in severities]
        return {m: float(np.mean([per_set[k]["errors"][m] for k in keys])) for m in present} if keys else {}

    per_corruption = {c: mean_err([c]) for c in tuple(corruptions) + tuple(held_out)}
    selection = {}
    for key, rec in per_set.items():
        total = sum(rec["choices"])
        if total:
            selection[key] = [c / total for c in rec["choices"]]
    ranking = {k: v["ranking"] for k, v in per_set.items() if "ranking" in v}
    return {
        "methods": present,
        "labels": {m: LABELS[m] for m in present},
        "clean": per_set["clean_0"]["errors"],
        "common_mean": mean_err(corruptions),
        "held_out_mean": mean_err(held_out),
        "per_corruption": per_corruption,
        "corruptions": list(corruptions), "held_out": list(held_out), "severities": list(severities),
        "n": per_set["clean_0"]["n"],
        "cost": cost,
        "candidate_names": list(names),
        "selection_rates": selection,
        "ranking": ranking,
        "spearman": {
            "clean": ranking.get("clean_0", {}).get("spearman"),
            "common": float(np.mean([ranking[f"{c}_{s}"]["spearman"] for c in corruptions for s in severities]))
            if ranking else None,
            "held_out": float(np.mean([ranking[f"{c}_{s}"]["spearman"] for c in held_out for s in severities]))
            if ranking and held_out else None,
        },
    }


def markdown_table(results: Dict) -> str:
    cost = results.get("cost", {})
    lines = ["| Method | Clean err % | Common mCE % | Held-out err % | Model calls / image | Wall time vs Identity |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in results["methods"]:
        c = cost.get(m, {})
        calls = c.get("model_calls_per_image", MODEL_CALLS.get(m, ""))
        rel = c.get("relative_time")
        lines.append(
            f"| {results['labels'][m]} | {results['clean'][m]:.2f} | "
            f"{results['common_mean'].get(m, float('nan')):.2f} | {results['held_out_mean'].get(m, float('nan')):.2f} | "
            f"{calls if calls == '' else f'{calls:g}'} | {'' if rel is None else f'{rel:.2f}x'} |")
    sp = results.get("spearman", {})
    if sp.get("clean") is not None:
        lines.append("")
        lines.append(f"Predictor Spearman (val): clean {sp['clean']:.3f}, common {sp['common']:.3f}, "
                     f"held-out {sp['held_out'] if sp['held_out'] is None else round(sp['held_out'], 3)}")
    lines.append(f"\n{results['n']} images; severities {results['severities']}; "
                 f"common = mean over {len(results['corruptions'])} corruptions, held-out over {results['held_out']}.\n")
    return "\n".join(lines)


def plot_selection_rates(results: Dict, path: str) -> None:
    """Selection rate of each candidate by Ours k=1, per corruption and severity (paper Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = results["selection_rates"]
    if not rates:
        return
    keys = ["clean_0"] + [f"{c}_{s}" for c in results["corruptions"] + results["held_out"] for s in results["severities"]]
    keys = [k for k in keys if k in rates]
    mat = np.array([rates[k] for k in keys])
    fig, ax = plt.subplots(figsize=(1 + 0.5 * mat.shape[1], 2 + 0.16 * len(keys)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(mat.shape[1]))
    ax.set_xticklabels(results["candidate_names"], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels(keys, fontsize=5)
    fig.colorbar(im, ax=ax, label="selection rate (Ours k=1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scatter(per_set: Dict[str, Dict], path: str) -> None:
    """Predicted vs true relative loss (per-sample mean removed), all sets (paper Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preds, trues = [], []
    for rec in per_set.values():
        if "scatter" in rec:
            p, t = np.array(rec["scatter"]["pred"]), np.array(rec["scatter"]["true"])
            preds.append((p - p.mean(1, keepdims=True)).ravel())
            trues.append((t - t.mean(1, keepdims=True)).ravel())
    if not preds:
        return
    p, t = np.concatenate(preds), np.concatenate(trues)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(t, p, s=2, alpha=0.3)
    ax.set_xlabel("true loss - per-image mean")
    ax.set_ylabel("predicted loss - per-image mean")
    ax.set_title(f"predicted vs true (r = {np.corrcoef(t, p)[0, 1]:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ segmentation
SEG_METHODS = ("identity", "hflip", "d4_ttach", "full_mean", "random_k1", "random_k2", "ours_k1", "ours_k2",
               "oracle_k1")
SEG_LABELS = {
    "identity": "Identity", "hflip": "H-Flip", "d4_ttach": "D4 (ttach)", "full_mean": "Full-space mean",
    "random_k1": "Random k=1", "random_k2": "Random k=2", "ours_k1": "Ours k=1", "ours_k2": "Ours k=2",
    "oracle_k1": "Oracle k=1",
}
#: Corruptions that move pixels: the mask would no longer match the image.
GEOMETRIC_CORRUPTIONS = ("elastic_transform",)


def check_seg_methods(methods: Sequence[str]) -> List[str]:
    bad = [m for m in methods if m not in SEG_METHODS]
    if bad:
        raise ValueError(f"methods must be among {list(SEG_METHODS)} for segmentation, got unknown {bad}")
    return list(methods)


def _seg_logits(model: nn.Module, x: Tensor, output_key: Optional[str]) -> Tensor:
    from .segmentation import _split_output

    return _split_output(model(x), output_key)


@torch.no_grad()
def evaluate_segmentation_arrays(model: nn.Module, images: Tensor, masks: Tensor, space, num_classes: int,
                                 predictor: Optional[nn.Module] = None, methods: Sequence[str] = SEG_METHODS,
                                 normalize: Optional[Callable] = None, loss: str = "ce", ignore_index: int = 255,
                                 output_key: Optional[str] = None, batch_size: int = 32, seed: int = 0) -> Dict:
    """mIoU and pixel accuracy of every method on one uint8 set ``(N, 3, H, W)`` with masks ``(N, H, W)``.

    The model runs once on every candidate of ``space`` (:class:`SegmentationTTAWrapper`); each
    method selects and merges those de-augmented views exactly as its wrapper would (validity
    weighted mean of logits, uncovered pixels extrapolated), so the numbers equal the wrappers'
    outputs at one pass's cost. H-Flip and ttach's D4 run as their own wrappers.
    Returns ``{"n", "miou": {m}, "pixel_acc": {m}, "choices", "pred", "true"}``.
    """
    import ttach as tta

    from .data import normalizer
    from .segmentation import (ConfusionMatrix, SegmentationTTAWrapper, merge_views, segmentation_loss)

    methods = check_seg_methods(methods)
    if predictor is None:
        methods = [m for m in methods if not m.startswith("ours")]
    normalize = normalize or normalizer(model)
    model.eval()
    if predictor is not None:
        predictor.eval()
    t = len(space)
    ident = next((i for i, c in enumerate(space.candidates) if c.is_identity), None)

    def net(x):
        return model(normalize(x))

    full = SegmentationTTAWrapper(net, space, output_mask_key=output_key)
    hflip = SegmentationTTAWrapper(net, "hflip", output_mask_key=output_key)
    d4 = tta.SegmentationTTAWrapper(net, tta.aliases.d4_transform(), merge_mode="mean", output_mask_key=output_key)
    gen = torch.Generator().manual_seed(seed)
    cms = {m: ConfusionMatrix(num_classes, ignore_index) for m in methods}
    choices = torch.zeros(t, dtype=torch.long)
    preds, trues = [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].float() / 255
        y = masks[i:i + batch_size].long()
        b = x.shape[0]
        r = full.run(x)
        views, valid = r["views"], r["validity"]  # (B, T, K, H, W), (B, T, 1, H, W)
        true = segmentation_loss(views.flatten(0, 1), y.repeat_interleave(t, 0), kind=loss,
                                 ignore_index=ignore_index).view(b, t)
        trues.append(true)

        def pick(idx):
            rows = torch.arange(b)[:, None]
            v = views[rows, idx]
            return merge_views(v, valid[rows, idx], fallback=v.mean(1))[0]

        out: Dict[str, Tensor] = {"full_mean": r["output"]}
        if "identity" in methods:
            out["identity"] = views[:, ident] if ident is not None else _seg_logits(net, x, output_key)
        if "hflip" in methods:
            out["hflip"] = hflip(x) if output_key is None else hflip(x)[output_key]
        if "d4_ttach" in methods:
            out["d4_ttach"] = d4(x) if output_key is None else d4(x)[output_key]
        for k in (1, 2):
            if f"random_k{k}" in methods:
                out[f"random_k{k}"] = pick(torch.rand(b, t, generator=gen).argsort(1)[:, :min(k, t)])
        if "oracle_k1" in methods:
            out["oracle_k1"] = pick(true.argmin(1, keepdim=True))
        if predictor is not None:
            pred = predictor(x).float()
            preds.append(pred)
            top = pred.topk(min(2, t), dim=1, largest=False, sorted=True).indices
            choices += torch.bincount(top[:, 0], minlength=t)
            out["ours_k1"] = pick(top[:, :1])
            out["ours_k2"] = pick(top)
        for m in methods:
            cms[m].update(out[m].argmax(1), y)
    metrics = {m: cms[m].metrics() for m in methods}
    return {
        "n": int(images.shape[0]),
        "miou": {m: 100.0 * metrics[m]["miou"] for m in methods},
        "pixel_acc": {m: 100.0 * metrics[m]["pixel_acc"] for m in methods},
        "choices": choices.tolist(),
        "pred": torch.cat(preds) if preds else None,
        "true": torch.cat(trues),
    }


def _seg_method_wrapper(method: str, net: Callable, space, predictor, output_key: Optional[str]):
    """The deployable inference of ``method`` as a callable on pixels (selection, views, one model
    call, de-augmentation, merge)."""
    import ttach as tta

    from .segmentation import LossGuidedSegmentationWrapper, RandomKSegmentationWrapper, SegmentationTTAWrapper

    kw = {"output_mask_key": output_key}
    if method == "identity":
        return net
    if method == "hflip":
        return SegmentationTTAWrapper(net, "hflip", **kw)
    if method == "d4_ttach":
        return tta.SegmentationTTAWrapper(net, tta.aliases.d4_transform(), merge_mode="mean", output_mask_key=output_key)
    if method == "full_mean":
        return SegmentationTTAWrapper(net, space, **kw)
    if method.startswith("random_k"):
        return RandomKSegmentationWrapper(net, space, k=int(method[-1]), generator=torch.Generator().manual_seed(0), **kw)
    if method.startswith("ours_k"):
        return LossGuidedSegmentationWrapper(net, predictor, space=space, k=int(method[-1]), **kw)
    raise ValueError(f"method {method!r} has no deployable forward (the oracle needs the labels)")


def measure_segmentation_cost(model: nn.Module, predictor: Optional[nn.Module], space, images: Tensor,
                              methods: Sequence[str] = SEG_METHODS, repeats: int = 3, batch_size: int = 32,
                              normalize: Optional[Callable] = None, output_key: Optional[str] = None) -> Dict[str, Dict]:
    """Wall time of each method's deployable segmentation inference on ``images`` (uint8), relative
    to Identity (best of ``repeats``), and model forwards per image counted by a forward hook."""
    from .data import normalizer

    normalize = normalize or normalizer(model)
    x_all = images.float() / 255
    calls = {"n": 0}

    def hook(_m, inputs, _o):
        calls["n"] += inputs[0].shape[0]

    def net(x):
        return model(normalize(x))

    handle = model.register_forward_hook(hook)
    out: Dict[str, Dict] = {}
    try:
        with torch.no_grad():
            for m in methods:
                if m == "oracle_k1" or (m.startswith("ours") and predictor is None):
                    continue
                fn = _seg_method_wrapper(m, net, space, predictor, output_key)
                fn(x_all[:min(2, x_all.shape[0])])  # warm-up (cached inverse maps)
                best = float("inf")
                for _ in range(repeats):
                    calls["n"] = 0
                    t0 = time.perf_counter()
                    for i in range(0, x_all.shape[0], batch_size):
                        fn(x_all[i:i + batch_size])
                    best = min(best, time.perf_counter() - t0)
                out[m] = {"seconds": best, "model_calls_per_image": calls["n"] / x_all.shape[0]}
    finally:
        handle.remove()
    base = out.get("identity", {}).get("seconds")
    for rec in out.values():
        rec["relative_time"] = rec["seconds"] / base if base else None
    if "oracle_k1" in methods:
        out["oracle_k1"] = {"model_calls_per_image": float(len(space)), "relative_time": None, "seconds": None}
    return out


def evaluate_segmentation(model: nn.Module, val_images: Tensor, val_masks: Tensor, space, out_dir: str,
                          num_classes: int, predictor: Optional[nn.Module] = None, size: Optional[int] = None,
                          corruptions: Sequence[str] = tuple(c for c in COMMON if c not in GEOMETRIC_CORRUPTIONS),
                          held_out: Sequence[str] = HELD_OUT, severities: Sequence[int] = SEVERITIES,
                          methods: Sequence[str] = SEG_METHODS, loss: str = "ce", ignore_index: int = 255,
                          output_key: Optional[str] = None, batch_size: int = 32, seed: int = 0,
                          cost_images: int = 64, cost_repeats: int = 3, progress: bool = True) -> Dict:
    """The methods table for a segmentation model: mIoU and pixel accuracy on clean, common- and
    held-out-corrupted versions of ``val_images`` (masks ``val_masks`` at the same resolution,
    resized with the images to ``size``), model forwards per image and wall time vs Identity.

    Writes ``out_dir/results.json`` and ``out_dir/table.md``; per-set results cached in
    ``out_dir/sets`` (resumable).
    """
    from tqdm import tqdm

    from .data import resize_masks

    corruptions, held_out = check_names(corruptions, "corruptions"), check_names(held_out, "held_out")
    methods = check_seg_methods(methods)
    for s in severities:
        if s not in SEVERITIES:
            raise ValueError(f"severities must be in 1..5, got {list(severities)}")
    if val_masks.shape != (val_images.shape[0],) + tuple(val_images.shape[-2:]):
        raise ValueError(f"val_masks must be (N, H, W) = {(val_images.shape[0],) + tuple(val_images.shape[-2:])}, "
                         f"got {tuple(val_masks.shape)}")
    masks = resize_masks(val_masks, size) if size is not None and val_masks.shape[-1] != size else val_masks
    os.makedirs(os.path.join(out_dir, "sets"), exist_ok=True)
    jobs = [(None, 0)] + [(c, s) for c in tuple(corruptions) + tuple(held_out) for s in severities]
    per_set: Dict[str, Dict] = {}
    for name, sev in tqdm(jobs, desc="eval sets", disable=not progress):
        key = f"{name or 'clean'}_{sev}"
        path = os.path.join(out_dir, "sets", key + ".json")
        if not os.path.isfile(path):
            imgs = corrupted_set(val_images, name, sev, size, os.path.join(out_dir, "data"), seed)
            res = evaluate_segmentation_arrays(model, imgs, masks, space, num_classes, predictor, methods, loss=loss,
                                               ignore_index=ignore_index, output_key=output_key,
                                               batch_size=batch_size, seed=seed)
            rec = {"corruption": name, "severity": sev, "n": res["n"], "miou": res["miou"],
                   "pixel_acc": res["pixel_acc"], "choices": res["choices"]}
            if res["pred"] is not None:
                from .training.losses import ranking_metrics

                rec["ranking"] = ranking_metrics(res["pred"], res["true"])
            atomic_write_json(path, rec)
        with open(path) as f:
            per_set[key] = json.load(f)
    cost = measure_segmentation_cost(model, predictor, space,
                                     corrupted_set(val_images[:cost_images], None, 0, size, None), methods,
                                     repeats=cost_repeats, batch_size=batch_size,
                                     output_key=output_key) if cost_images else {}
    present = [m for m in methods if m in per_set["clean_0"]["miou"]]

    def mean_over(cs, field_name):
        keys = [f"{c}_{s}" for c in cs for s in severities]
        return {m: float(np.mean([per_set[k][field_name][m] for k in keys])) for m in present} if keys else {}

    ranking = {k: v["ranking"] for k, v in per_set.items() if "ranking" in v}
    selection = {k: [c / sum(v["choices"]) for c in v["choices"]] for k, v in per_set.items() if sum(v["choices"])}
    results = {
        "task": "segmentation",
        "methods": present,
        "labels": {m: SEG_LABELS[m] for m in present},
        "clean": {"miou": per_set["clean_0"]["miou"], "pixel_acc": per_set["clean_0"]["pixel_acc"]},
        "common_mean": {"miou": mean_over(corruptions, "miou"), "pixel_acc": mean_over(corruptions, "pixel_acc")},
        "held_out_mean": {"miou": mean_over(held_out, "miou"), "pixel_acc": mean_over(held_out, "pixel_acc")},
        "per_set": {k: {"miou": v["miou"], "pixel_acc": v["pixel_acc"]} for k, v in per_set.items()},
        "corruptions": list(corruptions), "held_out": list(held_out), "severities": list(severities),
        "n": per_set["clean_0"]["n"], "num_classes": num_classes, "loss": loss,
        "cost": cost, "candidate_names": list(space.names), "selection_rates": selection, "ranking": ranking,
        "spearman": {
            "clean": ranking.get("clean_0", {}).get("spearman"),
            "common": float(np.mean([ranking[f"{c}_{s}"]["spearman"] for c in corruptions for s in severities]))
            if ranking and corruptions else None,
            "held_out": float(np.mean([ranking[f"{c}_{s}"]["spearman"] for c in held_out for s in severities]))
            if ranking and held_out else None,
        },
    }
    atomic_write_json(os.path.join(out_dir, "results.json"), results)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(segmentation_markdown_table(results))
    return results


def segmentation_markdown_table(results: Dict) -> str:
    cost = results.get("cost", {})
    calls_default = {"identity": 1, "hflip": 2, "d4_ttach": 8, "random_k1": 1, "random_k2": 2, "ours_k1": 1,
                     "ours_k2": 2}
    lines = ["| Method | Clean mIoU % | Clean pixel acc % | Corrupted mIoU % | Corrupted pixel acc % | "
             "Held-out mIoU % | Held-out pixel acc % | Model calls / image | Wall time vs Identity |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(group, field_name, m):
        v = results[group][field_name].get(m)
        return "" if v is None else f"{v:.2f}"

    for m in results["methods"]:
        c = cost.get(m, {})
        calls = c.get("model_calls_per_image", calls_default.get(m, len(results["candidate_names"])))
        rel = c.get("relative_time")
        lines.append(f"| {results['labels'][m]} | {cell('clean', 'miou', m)} | {cell('clean', 'pixel_acc', m)} | "
                     f"{cell('common_mean', 'miou', m)} | {cell('common_mean', 'pixel_acc', m)} | "
                     f"{cell('held_out_mean', 'miou', m)} | {cell('held_out_mean', 'pixel_acc', m)} | "
                     f"{calls:g} | {'' if rel is None else f'{rel:.2f}x'} |")
    sp = results.get("spearman", {})
    if sp.get("clean") is not None:
        lines.append("")
        lines.append("Predictor Spearman (val): " + ", ".join(
            f"{k} {v:.3f}" for k, v in sp.items() if v is not None))
    lines.append(f"\n{results['n']} images, {results['num_classes']} classes; severities {results['severities']}; "
                 f"corrupted = mean over {len(results['corruptions'])} corruptions, held-out over "
                 f"{results['held_out']}. Oracle k=1 picks by the true per-image {results['loss']} loss "
                 f"({len(results['candidate_names'])} + 1 forwards).\n")
    return "\n".join(lines)
