"""``ttach-instance demo``: the whole pipeline in a few minutes on CPU, nothing downloaded.

A small classification task is synthesised from scikit-image's bundled photos: each class is
one photo, samples are random crops of it (train crops from the left 70 % of the photo,
validation crops from the right 30 %, so they never overlap). A small ResNet is trained on it
from scratch, loss labels are generated with training-time corruptions, a loss predictor is
fitted, and the methods table is printed for clean and corrupted validation crops.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
               "brick", "grass", "gravel")
#: The demo's target model factory (allow-listed in :mod:`ttach_instance.model_spec`).
DEMO_TARGET = "ttach_instance.models:small_resnet"


def _photo(name: str) -> np.ndarray:
    from skimage import data

    arr = getattr(data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


def photo_patch_task(n_train: int = 150, n_val: int = 40, size: int = 64, photos: Sequence[str] = DEMO_PHOTOS,
                     seed: int = 0):
    """``(train, val)`` :class:`~ttach_instance.data.ImageSet` of photo crops; the class is the photo."""
    from PIL import Image

    from .data import ImageSet

    rng = np.random.default_rng(seed)
    out = {"train": ([], []), "val": ([], [])}
    for ci, name in enumerate(photos):
        arr = _photo(name)
        h, w = arr.shape[:2]
        split = int(0.7 * w)
        for part, count, (x0, x1) in (("train", n_train, (0, split)), ("val", n_val, (split, w))):
            for _ in range(count):
                side = int(rng.integers(max(24, min(h, x1 - x0) // 4), min(h, x1 - x0) + 1))
                top = int(rng.integers(0, h - side + 1))
                left = int(rng.integers(x0, x1 - side + 1))
                crop = Image.fromarray(arr[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
                out[part][0].append(np.asarray(crop))
                out[part][1].append(ci)
    sets = []
    for part in ("train", "val"):
        imgs = torch.from_numpy(np.stack(out[part][0])).permute(0, 3, 1, 2).contiguous()
        sets.append(ImageSet(imgs, torch.tensor(out[part][1]), list(photos), source=f"skimage-photos:{part}"))
    return sets[0], sets[1]


def make_predictor(space, size: int, backbone: Optional[str] = None):
    """The demo's predictor: ``"small"`` (width 8, the target's width, so ``init_from`` can start
    it from the target), or ``"timm"`` with ``backbone``. Nothing is downloaded, so no pretrained
    backbone: at 32 px the light CIFAR-style CNN ranks better and trains faster than a timm
    backbone that halves the image in its stem (docs/BENCHMARKS.md, "Demo")."""
    from .predictors import create_predictor

    if backbone is None:
        return create_predictor("small", space, width=8, input_size=size)
    return create_predictor("timm", space, backbone=backbone, input_size=size)


def run_demo(out_dir: str = "runs/demo", size: int = 32, target_epochs: int = 8, fit_epochs: int = 20, draws: int = 3,
             predictor_size: int = 16, init_from_target: bool = True, distill_weight: float = 0.0,
             corruptions: Sequence[str] = ("gaussian_noise", "defocus_blur", "contrast", "fog", "jpeg_compression"),
             held_out: Sequence[str] = ("speckle_noise", "gaussian_blur"), severities: Sequence[int] = (3,),
             seed: int = 0, progress: bool = True, log: Callable[[str], None] = print) -> Dict:
    """Train target + predictor on the photo-crop task and evaluate; returns the results dict.

    The predictor (as the Tiny ImageNet benchmark's) starts from the target's own trained layers
    and runs them at ``predictor_size`` (16 px: a quarter of the target's pixels and MACs) with
    a fresh ranking head. ``distill_weight``: see :class:`FitConfig`; on this task it makes the
    predictor keep the identity almost always (docs/BENCHMARKS.md, "Demo"), so it is off.
    """
    from .data import build_model, normalizer, resize_uint8
    from .evaluation import evaluate, markdown_table
    from .registry import get_space
    from .model_spec import save_model
    from .training.labels import generate_labels
    from .training.target import accuracy, train_classifier
    from .training.trainer import FitConfig, fit_predictor, flip_permutation

    t0 = time.time()
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    train, val = photo_patch_task(seed=seed)
    log(f"task: {len(train.classes)} classes (bundled photos), {len(train)} train / {len(val)} val crops")
    model = build_model(DEMO_TARGET, num_classes=len(train.classes), kwargs={"width": 8})
    norm = normalizer(model)
    train_small = resize_uint8(train.images, size)
    train_classifier(model, train_small, train.labels, norm, epochs=target_epochs, batch_size=64, lr=0.05,
                     seed=seed, checkpoint=os.path.join(out_dir, "target_ckpt.safetensors"), progress=progress,
                     log=log)
    # saved with its spec (factory and arguments), so `predict` and `eval` need no --model for it
    save_model(os.path.join(out_dir, "target.safetensors"), model, DEMO_TARGET,
               {"width": 8, "num_classes": len(train.classes)}, {"size": size})
    acc = accuracy(model, resize_uint8(val.images, size), val.labels, norm)
    log(f"target model: clean val error {100 * (1 - acc):.1f}% ({time.time() - t0:.0f}s)")
    space = get_space("paper12")
    cache = generate_labels(model, train.images, train.labels, space, os.path.join(out_dir, "labels"), size=size,
                            draws=draws, corruption_p=0.5, seed=seed, shard_size=500, progress=progress)
    log(f"labels: {cache.manifest()['total_rows']} rows x {len(space)} candidates ({time.time() - t0:.0f}s)")
    predictor = make_predictor(space, predictor_size)
    if init_from_target:  # the stand-in for the pretrained backbone the paper starts from
        predictor.init_from(model)
    cfg = FitConfig(epochs=fit_epochs, batch_size=64, optimizer="adamw", lr=3e-3, weight_decay=0.05, warmup_steps=20,
                    ema_decay=0.98, seed=seed, flip_permutation=flip_permutation(space), clean_tolerance=0.5,
                    group_weight=1.0,  # the corruption-recognition term, as the Tiny ImageNet benchmark's recipe
                    distill_weight=distill_weight)
    res = fit_predictor(predictor, cache.load(), os.path.join(out_dir, "fit"), cfg, num_images=len(train),
                        progress=progress, log=log)
    log(f"predictor: held-out Spearman {res['final'].get('val_spearman', float('nan')):.3f} ({time.time() - t0:.0f}s)")
    results = evaluate(model, val.images, val.labels, space, os.path.join(out_dir, "eval"), predictor=predictor,
                       size=size, corruptions=corruptions, held_out=held_out, severities=severities, seed=seed,
                       methods=DEMO_METHODS, cost_images=128, progress=progress, log=log)
    print(markdown_table(results))
    log(f"demo finished in {time.time() - t0:.0f}s; table, JSON and plots in {os.path.join(out_dir, 'eval')}")
    log("classify any image with what the demo trained (here one of its validation crops):\n  "
        + predict_command(out_dir, val, size))
    return results


#: The demo's table: the paper's Table-1 rows (the paper-crop and logit-averaging variants are in
#: ``ttach-instance eval``; left out here so the demo stays a few minutes).
DEMO_METHODS = ("identity", "hflip", "five_crops", "ten_crops", "random_k1", "random_k2", "random_k4", "full_mean",
                "ours_k1", "ours_k2", "ours_k1_hflip", "ours_k2_hflip", "oracle_k1")


def predict_command(out_dir: str, val, size: int) -> str:
    """The ``ttach-instance predict`` command line for the demo's target and predictor, with a
    validation crop written to ``out_dir/example.png`` and the class names to ``classes.txt``.
    No ``--model`` nor ``--num-classes``: the target's file records its spec (:func:`save_model`)."""
    from PIL import Image

    example, classes = os.path.join(out_dir, "example.png"), os.path.join(out_dir, "classes.txt")
    Image.fromarray(val.images[0].permute(1, 2, 0).numpy()).save(example)
    with open(classes, "w") as f:
        f.write("\n".join(val.classes) + "\n")
    return (f"ttach-instance predict --weights {os.path.join(out_dir, 'target.safetensors')} "
            f"--predictor {os.path.join(out_dir, 'fit', 'predictor.safetensors')} --size {size} "
            f"--classes {classes} {example}")
