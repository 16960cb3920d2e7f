"""Independent PIL implementation of the paper's op pipeline, used as the parity reference.

Geometric ops run on a 3x mirror-expanded canvas (numpy ``symmetric`` padding) and the centre
is cropped back; sharpness also filters the expanded canvas so the border ring is filtered.
"""

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def expand(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    pad = ((h, h), (w, w)) + ((0, 0),) * (arr.ndim - 2)
    return Image.fromarray(np.pad(arr, pad, mode="symmetric"))


def center_crop(canvas: Image.Image, w: int, h: int) -> Image.Image:
    cw, ch = canvas.size
    left, top = (cw - w) // 2, (ch - h) // 2
    return canvas.crop((left, top, left + w, top + h))


def rotate(img, angle):
    w, h = img.size
    return center_crop(expand(img).rotate(angle, resample=Image.BICUBIC), w, h)


def zoom(img, scale):
    w, h = img.size
    canvas = expand(img)
    size = (int(round(3 * w * scale)), int(round(3 * h * scale)))
    return center_crop(canvas.resize(size, Image.BICUBIC), w, h)


def autocontrast(img):
    return ImageOps.autocontrast(img)


def sharpness(img, factor):
    w, h = img.size
    return center_crop(ImageEnhance.Sharpness(expand(img)).enhance(factor), w, h)


def color(img, factor):
    return ImageEnhance.Color(img).enhance(factor)


def identity(img):
    return img.copy()


PAPER12 = [
    ("identity", identity, ()),
    ("rotate(-20)", rotate, (-20,)),
    ("rotate(20)", rotate, (20,)),
    ("zoom(0.8)", zoom, (0.8,)),
    ("zoom(1.2)", zoom, (1.2,)),
    ("autocontrast", autocontrast, ()),
    ("sharpness(0.2)", sharpness, (0.2,)),
    ("sharpness(0.5)", sharpness, (0.5,)),
    ("sharpness(3.0)", sharpness, (3.0,)),
    ("sharpness(4.0)", sharpness, (4.0,)),
    ("color(0.5)", color, (0.5,)),
    ("color(2.0)", color, (2.0,)),
]


def apply(name: str, img: Image.Image) -> Image.Image:
    for n, fn, args in PAPER12:
        if n == name:
            return fn(img, *args)
    raise KeyError(name)
