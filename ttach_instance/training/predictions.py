"""Prediction caches: the model's log-probabilities under every candidate of a pool, on a validation set.

What :mod:`ttach_instance.search` reads: ``log_probs`` ``(candidates, samples, classes)`` and
``labels`` ``(samples,)``. Any space works as a pool (a registered one, ``space_from_specs`` of
an op list, a product); each image is run once under every candidate, ``batch_size`` images
(``x candidates`` views) per model call.

On disk (``directory``): ``manifest.json`` and ``shard_XXXXX.safetensors`` files, shard ``s``
holding images ``s * shard_size ...``: ``log_probs`` ``(n, candidates, classes)`` (sample-major,
as computed), ``labels`` and ``rows``. Storage dtype: float32 by default -- the model's own
output, exactly; GPS's later steps separate candidates by ~1e-4 nats of mean log-likelihood
while float16 rounds a log-probability of -5 by up to 2e-3 -- or ``dtype="float16"`` for half
the disk and memory (100 candidates x 10,000 images x 1,000 classes: 4 GB -> 2 GB).

The machinery is the label cache's (:mod:`~ttach_instance.training.labels`): the manifest
records what made the cache (format version, the model's class, spec and weights' sha256, a
sha256 of the images and labels, the pool's name, parameters, fingerprint, candidate names and
op specs, and every setting that changes a value) and every finished shard's size and sha256.
Continuing with anything else is refused naming what differs; shards are written atomically,
verified on load (a damaged one is named) and on resume (recomputed); under ``torchrun`` rank
``r`` computes the shards ``s % world == r``, recorded in ``shards.rank<r>.json`` until rank 0
merges them.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..registry import space_record
from ..selection import check_positive_int
from .labels import LabelCache, _check_run_sizes, dataset_fingerprint, model_identity, write_shards

#: Version of the prediction cache's layout and manifest.
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16}


class PredictionCache(LabelCache):
    """A prediction cache directory: its manifest, which shards are done and sound, and loading
    ``log_probs`` / ``labels`` (shard records and verification are the label cache's)."""

    what = "prediction cache"
    rerun = "run the same command again"
    kind = "predictions"
    format_version = FORMAT_VERSION
    min_rows = 1

    def load(self, allow_partial: bool = False) -> Dict[str, Tensor]:
        """``{"log_probs": (candidates, samples, classes), "labels": (samples,), "rows": (samples,)}``,
        in row order, after verifying every shard against the manifest (a damaged one is a
        ``ValueError`` naming it; so are missing shards unless ``allow_partial``)."""
        m, parts = self.sound_shards(allow_partial)
        rows = torch.cat([p["rows"] for p in parts])
        if not allow_partial and not torch.equal(rows, torch.arange(m["total_rows"])):
            raise ValueError(f"prediction cache {self.directory!r}: rows are not exactly 0..{m['total_rows'] - 1}")
        return {"log_probs": torch.cat([p["log_probs"] for p in parts]).transpose(0, 1).contiguous(),
                "labels": torch.cat([p["labels"] for p in parts]), "rows": rows}


@torch.no_grad()
def candidate_log_probs(model: nn.Module, pixels: Tensor, space, normalize: Callable[[Tensor], Tensor],
                        batch_size: int = 64, output_key: Optional[str] = None) -> Tensor:
    """``(B, candidates, classes)`` float32 log-softmax of ``model`` on every candidate of
    ``space`` applied to pixel images ``(B, 3, H, W)`` in [0, 1]; ``batch_size`` images
    (``x candidates`` views) per model call."""
    check_positive_int(batch_size, "batch_size")
    t = len(space)
    out = []
    for i in range(0, pixels.shape[0], batch_size):
        x = pixels[i:i + batch_size]
        index = torch.arange(t, device=x.device).expand(x.shape[0], t)
        logits = model(normalize(space.apply(x, index)))
        if output_key is not None:
            logits = logits[output_key]
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0] * t:
            raise ValueError(f"the model must return logits (views, classes) = ({x.shape[0] * t}, classes) for "
                             f"{x.shape[0] * t} views, got {tuple(getattr(logits, 'shape', ())) or type(logits).__name__}")
        out.append(torch.log_softmax(logits.float(), dim=1).view(x.shape[0], t, -1))
    return torch.cat(out)


def generate_predictions(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    space,
    directory: str,
    size: Optional[int] = None,
    shard_size: int = 500,
    batch_size: int = 64,
    dtype: str = "float32",
    normalize: Optional[Callable[[Tensor], Tensor]] = None,
    device: str = "cpu",
    progress: bool = True,
    max_shards: Optional[int] = None,
    model_spec: Optional[Dict[str, Any]] = None,
    output_key: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> PredictionCache:
    """Fill (or continue) the prediction cache in ``directory``; returns it.

    ``images``: uint8 ``(N, 3, H, W)``, resized to ``size`` when given; ``labels``: class
    indices ``(N,)``. ``dtype``: ``"float32"`` (default, exact) or ``"float16"`` (half the size).
    ``max_shards`` stops after that many new shards in this process (tests, time-boxed runs).
    ``model_spec``: how ``model`` was built (JSON, recorded with its weights' hash).
    ``batch_size`` and ``device`` change how values are computed, not what they are, and may
    differ between a run and its continuation.
    """

    from ..data import normalizer, resize_uint8

    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise TypeError(f"images must be a uint8 tensor (N, 3, H, W), got "
                        f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one image, got 0")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0] \
            or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor with one class index per image ({images.shape[0]}), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if bool((labels < 0).any()):
        raise ValueError(f"labels must be class indices >= 0, got {int(labels.min())}")
    _check_run_sizes(shard_size, batch_size, size, max_shards)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    normalize = normalize or normalizer(model)
    n = images.shape[0]
    config = {
        "kind": "predictions",
        "format": FORMAT_VERSION,
        "model": model_identity(model, model_spec),
        "output_key": output_key,
        **space_record(space),
        "space_fingerprint": space.fingerprint,
        "candidate_names": space.names,
        "candidate_specs": space.spec(),
        "dataset": dataset_fingerprint(images, labels),
        "num_images": n,
        "total_rows": n,
        "size": int(size) if size is not None else int(images.shape[-1]),
        "source_size": [int(images.shape[-2]), int(images.shape[-1])],
        "dtype": dtype,
        "shard_size": shard_size,
        "num_shards": (n + shard_size - 1) // shard_size,
    }
    cache = PredictionCache(directory)
    model = model.to(device).eval()

    def compute(s: int) -> Dict[str, Tensor]:
        rows = torch.arange(s * shard_size, min(n, (s + 1) * shard_size))
        batch = images[rows]
        if size is not None and tuple(batch.shape[-2:]) != (size, size):
            batch = resize_uint8(batch, size)
        lp = candidate_log_probs(model, batch.to(device).float() / 255, space, normalize, batch_size, output_key)
        return {"log_probs": lp.to(DTYPES[dtype]).cpu(), "labels": labels[rows].long(), "rows": rows}

    write_shards(cache, config, compute, log, max_shards, progress)
    return cache



def load_predictions(directory: str) -> Dict[str, Any]:
    """``{"log_probs", "labels", "manifest", "identity"}`` of a complete prediction cache."""
    cache = PredictionCache(directory)
    data = cache.load()
    return {"log_probs": data["log_probs"], "labels": data["labels"], "manifest": cache.manifest(),
            "identity": cache.identity()}


__all__: List[str] = ["FORMAT_VERSION", "PredictionCache", "candidate_log_probs", "generate_predictions",
                      "load_predictions"]
