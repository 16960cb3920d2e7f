"""Transform ops: the batched kernels against the paper's PIL per-image loop, and the view
builder (``space.apply``) against the ops it applies.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/ops.py [--batch 32] [--size 224]
        [--threads 1] [--repeats 9] [--layout photos nchw] [--clock wall|cpu] [--stat median|min]
        [--device cpu] [--dtype float32]
    python benchmarks/ops.py --parity     # fidelity table: mean |tensor - PIL| x255 per op and size
                                          # (paper12's ops, then the RandAugment ops)

For a batch of RGB photos (scikit-image's astronaut/chelsea/coffee, centre-cropped and
resized, cycled to fill the batch), every non-identity candidate of paper12 is timed three ways
through the public API:

- ``op``: the candidate on the float ``(B, 3, H, W)`` batch in [0, 1] (``space[name].apply``);
- ``apply``: ``space.apply(images, index)`` with every sample on that candidate (the view
  builder on a single-candidate batch), reported as ``apply / op``;
- ``PIL``: the per-image loop a PIL pipeline runs to make the same model input: for each uint8
  photo as loaded, the paper's PIL op (:data:`PIL_OPS`: geometric ops and sharpness on the 3x
  mirror-expanded canvas, as the paper), then the results stacked as a float batch in [0, 1];
  reported as ``PIL / op``. The test suite checks the ops' fidelity against its own PIL
  reference (tests/pil_reference.py).

Layouts: ``photos`` is what users hold after loading HWC photos and permuting them
(``torch.from_numpy(uint8 (B, H, W, 3)).permute(0, 3, 1, 2).float() / 255``: channels-last
strides), ``nchw`` the same values contiguous. Repeats are interleaved (every method once per
round); the median (or the best) is reported. A last line times ``space.apply`` on a batch that
mixes candidates (one drawn per sample) against the mean op time. Goals (issue 13): every op
>= 1.5x the PIL loop, all eleven together >= 6x, ``apply`` <= 1.2x the op. Prints markdown.
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
from ttach_instance.registry import space_from_specs
from ttach_instance.space import TransformSpace


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
    # RandAugment ops (the ``randaugment`` pools): affine maps about the canvas centre, bicubic
    "translate_x": lambda img, t: _on_mirrored_canvas(
        img, lambda c: c.transform(c.size, Image.AFFINE, (1, 0, -t * img.width, 0, 1, 0), resample=Image.BICUBIC)),
    "translate_y": lambda img, t: _on_mirrored_canvas(
        img, lambda c: c.transform(c.size, Image.AFFINE, (1, 0, 0, 0, 1, -t * img.height), resample=Image.BICUBIC)),
    "shear_x": lambda img, s: _on_mirrored_canvas(
        img, lambda c: c.transform(c.size, Image.AFFINE, (1, s, -s * c.height / 2, 0, 1, 0), resample=Image.BICUBIC)),
    "shear_y": lambda img, s: _on_mirrored_canvas(
        img, lambda c: c.transform(c.size, Image.AFFINE, (1, 0, 0, s, 1, -s * c.width / 2), resample=Image.BICUBIC)),
    "brightness": lambda img, f: ImageEnhance.Brightness(img).enhance(f),
    "contrast": lambda img, f: ImageEnhance.Contrast(img).enhance(f),
    "equalize": lambda img: ImageOps.equalize(img),
    "posterize": lambda img, bits: ImageOps.posterize(img, int(bits)),
    "solarize": lambda img, t: ImageOps.solarize(img, t * 255),
}

#: RandAugment ops in the fidelity table (--parity), after paper12's.
RANDAUGMENT_PARITY = [
    {"op": "translate_x", "fraction": 0.1}, {"op": "translate_y", "fraction": -0.27},
    {"op": "shear_x", "shear": 0.3}, {"op": "shear_y", "shear": -0.45},
    {"op": "brightness", "factor": 0.4}, {"op": "brightness", "factor": 1.7},
    {"op": "contrast", "factor": 0.3}, {"op": "contrast", "factor": 1.8},
    {"op": "equalize"}, {"op": "posterize", "bits": 2}, {"op": "solarize", "threshold": 0.5},
]


def pil_op(name: str, img: Image.Image) -> Image.Image:
    """The PIL op of a one-op candidate name such as ``"rotate(-20)"``."""
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
    space = TransformSpace(list(paper12()) + list(space_from_specs(RANDAUGMENT_PARITY)))
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


def photo_batch(arrays: np.ndarray, layout: str) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` photos as a float ``(B, 3, H, W)`` batch in [0, 1]: permuted
    (channels-last strides) for ``photos``, contiguous for ``nchw``."""
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255)
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    return images.contiguous() if layout == "nchw" else images


def timings_ms(methods: dict, repeats: int, clock=time.perf_counter, stat=statistics.median) -> dict:
    """``stat`` of ``repeats`` interleaved timings of each method, in ms. Each timed call follows
    an untimed call of the same method, so every method is timed with its data in cache (else
    a method timed right after another on the same batch reads it warm, the first one cold)."""
    times = {k: [] for k in methods}
    for _ in range(repeats):
        for k, fn in methods.items():
            fn()
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return {k: stat(v) * 1000 for k, v in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--layout", nargs="+", default=["photos", "nchw"], choices=["photos", "nchw"])
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: this thread's CPU time (steadier on a shared machine; CPU and one thread only)")
    p.add_argument("--stat", default="median", choices=["median", "min"],
                   help="min: the best of the repeats (closest to an idle machine when others share it)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--parity", action="store_true", help="print the PIL fidelity table instead of timings")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.parity:
        parity()
        return {}
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    stat = statistics.median if args.stat == "median" else min

    space = paper12()
    arrays = np.ascontiguousarray((photos(args.batch, args.size) * 255).round_().to(torch.uint8)
                                  .permute(0, 2, 3, 1).numpy())
    pil_images = [Image.fromarray(a) for a in arrays]
    batches = {layout: photo_batch(arrays, layout).to(device=device, dtype=getattr(torch, args.dtype))
               for layout in args.layout}
    names = [c.name for c in space if not c.is_identity]

    def pil_loop_from_photos(name):
        out = np.stack([np.asarray(pil_op(name, img)) for img in pil_images])
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255)

    def synced(fn):
        def run():
            fn()
            sync()

        return run

    methods = {}
    mixed = torch.randint(0, len(space), (args.batch,), generator=torch.Generator().manual_seed(0)).to(device)
    for layout, x in batches.items():
        methods[(layout, "mixed")] = synced(lambda x=x: space.apply(x, mixed))
    for name in names:
        index = torch.full((args.batch,), space.index_of(name), dtype=torch.long, device=device)
        methods[("pil", name)] = lambda n=name: pil_loop_from_photos(n)
        for layout, x in batches.items():
            methods[(layout, "op", name)] = synced(lambda x=x, n=name: space[n].apply(x))
            methods[(layout, "apply", name)] = synced(lambda x=x, i=index: space.apply(x, i))
    ms = timings_ms(methods, args.repeats, clock, stat)

    print(
        f"paper12: batch {args.batch}x3x{args.size}x{args.size} {args.dtype} on {device}, "
        f"{torch.get_num_threads()} thread(s), {args.clock} clock, {args.stat} of {args.repeats} interleaved "
        f"repeats, torch {torch.__version__}\n"
    )
    head, rule = "| op | PIL loop ms |", "|---|---:|"
    for layout in batches:
        head += f" {layout}: op ms | apply ms | apply / op | PIL / op |"
        rule += "---:|---:|---:|---:|"
    print(head)
    print(rule)
    for name in names:
        row = f"| {name} | {ms[('pil', name)]:.1f} |"
        for layout in batches:
            op, ap = ms[(layout, "op", name)], ms[(layout, "apply", name)]
            row += f" {op:.1f} | {ap:.1f} | {ap / op:.2f}x | {ms[('pil', name)] / op:.1f}x |"
        print(row)
    total_pil = sum(ms[("pil", n)] for n in names)
    row = f"| **all {len(names)}** | {total_pil:.1f} |"
    summary = {}
    for layout in batches:
        op = sum(ms[(layout, "op", n)] for n in names)
        ap = sum(ms[(layout, "apply", n)] for n in names)
        row += f" {op:.1f} | {ap:.1f} | {ap / op:.2f}x | **{total_pil / op:.1f}x** |"
        low = min(names, key=lambda n: ms[("pil", n)] / ms[(layout, "op", n)])
        high = max(names, key=lambda n: ms[(layout, "apply", n)] / ms[(layout, "op", n)])
        summary[layout] = {
            "all_pil_over_op": total_pil / op,
            "lowest_pil_over_op": (low, ms[("pil", low)] / ms[(layout, "op", low)]),
            "highest_apply_over_op": (high, ms[(layout, "apply", high)] / ms[(layout, "op", high)]),
        }
    print(row)
    print()
    for layout, s in summary.items():
        (low, r_low), (high, r_high) = s["lowest_pil_over_op"], s["highest_apply_over_op"]
        mean_op = sum(ms[(layout, "op", n)] for n in names) / len(names)
        print(f"{layout}: all ops {s['all_pil_over_op']:.1f}x the PIL loop (goal >= 6x); lowest {low} {r_low:.1f}x "
              f"(goal >= 1.5x); highest apply/op {high} {r_high:.2f}x (goal <= 1.2x); space.apply with a candidate "
              f"drawn per sample {ms[(layout, 'mixed')]:.1f} ms, mean op on the whole batch {mean_op:.1f} ms")
    return {"ms": ms, "summary": summary}


if __name__ == "__main__":
    main()
