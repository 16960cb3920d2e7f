"""Datasets as in-memory uint8 tensors, and target models from a spec.

Datasets: an ImageFolder directory (``root/<class>/<image>``) or torchvision CIFAR-10/100
(when ``root`` already holds them; nothing is downloaded). Images come back as a uint8
tensor ``(N, 3, H, W)`` (resized to ``size`` when given) with int64 labels.

Models: ``timm:<name>`` or a bare timm name, or ``package.module:factory`` (any callable
returning an ``nn.Module``), optionally with a weights file (safetensors, or a state dict
read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
#: Sub-directory names that mark a dataset root as split (``root/<split>/<class>/<image>``).
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded whole (corrupt, truncated, not an image, too large)."""

    def __init__(self, path: str, reason: BaseException):
        self.path = path
        super().__init__(f"image {path!r} cannot be read ({type(reason).__name__}: {reason}); fix or remove it"
                         f" (the CLI's --skip-bad-images skips such files)")


def read_image(path: str, size: Optional[int] = None) -> np.ndarray:
    """The image file at ``path`` as uint8 ``(H, W, 3)``, resized (bicubic) to ``size x size``
    when given. A file that cannot be decoded whole is an :class:`UnreadableImageError` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return _resize_uint8(img, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(path, e) from None


def _common_size(arrays: List[np.ndarray], paths: List[str], mixed_size: Optional[int], where: str) -> List[np.ndarray]:
    """``arrays`` if they share one size; else all resized to ``mixed_size`` when given, else a
    ``ValueError`` naming two files of different sizes."""
    shapes = [a.shape[:2] for a in arrays]
    if len(set(shapes)) <= 1:
        return arrays
    if mixed_size is None:
        j = next(i for i, sh in enumerate(shapes) if sh != shapes[0])
        raise ValueError(f"images of {where} differ in size ({shapes[0][1]}x{shapes[0][0]} {paths[0]!r}, "
                         f"{shapes[j][1]}x{shapes[j][0]} {paths[j]!r}); give a size (size=, the CLI's --size) "
                         f"to resize them all")
    from PIL import Image

    return [_resize_uint8(Image.fromarray(a), mixed_size) for a in arrays]


def _check_uint8_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"images must be a uint8 tensor (N, 3, H, W), got {getattr(images, 'dtype', type(images))}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 channels (N, 3, H, W), got shape {tuple(images.shape)}")


@dataclass
class ImageSet:
    """Images ``(N, 3, H, W)`` uint8, labels ``(N,)`` int64, class names, and where they came from."""

    images: Tensor
    labels: Tensor
    classes: List[str]
    source: str = ""
    paths: List[str] = field(default_factory=list)
    #: Unreadable files left out (``skip_bad=True``).
    skipped: List[str] = field(default_factory=list)

    def __post_init__(self):
        _check_uint8_images(self.images)
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, rows: Sequence[int]) -> "ImageSet":
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        paths = [self.paths[i] for i in rows_t.tolist()] if self.paths else []
        return ImageSet(self.images[rows_t], self.labels[rows_t], list(self.classes), self.source, paths,
                        list(self.skipped))


def _resize_uint8(img, size: Optional[int]):
    from PIL import Image

    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC, reducing_gap=None)
    return np.array(img, dtype=np.uint8)  # writable: torch.from_numpy warns on read-only arrays


def load_image_folder(root: str, size: Optional[int] = None, limit_per_class: Optional[int] = None,
                      progress: bool = True, skip_bad: bool = False, mixed_size: Optional[int] = None) -> ImageSet:
    """Every image under ``root/<class>/`` (classes sorted by name, as torchvision's ImageFolder).

    ``size``: every image resized to ``size x size``. Otherwise the images must share one size,
    or are all resized to ``mixed_size`` when given. A file that cannot be decoded is an
    :class:`UnreadableImageError` naming it, or with ``skip_bad`` left out and listed in the
    set's ``skipped``.
    """
    from tqdm import tqdm

    if not os.path.isdir(root):
        raise ValueError(f"root must be an ImageFolder directory (root/<class>/<image>), {root!r} is not a directory")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"root {root!r} has no class sub-directories (expected root/<class>/<image>)")
    paths, labels = [], []
    for ci, cls in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, cls)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if limit_per_class is not None:
            files = files[:limit_per_class]
        paths += [os.path.join(root, cls, f) for f in files]
        labels += [ci] * len(files)
    if not paths:
        raise ValueError(f"root {root!r} holds no images with extensions {IMAGE_EXTENSIONS}")
    arrays, kept, kept_labels, skipped = [], [], [], []
    for p, label in tqdm(list(zip(paths, labels)), desc=f"loading {os.path.basename(os.path.normpath(root))}",
                         disable=not progress, leave=False):
        try:
            arrays.append(read_image(p, size))
        except UnreadableImageError:
            if not skip_bad:
                raise
            skipped.append(p)
            continue
        kept.append(p)
        kept_labels.append(label)
    if not arrays:
        raise ValueError(f"root {root!r}: none of its {len(paths)} images could be read")
    arrays = _common_size(arrays, kept, mixed_size, repr(root))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(kept_labels, dtype=torch.long), classes, source=root, paths=kept,
                    skipped=skipped)


def load_cifar(root: str, name: str = "cifar10", train: bool = False, size: Optional[int] = None) -> ImageSet:
    """torchvision CIFAR-10/100 already present under ``root`` (never downloads)."""
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}.get(name)
    if cls is None:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    try:
        ds = cls(root, train=train, download=False)
    except RuntimeError as exc:
        raise ValueError(f"root {root!r} does not hold {name} (torchvision's layout; nothing is downloaded): {exc}") from None
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    if size is not None and size != images.shape[-1]:
        images = resize_uint8(images, size)
    return ImageSet(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes), source=f"{name}:{root}")


def load_dataset(spec: str, split: str = "val", size: Optional[int] = None, skip_bad: bool = False,
                 mixed_size: Optional[int] = None) -> ImageSet:
    """``cifar10:ROOT`` / ``cifar100:ROOT`` (``split`` ``train``, or ``val``/``test`` for the test
    set) or an ImageFolder path: ``spec/<split>/`` when ``spec`` holds split directories
    (:data:`SPLIT_NAMES`; a missing ``split`` is an error naming it), else ``spec`` itself.
    ``size``, ``skip_bad``, ``mixed_size``: see :func:`load_image_folder`."""
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"dataset must be a path or 'cifar10:ROOT', got {spec!r}")
    for name in ("cifar10", "cifar100"):
        if spec.startswith(name + ":"):
            if split not in ("train", "val", "test"):
                raise ValueError(f"split of {name} must be 'train', 'val' or 'test' (both the test set), got {split!r}")
            return load_cifar(spec[len(name) + 1:], name, train=(split == "train"), size=size)
    if not os.path.isdir(spec):
        raise ValueError(f"dataset {spec!r} is not a directory (an ImageFolder root) nor cifar10:ROOT / cifar100:ROOT")
    sub = os.path.join(spec, split)
    if os.path.isdir(sub):
        root = sub
    else:
        present = sorted(d for d in os.listdir(spec) if d in SPLIT_NAMES and os.path.isdir(os.path.join(spec, d)))
        if present:
            raise ValueError(f"split {split!r} not found: {sub!r} is not a directory (dataset {spec!r} holds the "
                             f"splits {present})")
        root = spec
    return load_image_folder(root, size=size, skip_bad=skip_bad, mixed_size=mixed_size)


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of a uint8 batch ``(N, 3, H, W)`` to ``size x size``."""
    out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- models
def load_state_dict(path: str) -> Dict[str, Tensor]:
    """A state dict from safetensors or a torch file read with ``weights_only=True`` (no pickle code)."""
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ValueError(f"weights must be an existing file (.safetensors or a torch state dict), got {path!r}")
    if path.endswith(".safetensors"):
        from .io import load_tensors

        return load_tensors(path)[0]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling refusals, truncated zips, foreign formats
        raise ValueError(f"weights {path!r} are not a readable torch state dict (weights_only): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights {path!r} must hold a state dict, got {type(state).__name__}")
    return state


def build_model(spec: str, num_classes: Optional[int] = None, weights: Optional[str] = None,
                kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Build a model from ``timm:NAME`` / ``NAME`` (timm, ``pretrained=False``) or ``module:factory``."""
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"model must be a timm name or 'package.module:factory', got {spec!r}")
    kwargs = dict(kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if ":" in spec and not spec.startswith("timm:"):
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"model {spec!r}: cannot import module {module_name!r} ({exc})") from None
        factory = getattr(module, attr, None)
        if factory is None or not callable(factory):
            raise ValueError(f"model {spec!r}: module {module_name!r} has no callable {attr!r}")
        try:
            model = factory(**kwargs)
        except Exception as e:  # noqa: BLE001 - the user's factory and arguments: report, do not trace
            raise ValueError(f"model {spec!r}: {attr}(**{kwargs}) failed: {type(e).__name__}: {e}") from None
    else:
        import timm

        name = spec[5:] if spec.startswith("timm:") else spec
        if not timm.list_models(name):
            raise ValueError(f"model {spec!r}: not a timm model name nor 'package.module:factory'")
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except Exception as e:  # noqa: BLE001 - timm's refusal of the arguments, reported
            raise ValueError(f"model {spec!r}: timm cannot build it with {kwargs}: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {spec!r}: the factory returned {type(model).__name__}, expected an nn.Module")
    if weights:
        try:
            missing, unexpected = model.load_state_dict(load_state_dict(weights), strict=False)
        except RuntimeError as exc:
            raise ValueError(f"weights {weights!r} do not fit model {spec!r}: {str(exc).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ValueError(f"weights {weights!r} do not fit model {spec!r}: missing {list(missing)[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")
    return model.eval()


def model_mean_std(model: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The model's input normalisation for the CLI and benchmarks:
    :func:`~ttach_instance.normalization.resolve_mean_std` (``model.mean/std``, timm's data
    config), else ImageNet's -- the convention of the models these commands train and load.
    (The wrappers themselves never assume ImageNet statistics: pass ``mean``/``std``.)"""
    from .normalization import resolve_mean_std

    mean, std = resolve_mean_std(model)
    if mean is None or std is None:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def normalizer(model: nn.Module):
    """``f(pixels in [0,1]) -> model input`` using :func:`model_mean_std`."""
    mean, std = model_mean_std(model)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)

    def norm(x: Tensor) -> Tensor:
        return (x - m.to(x.device, x.dtype)) / s.to(x.device, x.dtype)

    return norm


# ----------------------------------------------------------------------------- segmentation data
@dataclass
class SegmentationSet:
    """Images ``(N, 3, H, W)`` uint8 with per-pixel class masks ``(N, H, W)`` (uint8, or int32 for
    more than 255 classes; ``ignore_index`` pixels carry no label), ``num_classes`` and names."""

    images: Tensor
    masks: Tensor
    classes: List[str]
    source: str = ""
    paths: List[str] = field(default_factory=list)
    #: Unreadable files left out (``skip_bad=True``).
    skipped: List[str] = field(default_factory=list)

    def __post_init__(self):
        _check_uint8_images(self.images)
        n, _, h, w = self.images.shape
        if not isinstance(self.masks, Tensor) or self.masks.shape != (n, h, w) or self.masks.is_floating_point():
            raise ValueError(f"masks must be integer labels of shape ({n}, {h}, {w}), got "
                             f"{getattr(self.masks, 'dtype', type(self.masks))} {tuple(getattr(self.masks, 'shape', ()))}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, rows: Sequence[int]) -> "SegmentationSet":
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        paths = [self.paths[i] for i in rows_t.tolist()] if self.paths else []
        return SegmentationSet(self.images[rows_t], self.masks[rows_t], list(self.classes), self.source, paths,
                               list(self.skipped))


def resize_masks(masks: Tensor, size: int) -> Tensor:
    """Nearest-neighbour resize of label maps ``(N, H, W)`` to ``size x size`` (labels stay labels)."""
    out = torch.nn.functional.interpolate(masks[:, None].float(), size=(size, size), mode="nearest-exact")
    return out[:, 0].round().to(masks.dtype)


def _stack_masks(arrays: List[np.ndarray]) -> Tensor:
    m = np.stack(arrays)
    return torch.from_numpy(m.astype(np.uint8 if m.max(initial=0) <= 255 else np.int32))


def _load_boxes(root: str, split: str, progress: bool, skip_bad: bool = False):
    """``root/boxes.tsv`` (columns split, path, x0, y0, x1, y1; inclusive pixel boxes): mask 1 inside.
    Paths are relative to ``root`` and must stay inside it; boxes must lie inside their image.
    Returns ``(images, masks, paths, skipped)``."""
    import csv

    from tqdm import tqdm

    table = os.path.join(root, "boxes.tsv")
    try:
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{table!r} cannot be read as a tab-separated table: {e}") from None
    need = {"split", "path", "x0", "y0", "x1", "y1"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{table!r} must have columns {sorted(need)}, got {sorted(k for k in rows[0] if k)}")
    numbered = [(n, r) for n, r in enumerate(rows, 2) if r["split"] == split]  # line 1 is the header
    if not numbered:
        raise ValueError(f"{table!r} has no rows with split {split!r}")
    base = os.path.realpath(root)
    images, masks, paths, skipped = [], [], [], []
    for n, r in tqdm(numbered, desc=f"loading {split} boxes", disable=not progress, leave=False):
        where = f"{table!r} line {n}"
        rel = r["path"] or ""
        path = os.path.join(root, rel)
        if not rel or os.path.isabs(rel) or os.path.commonpath([base, os.path.realpath(path)]) != base:
            raise ValueError(f"{where}: path {rel!r} must be relative to the dataset root and stay inside it")
        try:
            x0, y0, x1, y1 = (int(r[k]) for k in ("x0", "y0", "x1", "y1"))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: x0 y0 x1 y1 must be integers, got "
                             f"{[r[k] for k in ('x0', 'y0', 'x1', 'y1')]}") from None
        if not os.path.isfile(path):
            raise ValueError(f"{where}: image {path!r} does not exist")
        try:
            arr = read_image(path)
        except UnreadableImageError:
            if not skip_bad:
                raise
            skipped.append(path)
            continue
        h, w = arr.shape[:2]
        if not (0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h):
            raise ValueError(f"{where}: box ({x0}, {y0}, {x1}, {y1}) must satisfy 0 <= x0 <= x1 < {w} and "
                             f"0 <= y0 <= y1 < {h} (inclusive pixels of the {w}x{h} image {path!r})")
        mask = np.zeros(arr.shape[:2], np.uint8)
        mask[y0:y1 + 1, x0:x1 + 1] = 1
        images.append(arr)
        masks.append(mask)
        paths.append(path)
    return images, masks, paths, skipped


def _load_mask_folder(root: str, progress: bool, skip_bad: bool = False):
    """``root/images/<name>.<ext>`` with ``root/masks/<name>.png`` (class index per pixel).
    Returns ``(images, masks, paths, skipped)``."""
    from PIL import Image
    from tqdm import tqdm

    img_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
    files = sorted(f for f in os.listdir(img_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"{img_dir!r} holds no images with extensions {IMAGE_EXTENSIONS}")
    images, masks, paths, skipped = [], [], [], []
    for name in tqdm(files, desc=f"loading {os.path.basename(os.path.normpath(root))}", disable=not progress, leave=False):
        mpath = os.path.join(mask_dir, os.path.splitext(name)[0] + ".png")
        if not os.path.isfile(mpath):
            raise ValueError(f"image {name!r} has no mask {mpath!r} (masks are PNGs named like their image)")
        try:
            arr = read_image(os.path.join(img_dir, name))
            try:
                with Image.open(mpath) as m:
                    if m.mode not in ("L", "P", "I", "I;16"):
                        raise ValueError(f"mask {mpath!r} must be a single-channel PNG of class indices, got mode "
                                         f"{m.mode}")
                    mask = np.array(m)
            except (OSError, SyntaxError, Image.DecompressionBombError) as e:
                raise UnreadableImageError(mpath, e) from None
        except UnreadableImageError as e:
            if not skip_bad:
                raise
            skipped.append(e.path)
            continue
        if mask.shape != arr.shape[:2]:
            raise ValueError(f"mask {mpath!r} is {mask.shape[::-1]} but its image is {arr.shape[1::-1]} (W x H)")
        images.append(arr)
        masks.append(mask)
        paths.append(os.path.join(img_dir, name))
    return images, masks, paths, skipped


def load_segmentation_dataset(spec: str, split: str = "val", size: Optional[int] = None,
                              num_classes: Optional[int] = None, ignore_index: int = 255,
                              progress: bool = True, skip_bad: bool = False,
                              mixed_size: Optional[int] = None) -> SegmentationSet:
    """Images with per-pixel masks, in one of two layouts:

    * ``spec/boxes.tsv`` (Tiny ImageNet style: columns ``split path x0 y0 x1 y1``, paths
      relative to ``spec``, inclusive pixel boxes): foreground/background masks, 1 inside the
      box; rows of ``split``.
    * ``spec/<split>/images/`` + ``spec/<split>/masks/`` (or ``spec/images`` + ``spec/masks``):
      a mask PNG ``<name>.png`` of class indices for every image ``<name>.<ext>``;
      ``ignore_index`` marks unlabelled pixels.

    ``size``: images resized (antialiased bilinear) and masks resized (nearest) to ``size x size``;
    without it the images must share one size, or are all resized so to ``mixed_size`` when given.
    ``num_classes``: default 2 for boxes, else the largest label (not ``ignore_index``) + 1.
    ``skip_bad``: leave out images (or masks) that cannot be decoded, listed in ``skipped``; else
    such a file is an :class:`UnreadableImageError` naming it.
    """
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"dataset must be a directory path, got {spec!r}")
    if not os.path.isdir(spec):
        raise ValueError(f"segmentation data {spec!r} is not a directory")
    if os.path.isfile(os.path.join(spec, "boxes.tsv")):
        images, masks, paths, skipped = _load_boxes(spec, split, progress, skip_bad)
        default_classes = ["background", "object"]
    else:
        root = os.path.join(spec, split) if os.path.isdir(os.path.join(spec, split, "images")) else spec
        if not (os.path.isdir(os.path.join(root, "images")) and os.path.isdir(os.path.join(root, "masks"))):
            raise ValueError(f"segmentation data {spec!r} must hold boxes.tsv, or images/ and masks/ "
                             f"(directly or under {split}/)")
        images, masks, paths, skipped = _load_mask_folder(root, progress, skip_bad)
        default_classes = None
    if not images:
        raise ValueError(f"segmentation data {spec!r}: none of its images could be read")
    if size is None and len({a.shape for a in images}) > 1:
        if mixed_size is None:
            _common_size(images, paths, None, repr(spec))  # raises, naming two files of different sizes
        size = mixed_size
    if size is not None:
        img_t = torch.cat([resize_uint8(torch.from_numpy(a).permute(2, 0, 1)[None].contiguous(), size) for a in images])
        mask_t = torch.cat([resize_masks(_stack_masks([m]), size) for m in masks])
    else:
        img_t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        mask_t = _stack_masks(masks)
    if num_classes is None:
        if default_classes is not None:
            num_classes = len(default_classes)
        else:
            labelled = mask_t[mask_t != ignore_index]
            num_classes = int(labelled.max()) + 1 if labelled.numel() else 1
    labelled = mask_t[mask_t != ignore_index]
    if labelled.numel() and int(labelled.max()) >= num_classes:
        raise ValueError(f"masks of {spec!r} hold label {int(labelled.max())} but num_classes is {num_classes}")
    classes = default_classes if default_classes is not None and num_classes == len(default_classes) else \
        [f"class{i}" for i in range(num_classes)]
    return SegmentationSet(img_t, mask_t, classes, source=spec, paths=paths, skipped=skipped)
