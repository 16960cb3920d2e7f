"""Loss labels: the target model's loss under every candidate, for every (possibly corrupted) image.

Rows: ``draws`` passes over the dataset, row ``r`` is image ``r % N`` in draw ``r // N``.
Each row's corruption (with probability ``corruption_p`` a random corruption from
``corruptions`` at a random severity) is a pure function of ``(seed, r)``, so any shard can
be (re)computed independently and identically.

On disk (``directory``): ``manifest.json`` and ``shard_XXXXX.safetensors`` files, each holding
a contiguous range of rows: ``images`` (uint8, the model-size input actually used), ``losses``
(float32 ``(n, |T|)``), ``labels``, ``rows``, ``corruption`` (index into
:data:`~ttach_instance.training.corruptions.ALL`, -1 for clean) and ``severity``, plus the
task's extra fields (classification: ``correct`` per view and, when the space has an identity
candidate, ``input_logits``).

The manifest records what made the cache (format version, model spec and a sha256 of its
weights, a sha256 of the images and targets, the space's name, parameters -- what ``fit``
rebuilds it from; absent in older caches, the name alone -- and fingerprint, the task and every
setting that changes a row) and, under ``shards``, the size and sha256 of every finished
shard. A cache refuses to be continued with anything else, naming what differs: one cache is
one model on one dataset. Shards are written atomically and fsynced, then recorded; restarting
verifies every shard against its record, reports a truncated or altered one by name and
recomputes it with the missing ones; :meth:`LabelCache.load` refuses damaged shards. Under
``torchrun`` rank ``r`` computes the shards ``s`` with ``s % world == r`` and records them in
``shards.rank<r>.json`` until rank 0 merges them into the manifest.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..io import atomic_save_tensors, atomic_write_json, file_digest, load_tensors, tensors_sha256
from ..registry import space_record
from ..selection import check_positive_int
from . import distributed as dist
from .corruptions import ALL, COMMON, SEVERITIES, check_names, corrupt_batch, draw_recipes
from .deformations import Deformation, deform_batch, draw_deformations
from .tasks import ClassificationTask, Task

#: Version of the cache layout and manifest. 2: the manifest records the model and its weights'
#: hash, a full hash of the data, and every shard's size and sha256 (format 1 recorded neither).
FORMAT_VERSION = 2


def dataset_fingerprint(images: Tensor, labels: Tensor) -> str:
    """sha256 of every image and target (shapes and dtypes included): another dataset of the same
    size, or the same one relabelled, gets another fingerprint."""
    return tensors_sha256({"images": images, "targets": labels})


def model_identity(model: nn.Module, spec: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What made a cache's losses: the model's class, the spec it was built from (``spec``: e.g.
    ``{"model": "timm:resnet18", "num_classes": 200}``; ``None`` when built by the caller) and the
    sha256 of its state dict (parameters and buffers)."""
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "spec": None if spec is None else json.loads(json.dumps(spec, sort_keys=True)),
            "weights_sha256": tensors_sha256(model.state_dict())}


def _short(value: Any) -> str:
    text = re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1...", json.dumps(value, sort_keys=True))  # sha256s
    return text if len(text) <= 100 else text[:97] + "..."


def describe_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """``"key: old -> new"`` for every top-level key (and the keys of nested objects) that
    differs between two records, for refusals that say what differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{line}" for line in describe_differences(a, b)]
        else:
            out.append(f"{key}: {_short(a)} -> {_short(b)}")
    return out


def check_format(found: Any, current: int, what: str) -> None:
    """``ValueError`` unless ``found`` (a file's recorded format version) is ``current``."""
    if found == current:
        return
    if isinstance(found, int) and not isinstance(found, bool) and found > current:
        raise ValueError(f"{what} was made by a newer ttach-instance (format {found}); this one reads format "
                         f"{current}: upgrade ttach-instance")
    version = f"format {found}" if isinstance(found, int) and not isinstance(found, bool) else "no format version"
    raise ValueError(f"{what} was made by an older ttach-instance ({version}; this one reads format {current}); "
                     f"regenerate it")


def concat_common_fields(parts: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """The fields every part holds, each concatenated along rows in the parts' order."""
    keys = [k for k in parts[0] if all(k in p for p in parts)]
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


class LabelCache:
    #: What the cache is called in messages, and the step that (re)computes its shards.
    what = "label cache"
    rerun = "run the labels step again"
    #: The manifest's ``kind`` (label caches have none), format version and least ``total_rows``.
    kind = None
    format_version = FORMAT_VERSION
    min_rows = 0
    """A label cache directory: its manifest, which shards are done and sound, and loading the rows."""

    def __init__(self, directory: str):
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise TypeError(f"directory must be a path string, got {directory!r}")
        self.directory = os.fspath(directory)

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, "manifest.json")

    def manifest(self) -> Dict:
        """The manifest, after checking it is a cache of this kind and format with valid shard
        counts (else a ``ValueError`` naming the directory)."""
        what, where = self.what, f"{self.what} {self.directory!r}"
        if not os.path.isfile(self.manifest_path):
            raise ValueError(f"directory {self.directory!r} is not a {what} (no manifest.json)")
        try:
            with open(self.manifest_path) as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: manifest.json is unreadable ({e})") from None
        if not isinstance(m, dict):
            raise ValueError(f"{where}: manifest.json must hold a JSON object")
        if m.get("kind") != self.kind:
            raise ValueError(f"directory {self.directory!r} does not hold a {what} (its manifest.json is of kind "
                             f"{m.get('kind')!r})")
        check_format(m.get("format"), self.format_version, where)
        for key in ("num_shards", "total_rows", "shard_size"):
            if not isinstance(m.get(key), int) or m[key] < (self.min_rows if key == "total_rows" else 1):
                raise ValueError(f"{where}: manifest.json has no valid {key!r}")
        return m

    def identity(self) -> str:
        """sha256 of the manifest (what made the cache and every shard's hash): equal for two
        caches with the same rows."""
        return _manifest_sha256(self.manifest())

    def shard_path(self, s: int) -> str:
        return os.path.join(self.directory, f"shard_{s:05d}.safetensors")

    def _rank_record_paths(self) -> List[str]:
        return sorted(glob.glob(os.path.join(glob.escape(self.directory), "shards.rank*.json")))

    def records(self, manifest: Optional[Dict] = None) -> Dict[int, Dict[str, Any]]:
        """``{shard: {"bytes", "sha256"}}`` of every recorded shard: the manifest's, plus those a
        ``torchrun`` rank recorded in its own file and rank 0 has not merged yet."""
        m = manifest or self.manifest()
        out = {int(s): r for s, r in (m.get("shards") or {}).items()}
        for path in self._rank_record_paths():
            try:
                with open(path) as f:
                    out.update({int(s): r for s, r in json.load(f).items()})
            except (OSError, ValueError):
                continue  # a rank's file is rewritten atomically; an unreadable one records nothing
        return out

    def done_shards(self) -> List[int]:
        """Shards recorded and present with their recorded size (:meth:`verify` checks hashes)."""
        m = self.manifest()
        rec = self.records(m)
        return [s for s in range(m["num_shards"]) if s in rec and _size(self.shard_path(s)) == rec[s].get("bytes")]

    def missing_shards(self) -> List[int]:
        done = set(self.done_shards())
        return [s for s in range(self.manifest()["num_shards"]) if s not in done]

    @property
    def complete(self) -> bool:
        return os.path.isfile(self.manifest_path) and not self.missing_shards()

    def verify(self) -> Dict[int, str]:
        """``{shard: problem}`` for every shard that is not exactly as recorded: missing, written but
        never recorded (a job killed in between), truncated or altered (size or sha256 differs)."""
        m = self.manifest()
        rec = self.records(m)
        problems = {}
        for s in range(m["num_shards"]):
            path = self.shard_path(s)
            if not os.path.isfile(path):
                problems[s] = "missing"
            elif s not in rec:
                problems[s] = "written but not recorded (the job was killed before recording it)"
            else:
                got = file_digest(path)
                if got["bytes"] != rec[s].get("bytes"):
                    problems[s] = f"truncated or altered: {got['bytes']} bytes, the manifest records {rec[s].get('bytes')}"
                elif got["sha256"] != rec[s].get("sha256"):
                    problems[s] = "altered: its sha256 differs from the manifest's"
        return problems

    def sound_shards(self, allow_partial: bool = False) -> Tuple[Dict, List[Dict[str, Tensor]]]:
        """``(manifest, tensors of every finished shard)``, each shard verified against the manifest
        first: a damaged one is a ``ValueError`` naming it (run the same step again to recompute
        it), and so are missing shards unless ``allow_partial``, and a cache without any."""
        m = self.manifest()
        problems = self.verify()
        damaged = {s: p for s, p in problems.items() if p != "missing" and not p.startswith("written but")}
        if damaged:
            listed = "; ".join(f"{os.path.basename(self.shard_path(s))} {p}" for s, p in sorted(damaged.items())[:5])
            raise ValueError(f"{self.what} {self.directory!r} has {len(damaged)} damaged shard(s): {listed}; "
                             f"{self.rerun} with the same arguments to recompute them")
        missing = sorted(problems)
        if missing and not allow_partial:
            raise ValueError(f"{self.what} {self.directory!r} is incomplete: {len(missing)} of {m['num_shards']} "
                             f"shards missing (first {missing[:5]}); {self.rerun} to finish it")
        parts = [load_tensors(self.shard_path(s))[0] for s in range(m["num_shards"]) if s not in problems]
        if not parts:
            raise ValueError(f"{self.what} {self.directory!r} has no finished shard")
        return m, parts

    def load(self, allow_partial: bool = False) -> Dict[str, Tensor]:
        """All rows (sorted by row id) as a dict of tensors. Every shard is verified against the
        manifest first: a damaged one is a ``ValueError`` naming it (run the labels step again to
        recompute it), and so are missing shards unless ``allow_partial``."""
        m, parts = self.sound_shards(allow_partial)
        out = concat_common_fields(parts)
        order = out["rows"].argsort()
        out = {k: v[order] for k, v in out.items()}
        rows = out["rows"]
        if rows.unique().numel() != rows.numel():
            raise ValueError(f"label cache {self.directory!r} holds duplicate rows")
        if not allow_partial and not torch.equal(rows, torch.arange(m["total_rows"])):
            raise ValueError(f"label cache {self.directory!r}: rows are not exactly 0..{m['total_rows'] - 1}")
        return out


def _manifest_sha256(manifest: Dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _size(path: str) -> Optional[int]:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


# Manifest keys that must agree for rows of several caches to be one training set: the same
# images (row r is image r % N in every cache), the same model, candidates, task and input size.
# The rest (seed, draws, corruption and deformation settings, shard size) may differ: that is
# the point of combining caches.
SHARED_KEYS = ("space_fingerprint", "candidate_names", "task", "num_images", "size", "source_size", "dataset", "model")
_LAYOUT_KEYS = ("shard_size", "num_shards", "draws", "total_rows", "shards")


def load_label_caches(directories: Sequence[str]) -> Tuple[Dict[str, Tensor], Dict]:
    """The rows of several complete label caches of one dataset (other seeds, deformed draws) as
    one set: ``(data, manifest)``.

    Cache ``i``'s rows are offset by the rows of the caches before it, so row ``r`` is still image
    ``r % num_images`` (each cache holds whole draws) and the trainer's image-level held-out fold
    keeps every draw of an image on one side. ``manifest``: the first cache's without its shard
    layout, ``total_rows`` and ``draws`` summed, ``caches`` listing the directories and
    ``identities`` their :meth:`LabelCache.identity` (what a fit checkpoint records). A cache that
    is incomplete or damaged, made for other images / model / candidates / task / size, or that
    repeats another's rows (listed twice, or the same seed and settings) is an error naming it.
    """
    if isinstance(directories, (str, os.PathLike)) or not directories:
        raise ValueError(f"directories must be a non-empty list of label cache paths, got {directories!r}")
    parts, manifests, seen = [], [], {}
    for directory in directories:
        cache = LabelCache(directory)
        m = cache.manifest()
        if manifests:
            diff = [k for k in SHARED_KEYS if m.get(k) != manifests[0].get(k)]
            if diff:
                raise ValueError(f"label cache {directory!r} does not fit with {directories[0]!r}: they differ in "
                                 f"{diff} (caches combine only for the same images, model, space, task and size)")
        # Row r is a pure function of these settings and r: two caches that share them share
        # their first rows (whatever their draws), and training on a row twice only weights it.
        settings = json.dumps({k: v for k, v in m.items() if k not in _LAYOUT_KEYS + ("space_params",)},
                              sort_keys=True)  # the fingerprint says which space; caches may predate its params
        if settings in seen:
            raise ValueError(f"label cache {directory!r} has the same seed and settings as {seen[settings]!r}: "
                             f"it repeats that cache's rows (make more labels with another seed)")
        seen[settings] = directory
        data = cache.load()
        offset = sum(p["total_rows"] for p in manifests)
        data["rows"] = data["rows"] + offset
        parts.append(data)
        manifests.append(m)
    data = concat_common_fields(parts)
    manifest = {k: v for k, v in manifests[0].items() if k not in ("shard_size", "num_shards", "shards")}
    manifest.update(total_rows=sum(m["total_rows"] for m in manifests), draws=sum(m["draws"] for m in manifests),
                    caches=[os.fspath(d) for d in directories],
                    identities=[_manifest_sha256(m) for m in manifests])
    return data, manifest


def _check_run_sizes(shard_size: Any, batch_size: Any, size: Any, max_shards: Any) -> None:
    """The sizes a cache-writing run takes (label and prediction caches alike): positive
    integers, ``size`` and ``max_shards`` optional."""
    check_positive_int(shard_size, "shard_size")
    check_positive_int(batch_size, "batch_size")
    if size is not None:
        check_positive_int(size, "size")
    if max_shards is not None:
        check_positive_int(max_shards, "max_shards")


@torch.no_grad()
def compute_view_outputs(model: nn.Module, pixels: Tensor, targets: Tensor, space, task: Task,
                         normalize: Callable[[Tensor], Tensor], batch_size: int = 64) -> Dict[str, Tensor]:
    """``{"losses": (B, |T|), ...}`` for every candidate of pixel images ``(B, 3, H, W)`` in [0, 1].

    ``batch_size`` images at a time, i.e. ``batch_size * |T|`` views per model call.
    """
    check_positive_int(batch_size, "batch_size")
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
    model_spec: Optional[Dict[str, Any]] = None,
    log: Callable[[str], None] = print,
) -> LabelCache:
    """Fill (or continue) the label cache in ``directory``; returns it.

    ``images``: uint8 ``(N, 3, H, W)`` at the source resolution (corruptions are applied
    there), resized to ``size`` for the model when given. ``targets``: class indices ``(N,)``,
    or label maps ``(N, H, W)`` for a dense ``task`` (:class:`~.tasks.SegmentationTask`;
    resized with the images, nearest). ``max_shards`` stops after that many
    new shards in this process (for tests and time-boxed runs). ``deformation``
    (:class:`~.deformations.Deformation` or a dict of its fields): every row's image is first
    rotated, zoomed and brightened by a small random amount (drawn per row; before the
    corruption), so that no two rows of an image are the same input -- the paper's recipe.
    ``model_spec``: how ``model`` was built (JSON, recorded with its weights' hash; see
    :func:`model_identity`). ``batch_size`` and ``device`` change how rows are computed, not
    what they are, and may differ between a run and its continuation. ``log``: where shards
    found damaged on a restart are reported (rank 0).
    """
    from ..data import normalizer, resize_masks, resize_uint8

    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"images must be a uint8 tensor (N, 3, H, W), got {getattr(images, 'dtype', type(images))}")
    if not isinstance(targets, Tensor) or targets.dim() < 1 or targets.shape[0] != images.shape[0]:
        raise ValueError(f"targets must be a tensor with one entry per image ({images.shape[0]}), got "
                         f"{tuple(getattr(targets, 'shape', ())) or type(targets).__name__}")
    if getattr(task, "dense", False) and (targets.dim() != 3 or targets.shape[-2:] != images.shape[-2:]):
        raise ValueError(f"targets of a dense task must be label maps (N, H, W) matching the images "
                         f"{tuple(images.shape[-2:])}, got {tuple(targets.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image, got 0")
    check_positive_int(draws, "draws")
    _check_run_sizes(shard_size, batch_size, size, max_shards)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    corruptions = check_names(corruptions)
    if isinstance(corruption_p, bool) or not isinstance(corruption_p, (int, float)) or not 0.0 <= corruption_p <= 1.0:
        raise ValueError(f"corruption_p must be a probability in [0, 1], got {corruption_p!r}")
    severities = [int(s) for s in severities]
    if not severities or any(s not in SEVERITIES for s in severities):
        raise ValueError(f"severities must be a non-empty list of values in {list(SEVERITIES)}, got {severities}")
    if corruption_p > 0 and corruptions and min(images.shape[-2:]) < 32:
        raise ValueError(f"images must be at least 32x32 pixels to be corrupted (ImageNet-C corruptions), got "
                         f"{images.shape[-1]}x{images.shape[-2]}; use larger images or corruption_p=0")
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
        "model": model_identity(model, model_spec),
        **space_record(space),  # its name and parameters: fit rebuilds it from the cache
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
        "severities": severities,
        "seed": int(seed),
        "size": int(size) if size is not None else int(images.shape[-1]),
        "source_size": [int(images.shape[-2]), int(images.shape[-1])],
        "dataset": dataset_fingerprint(images, targets),
        "deformation": None if deformation is None else deformation.spec(),
    }
    cache = LabelCache(directory)
    model = model.to(device).eval()

    def compute(s: int) -> Dict[str, Tensor]:
        rows = list(range(s * shard_size, min(total, (s + 1) * shard_size)))
        img_idx = torch.tensor([r % n for r in rows])
        recipes = draw_recipes(rows, seed, corruption_p, corruptions, severities)
        batch = images[img_idx]
        if deformation is not None:
            batch = deform_batch(batch, draw_deformations(rows, seed, deformation))
        batch = corrupt_batch(batch, [r[0] for r in recipes], [r[1] for r in recipes], [r[2] for r in recipes])
        if size is not None and tuple(batch.shape[-2:]) != (size, size):
            batch = resize_uint8(batch, size)
        tgt = targets[img_idx]
        if task.dense and size is not None and tuple(tgt.shape[-2:]) != (size, size):
            tgt = resize_masks(tgt, size)  # label maps follow the images (nearest)
        outputs = compute_view_outputs(model, batch.to(device).float() / 255, tgt.to(device), space, task,
                                       normalize, batch_size)
        if tuple(outputs["losses"].shape) != (len(rows), len(space)):  # never record a shard without its losses
            raise RuntimeError(f"shard {s}: losses of shape {tuple(outputs['losses'].shape)}, expected "
                               f"({len(rows)}, {len(space)})")
        return {
            "images": batch,
            **{k: v.cpu() for k, v in outputs.items()},
            "labels": tgt,
            "rows": torch.tensor(rows, dtype=torch.long),
            "corruption": torch.tensor([ALL.index(r[0]) if r[0] else -1 for r in recipes], dtype=torch.long),
            "severity": torch.tensor([r[1] for r in recipes], dtype=torch.long),
        }

    write_shards(cache, config, compute, log, max_shards, progress)
    return cache


def write_shards(cache: LabelCache, config: Dict[str, Any], compute: Callable[[int], Dict[str, Tensor]],
                 log: Callable[[str], None], max_shards: Optional[int] = None, progress: bool = True) -> None:
    """Compute and write the shards ``cache`` still lacks, resumably (label and prediction caches
    alike): rank 0 opens the cache (:func:`_open_for_writing`); each rank takes every
    ``world``-th missing shard (at most ``max_shards``), writes ``compute(shard)`` atomically and
    records it with its size and hash -- rank 0 in the manifest, the others in their own file,
    merged into the manifest at the end -- so a killed job loses at most the shard in progress."""
    from tqdm import tqdm

    if dist.is_main():
        config = _open_for_writing(cache, config, log)
    dist.barrier()
    rank, world = dist.rank(), dist.world_size()
    todo = [s for s in cache.missing_shards() if s % world == rank]
    if max_shards is not None:
        todo = todo[:max_shards]
    records = cache.records() if rank == 0 else {}
    what = cache.what.split()[0]
    for s in tqdm(todo, desc=f"{what} (rank {rank})" if world > 1 else what, disable=not progress or not todo):
        records[s] = atomic_save_tensors(cache.shard_path(s), compute(s), {"shard": s, "rank": rank, "world": world})
        if rank == 0:
            atomic_write_json(cache.manifest_path, {**config, "shards": _json_records(records)})
        else:
            atomic_write_json(_rank_path(cache, rank), _json_records(records))
    dist.barrier()
    if dist.is_main() and world > 1:  # merge the other ranks' records into the manifest
        _merge_rank_records(cache)
    dist.barrier()


def _rank_path(cache: LabelCache, rank: int) -> str:
    return os.path.join(cache.directory, f"shards.rank{rank}.json")


def _json_records(records: Dict[int, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {str(s): records[s] for s in sorted(records)}


def _merge_rank_records(cache: LabelCache) -> None:
    m = cache.manifest()
    atomic_write_json(cache.manifest_path, {**m, "shards": _json_records(cache.records(m))})
    for path in cache._rank_record_paths():
        os.remove(path)


def _open_for_writing(cache: LabelCache, config: Dict[str, Any], log: Callable[[str], None]) -> Dict[str, Any]:
    """Rank 0 before any shard is computed (label and prediction caches alike): a new cache gets
    its manifest; an existing one must have been made by the same model, data, space, task and
    settings (else a ``ValueError`` naming what differs), and every shard not exactly as recorded
    is reported and removed, so it is recomputed with the missing ones. Returns the manifest's
    settings from now on: ``config``, less ``space_params`` for a cache made before they were
    recorded (it stays as it was made)."""
    what = cache.what
    if not os.path.isfile(cache.manifest_path):
        if os.path.isdir(cache.directory) and os.listdir(cache.directory):
            raise ValueError(f"directory {cache.directory!r} is not empty and holds no {what} (no manifest.json) this "
                             f"version can continue; use another directory or delete it")
        atomic_write_json(cache.manifest_path, {**config, "shards": {}})
        return config
    old = cache.manifest()
    if "space_params" not in old:  # made before the space's parameters were recorded: the name
        config = {k: v for k, v in config.items() if k != "space_params"}  # alone, as it was made
    diff = describe_differences({k: v for k, v in old.items() if k != "shards"}, config)
    if diff:
        raise ValueError(f"directory {cache.directory!r} holds a {what} made with other settings or another "
                         f"model/data (cache -> now: {'; '.join(diff)}); use another directory or delete it")
    _merge_rank_records(cache)  # records a killed torchrun left in the ranks' files
    problems = cache.verify()
    records = cache.records()
    for s, problem in sorted(problems.items()):
        if problem == "missing":
            continue
        log(f"{what} {cache.directory!r}: {os.path.basename(cache.shard_path(s))} is {problem}; recomputing it")
        os.remove(cache.shard_path(s))
        records.pop(s, None)
    atomic_write_json(cache.manifest_path, {**config, "shards": _json_records(records)})
    for tmp in glob.glob(os.path.join(glob.escape(cache.directory), "*.tmp*")):  # a killed writer's leftovers
        os.remove(tmp)
    return config
