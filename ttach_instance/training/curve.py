"""The label budget made visible: a learning curve of the held-out k=1 gain over the identity.

:func:`~ttach_instance.training.gain.heldout_gain` is what every fit reports at its end
(``fit_predictor`` logs it and records it in the selected epoch's history).

:func:`learning_curve` fits the same recipe on nested fractions of the training rows (every
smaller set inside the larger; the held-out fold fixed by the image split, the same for every
point) and judges the last step from the per-row gains of its two fits on the same held-out rows
(:func:`verdict`): whether more labels are likely to pay. Why: labels cost model calls on every
candidate; a user should see whether the last doubling still bought accuracy before paying for
another.
"""

from __future__ import annotations

import hashlib
import math
import os
import textwrap
from dataclasses import asdict, replace
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..io import atomic_write_json
from .gain import SPLITS, clustered_se, format_gain, gain_record, heldout_gain
from .trainer import FitConfig, fit_predictor, split_rows

__all__ = ["CURVE_KIND", "CURVE_FORMAT", "heldout_gain", "format_gain", "gain_record", "nested_training_rows",
           "learning_curve", "verdict", "format_curve", "plot_curve", "parse_fractions"]

CURVE_KIND = "ttach_instance.learning_curve"
CURVE_FORMAT = 1


def parse_fractions(text: str) -> List[float]:
    """``"1/4,1/2"`` or ``"0.25,0.5"`` -> sorted fractions in (0, 1) (1, the whole set, is always
    added by the curve); ``ValueError`` naming what is wrong."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            f = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"fractions must be numbers or a/b separated by commas, got {part!r} in {text!r}") from None
        if not 0 < f <= 1:
            raise ValueError(f"fractions must be in (0, 1], got {part!r}")
        out.append(f)
    return sorted(set(out))


def nested_training_rows(train_rows: Tensor, fractions: Sequence[float], seed: int) -> List[Tensor]:
    """For each fraction ``f`` the first ``max(1, round(f * n))`` of one seeded permutation of
    ``train_rows`` (positions into the data), sorted: every smaller set lies inside the larger."""
    n = train_rows.numel()
    perm = train_rows[torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104729))]
    return [perm[:max(1, int(round(f * n)))].sort().values for f in fractions]


def _subset(data: Dict, keep: Tensor) -> Dict:
    """The rows ``keep`` of every per-row tensor of ``data`` (other entries as they are)."""
    n = data["rows"].shape[0]
    return {k: v[keep] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v for k, v in data.items()}


def _fold_sha256(rows: Tensor) -> str:
    return hashlib.sha256(rows.long().contiguous().numpy().tobytes()).hexdigest()


def verdict(points: List[Dict], row_gains: List[Tensor], image_ids: Tensor) -> Dict:
    """The plain-language reading of the curve's last step (the two largest points): the change in
    held-out gain on all rows, with a paired standard error (the same held-out rows under both
    fits, clustered by image). ``pays``: the change is positive by more than twice its error;
    ``flat``: within it; ``worse``: negative by more. One seed: fit-to-fit noise of the recipe is
    not in the error."""
    if len(points) < 2:
        return {"reading": "one point: no slope", "text": "one point only: give smaller fractions to see a slope"}
    a, b = points[-2], points[-1]
    delta = b["gain"]["all"]["gain_points"] - a["gain"]["all"]["gain_points"]
    se = 100 * clustered_se(row_gains[-1] - row_gains[-2], image_ids)
    step = "doubling" if abs(b["label_rows"] / max(1, a["label_rows"]) - 2) < 0.05 else "step"
    span = (f"{delta:+.2f} points (two paired SE {2 * se:.2f}) from {a['label_rows']:,} → {b['label_rows']:,} "
            f"label rows")
    if delta > 2 * se:
        reading, advice = "pays", "more labels likely pay"
    elif delta < -2 * se:
        reading, advice = "worse", "more labels did not pay at this recipe (look at the recipe before adding labels)"
    else:
        reading, advice = "flat", "flat: more labels unlikely to pay much at this recipe"
    corrupted = ""
    if b["gain"].get("corrupted", {}).get("rows") and a["gain"].get("corrupted", {}).get("rows"):
        dc = b["gain"]["corrupted"]["gain_points"] - a["gain"]["corrupted"]["gain_points"]
        corrupted = f" (corrupted rows {dc:+.2f}, clean {b['gain']['clean']['gain_points'] - a['gain']['clean']['gain_points']:+.2f})"
    return {"reading": reading, "delta_points": delta, "se_points": se, "step": step,
            "text": f"last {step}: {span}{corrupted}: {advice}"}


def learning_curve(build_predictor: Callable[[], nn.Module], data: Dict[str, Tensor], config: FitConfig,
                   fractions: Sequence[float], point_dir: Callable[[float, int], Optional[str]],
                   num_images: Optional[int] = None, device: str = "cpu", log: Callable[[str], None] = print,
                   progress: bool = True, labels_identity: Optional[Dict] = None,
                   out_json: Optional[str] = None, steps: str = "same") -> Dict:
    """Fit ``build_predictor()`` with ``config`` on nested fractions of ``data``'s training rows
    (:func:`nested_training_rows`; 1 is always added: the whole set) and measure each fit's
    :func:`heldout_gain` on the one held-out fold (``config.val_fraction`` of the images,
    ``config.seed``: the fold every fit on ``data`` holds out). Each point's fit goes to
    ``point_dir(fraction, label_rows)`` (resumable there, as any fit); after every point the curve
    so far is written to ``out_json``. ``label_rows``: the budget a point stands for,
    ``round(fraction * all rows)``. ``steps``: ``"same"``, a point at fraction ``f`` runs
    ``round(config.epochs / f)`` epochs, about the whole set's optimiser steps, so only the labels
    differ; ``"epochs"``, every point runs ``config.epochs`` (smaller budgets are also shorter
    fits: on both Tiny ImageNet targets that curve climbed to 30,000 rows while at the same steps
    7,500 rows did as well as 30,000; docs/BENCHMARKS.md). Returns the curve: ``{"kind", "format_version", "points":
    [{"fraction", "label_rows", "train_rows", "heldout_rows", "heldout_sha256" (of the rows
    the fit held out), "gain", "selected", "dir"}], "fold",
    "verdict", "config"}``; ``"predictors"`` (not in the JSON) holds the fitted predictors."""
    for key in ("images", "losses", "rows", "correct"):
        if key not in data:
            raise ValueError(f"a learning curve needs the label cache's {key!r} (LabelCache(dir).load())")
    fractions = sorted(set(float(f) for f in fractions) | {1.0})
    if not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1], got {fractions}")
    if config.val_fraction <= 0:
        raise ValueError("a learning curve is measured on the held-out fold: val_fraction must be > 0")
    if steps not in ("epochs", "same"):
        raise ValueError(f"steps must be 'epochs' (the recipe's epochs at every point) or 'same' (about the whole "
                         f"set's optimiser steps at every point), got {steps!r}")
    rows = data["rows"]
    n_img = int(num_images or data.get("num_images") or int(rows.max()) + 1)
    train_mask, val_mask = split_rows(rows, n_img, config.val_fraction, config.seed)
    train_idx, val_idx = train_mask.nonzero().squeeze(1), val_mask.nonzero().squeeze(1)
    if val_idx.numel() == 0 or train_idx.numel() == 0:
        raise ValueError("a learning curve needs training and held-out rows: add images or change val_fraction")
    subsets = nested_training_rows(train_idx, fractions, config.seed)
    image_ids = rows[val_idx] % n_img
    cfg = {k: v for k, v in asdict(config).items() if k != "flip_permutation"}
    cfg["flip"] = config.flip_permutation is not None
    curve: Dict = {"kind": CURVE_KIND, "format_version": CURVE_FORMAT, "config": cfg, "labels": labels_identity,
                   "steps": steps,
                   "fold": {"heldout_rows": int(val_idx.numel()), "heldout_images": int(image_ids.unique().numel()),
                            "rows_sha256": _fold_sha256(rows[val_idx])},
                   "points": [], "verdict": None}
    gains, predictors = [], []
    total = rows.numel()
    for f, subset in zip(fractions, subsets):
        label_rows = int(round(f * total))
        keep = torch.cat([subset, val_idx]).sort().values
        sub = _subset(data, keep)
        directory = point_dir(f, label_rows)
        log(f"learning curve: {label_rows:,} label rows ({subset.numel():,} training rows, fraction {f:.4g}) "
            f"-> {directory or '(not saved)'}")
        point_config = replace(config, epochs=max(1, round(config.epochs / f))) if steps == "same" else config
        predictor = build_predictor()
        res = fit_predictor(predictor, sub, directory, point_config, num_images=n_img, device=device, progress=progress,
                            log=log, labels_identity=labels_identity)
        if not res["complete"]:
            raise RuntimeError("a learning-curve fit stopped before its last epoch")
        if not torch.equal(keep[res["val_rows"]], val_idx):  # the fold is the image split's, whatever rows remain
            raise RuntimeError("the held-out fold differs between learning-curve points")
        gain = res.get("heldout_gain")
        if gain is None:
            raise ValueError("a learning curve needs a predictor with a space that has an identity candidate")
        gains.append(gain["row_gains"])
        predictors.append(predictor)
        final = res["final"]
        curve["points"].append({
            "fraction": f, "label_rows": label_rows, "train_rows": int(subset.numel()), "epochs": point_config.epochs,
            "steps": point_config.epochs * math.ceil(subset.numel() / config.batch_size),
            "heldout_rows": int(val_idx.numel()), "heldout_sha256": _fold_sha256(sub["rows"][res["val_rows"]]),
            "gain": gain_record(gain), "dir": directory,
            "selected": {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}})
        curve["verdict"] = verdict(curve["points"], gains, image_ids)
        if out_json:
            atomic_write_json(out_json, curve)
    curve["predictors"] = predictors
    return curve


def format_curve(curve: Dict) -> str:
    """The curve as a small table and its verdict (what ``fit --learning-curve`` prints)."""
    lines = ["learning curve (held-out k=1 gain over the identity, points; ± one clustered SE):",
             f"  {'label rows':>10} {'train rows':>10} {'steps':>7} {'all':>14} {'clean':>14} {'corrupted':>14}"]
    for p in curve["points"]:
        cells = []
        for s in SPLITS:
            g = p["gain"].get(s) or {}
            cells.append(f"{g['gain_points']:+.2f} ± {g['se_points']:.2f}" if g.get("rows") else "-")
        lines.append(f"  {p['label_rows']:>10,} {p['train_rows']:>10,} {p['steps']:>7,} " +
                     " ".join(f"{c:>14}" for c in cells))
    lines.append(curve["verdict"]["text"])
    if curve.get("steps") == "epochs" and len(curve["points"]) > 1:
        lines.append("(every point ran the recipe's epochs, so smaller budgets also took fewer optimiser steps; "
                     "--curve-steps same gives each about the whole set's steps: labels alone)")
    return "\n".join(lines)


def plot_curve(curve: Dict, path: str) -> None:
    """A PNG of the curve: label rows (log scale) -> held-out gain, one line per split, ± 2 SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for s, colour in zip(SPLITS, ("black", "tab:blue", "tab:red")):
        pts = [p for p in curve["points"] if (p["gain"].get(s) or {}).get("rows")]
        if not pts:
            continue
        x = [p["label_rows"] for p in pts]
        y = [p["gain"][s]["gain_points"] for p in pts]
        e = [2 * p["gain"][s]["se_points"] for p in pts]
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=colour, label=f"{s} rows")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([p["label_rows"] for p in curve["points"]], [f"{p['label_rows']:,}" for p in curve["points"]])
    ax.set_xlabel("label rows (bars: ± 2 SE, clustered by image)")
    ax.set_ylabel("held-out k=1 gain over identity (points)")
    ax.set_title(textwrap.fill(curve["verdict"]["text"], 90), fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
