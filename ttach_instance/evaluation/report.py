"""Reports of an evaluation: summaries over corruptions, markdown tables and plots."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .methods import LABELS, MODEL_CALLS

__all__ = ["summarize", "markdown_table", "plot_selection_rates", "plot_scatter", "segmentation_markdown_table"]


def summarize(per_set: Dict[str, Dict], methods, corruptions, held_out, severities, names, cost,
              labels: Optional[Dict[str, str]] = None, model_calls: Optional[Dict[str, int]] = None) -> Dict:
    """``labels`` / ``model_calls``: those of methods beyond the built-in table (policy rows)."""
    labels, model_calls = {**LABELS, **(labels or {})}, {**MODEL_CALLS, **(model_calls or {})}
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
        "labels": {m: labels[m] for m in present},
        "model_calls": {m: model_calls[m] for m in present if m in model_calls},
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
        calls = c.get("model_calls_per_image", results.get("model_calls", MODEL_CALLS).get(m, ""))
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
