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


# RandAugment ops (tests/test_randaugment_ops.py). Geometric ones are PIL's affine transform
# (bicubic) on the mirror-expanded canvas, about its centre, centre cropped back.


def _affine(img, data):
    w, h = img.size
    canvas = expand(img)
    return center_crop(canvas.transform(canvas.size, Image.AFFINE, data, resample=Image.BICUBIC), w, h)


def translate_x(img, fraction):
    return _affine(img, (1, 0, -fraction * img.size[0], 0, 1, 0))


def translate_y(img, fraction):
    return _affine(img, (1, 0, 0, 0, 1, -fraction * img.size[1]))


def shear_x(img, shear):
    cy = 1.5 * img.size[1]  # the canvas centre
    return _affine(img, (1, shear, -shear * cy, 0, 1, 0))


def shear_y(img, shear):
    cx = 1.5 * img.size[0]
    return _affine(img, (1, 0, 0, shear, 1, -shear * cx))


def brightness(img, factor):
    return ImageEnhance.Brightness(img).enhance(factor)


def contrast(img, factor):
    return ImageEnhance.Contrast(img).enhance(factor)


def equalize(img):
    return ImageOps.equalize(img)


def posterize(img, bits):
    return ImageOps.posterize(img, bits)


def solarize(img, threshold):
    return ImageOps.solarize(img, threshold * 255)


RANDAUGMENT = {
    "translate_x": translate_x,
    "translate_y": translate_y,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "brightness": brightness,
    "contrast": contrast,
    "equalize": equalize,
    "posterize": posterize,
    "solarize": solarize,
}
