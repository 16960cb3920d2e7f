#!/usr/bin/env python
"""Write the bundled policy ``demo-photos``: ``ttach-instance search gps`` over paper12 for the
demo's target on the demo's validation crops (nothing downloaded; about a CPU minute).

The setup is ``ttach-instance demo``'s (``ttach_instance.demo_run``): ten classes, each one of
scikit-image's bundled photos, samples are random crops of it; the target is the demo's
``small_resnet`` (width 8) trained 8 epochs at 32 px with the demo's seed and settings. Its 400
validation crops are written as an ImageFolder and searched by the real CLI, so the file is
exactly what ``search gps`` writes (its ``predictions.directory`` names the temporary cache).

Usage: ``python plugins/ttach-instance-gps/scripts/make_demo_policy.py [--n 8] [--out FILE]``
(default ``--out``: the package's ``policies/demo-photos.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from PIL import Image

from ttach_instance.cli import main as cli
from ttach_instance.data import build_model, normalizer, resize_uint8
from ttach_instance.demo_run import photo_patch_task
from ttach_instance.io import atomic_save_tensors
from ttach_instance.training.target import train_classifier

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "src", "ttach_instance_gps", "policies", "demo-photos.json")
FACTORY, KWARGS, SIZE, SEED = "ttach_instance.models:small_resnet", {"width": 8}, 32, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="GPS steps")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    train, val = photo_patch_task(seed=SEED)
    model = build_model(FACTORY, num_classes=len(train.classes), kwargs=KWARGS)
    train_classifier(model, resize_uint8(train.images, SIZE), train.labels, normalizer(model), epochs=8,
                     batch_size=64, lr=0.05, seed=SEED, progress=False)
    with tempfile.TemporaryDirectory() as work:
        weights = os.path.join(work, "target.safetensors")
        atomic_save_tensors(weights, model.state_dict(), {"width": 8, "size": SIZE})
        for i, (image, label) in enumerate(zip(val.images, val.labels.tolist())):
            # folders sort in label order (ImageFolder numbers classes alphabetically)
            folder = os.path.join(work, "data", "val", f"{label:02d}-{val.classes[label]}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:04d}.png"))
        code = cli(["search", "gps", "--predictions", os.path.join(work, "predictions"), "--out", args.out,
                    "--model", FACTORY, "--model-kwargs", json.dumps(KWARGS), "--weights", weights,
                    "--data", os.path.join(work, "data"), "--split", "val", "--space", "paper12",
                    "--size", str(SIZE), "--n", str(args.n)])
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
