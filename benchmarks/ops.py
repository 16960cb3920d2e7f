"""Transform ops: batched tensor kernels vs the paper's PIL per-image loop.

    python benchmarks/ops.py [--batch 32] [--size 224] [--threads 1] [--repeats 7] [--device cpu]
    python benchmarks/ops.py --parity     # fidelity table: mean |tensor - PIL| x255 per op and size

For a batch of RGB photos (scikit-image's astronaut/chelsea/coffee, centre-cropped and
resized, cycled to fill the batch) it times, per op of the paper's space:
- tensor: the op on the float (B, 3, H, W) batch in [0, 1] (ttach_instance ops);
- PIL: for each image, tensor -> uint8 PIL, the paper's PIL op (:data:`PIL_OPS`: geometric ops
  and sharpness on the 3x mirror-expanded canvas, as the paper), PIL -> float tensor, stacked.
  The test suite checks the ops' fidelity against its own PIL reference (tests/pil_reference.py).
Then ``space.apply`` with a random candidate per sample against the single slowest op applied
to the whole batch. Repeats are interleaved (every method once per round) and the median is
reported. Goals (issue #2): the 11 non-identity ops together >= 6x faster than PIL, no op
under 1.5x, and space.apply <= 1.2x the slowest op. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from ttach_instance.builtin_spaces import paper12


def _on_mirrored_canvas(img: Image.Image, fn) -> Image.Image:
    """``fn`` applied to the image mirror-padded to 3x its size, the centre cropped back."""
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    canvas = fn(Image.fromarray(np.pad(arr, ((h, h), (w, w), (0, 0)), mode="symmetric")))
    left, top = (canvas.width - w) // 2, (canvas.height - h) // 2
    return canvas.crop((left, top, left + w, top + h))


#: The paper's ops in PIL, by candidate name stem: the per-image loop the tensor ops replace.
PIL_OPS = {
    "identity": lambda img: img.copy(),
    "rotate": lambda img, a: _on_mirrored_canvas(img, lambda c: c.rotate(a, resample=Image.BICUBIC)),
    "zoom": lambda img, s: _on_mirrored_canvas(
        img, lambda c: c.resize((int(round(c.width * s)), int(round(c.height * s))), Image.BICUBIC)),
    "autocontrast": lambda img: ImageOps.autocontrast(img),
    "sharpness": lambda img, f: _on_mirrored_canvas(img, lambda c: ImageEnhance.Sharpness(c).enhance(f)),
    "color": lambda img, f: ImageEnhance.Color(img).enhance(f),
}


def pil_op(name: str, img: Image.Image) -> Image.Image:
    """The PIL op of a paper12 candidate name such as ``"rotate(-20)"``."""
    stem, arg = re.fullmatch(r"(\w+)(?:\((.*)\))?", name).groups()
    return PIL_OPS[stem](img, *([float(arg)] if arg else []))


def photos(batch: int, size: int) -> torch.Tensor:
    import skimage.data

    imgs = []
    for name in ("astronaut", "chelsea", "coffee"):
        img = Image.fromarray(getattr(skimage.data, name)())
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
        imgs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
    return torch.stack([imgs[i % 3] for i in range(batch)])


def pil_loop(images: torch.Tensor, name: str) -> torch.Tensor:
    arrays = (images * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for arr in arrays:
        res = pil_op(name, Image.fromarray(arr))
        out.append(torch.from_numpy(np.array(res)))
    return torch.stack(out).permute(0, 3, 1, 2).float().div_(255)


def parity(sizes=(32, 64, 224)) -> None:
    """Worst (over the three photos) mean absolute difference to PIL, in 8-bit units (the tests
    hold the ops to tests/pil_reference.py; this is the same comparison on this machine)."""
    space = paper12()
    print("| op | " + " | ".join(f"{s} px" for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    batches = {s: photos(3, s) for s in sizes}
    for cand in space:
        cells = []
        for s in sizes:
            x = batches[s]
            ours = cand.apply(x) * 255
            ref = pil_loop(x, cand.name) * 255
            cells.append(f"{float((ours - ref).abs().mean((1, 2, 3)).max()):.2f}")
        print(f"| {cand.name} | " + " | ".join(cells) + " |")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--parity", action="store_true", help="print the PIL fidelity table instead of timings")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.parity:
        parity()
        return
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = getattr(torch, args.dtype)

    space = paper12()
    images_cpu = photos(args.batch, args.size)
    images = images_cpu.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, len(space), (args.batch,), generator=g).to(device)

    def tensor_fn(cand):
        def run():
            cand.apply(images)
            sync()

        return run

    methods = {}
    for cand in space:
        if cand.is_identity:
            continue
        methods[("tensor", cand.name)] = tensor_fn(cand)
        methods[("pil", cand.name)] = lambda n=cand.name: pil_loop(images_cpu, n)

    def apply_space():
        space.apply(images, index)
        sync()

    methods[("space", "apply")] = apply_space
    for fn in methods.values():  # warm-up
        fn()
    times = {k: [] for k in methods}
    for _ in range(args.repeats):
        for k, fn in methods.items():
            times[k].append(timed(fn))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}

    names = [c.name for c in space if not c.is_identity]
    print(
        f"batch {args.batch}x3x{args.size}x{args.size} {args.dtype} on {device}, {args.threads} thread(s), "
        f"median of {args.repeats} interleaved repeats, torch {torch.__version__}\n"
    )
    print("| op | tensor ms | PIL loop ms | PIL / tensor |")
    print("|---|---:|---:|---:|")
    for n in names:
        t, pl = med[("tensor", n)], med[("pil", n)]
        print(f"| {n} | {t:.1f} | {pl:.1f} | {pl / t:.1f}x |")
    tot_t = sum(med[("tensor", n)] for n in names)
    tot_p = sum(med[("pil", n)] for n in names)
    worst = min(names, key=lambda n: med[("pil", n)] / med[("tensor", n)])
    print(f"| **all 11 ops** | {tot_t:.1f} | {tot_p:.1f} | **{tot_p / tot_t:.1f}x** |")
    slowest = max(names, key=lambda n: med[("tensor", n)])
    sa = med[("space", "apply")]
    print()
    print(f"lowest ratio: {worst} {med[('pil', worst)] / med[('tensor', worst)]:.1f}x (goal >= 1.5x); all ops together goal >= 6x")
    print(
        f"space.apply, random candidate per sample: {sa:.1f} ms vs slowest op {slowest} on the whole batch "
        f"{med[('tensor', slowest)]:.1f} ms: {sa / med[('tensor', slowest)]:.2f}x (goal <= 1.2x)"
    )


if __name__ == "__main__":
    main()
