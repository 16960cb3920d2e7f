"""Loss-guided TTA for segmentation, end to end on real data (CPU friendly).

Task: box-mask foreground/background segmentation on the 20-class Tiny ImageNet split in
``../shared/data/tinyimagenet-dev20`` (``boxes.tsv`` gives one object box per image; the mask
is 1 inside the box, inclusive pixel coordinates, 0 outside). Stages, each cached under
``--runs`` (default ``runs/seg_tin``, git-ignored) and skipped when its output exists:

1. ``data``   decode the JPEGs once into ``data.npz`` (uint8 images, uint8 masks).
2. ``train``  a compact U-Net (``pretrained=False``, random init) on the clean train split;
              resumable per epoch (``unet.safetensors`` + ``unet.json``).
3. ``labels`` per-image segmentation losses of every ``paper12`` candidate (mean pixel CE,
              see :class:`ttach_instance.segmentation.SegmentationTask`) on train images, 60 %
              of them under a random common corruption (severity 1-5).
4. ``fit``    the loss predictor on those labels (listwise KL + soft Spearman).
5. ``eval``   mIoU / pixel accuracy per method on clean, corrupted and held-out-corruption
              val images, with cost relative to one forward; writes ``table.md``.

Run everything:  ``python examples/segmentation_tinyimagenet.py --stage all``
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
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

#: The loss predictor's configuration (see ttach_instance.predictor.LossPredictor).
PREDICTOR_KWARGS = {"input_size": 64}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Compact U-Net: ``depth`` down/up levels, ``width`` channels at full resolution.

    Takes pixels in [0, 1] (normalises internally), returns logits ``(B, classes, H, W)`` at
    the input resolution (H, W divisible by ``2 ** depth``).
    """

    def __init__(self, classes: int = 2, width: int = 16, depth: int = 3):
        super().__init__()
        self.config = {"classes": classes, "width": width, "depth": depth}
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        chans = [width * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(3, chans[0])] + [_block(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in range(depth)])
        self.dec = nn.ModuleList([_block(2 * chans[i], chans[i]) for i in range(depth)])
        self.head = nn.Conv2d(chans[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else TF.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips.pop()], 1))
        return self.head(x)


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


def stage_labels(runs: Path, n: int, chunk: int = 500, prob: float = 0.6, seed: int = 1) -> Path:
    """Per-image loss of every paper12 candidate, in resumable chunks of ``chunk`` images."""
    from ttach_instance.segmentation import SegmentationTask

    out = runs / f"labels_{n}.npz"
    if out.exists():
        return out
    space = ti_space()
    model = load_unet(runs / "unet")
    task = SegmentationTask(loss="ce")
    data = load_data(runs)
    parts = []
    for s in range(0, n, chunk):
        part = runs / f"labels_{n}_part{s // chunk:03d}.npz"
        if not part.exists():
            t0 = time.time()
            rng = np.random.default_rng(seed * 100003 + s)
            imgs = data["train_images"][s : s + chunk]
            names = [str(rng.choice(COMMON)) if rng.random() < prob else "" for _ in range(len(imgs))]
            imgs = corrupt_batch(imgs, names, rng.integers(1, 6, len(imgs)))
            target = torch.from_numpy(data["train_masks"][s : s + chunk]).long()
            x = to_tensor(imgs)
            losses = torch.cat([task.view_losses(model, space, x[i : i + 100], target[i : i + 100]) for i in range(0, len(x), 100)])
            np.savez(part, images=imgs, losses=losses.numpy(), names=np.array(names))
            print(f"  labels {s + len(imgs)}/{n} ({time.time() - t0:.0f}s)", flush=True)
        parts.append(np.load(part))
    np.savez(
        out,
        images=np.concatenate([p["images"] for p in parts]),
        losses=np.concatenate([p["losses"] for p in parts]),
        names=np.concatenate([p["names"] for p in parts]),
    )
    return out


def soft_rank(x: torch.Tensor, temp: float = 0.1) -> torch.Tensor:
    """Pairwise-sigmoid soft rank along the last dim: rank_i = sum_j sigmoid((x_i - x_j) / t)."""
    return torch.sigmoid((x[..., :, None] - x[..., None, :]) / temp).sum(-1)


def ranking_loss(pred: torch.Tensor, losses: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """Listwise KL (target softmin of per-image standardised losses) + (1 - soft Spearman)."""
    z = (losses - losses.mean(1, keepdim=True)) / losses.std(1, keepdim=True).clamp_min(1e-6)
    target = torch.softmax(-z / tau, 1)
    kl = TF.kl_div(torch.log_softmax(-pred, 1), target, reduction="batchmean")
    rp, rt = soft_rank(pred), soft_rank(losses, temp=1e-3)
    rp = rp - rp.mean(1, keepdim=True)
    rt = rt - rt.mean(1, keepdim=True)
    spearman = (rp * rt).sum(1) / (rp.norm(dim=1) * rt.norm(dim=1)).clamp_min(1e-6)
    return kl + (1 - spearman).mean()


def make_predictor(space):
    """The library's ``LossPredictor`` (EfficientNet-B0 at 64 px, random init) when present,
    else the light :class:`ttach_instance.models.SmallLossPredictor` (same contract)."""
    try:
        from ttach_instance.predictor import LossPredictor
    except ImportError:
        from ttach_instance.models import SmallLossPredictor

        print("  (ttach_instance.predictor is not available: using models.SmallLossPredictor)", flush=True)
        return SmallLossPredictor(space, width=16, **PREDICTOR_KWARGS)
    return LossPredictor(space, pretrained=False, **PREDICTOR_KWARGS)


def load_predictor(runs: Path):
    from ttach_instance.models import load_predictor as load

    return load(str(runs / "predictor.safetensors")).eval()


def stage_fit(runs: Path, n_labels: int, epochs: int, batch: int = 64) -> Path:
    """Train the loss predictor on the labels: 80 % train / 20 % valid split, cutout
    on the predictor input (no flips), AdamW + one-cycle; keeps the epoch with the best valid Spearman."""
    out = runs / "predictor"
    if (runs / "predictor_fit.json").exists():
        return out
    lab = np.load(stage_labels(runs, n_labels))
    x_all = torch.from_numpy(lab["images"]).permute(0, 3, 1, 2)
    l_all = torch.from_numpy(lab["losses"]).float()
    n = len(x_all)
    n_tr = int(0.8 * n)
    space = ti_space()
    pred = make_predictor(space)
    opt = torch.optim.AdamW(pred.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(n_tr / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    best = -2.0
    history = []
    for epoch in range(epochs):
        pred.train()
        perm = torch.randperm(n_tr, generator=g)
        t0, total = time.time(), 0.0
        for s in range(0, n_tr, batch):
            idx = perm[s : s + batch]
            x = x_all[idx].float().div(255)
            # cutout on the predictor's input (a 16x16 hole), as in the paper
            cy, cx = torch.randint(0, 64, (2,), generator=g).tolist()
            x[:, :, max(cy - 8, 0) : cy + 8, max(cx - 8, 0) : cx + 8] = 0.5
            loss = ranking_loss(pred(x), l_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        rho, top1 = predictor_quality(pred, x_all[n_tr:], l_all[n_tr:])
        history.append({"epoch": epoch + 1, "loss": total / n_tr, "valid_spearman": rho, "valid_top1_loss": top1})
        print(f"  predictor epoch {epoch + 1}/{epochs} loss {total / n_tr:.4f} valid spearman {rho:.3f} "
              f"chosen-view loss {top1:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if rho > best:
            best = rho
            pred.save(str(out) + ".safetensors")
    v = l_all[n_tr:]
    summary = {
        "history": history,
        "valid_identity_loss": float(v[:, 0].mean()),
        "valid_oracle_loss": float(v.min(1).values.mean()),
        "best_valid_spearman": best,
        "predictor": type(pred).__name__,
    }
    (runs / "predictor_fit.json").write_text(json.dumps(summary, indent=1))
    return out


@torch.no_grad()
def predictor_quality(pred, x: torch.Tensor, losses: torch.Tensor):
    """Mean per-image Spearman of predicted vs true losses, and the true loss of the top-1 pick."""
    pred.eval()
    scores = torch.cat([pred(x[i : i + 200].float().div(255)) for i in range(0, len(x), 200)])
    pred.train()
    rs = scores.argsort(1).argsort(1).float()
    rt = losses.argsort(1).argsort(1).float()
    rs, rt = rs - rs.mean(1, keepdim=True), rt - rt.mean(1, keepdim=True)
    rho = float(((rs * rt).sum(1) / (rs.norm(dim=1) * rt.norm(dim=1)).clamp_min(1e-6)).mean())
    top1 = float(losses.gather(1, scores.argmin(1, keepdim=True)).mean())
    return rho, top1


@torch.no_grad()
def stage_eval(runs: Path, n_val: int = 1000, batch: int = 100) -> Path:
    """mIoU / pixel accuracy per method and condition; cost relative to Identity (wall time of
    the whole method on this machine, predictor included, and model forwards per image)."""
    import ttach as tta
    from ttach_instance.segmentation import (
        ConfusionMatrix,
        LossGuidedSegmentationWrapper,
        OracleKSegmentationWrapper,
        RandomKSegmentationWrapper,
        SegmentationTTAWrapper,
    )

    model = load_unet(runs / "unet")
    predictor = load_predictor(runs)
    space = predictor.space
    data = load_data(runs)
    target_all = torch.from_numpy(data["val_masks"][:n_val]).long()
    conditions = {
        "clean": data["val_images"][:n_val],
        "corrupted": corrupted_set(runs, "val", "common", n_val, seed=7)[0],
        "held-out corruptions": corrupted_set(runs, "val", "heldout", n_val, seed=8)[0],
    }
    ck = {"chunk_size": batch}  # one model call per `batch` views: big CPU batches run slower per image
    methods = {
        "Identity": (lambda m: m, 1),
        "H-Flip": (lambda m: SegmentationTTAWrapper(m, "hflip", **ck), 2),
        "D4 (ttach)": (lambda m: tta.SegmentationTTAWrapper(m, tta.aliases.d4_transform(), merge_mode="mean"), 8),
        "paper12 full mean": (lambda m: SegmentationTTAWrapper(m, space, **ck), 12),
        "Random k=1": (lambda m: RandomKSegmentationWrapper(m, space, k=1, generator=torch.Generator().manual_seed(0), **ck), 1),
        "Ours k=1": (lambda m: LossGuidedSegmentationWrapper(m, predictor, k=1, **ck), 1),
        "Ours k=1, coverage=identity": (lambda m: LossGuidedSegmentationWrapper(m, predictor, k=1, coverage="identity", **ck), 2),
        "Ours k=2": (lambda m: LossGuidedSegmentationWrapper(m, predictor, k=2, **ck), 2),
        "Oracle k=1": (lambda m: OracleKSegmentationWrapper(m, space, k=1, **ck), "12+1"),
    }
    results = {}
    for cond, imgs in conditions.items():
        x_all = to_tensor(imgs)
        for name, (make, forwards) in methods.items():
            wrapper = make(model)
            cm = ConfusionMatrix(2)
            picks = torch.zeros(len(space), dtype=torch.long)
            for s in range(0, n_val, batch):
                x, y = x_all[s : s + batch], target_all[s : s + batch]
                if name.startswith("Oracle"):
                    out = wrapper(x, target=y)
                elif hasattr(wrapper, "run") and name.startswith("Ours k=1"):
                    r = wrapper.run(x)
                    out = r["output"]
                    picks += torch.bincount(r["index"][:, 0], minlength=len(space))
                else:
                    out = wrapper(x)
                cm.update(out.argmax(1), y)
            m = cm.metrics()
            results[(cond, name)] = {"miou": m["miou"], "pixel_acc": m["pixel_acc"], "forwards": forwards}
            if name == "Ours k=1":
                results[(cond, name)]["picks"] = {space.names[i]: int(c) for i, c in enumerate(picks) if c}
            print(f"  {cond:22s} {name:30s} mIoU {m['miou']:.4f} acc {m['pixel_acc']:.4f}", flush=True)
    # Cost: median wall time of one batch of `batch` clean images (after a warm-up batch),
    # predictor and all TTA work included, relative to the plain model.
    x_all, times = to_tensor(conditions["clean"]), {}
    for name, (make, _) in methods.items():
        wrapper = make(model)
        runs_t = []
        for r in range(4):
            x, y = x_all[r * batch : (r + 1) * batch], target_all[r * batch : (r + 1) * batch]
            t0 = time.perf_counter()
            wrapper(x, target=y) if name.startswith("Oracle") else wrapper(x)
            runs_t.append(time.perf_counter() - t0)
        times[name] = sorted(runs_t[1:])[1]
        print(f"  cost {name:30s} {times[name] * 1e3:.0f} ms / {batch} images", flush=True)
    for (cond, name), v in results.items():
        v["time_ms_per_batch"] = times[name] * 1e3
    lines = ["| method | forwards / image | " + " | ".join(f"{c} mIoU / acc" for c in conditions) + " | time vs Identity |",
             "|---|---|" + "---|" * len(conditions) + "---|"]
    for name, (_, forwards) in methods.items():
        cells = [f"{results[(c, name)]['miou'] * 100:.1f} / {results[(c, name)]['pixel_acc'] * 100:.1f}" for c in conditions]
        rel = times[name] / times["Identity"]
        lines.append(f"| {name} | {forwards} | " + " | ".join(cells) + f" | {rel:.2f}x |")
    picks = {c: results[(c, "Ours k=1")]["picks"] for c in conditions}
    lines.append("")
    lines.append("Ours k=1 picks: " + "; ".join(f"{c}: {p}" for c, p in picks.items()))
    table = "\n".join(lines)
    (runs / "table.md").write_text(table + "\n")
    (runs / "results.json").write_text(json.dumps({f"{c}|{n}": v for (c, n), v in results.items()}, indent=1))
    print(table)
    return runs / "table.md"


def ti_space():
    import ttach_instance as ti

    return ti.get_space("paper12")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=["data", "train", "labels", "fit", "eval", "all"])
    p.add_argument("--runs", default="runs/seg_tin")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--labels", type=int, default=8000, help="train images to label (predictor train + valid)")
    p.add_argument("--pred-epochs", type=int, default=15)
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
            stage_labels(runs, args.labels)
        elif stage == "fit":
            stage_fit(runs, args.labels, args.pred_epochs)
        elif stage == "eval":
            stage_eval(runs, args.n_val)
        else:
            raise SystemExit(f"stage {stage} not implemented yet")
        print(f"[{stage}] done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
