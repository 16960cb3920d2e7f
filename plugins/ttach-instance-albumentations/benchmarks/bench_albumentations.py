"""Cost of the albumentations CPU path vs ttach-instance's tensor ops.

Times one op applied to a (32, 3, 224, 224) float batch in [0, 1], median of --repeats runs
after one warm-up, and splits the albumentations path into conversion (tensor -> uint8 HWC
numpy -> tensor) and the albumentations calls themselves.

    python plugins/ttach-instance-albumentations/benchmarks/bench_albumentations.py --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import ttach_instance as ti
from ttach_instance_albumentations import default_transforms, from_uint8_hwc, space_from_albumentations, to_uint8_hwc


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import cv2

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
    shape = f"{args.batch}x3x{args.size}x{args.size}"
    print(f"# {shape} float32 on {args.device}, {args.threads} thread(s), median of {args.repeats}; "
          f"torch {torch.__version__}, opencv {cv2.__version__}, {platform.processor() or platform.machine()}")
    print("| path | op | ms / batch |")
    print("| --- | --- | ---: |")

    def sync():
        if x.is_cuda:
            torch.cuda.synchronize()

    conv = median_ms(lambda: (from_uint8_hwc(to_uint8_hwc(x), x), sync()), args.repeats)
    print(f"| albumentations | conversion only (tensor -> uint8 HWC -> tensor) | {conv:.1f} |")
    albu = space_from_albumentations(list(default_transforms().values()), names=list(default_transforms()))
    for cand in albu.candidates[1:]:
        op = cand.ops[0]
        ms = median_ms(lambda: (op.apply(x), sync()), args.repeats)
        print(f"| albumentations | {cand.name} | {ms:.1f} |")
    paper = ti.get_space("paper12")
    for cand in paper.candidates[1:]:
        ms = median_ms(lambda: (cand.apply(x), sync()), args.repeats)
        print(f"| tensor (paper12) | {cand.name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
