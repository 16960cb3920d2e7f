"""Loss labels: the target model's loss under every candidate, for every (possibly corrupted) image.

Rows: ``draws`` passes over the dataset, row ``r`` is image ``r % N`` in draw ``r // N``.
Each row's corruption (with probability ``corruption_p`` a random corruption from
``corruptions`` at a random severity) is a pure function of ``(seed, r)``, so any shard can
be (re)computed independently and identically.

On disk (``directory``): ``manifest.json`` (the configuration; a cache refuses to be
continued with another one) and ``shard_XXXXX.safetensors`` files, each holding a
contiguous range of rows: ``images`` (uint8, the model-size input actually used),
``losses`` (float32 ``(n, |T|)``), ``labels``, ``rows``, ``corruption`` (index into
:data:`~ttach_instance.training.corruptions.ALL`, -1 for clean) and ``severity``, plus the
task's extra fields (classification: ``correct`` per view and, when the space has an identity
candidate, ``input_logits``). Shards are
written to a temporary file then renamed, so a killed job leaves only whole shards;
restarting computes exactly the missing ones. Under ``torchrun`` rank ``r`` computes the
shards ``s`` with ``s % world == r``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import distributed as dist
from ..io import atomic_save_tensors, atomic_write_json
from .corruptions import ALL, COMMON, SEVERITIES, check_names, corrupt_batch, draw_recipes
from .deformations import Deformation, deform_batch, draw_deformations
from .tasks import ClassificationTask, Task

FORMAT_VERSION = 1


def dataset_fingerprint(images: Tensor, labels: Tensor) -> str:
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    step = max(1, images.shape[0] // 64)
    h.update(images[::step].contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes() if labels.dtype != torch.bfloat16 else b"")
    return h.hexdigest()[:16]


def concat_common_fields(parts: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """The fields every part holds, each concatenated along rows in the parts' order."""
    keys = [k for k in parts[0] if all(k in p for p in parts)]
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


class LabelCache:
    """A label cache directory: its manifest, which shards are done, and loading the rows."""

    def __init__(self, directory: str):
        if not isinstance(directory, str) or not directory:
            raise TypeError(f"directory must be a path string, got {directory!r}")
        self.directory = directory

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, "manifest.json")

    def manifest(self) -> Dict:
        if not os.path.isfile(self.manifest_path):
            raise ValueError(f"directory {self.directory!r} is not a label cache (no manifest.json)")
        with open(self.manifest_path) as f:
            return json.load(f)

    def shard_path(self, s: int) -> str:
        return os.path.join(self.directory, f"shard_{s:05d}.safetensors")

    def done_shards(self) -> List[int]:
        m = self.manifest()
        return [s for s in range(m["num_shards"]) if os.path.isfile(self.shard_path(s))]

    def missing_shards(self) -> List[int]:
        m = self.manifest()
        return [s for s in range(m["num_shards"]) if not os.path.isfile(self.shard_path(s))]

    @property
    def complete(self) -> bool:
        return os.path.isfile(self.manifest_path) and not self.missing_shards()

    def load(self, allow_partial: bool = False) -> Dict[str, Tensor]:
        """All rows (sorted by row id) as a dict of tensors; checks for gaps and duplicates."""
        from safetensors.torch import load_file

        m = self.manifest()
        missing = self.missing_shards()
        if missing and not allow_partial:
            raise ValueError(f"label cache {self.directory!r} is incomplete: {len(missing)} of {m['num_shards']} "
                             f"shards missing (first {missing[:5]}); run the labels step again to finish it")
        parts = [load_file(self.shard_path(s)) for s in self.done_shards()]
        if not parts:
            raise ValueError(f"label cache {self.directory!r} has no finished shard")
        # a cache continued by a newer version may add a field (input_logits) to its later shards only
        out = concat_common_fields(parts)
        order = out["rows"].argsort()
        out = {k: v[order] for k, v in out.items()}
        rows = out["rows"]
        if rows.unique().numel() != rows.numel():
            raise ValueError(f"label cache {self.directory!r} holds duplicate rows")
        if not allow_partial and not torch.equal(rows, torch.arange(m["total_rows"])):
            raise ValueError(f"label cache {self.directory!r}: rows are not exactly 0..{m['total_rows'] - 1}")
        return out


# Manifest keys that must agree for rows of several caches to be one training set: the same
# images (row r is image r % N in every cache), the same candidates, task and input size. The
# rest (seed, draws, corruption and deformation settings, shard size) may differ: that is the
# point of combining caches.
SHARED_KEYS = ("space_fingerprint", "candidate_names", "task", "num_images", "size", "source_size", "dataset")
_LAYOUT_KEYS = ("shard_size", "num_shards", "draws", "total_rows")


def load_label_caches(directories: Sequence[str]) -> Tuple[Dict[str, Tensor], Dict]:
    """The rows of several complete label caches of one dataset (other seeds, deformed draws) as
    one set: ``(data, manifest)``.

    Cache ``i``'s rows are offset by the rows of the caches before it, so row ``r`` is still image
    ``r % num_images`` (each cache holds whole draws) and the trainer's image-level held-out fold
    keeps every draw of an image on one side. Only the fields every cache holds are kept (caches
    made before ``input_logits`` was recorded lack it). ``manifest``: the first cache's without
    its shard layout, ``total_rows`` and ``draws`` summed, ``caches`` listing the directories.
    A cache that is incomplete, made for other images / candidates / task / size, or that
    repeats another's rows (listed twice, or the same seed and settings) is an error naming it.
    """
    if isinstance(directories, str) or not directories:
        raise ValueError(f"directories must be a non-empty list of label cache paths, got {directories!r}")
    parts, manifests, seen = [], [], {}
    for directory in directories:
        cache = LabelCache(directory)
        m = cache.manifest()
        if manifests:
            diff = [k for k in SHARED_KEYS if m.get(k) != manifests[0].get(k)]
            if diff:
                raise ValueError(f"label cache {directory!r} does not fit with {directories[0]!r}: they differ in "
                                 f"{diff} (caches combine only for the same images, space, task and size)")
        # Row r is a pure function of these settings and r: two caches that share them share
        # their first rows (whatever their draws), and training on a row twice only weights it.
        settings = json.dumps({k: v for k, v in m.items() if k not in _LAYOUT_KEYS}, sort_keys=True)
        if settings in seen:
            raise ValueError(f"label cache {directory!r} has the same seed and settings as {seen[settings]!r}: "
                             f"it repeats that cache's rows (make more labels with another seed)")
        seen[settings] = directory
        data = cache.load()
        offset = sum(p["total_rows"] for p in manifests)
        data["rows"] = data["rows"] + offset
        parts.append(data)
        manifests.append(m)
    data = concat_common_fields(parts)  # caches made before input_logits was recorded lack it
    manifest = {k: v for k, v in manifests[0].items() if k not in ("shard_size", "num_shards")}
    manifest.update(total_rows=sum(m["total_rows"] for m in manifests), draws=sum(m["draws"] for m in manifests),
                    caches=list(directories))
    return data, manifest


@torch.no_grad()
def compute_view_outputs(model: nn.Module, pixels: Tensor, targets: Tensor, space, task: Task,
                         normalize: Callable[[Tensor], Tensor], batch_size: int = 64) -> Dict[str, Tensor]:
    """``{"losses": (B, |T|), ...}`` for every candidate of pixel images ``(B, 3, H, W)`` in [0, 1].

    ``batch_size`` images at a time, i.e. ``batch_size * |T|`` views per model call.
    """
    t = len(space)
    out: Dict[str, List[Tensor]] = {}
    for i in range(0, pixels.shape[0], batch_size):
        x = pixels[i:i + batch_size]
        index = torch.arange(t, device=x.device).expand(x.shape[0], t)
        views = normalize(space.apply(x, index))
        for key, val in task.view_outputs(model, views, targets[i:i + batch_size], space, index).items():
            out.setdefault(key, []).append(val.float() if key == "losses" else val)
    return {k: torch.cat(v) for k, v in out.items()}


def compute_view_losses(model, pixels, targets, space, task, normalize, batch_size: int = 64) -> Tensor:
    """``(B, |T|)`` losses of every candidate (see :func:`compute_view_outputs`)."""
    return compute_view_outputs(model, pixels, targets, space, task, normalize, batch_size)["losses"]


def generate_labels(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    space,
    directory: str,
    task: Optional[Task] = None,
    size: Optional[int] = None,
    draws: int = 1,
    corruption_p: float = 0.0,
    corruptions: Sequence[str] = COMMON,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    shard_size: int = 500,
    batch_size: int = 64,
    normalize: Optional[Callable[[Tensor], Tensor]] = None,
    device: str = "cpu",
    progress: bool = True,
    max_shards: Optional[int] = None,
    deformation: Optional[Union[Deformation, Dict]] = None,
) -> LabelCache:
    """Fill (or continue) the label cache in ``directory``; returns it.

    ``images``: uint8 ``(N, 3, H, W)`` at the source resolution (corruptions are applied
    there), resized to ``size`` for the model when given. ``targets``: class indices ``(N,)``,
    or label maps ``(N, H, W)`` for a dense ``task`` (:class:`~.tasks.SegmentationLossTask`;
    resized with the images, nearest). ``max_shards`` stops after that many
    new shards in this process (for tests and time-boxed runs). ``deformation``
    (:class:`~.deformations.Deformation` or a dict of its fields): every row's image is first
    rotated, zoomed and brightened by a small random amount (drawn per row; before the
    corruption), so that no two rows of an image are the same input -- the paper's recipe.
    """
    from tqdm import tqdm

    from ..data import normalizer, resize_masks, resize_uint8

    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"images must be a uint8 tensor (N, 3, H, W), got {getattr(images, 'dtype', type(images))}")
    if targets.shape[0] != images.shape[0]:
        raise ValueError(f"targets must have one entry per image ({images.shape[0]}), got {targets.shape[0]}")
    if getattr(task, "dense", False) and (targets.dim() != 3 or targets.shape[-2:] != images.shape[-2:]):
        raise ValueError(f"targets of a dense task must be label maps (N, H, W) matching the images "
                         f"{tuple(images.shape[-2:])}, got {tuple(targets.shape)}")
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    corruptions = check_names(corruptions)
    if not 0.0 <= corruption_p <= 1.0:
        raise ValueError(f"corruption_p must be in [0, 1], got {corruption_p}")
    task = task or ClassificationTask()
    if deformation is not None:
        deformation = Deformation.from_spec(deformation)
        if getattr(task, "dense", False):
            raise ValueError("deformation is for classification labels: a dense task's label maps would need "
                             "the same warp; pass deformation=None")
    normalize = normalize or normalizer(model)
    n = images.shape[0]
    total = n * draws
    config = {
        "format": FORMAT_VERSION,
        "space": space.name,
        "space_fingerprint": space.fingerprint,
        "candidate_names": space.names,
        "task": task.spec(),
        "num_images": n,
        "draws": draws,
        "total_rows": total,
        "shard_size": shard_size,
        "num_shards": (total + shard_size - 1) // shard_size,
        "corruption_p": float(corruption_p),
        "corruptions": list(corruptions),
        "severities": [int(s) for s in severities],
        "seed": int(seed),
        "size": int(size) if size else int(images.shape[-1]),
        "source_size": [int(images.shape[-2]), int(images.shape[-1])],
        "dataset": dataset_fingerprint(images, targets),
    }
    if deformation is not None:  # absent otherwise, so caches made before it existed still continue
        config["deformation"] = deformation.spec()
    cache = LabelCache(directory)
    if os.path.isfile(cache.manifest_path):
        old = cache.manifest()
        diff = sorted(k for k in set(config) | set(old) if old.get(k) != config.get(k))
        if diff:
            raise ValueError(f"directory {directory!r} holds a label cache made with other settings ({diff}); "
                             f"use another directory or delete it")
    elif dist.is_main():
        atomic_write_json(cache.manifest_path, config)
    dist.barrier()
    rank, world = dist.rank(), dist.world_size()
    todo = [s for s in cache.missing_shards() if s % world == rank]
    if max_shards is not None:
        todo = todo[:max_shards]
    model = model.to(device).eval()
    bar = tqdm(todo, desc=f"labels (rank {rank})" if world > 1 else "labels", disable=not progress or not todo)
    for s in bar:
        rows = list(range(s * shard_size, min(total, (s + 1) * shard_size)))
        img_idx = torch.tensor([r % n for r in rows])
        recipes = draw_recipes(rows, seed, corruption_p, corruptions, severities)
        batch = images[img_idx]
        if deformation is not None:
            batch = deform_batch(batch, draw_deformations(rows, seed, deformation))
        batch = corrupt_batch(batch, [r[0] for r in recipes], [r[1] for r in recipes], [r[2] for r in recipes])
        if size is not None and batch.shape[-1] != size:
            batch = resize_uint8(batch, size)
        tgt = targets[img_idx]
        if task.dense and size is not None and tgt.shape[-1] != size:
            tgt = resize_masks(tgt, size)  # label maps follow the images (nearest)
        outputs = compute_view_outputs(model, batch.to(device).float() / 255, tgt.to(device), space, task,
                                       normalize, batch_size)
        atomic_save_tensors(cache.shard_path(s), {
            "images": batch,
            **{k: v.cpu() for k, v in outputs.items()},
            "labels": tgt,
            "rows": torch.tensor(rows, dtype=torch.long),
            "corruption": torch.tensor([ALL.index(r[0]) if r[0] else -1 for r in recipes], dtype=torch.long),
            "severity": torch.tensor([r[1] for r in recipes], dtype=torch.long),
        }, {"shard": s, "rank": rank, "world": world})
    dist.barrier()
    return cache
