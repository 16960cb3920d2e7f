"""Loss-guided TTA for segmentation, end to end on real data (CPU friendly).

Task: box-mask foreground/background segmentation on the 20-class Tiny ImageNet split in
``../shared/data/tinyimagenet-dev20`` (``boxes.tsv`` gives one object box per image; the mask
is 1 inside the box, inclusive pixel coordinates, 0 outside). Stages, each cached under
``--runs`` (default ``runs/seg_tin``, git-ignored) and skipped when its output exists:

1. ``data``   decode the JPEGs once into ``data.npz`` (uint8 images, uint8 masks).
2. ``train``  a compact U-Net (``pretrained=False``, random init) on the clean train split;
              resumable per epoch (``unet.safetensors`` + ``unet.json``).
3. ``labels`` per-image segmentation loss (mean pixel CE) and pixel accuracy of every
              ``paper12`` candidate (:func:`ttach_instance.segmentation.view_losses`) on
              train images, 60 % of them under a random common corruption (severity 1-5);
              ``--draws`` corruption draws per image.
4. ``fit``    the loss predictor of ``--recipe`` (default the shipped ``segmentation-small24``:
              a ``SmallLossPredictor`` at 24 px, ~3 % of the U-Net's time) with the library's
              trainer (:func:`ttach_instance.training.trainer.fit_predictor`: listwise KL + soft
              Spearman, EMA, flip augmentation) and the identity margin calibrated on its
              held-out fold (the recipe's ``clean_tolerance``).
5. ``eval``   mIoU / pixel accuracy per method on clean, corrupted and held-out-corruption
              val images, with cost relative to one forward; writes ``table.md`` in the fit's folder.

``--stage predictor-cost`` times each predictor of :data:`PREDICTORS` against the U-Net;
``--stage cost`` re-times only the methods of one or two forwards (15 rounds, the fitted
predictor), i.e. the eval table's last column.

Run everything:  ``python research/segmentation_tinyimagenet.py --stage all``
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as TF

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyimagenet-dev20"
if not DATA.exists():  # repository checked out elsewhere: fall back to the shared location
    DATA = Path("/work/shared/data/tinyimagenet-dev20")

#: Common corruptions used for predictor labels and the "corrupted" evaluation. Left out:
#: glass_blur (2.4 s per 64 px image in imagecorruptions) and elastic_transform (it moves
#: pixels, so the box mask would no longer match the image).
COMMON = [
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "pixelate", "jpeg_compression",
]
#: Never seen when building predictor labels.
HELD_OUT = ["speckle_noise", "gaussian_blur", "spatter", "saturate"]


# --------------------------------------------------------------------------- model

def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Compact U-Net: ``depth`` down/up levels, ``width`` channels at full resolution.

    Takes pixels in [0, 1] (normalises internally, so it has no ``mean``/``std`` attributes: the
    wrappers read those as the normalisation the model's *input* carries), returns logits
    ``(B, classes, H, W)`` at the input resolution (H, W divisible by ``2 ** depth``).
    """

    def __init__(self, classes: int = 2, width: int = 16, depth: int = 3):
        super().__init__()
        self.config = {"classes": classes, "width": width, "depth": depth}
        self.register_buffer("pix_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("pix_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        chans = [width * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(3, chans[0])] + [_block(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in range(depth)])
        self.dec = nn.ModuleList([_block(2 * chans[i], chans[i]) for i in range(depth)])
        self.head = nn.Conv2d(chans[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.pix_mean) / self.pix_std
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else TF.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips.pop()], 1))
        return self.head(x)


def unet(num_classes: int = 2, width: int = 16, depth: int = 3) -> UNet:
    """The U-Net as a ``module:factory`` for the CLI (``--model segmentation_tinyimagenet:unet`` with
    ``PYTHONPATH=research``): ``mean``/``std`` mark it as taking pixels in [0, 1], so the CLI does not
    feed it ImageNet-normalised input (it normalises inside)."""
    model = UNet(classes=num_classes, width=width, depth=depth)
    model.mean, model.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return model


def save_model(model: nn.Module, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps({"config": model.config, **meta}, indent=1))


def load_unet(path: Path) -> UNet:
    from safetensors.torch import load_file

    meta = json.loads(path.with_suffix(".json").read_text())
    model = UNet(**meta["config"])
    model.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
    return model.eval()


# --------------------------------------------------------------------------- data


def stage_data(runs: Path) -> Path:
    out = runs / "data.npz"
    if out.exists():
        return out
    from PIL import Image

    arrays = {"train": ([], []), "val": ([], [])}
    with open(DATA / "boxes.tsv") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            img = np.asarray(Image.open(DATA / row["path"]).convert("RGB"))
            h, w = img.shape[:2]
            mask = np.zeros((h, w), np.uint8)
            x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
            mask[y0 : y1 + 1, x0 : x1 + 1] = 1
            arrays[row["split"]][0].append(img)
            arrays[row["split"]][1].append(mask)
    np.savez(
        out,
        **{f"{s}_images": np.stack(a[0]) for s, a in arrays.items()},
        **{f"{s}_masks": np.stack(a[1]) for s, a in arrays.items()},
    )
    return out


def load_data(runs: Path):
    d = np.load(stage_data(runs))
    return {k: d[k] for k in d.files}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)


def corrupt_batch(images: np.ndarray, names, severities) -> np.ndarray:
    from imagecorruptions import corrupt

    out = images.copy()
    for i, (name, sev) in enumerate(zip(names, severities)):
        if name:
            out[i] = np.clip(corrupt(images[i], corruption_name=name, severity=int(sev)), 0, 255).astype(np.uint8)
    return out


def corrupted_set(runs: Path, split: str, kind: str, n: int, seed: int, prob: float = 1.0):
    """A cached, seeded corrupted copy of the first ``n`` images of ``split``."""
    path = runs / f"{split}_{kind}_{n}_{seed}.npz"
    data = load_data(runs)
    images = data[f"{split}_images"][:n]
    if path.exists():
        d = np.load(path)
        return d["images"], list(d["names"])
    pool = {"common": COMMON, "heldout": HELD_OUT}[kind]
    rng = np.random.default_rng(seed)
    names = [str(rng.choice(pool)) if rng.random() < prob else "" for _ in range(len(images))]
    sev = rng.integers(1, 6, len(images))
    out = corrupt_batch(images, names, sev)
    np.savez(path, images=out, names=np.array(names))
    return out, names


# --------------------------------------------------------------------------- stages


def stage_train(runs: Path, epochs: int, width: int, batch: int = 64) -> Path:
    ckpt = runs / "unet"
    state_path = runs / "unet_train.json"
    model = UNet(width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    start = 0
    if state_path.exists():
        state = json.loads(state_path.read_text())
        start = state["epoch"]
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(ckpt.with_suffix(".safetensors"))))
        if start >= epochs:
            return ckpt
    data = load_data(runs)
    x_all = torch.from_numpy(data["train_images"]).permute(0, 3, 1, 2)
    y_all = torch.from_numpy(data["train_masks"]).long()
    n = len(x_all)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for _ in range(start * math.ceil(n / batch)):
        sched.step()
    g = torch.Generator().manual_seed(0)
    for epoch in range(start, epochs):
        model.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        t0, total = time.time(), 0.0
        for s in range(0, n, batch):
            idx = perm[s : s + batch]
            x = x_all[idx].float().div(255)
            y = y_all[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y = torch.where(flip[:, None, None], y.flip(-1), y)
            # mild photometric jitter (brightness / contrast)
            a = 1 + 0.2 * (torch.rand(len(idx), 1, 1, 1, generator=g) - 0.5)
            b = 0.1 * (torch.rand(len(idx), 1, 1, 1, generator=g) - 0.5)
            x = ((x - 0.5) * a + 0.5 + b).clamp(0, 1)
            loss = TF.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        miou = evaluate_plain(model, to_tensor(data["val_images"]), torch.from_numpy(data["val_masks"]).long())
        print(f"epoch {epoch + 1}/{epochs} loss {total / n:.4f} val mIoU {miou:.4f} ({time.time() - t0:.0f}s)", flush=True)
        save_model(model, ckpt, {"epoch": epoch + 1, "val_miou": miou})
        state_path.write_text(json.dumps({"epoch": epoch + 1}))
    return ckpt


@torch.no_grad()
def evaluate_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    preds = torch.cat([model(x[i : i + 200]).argmax(1) for i in range(0, len(x), 200)])
    model.train(was)
    ious = [((preds == c) & (y == c)).sum() / ((preds == c) | (y == c)).sum().clamp(min=1) for c in (0, 1)]
    return float(sum(ious) / 2)


@torch.no_grad()
def stage_labels(runs: Path, n: int, draws: int = 1, chunk: int = 500, prob: float = 0.6, seed: int = 1) -> Path:
    """Per-image loss and pixel accuracy of every paper12 candidate on the first ``n`` train
    images, ``draws`` times (each draw its own random corruption per image: common corruption
    with probability ``prob``, severity 1-5, else clean), in resumable chunks of ``chunk`` rows."""
    from ttach_instance.segmentation import view_losses

    out = runs / f"labels_{n}x{draws}.npz"
    if out.exists():
        return out
    space = ti_space()
    model = load_unet(runs / "unet")
    data = load_data(runs)
    parts = []
    for d in range(draws):
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            part = runs / f"labels_d{d}_{s:05d}-{e:05d}.npz"  # independent of n: a longer run reuses it
            if not part.exists():
                t0 = time.time()
                rng = np.random.default_rng((seed * 1009 + d) * 100003 + s)
                imgs = data["train_images"][s:e]
                names = [str(rng.choice(COMMON)) if rng.random() < prob else "" for _ in range(len(imgs))]
                sev = rng.integers(1, 6, len(imgs))
                imgs = corrupt_batch(imgs, names, sev)
                target = torch.from_numpy(data["train_masks"][s : s + len(imgs)]).long()
                x = to_tensor(imgs)
                res = [view_losses(model, space, x[i : i + 100], target[i : i + 100], loss="ce", chunk_size=200,
                                   return_accuracy=True)
                       for i in range(0, len(x), 100)]
                np.savez(part, images=imgs, losses=torch.cat([r[0] for r in res]).numpy(),
                         accuracy=torch.cat([r[1] for r in res]).numpy(), names=np.array(names),
                         severity=np.where([bool(c) for c in names], sev, 0), image=np.arange(s, s + len(imgs)))
                print(f"  labels draw {d + 1}/{draws} {s + len(imgs)}/{n} ({time.time() - t0:.0f}s)", flush=True)
            parts.append(np.load(part))
    np.savez(out, **{k: np.concatenate([p[k] for p in parts]) for k in parts[0].files})
    return out


#: Predictors whose cost ``--stage predictor-cost`` compares with the U-Net (random init):
#: ``create_predictor`` name and configuration.
PREDICTORS = {
    "small24": ("small", {"width": 8, "input_size": 24}),  # ~1.8 M-MAC, ~3 % of the U-Net
    "small32": ("small", {"width": 8, "input_size": 32}),  # ~3.2 M-MAC, ~4-5 %
    "timm64": ("timm", {"input_size": 64}),  # the library's timm predictor (mobilenetv3_small_100)
}


def load_recipe(name_or_path) -> dict:
    """A fit recipe (ttach_instance.recipes: a shipped name or a .json file), checked."""
    from ttach_instance import recipes

    return recipes.load_recipe(str(name_or_path))


def fit_dir(runs: Path, recipe: Path, n_labels: int, draws: int) -> Path:
    """Where a fit of this recipe on these labels lives (so that changing either never reuses another fit)."""
    return runs / f"fit_{Path(recipe).stem}_{n_labels}x{draws}"


def load_predictor(fit: Path):
    from ttach_instance.predictors import load_predictor as load

    return load(str(fit / "predictor.safetensors")).eval()


def fit_data(lab, input_size: int) -> dict:
    """The label arrays as a label cache for :func:`ttach_instance.training.trainer.fit_predictor`:
    ``rows`` = image + draw * n (the train/valid split is by image, all draws of an image on one
    side), ``correct`` = per-view pixel accuracy, ``corruption`` = -1 on clean rows. The images
    are resized once to the predictor's input size, as its forward would (same interpolation),
    so each training step skips the resize."""
    x = torch.from_numpy(lab["images"]).permute(0, 3, 1, 2).float()
    if x.shape[-1] != input_size:
        x = torch.cat([TF.interpolate(x[i : i + 1000], size=(input_size, input_size), mode="bilinear", antialias=True,
                                      align_corners=False) for i in range(0, len(x), 1000)])
    image = torch.from_numpy(lab["image"]).long()
    n = int(image.max()) + 1
    draw = torch.arange(len(image)) // n
    names = list(lab["names"])
    return {
        "images": x,  # float in [0, 255]: the trainer divides by 255
        "losses": torch.from_numpy(lab["losses"]).float(),
        "correct": torch.from_numpy(lab["accuracy"]).float(),
        "rows": image + draw * n,
        "num_images": n,
        "corruption": torch.tensor([COMMON.index(c) if c else -1 for c in names]),
    }


def stage_fit(runs: Path, n_labels: int, draws: int, recipe_path: Path) -> Path:
    """Fit the recipe's loss predictor with the library's trainer (listwise KL + soft Spearman,
    AdamW, cosine LR, EMA weights, horizontal-flip augmentation with the candidates' flip
    permutation, cutout; 20 % of the images held out) and, with the recipe's
    ``clean_tolerance``, the identity margin calibrated on the held-out fold: the margin
    maximising the held-out k=1 pixel accuracy with clean images' pixel accuracy at least the
    identity's minus ``clean_tolerance`` points."""
    from ttach_instance.predictors import create_predictor
    from ttach_instance.training.losses import ranking_metrics, tau_from_spread
    from ttach_instance.training.trainer import fit_predictor, predict_losses

    out = fit_dir(runs, recipe_path, n_labels, draws)
    if (out / "fit.json").exists():
        return out
    out.mkdir(exist_ok=True)
    recipe = load_recipe(recipe_path)
    lab = np.load(stage_labels(runs, n_labels, draws))
    space = ti_space()
    spec = {k: v for k, v in recipe["predictor"].items() if k != "init_from"}
    pred = create_predictor(spec.pop("architecture"), space, **spec)
    data = fit_data(lab, pred.input_size)
    # listwise target softmin(losses / tau): mean-pixel CE differs by a few hundredths between
    # views, so "from_spread" sets tau from the labels' spread (half the median per-image std)
    from ttach_instance import recipes

    fit = {**recipes.defaults()["fit"], **recipe["fit"]}
    tau = tau_from_spread(data["losses"]) if fit["tau"] == "auto" else float(fit["tau"] or 1.0)
    cfg = recipes.fit_config(fit, space, tau)
    res = fit_predictor(pred, data, str(out), cfg, num_images=data["num_images"], progress=False,
                        log=lambda m: print("  " + m, flush=True))
    val = res["val_rows"]
    scores = predict_losses(pred, data["images"][val])
    metrics = ranking_metrics(scores, data["losses"][val], data["correct"][val])
    clean = data["corruption"][val] < 0
    v = data["losses"][val]
    chosen = v.gather(1, scores.argmin(1, keepdim=True)).squeeze(1)
    summary = {
        "recipe": recipe, "tau": tau, "rows": len(data["rows"]),
        "history": res["history"], "identity_margin": res["identity_margin"],
        # after the margin: what the deployed predictor does on the held-out fold
        "valid": {**metrics, "chosen_loss": float(chosen.mean()), "identity_loss": float(v[:, 0].mean()),
                  "oracle_loss": float(v.min(1).values.mean()),
                  "chosen_loss_corrupted": float(chosen[~clean].mean()), "identity_loss_corrupted": float(v[~clean, 0].mean()),
                  "identity_share": float((scores.argmin(1) == 0).float().mean())},
    }
    (out / "fit.json").write_text(json.dumps(summary, indent=1))
    print("  valid: " + " ".join(f"{k} {x:.4f}" for k, x in summary["valid"].items()), flush=True)
    return out


def eval_methods(runs: Path, fit: Path, batch: int = 100):
    """``(model, {name: (make(model) -> method, forwards per image)})``: the U-Net and the methods
    compared, with the fitted predictor of ``fit`` (and the same weights without its margin)."""
    import ttach as tta
    from ttach_instance.evaluation import OracleKSegmentationWrapper
    from ttach_instance.wrappers import (LossGuidedSegmentationWrapper, RandomKSegmentationWrapper,
                                         SegmentationTTAWrapper)

    model = load_unet(runs / "unet")
    predictor = load_predictor(fit)
    raw = load_predictor(fit)  # the same weights without the calibrated identity margin
    raw.calibration = None
    space = predictor.space
    ck = {"chunk_size": batch}  # one model call per `batch` views: big CPU batches run slower per image
    methods = {
        "Identity": (lambda m: m, 1),
        "H-Flip": (lambda m: SegmentationTTAWrapper(m, "hflip", **ck), 2),
        "D4 (ttach)": (lambda m: tta.SegmentationTTAWrapper(m, tta.aliases.d4_transform(), merge_mode="mean"), 8),
        "paper12 full mean": (lambda m: SegmentationTTAWrapper(m, space, **ck), 12),
        "Random k=1": (lambda m: RandomKSegmentationWrapper(m, space, k=1, seed=0, **ck), 1),
        "Ours k=1": (lambda m: LossGuidedSegmentationWrapper(m, predictor, k=1, **ck), 1),
        "Ours k=1, no identity margin": (lambda m: LossGuidedSegmentationWrapper(m, raw, k=1, **ck), 1),
        "Ours k=1, coverage=identity": (lambda m: LossGuidedSegmentationWrapper(m, predictor, k=1, coverage="identity", **ck), 2),
        "Ours k=2": (lambda m: LossGuidedSegmentationWrapper(m, predictor, k=2, **ck), 2),
        "Oracle k=1": (lambda m: OracleKSegmentationWrapper(m, space, k=1, **ck), "12+1"),
    }
    return model, methods


@torch.no_grad()
def stage_eval(runs: Path, fit: Path, n_val: int = 1000, batch: int = 100, rounds: int = 7) -> Path:
    """mIoU / pixel accuracy per method and condition; cost relative to Identity (wall time of
    the whole method on this machine, predictor included, and model forwards per image)."""
    from ttach_instance.segmentation import ConfusionMatrix

    model, methods = eval_methods(runs, fit, batch)
    space = ti_space()
    data = load_data(runs)
    target_all = torch.from_numpy(data["val_masks"][:n_val]).long()
    conditions = {
        "clean": data["val_images"][:n_val],
        "corrupted": corrupted_set(runs, "val", "common", n_val, seed=7)[0],
        "held-out corruptions": corrupted_set(runs, "val", "heldout", n_val, seed=8)[0],
    }
    results, counts = {}, {}
    for cond, imgs in conditions.items():
        x_all = to_tensor(imgs)
        for name, (make, forwards) in methods.items():
            wrapper = make(model)
            cm = ConfusionMatrix(2)
            per_image = []  # (B, 2, 2): intersection / union pixel counts per image and class
            picks = torch.zeros(len(space), dtype=torch.long)
            for s in range(0, n_val, batch):
                x, y = x_all[s : s + batch], target_all[s : s + batch]
                if name.startswith("Oracle"):
                    out = wrapper(x, target=y)
                elif hasattr(wrapper, "run") and name.startswith("Ours k=1"):
                    r = wrapper.run(x)
                    out = r["output"]
                    picks += torch.bincount(r["selection"].index[:, 0], minlength=len(space))
                else:
                    out = wrapper(x)
                cm.update(out.argmax(1), y)
                per_image.append(iou_counts(out.argmax(1), y))
            m = cm.metrics()
            counts[(cond, name)] = torch.cat(per_image)
            results[(cond, name)] = {"miou": m["miou"], "pixel_acc": m["pixel_acc"], "forwards": forwards}
            if name == "Ours k=1":
                results[(cond, name)]["picks"] = {space.names[i]: int(c) for i, c in enumerate(picks) if c}
            if name == "Ours k=1, no identity margin":
                results[(cond, name)]["picks"] = {space.names[i]: int(c) for i, c in enumerate(picks) if c}
            print(f"  {cond:22s} {name:30s} mIoU {m['miou']:.4f} acc {m['pixel_acc']:.4f}", flush=True)
    # Cost: wall time relative to the plain model (see time_methods).
    times = time_methods(methods, model, to_tensor(conditions["clean"]), target_all, n_val, batch, rounds)
    for (cond, name), v in results.items():
        v["time_ms_per_batch"] = times[name] * 1e3
    lines = ["| method | forwards / image | " + " | ".join(f"{c} mIoU / acc" for c in conditions) + " | time vs Identity |",
             "|---|---|" + "---|" * len(conditions) + "---|"]
    for name, (_, forwards) in methods.items():
        cells = [f"{results[(c, name)]['miou'] * 100:.1f} / {results[(c, name)]['pixel_acc'] * 100:.1f}" for c in conditions]
        rel = times[name] / times["Identity"]
        lines.append(f"| {name} | {forwards} | " + " | ".join(cells) + f" | {rel:.2f}x |")
    lines.append("")
    lines.append("mIoU difference to Identity, points, with a 95 % paired bootstrap interval over the images (2,000 resamples):")
    lines.append("")
    lines.append("| method | " + " | ".join(conditions) + " |")
    lines.append("|---|" + "---|" * len(conditions))
    for row in ("Ours k=1", "Ours k=1, no identity margin", "Ours k=2", "Random k=1", "D4 (ttach)"):
        cells = []
        for c in conditions:
            d, lo, hi = paired_bootstrap(counts[(c, row)], counts[(c, "Identity")])
            results[(c, row)]["miou_diff_vs_identity"] = [d, lo, hi]
            cells.append(f"{d * 100:+.2f} [{lo * 100:+.2f}, {hi * 100:+.2f}]")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for row in ("Ours k=1", "Ours k=1, no identity margin"):
        picks = {c: results[(c, row)]["picks"] for c in conditions}
        lines.append("")
        lines.append(f"{row} picks: " + "; ".join(f"{c}: {p}" for c, p in picks.items()))
    table = "\n".join(lines)
    (fit / "table.md").write_text(table + "\n")
    (fit / "results.json").write_text(json.dumps({f"{c}|{n}": v for (c, n), v in results.items()}, indent=1))
    print(table)
    return fit / "table.md"


@torch.no_grad()
def time_methods(methods: dict, model: nn.Module, x_all: torch.Tensor, target_all: torch.Tensor, n_val: int,
                 batch: int = 100, rounds: int = 7) -> dict:
    """Median wall time (s) of one batch of ``batch`` clean images per method, predictor and all
    TTA work included. The methods are timed round-robin on the same batches (after a warm-up
    round, in alternating order), so load from other processes hits them alike; median over
    ``rounds`` rounds for the methods of 1-2 forwards, over 2 rounds for the others (their cost
    needs no precision)."""
    samples = {name: [] for name in methods}
    wrappers = {name: make(model) for name, (make, _) in methods.items()}
    nb = max(1, min(4, n_val // batch))
    for r in range(rounds + 1):
        sl = slice((r % nb) * batch, (r % nb + 1) * batch)
        x, y = x_all[sl], target_all[sl]
        for name in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            forwards = methods[name][1]
            if not (isinstance(forwards, int) and forwards <= 2) and r not in (1, 2):
                continue
            wrapper = wrappers[name]
            t0 = time.perf_counter()
            wrapper(x, target=y) if name.startswith("Oracle") else wrapper(x)
            if r:
                samples[name].append(time.perf_counter() - t0)
    times = {name: float(np.median(v)) for name, v in samples.items() if v}
    for name in times:
        print(f"  cost {name:30s} {times[name] * 1e3:.0f} ms / {batch} images "
              f"(x{times[name] / times['Identity']:.3f}, {len(samples[name])} rounds)", flush=True)
    return times


@torch.no_grad()
def stage_cost(runs: Path, fit: Path, n_val: int = 1000, batch: int = 100, rounds: int = 15) -> dict:
    """Only the cost column, for the methods of one or two forwards, with more rounds."""
    model, methods = eval_methods(runs, fit, batch)
    methods = {k: v for k, v in methods.items() if isinstance(v[1], int) and v[1] <= 2}
    data = load_data(runs)
    target = torch.from_numpy(data["val_masks"][:n_val]).long()
    return time_methods(methods, model, to_tensor(data["val_images"][:n_val]), target, n_val, batch, rounds)


@torch.no_grad()
def stage_predictor_cost(runs: Path, batch: int = 100, rounds: int = 7) -> None:
    """Wall time of each :data:`PREDICTORS` entry (random init) relative to one U-Net forward,
    on `batch` val images (channels-last, as :func:`to_tensor` gives them), round-robin, median."""
    model = load_unet(runs / "unet") if (runs / "unet.json").exists() else UNet().eval()
    x = to_tensor(load_data(runs)["val_images"][:batch])
    from ttach_instance.predictors import create_predictor

    nets = {"U-Net": model, **{name: create_predictor(arch, ti_space(), **cfg).eval()
                               for name, (arch, cfg) in PREDICTORS.items()}}
    samples = {name: [] for name in nets}
    for r in range(rounds + 1):
        for name, net in nets.items():
            t0 = time.perf_counter()
            net(x)
            if r:
                samples[name].append(time.perf_counter() - t0)
    base = float(np.median(samples["U-Net"]))
    for name, v in samples.items():
        print(f"  {name:8s} {float(np.median(v)) * 1e3:7.1f} ms / {batch} images  "
              f"{float(np.median(v)) / base * 100:5.1f} % of the U-Net", flush=True)


def iou_counts(pred: torch.Tensor, target: torch.Tensor, classes: int = 2) -> torch.Tensor:
    """Per-image ``(B, 2, classes)`` pixel counts: intersection and union of each class."""
    out = []
    for c in range(classes):
        p, t = pred == c, target == c
        out.append(torch.stack([(p & t).flatten(1).sum(1), (p | t).flatten(1).sum(1)], 1))
    return torch.stack(out, 2)


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, resamples: int = 2000, seed: int = 0):
    """mIoU(a) - mIoU(b) on the whole set and its 95 % interval, resampling the images (the
    same resample for both methods; mIoU pooled over the resampled images, as the table's)."""
    def miou(c):  # (..., N, 2, K) -> (...)
        s = c.sum(-3).double()
        return (s[..., 0, :] / s[..., 1, :].clamp_min(1)).mean(-1)

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.shape[0], (resamples, a.shape[0]), generator=g)
    diffs = miou(a[idx]) - miou(b[idx])
    lo, hi = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(miou(a) - miou(b)), lo, hi


def ti_space():
    import ttach_instance as ti

    return ti.get_space("paper12")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=["data", "train", "labels", "fit", "eval", "all", "predictor-cost", "cost"])
    p.add_argument("--runs", default="runs/seg_tin")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--labels", type=int, default=8000, help="train images to label (predictor train + valid)")
    p.add_argument("--draws", type=int, default=1, help="corruption draws per labelled image (rows = labels x draws)")
    p.add_argument("--recipe", default="segmentation-small24",
                   help="the loss predictor's recipe: architecture, FitConfig, tau (default: %(default)s)")
    p.add_argument("--n-val", type=int, default=1000)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    stages = ["data", "train", "labels", "fit", "eval"] if args.stage == "all" else [args.stage]
    for stage in stages:
        t0 = time.time()
        if stage == "data":
            stage_data(runs)
        elif stage == "train":
            stage_train(runs, args.epochs, args.width)
        elif stage == "labels":
            stage_labels(runs, args.labels, args.draws)
        elif stage == "fit":
            stage_fit(runs, args.labels, args.draws, args.recipe)
        elif stage == "predictor-cost":
            stage_predictor_cost(runs)
        elif stage == "cost":
            stage_cost(runs, fit_dir(runs, args.recipe, args.labels, args.draws), args.n_val)
        elif stage == "eval":
            stage_eval(runs, fit_dir(runs, args.recipe, args.labels, args.draws), args.n_val)
        else:
            raise SystemExit(f"stage {stage} not implemented yet")
        print(f"[{stage}] done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
