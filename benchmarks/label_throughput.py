"""Label generation throughput vs the plain model's throughput / |T|.

    python benchmarks/label_throughput.py [--size 32] [--images 2000] [--threads 1]

Goal: labels/s >= 0.9 x (plain model images/s / |T|): generating labels should cost little more
than the |T| forwards it has to make (transforms, loss, shard writing included; no corruption).
Prints both throughputs and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ttach_instance.data import normalizer
from ttach_instance.models import small_resnet
from ttach_instance.registry import get_space
from ttach_instance.training.labels import generate_labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    space = get_space("paper12")
    model = small_resnet(20, args.width).eval()
    norm = normalizer(model)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 20, (args.images,), generator=g)
    per_batch = 64 * len(space)
    plain_best = label_best = float("inf")
    for _ in range(args.repeats):
        # plain: the same number of model inputs (N x |T|), in the same batch size, inputs already prepared
        x = norm(images[:per_batch].float() / 255)
        reps = args.images * len(space) // per_batch
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(reps):
                model(x)
        plain_best = min(plain_best, (time.perf_counter() - t0) / (reps * per_batch))
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            generate_labels(model, images, labels, space, d, shard_size=1000, batch_size=64, progress=False)
            label_best = min(label_best, (time.perf_counter() - t0) / args.images)
    plain_ips = 1 / plain_best
    label_ips = 1 / label_best
    goal = plain_ips / len(space)
    print(f"plain model: {plain_ips:.0f} images/s -> |T|={len(space)} views: {goal:.1f} images/s ceiling")
    print(f"label generation: {label_ips:.1f} images/s (all {len(space)} candidates, loss, shards)")
    print(f"ratio: {label_ips / goal:.3f} (goal >= 0.90)")


if __name__ == "__main__":
    main()
