"""The evaluation harness: every method's wrapper on clean and corrupted data, resumable.

Each method is the wrapper :func:`~ttach_instance.evaluation.methods.build_method` returns,
called as a user calls it; within a batch the methods share one :class:`ViewMemo`, so a view
several methods need goes through the model once (outputs replayed bit for bit). Costs are
measured on the plain wrappers (no memo), interleaved rounds, relative to Identity.

An output folder belongs to one evaluation: ``run.json`` records what the numbers depend on
(model and predictor weights, data, space, methods, corruptions, settings) and a rerun with
anything else is refused with the differences named, so stale results are never shown.
Corrupted sets are cached in the folder, keyed and checked the same way.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..io import atomic_save_tensors, atomic_write_json, load_tensors
from ..normalization import to_model_input
from ..ops import CropResize
from ..registry import get_space
from ..training.corruptions import COMMON, HELD_OUT, SEVERITIES, check_names, corrupt_batch
from ..training.labels import check_format, dataset_fingerprint, describe_differences, model_identity
from .methods import (FIXED_SPACES, METHODS, PREDICTOR_METHODS, SEG_LABELS, SEG_METHODS, ViewMemo, build_method,
                      load_policies, policy_methods, row_fingerprint)
from .report import (markdown_table, plot_scatter, plot_selection_rates, segmentation_markdown_table,
                     summarize)

__all__ = ["evaluate", "evaluate_arrays", "evaluate_segmentation", "evaluate_segmentation_arrays", "measure_cost",
           "corrupted_set", "check_methods", "GEOMETRIC_CORRUPTIONS", "RUN_FORMAT"]

#: Corruptions that move pixels: a mask would no longer match the image.
GEOMETRIC_CORRUPTIONS = ("elastic_transform",)
#: Version of ``run.json`` and the per-set records; other versions are refused.
RUN_FORMAT = 2


def check_methods(methods: Sequence[str], task: str = "classification", policies: Any = None) -> List[str]:
    """``methods`` without repeats, or an error naming the unknown ones (``policies``: loaded
    policy documents whose rows are valid too)."""
    valid = (METHODS + tuple(policy_methods(policies))) if task == "classification" else SEG_METHODS
    bad = [m for m in methods if m not in valid]
    if bad:
        raise ValueError(f"methods must be among {list(valid)} for {task}, got unknown {bad}")
    return list(dict.fromkeys(methods))


def _mean_std(model: nn.Module, mean: Any, std: Any):
    from ..data import model_mean_std

    return (mean, std) if mean is not None else model_mean_std(model)


def _wrappers(model: nn.Module, space, predictor, methods: Sequence[str], task: str, **kwargs) -> Dict[str, nn.Module]:
    return {m: build_method(m, model, space, predictor, task=task, **kwargs) for m in methods}


def _usable(methods: Sequence[str], predictor, image_side: int, task: str) -> List[str]:
    """The methods that run: those needing a predictor only with one, and below 16 px no method
    whose fixed space resizes crops back (a few pixels blown up say nothing), however it merges."""
    out = [m for m in methods if predictor is not None or not m.startswith("ours")]
    if task == "classification" and image_side < 16:
        out = [m for m in out if not _resizes_crops_back(m)]
    return out


def _resizes_crops_back(method: str) -> bool:
    """Whether ``method``'s fixed space (:data:`FIXED_SPACES`) holds a crop resized back to the
    input size (:class:`~ttach_instance.ops.CropResize`; the paper crops cut an input-size window)."""
    name = FIXED_SPACES.get(method)
    return name is not None and any(isinstance(op, CropResize) for cand in get_space(name) for op in cand.ops)


def _method_outputs(wrappers: Dict[str, nn.Module], x: Tensor, y: Tensor, preds: List[Tensor],
                    choices: Tensor) -> Tuple[Dict[str, Tensor], Optional[Tensor]]:
    """Every method's output on one batch (model inputs ``x``, targets ``y``), and the oracle's
    true losses of every candidate when the oracle is among them; appends Ours k=1's predicted
    losses to ``preds`` and counts its picks in ``choices``."""
    outputs, true = {}, None
    for m, wrapper in wrappers.items():
        if m == "oracle_k1":
            out, selection = wrapper(x, y)
            true = selection.true_losses
        elif m in PREDICTOR_METHODS:
            out, selection = wrapper(x)
            if m == "ours_k1":
                preds.append(selection.predicted_losses.float().cpu())
                choices += torch.bincount(selection.index[:, 0].cpu(), minlength=choices.numel())
        else:
            out = wrapper(x)
        outputs[m] = next(iter(out.values())) if isinstance(out, dict) else out
    return outputs, true


@torch.no_grad()
def evaluate_arrays(model: nn.Module, images: Tensor, labels: Tensor, space, predictor: Optional[nn.Module] = None,
                    methods: Sequence[str] = METHODS, batch_size: int = 200, mean: Any = None,
                    std: Any = None, policies: Any = None) -> Dict:
    """Errors of every method on one uint8 set ``(N, 3, H, W)`` at the model's size
    (``policies``: ``{name: policy file or document}`` whose rows ``methods`` may name).

    Returns ``{"n", "errors": {method: %}, "choices": (T,) counts of Ours k=1's picks,
    "pred": (N, T) predicted losses, "true": (N, T) true losses}`` (the last two for plots and
    the ranking metrics; ``None`` without a predictor)."""
    policies = load_policies(policies)
    methods = _usable(check_methods(methods, policies=policies), predictor, min(images.shape[-2:]), "classification")
    mean, std = _mean_std(model, mean, std)
    model.eval()
    if predictor is not None:
        predictor.eval()
    memo = ViewMemo(model)
    wrappers = _wrappers(memo, space, predictor, methods, "classification", mean=mean, std=std, policies=policies)
    oracle = wrappers.get("oracle_k1") or (build_method("oracle_k1", memo, space, mean=mean, std=std)
                                           if predictor is not None else None)
    correct = {m: 0 for m in methods}
    choices = torch.zeros(len(space), dtype=torch.long)
    preds, trues = [], []
    for i in range(0, images.shape[0], batch_size):
        y = labels[i:i + batch_size]
        x = to_model_input(images[i:i + batch_size].float() / 255, mean, std)
        memo.clear()
        outputs, true = _method_outputs(wrappers, x, y, preds, choices)
        for m, out in outputs.items():
            correct[m] += int((out.argmax(1).cpu() == y).sum())
        if oracle is not None:
            trues.append((true if true is not None else oracle(x, y)[1].true_losses).float().cpu())
    n = images.shape[0]
    return {"n": n, "errors": {m: 100.0 * (1 - correct[m] / n) for m in methods}, "choices": choices.tolist(),
            "pred": torch.cat(preds) if preds else None, "true": torch.cat(trues) if trues else None}


def corrupted_set(images: Tensor, name: Optional[str], severity: int, size: Optional[int], cache_dir: Optional[str],
                  seed: int = 0, fingerprint: Optional[str] = None) -> Tensor:
    """``images`` (source resolution, uint8) corrupted by ``name`` at ``severity`` then resized to
    ``size``; cached as ``cache_dir/<name>_<severity>.safetensors`` with the source data's
    fingerprint, size and seed, and recomputed when any of them differs."""
    from ..data import resize_uint8

    fingerprint = fingerprint or dataset_fingerprint(images, torch.zeros(0))
    key = f"{name or 'clean'}_{severity if name else 0}"
    path = os.path.join(cache_dir, f"{key}.safetensors") if cache_dir else None
    meta = {"source": fingerprint, "n": int(images.shape[0]), "size": size, "seed": seed, "corruption": name,
            "severity": severity}
    if path and os.path.isfile(path):
        try:
            tensors, found = load_tensors(path)
            if found == meta:
                return tensors["images"]
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            pass
    n = images.shape[0]
    out = images if name is None else corrupt_batch(images, [name] * n, [severity] * n,
                                                    [seed * 1000003 + i for i in range(n)])
    if size is not None and out.shape[-1] != size:
        out = resize_uint8(out, size)
    if path:
        atomic_save_tensors(path, {"images": out.contiguous()}, meta)
    return out


def _claim(out_dir: str, identity: Dict[str, Any]) -> None:
    """Record ``identity`` in ``out_dir/run.json``, or refuse a folder that holds another run."""
    os.makedirs(os.path.join(out_dir, "sets"), exist_ok=True)
    path = os.path.join(out_dir, "run.json")
    identity = json.loads(json.dumps(identity, sort_keys=True))
    if os.path.isfile(path):
        with open(path) as f:
            found = json.load(f)
        check_format(found.get("format_version"), RUN_FORMAT, f"evaluation folder {out_dir!r}")
        if found != identity:
            diff = "; ".join(describe_differences(found, identity))
            raise ValueError(f"evaluation folder {out_dir!r} holds the results of another evaluation ({diff}); "
                             f"use another --out, or delete the folder to start over")
        return
    atomic_write_json(path, identity)


def _identity(task: str, model, predictor, space, images, targets, **settings) -> Dict[str, Any]:
    return {"format_version": RUN_FORMAT, "task": task, "model": model_identity(model, settings.pop("model_spec")),
            "predictor": None if predictor is None else model_identity(predictor), "space": space.fingerprint,
            "data": dataset_fingerprint(images, targets), **settings}


def measure_cost(model: nn.Module, predictor: Optional[nn.Module], space, images: Tensor,
                 methods: Sequence[str] = METHODS, repeats: int = 3, batch_size: int = 64, mean: Any = None,
                 std: Any = None, task: str = "classification", **method_kwargs: Any) -> Dict[str, Dict]:
    """Wall time of each method's wrapper on ``images`` (uint8, model size) relative to Identity
    (best of ``repeats`` interleaved rounds: every method once per round, so a change of machine
    load hits all alike), and model rows per image counted by a forward hook."""
    mean, std = _mean_std(model, mean, std)
    methods = [m for m in _usable(methods, predictor, min(images.shape[-2:]), task) if m != "oracle_k1"]
    wrappers = _wrappers(model, space, predictor, methods, task, mean=mean, std=std, **method_kwargs)
    x_all = to_model_input(images.float() / 255, mean, std)
    calls = {"n": 0}

    def hook(_m, inputs, _o):
        calls["n"] += inputs[0].shape[0]

    handle = model.register_forward_hook(hook)
    out: Dict[str, Dict] = {}
    try:
        with torch.no_grad():
            for m, w in wrappers.items():  # warm-up (cached inverse maps, lazy imports)
                w(x_all[:2])
            for _ in range(repeats):
                for m, w in wrappers.items():
                    if hasattr(w, "reset"):
                        w.reset()
                    calls["n"] = 0
                    t0 = time.perf_counter()
                    for i in range(0, x_all.shape[0], batch_size):
                        w(x_all[i:i + batch_size])
                    seconds = time.perf_counter() - t0
                    rec = out.setdefault(m, {"seconds": float("inf")})
                    rec["seconds"] = min(rec["seconds"], seconds)
                    rec["model_calls_per_image"] = calls["n"] / x_all.shape[0]
    finally:
        handle.remove()
    base = out.get("identity", {}).get("seconds")
    for rec in out.values():
        rec["relative_time"] = rec["seconds"] / base if base else None
    return out


def _jobs(corruptions, held_out, severities):
    return [(None, 0)] + [(c, s) for c in tuple(corruptions) + tuple(held_out) for s in severities]


def _check_severities(severities: Sequence[int]) -> List[int]:
    bad = [s for s in severities if isinstance(s, bool) or not isinstance(s, int) or s not in SEVERITIES]
    if bad or not severities:
        raise ValueError(f"severities must be one or more of {list(SEVERITIES)}, got {list(severities)}")
    return list(severities)


def evaluate(model: nn.Module, val_images: Tensor, val_labels: Tensor, space, out_dir: str,
             predictor: Optional[nn.Module] = None, size: Optional[int] = None,
             corruptions: Sequence[str] = COMMON, held_out: Sequence[str] = HELD_OUT,
             severities: Sequence[int] = SEVERITIES, methods: Sequence[str] = METHODS, batch_size: int = 200,
             seed: int = 0, cost_images: int = 256, progress: bool = True, log: Callable[[str], None] = print,
             model_spec: Any = None, policies: Any = None) -> Dict:
    """Table 1 on clean, common-corrupted and held-out-corrupted versions of ``val_images``.

    ``policies``: ``{name: policy file or document}`` (GPS or budget search results); their rows
    (:func:`~ttach_instance.evaluation.methods.policy_methods`) join ``methods``, and the
    run's identity records each policy's candidates (the fingerprint of its space).

    Writes ``out_dir/results.json``, ``out_dir/table.md`` and PNG plots; per-set results are kept
    in ``out_dir/sets`` (an interrupted run continues where it stopped). Under ``torchrun`` every
    rank evaluates its share of the sets and rank 0 summarises. Returns the results dict."""
    from tqdm import tqdm

    from ..training import distributed as dist
    from ..training.losses import ranking_metrics

    corruptions, held_out = check_names(corruptions, "corruptions"), check_names(held_out, "held_out")
    policies = load_policies(policies)
    methods = check_methods(list(methods) + list(policy_methods(policies)), policies=policies)
    severities = _check_severities(severities)
    extra = {"policies": {name: row_fingerprint(p) for name, p in policies.items()}} \
        if policies else {}
    _claim(out_dir, _identity("classification", model, predictor, space, val_images, val_labels,
                              model_spec=model_spec, size=size, seed=seed, methods=methods,
                              corruptions=list(corruptions), held_out=list(held_out), severities=severities, **extra))
    source = dataset_fingerprint(val_images, val_labels)
    jobs = _jobs(corruptions, held_out, severities)
    rank, world = dist.rank(), dist.world_size()
    for j, (name, sev) in enumerate(tqdm(jobs, desc="eval sets", disable=not progress or rank != 0)):
        path = os.path.join(out_dir, "sets", f"{name or 'clean'}_{sev}.json")
        if os.path.isfile(path) or j % world != rank:
            continue
        imgs = corrupted_set(val_images, name, sev, size, os.path.join(out_dir, "data"), seed, source)
        res = evaluate_arrays(model, imgs, val_labels, space, predictor, methods, batch_size=batch_size,
                              policies=policies)
        rec = {"corruption": name, "severity": sev, "n": res["n"], "errors": res["errors"], "choices": res["choices"]}
        if res["pred"] is not None:
            rec["ranking"] = ranking_metrics(res["pred"], res["true"])
            keep = torch.arange(0, res["n"], max(1, res["n"] // 50))
            rec["scatter"] = {"pred": res["pred"][keep].tolist(), "true": res["true"][keep].tolist()}
        atomic_write_json(path, rec)
    dist.barrier()
    if rank != 0:
        return {}
    per_set = {}
    for name, sev in jobs:
        key = f"{name or 'clean'}_{sev}"
        with open(os.path.join(out_dir, "sets", key + ".json")) as f:
            per_set[key] = json.load(f)
    cost = measure_cost(model, predictor, space, corrupted_set(val_images[:cost_images], None, 0, size, None),
                        methods, policies=policies) if cost_images else {}
    if cost and "oracle_k1" in methods:
        cost["oracle_k1"] = {"model_calls_per_image": float(len(space)), "relative_time": None, "seconds": None}
    rows = policy_methods(policies)
    results = summarize(per_set, methods, corruptions, held_out, severities, space.names, cost,
                        labels={m: v[0] for m, v in rows.items()}, model_calls={m: v[1] for m, v in rows.items()})
    atomic_write_json(os.path.join(out_dir, "results.json"), results)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown_table(results))
    try:
        plot_selection_rates(results, os.path.join(out_dir, "selection_rates.png"))
        plot_scatter(per_set, os.path.join(out_dir, "pred_vs_true.png"))
    except Exception as exc:  # noqa: BLE001 - plots are a convenience; never lose the table for them
        log(f"plotting failed: {exc}")
    return results


# ============================================================================ segmentation


@torch.no_grad()
def evaluate_segmentation_arrays(model: nn.Module, images: Tensor, masks: Tensor, space, num_classes: int,
                                 predictor: Optional[nn.Module] = None, methods: Sequence[str] = SEG_METHODS,
                                 loss: str = "ce", ignore_index: int = 255, output_key: Optional[str] = None,
                                 batch_size: int = 32, mean: Any = None, std: Any = None) -> Dict:
    """mIoU and pixel accuracy of every method's wrapper on one uint8 set ``(N, 3, H, W)`` with
    masks ``(N, H, W)``. Returns ``{"n", "miou": {m}, "pixel_acc": {m}, "choices", "pred", "true"}``."""
    from ..segmentation import ConfusionMatrix

    methods = _usable(check_methods(methods, "segmentation"), predictor, min(images.shape[-2:]), "segmentation")
    mean, std = _mean_std(model, mean, std)
    model.eval()
    if predictor is not None:
        predictor.eval()
    memo = ViewMemo(model)
    kwargs = {"mean": mean, "std": std, "output_key": output_key}
    wrappers = _wrappers(memo, space, predictor, methods, "segmentation", loss=loss, ignore_index=ignore_index,
                         **kwargs)
    oracle = wrappers.get("oracle_k1") or build_method("oracle_k1", memo, space, task="segmentation", loss=loss,
                                                       ignore_index=ignore_index, **kwargs)
    cms = {m: ConfusionMatrix(num_classes, ignore_index) for m in methods}
    choices = torch.zeros(len(space), dtype=torch.long)
    preds, trues = [], []
    for i in range(0, images.shape[0], batch_size):
        x = to_model_input(images[i:i + batch_size].float() / 255, mean, std)
        y = masks[i:i + batch_size].long()
        memo.clear()
        outputs, true = _method_outputs(wrappers, x, y, preds, choices)
        for m, out in outputs.items():
            cms[m].update(out.argmax(1), y.to(out.device))
        if predictor is not None:
            trues.append((true if true is not None else oracle(x, y)[1].true_losses).float().cpu())
    metrics = {m: cms[m].metrics() for m in methods}
    return {"n": int(images.shape[0]), "miou": {m: 100.0 * metrics[m]["miou"] for m in methods},
            "pixel_acc": {m: 100.0 * metrics[m]["pixel_acc"] for m in methods}, "choices": choices.tolist(),
            "pred": torch.cat(preds) if preds else None, "true": torch.cat(trues) if trues else None}


def evaluate_segmentation(model: nn.Module, val_images: Tensor, val_masks: Tensor, space, out_dir: str,
                          num_classes: int, predictor: Optional[nn.Module] = None, size: Optional[int] = None,
                          corruptions: Sequence[str] = tuple(c for c in COMMON if c not in GEOMETRIC_CORRUPTIONS),
                          held_out: Sequence[str] = HELD_OUT, severities: Sequence[int] = SEVERITIES,
                          methods: Sequence[str] = SEG_METHODS, loss: str = "ce", ignore_index: int = 255,
                          output_key: Optional[str] = None, batch_size: int = 32, seed: int = 0,
                          cost_images: int = 64, cost_repeats: int = 3, progress: bool = True,
                          model_spec: Any = None) -> Dict:
    """The methods table for a segmentation model: mIoU and pixel accuracy on clean, common- and
    held-out-corrupted versions of ``val_images`` (masks at the same resolution, resized with the
    images to ``size``), model forwards per image and wall time vs Identity. Writes
    ``out_dir/results.json`` and ``out_dir/table.md``; resumable like :func:`evaluate`."""
    import numpy as np
    from tqdm import tqdm

    from ..data import resize_masks
    from ..training.losses import ranking_metrics

    corruptions, held_out = check_names(corruptions, "corruptions"), check_names(held_out, "held_out")
    methods, severities = check_methods(methods, "segmentation"), _check_severities(severities)
    if val_masks.shape != (val_images.shape[0],) + tuple(val_images.shape[-2:]):
        raise ValueError(f"val_masks must be (N, H, W) = {(val_images.shape[0],) + tuple(val_images.shape[-2:])}, "
                         f"got {tuple(val_masks.shape)}")
    _claim(out_dir, _identity("segmentation", model, predictor, space, val_images, val_masks, model_spec=model_spec,
                              size=size, seed=seed, methods=methods, corruptions=list(corruptions),
                              held_out=list(held_out), severities=severities, loss=loss, ignore_index=ignore_index,
                              num_classes=num_classes, output_key=output_key))
    masks = resize_masks(val_masks, size) if size is not None and val_masks.shape[-1] != size else val_masks
    source = dataset_fingerprint(val_images, val_masks)
    per_set: Dict[str, Dict] = {}
    for name, sev in tqdm(_jobs(corruptions, held_out, severities), desc="eval sets", disable=not progress):
        key = f"{name or 'clean'}_{sev}"
        path = os.path.join(out_dir, "sets", key + ".json")
        if not os.path.isfile(path):
            imgs = corrupted_set(val_images, name, sev, size, os.path.join(out_dir, "data"), seed, source)
            res = evaluate_segmentation_arrays(model, imgs, masks, space, num_classes, predictor, methods, loss=loss,
                                               ignore_index=ignore_index, output_key=output_key,
                                               batch_size=batch_size)
            rec = {"corruption": name, "severity": sev, "n": res["n"], "miou": res["miou"],
                   "pixel_acc": res["pixel_acc"], "choices": res["choices"]}
            if res["pred"] is not None:
                rec["ranking"] = ranking_metrics(res["pred"], res["true"])
            atomic_write_json(path, rec)
        with open(path) as f:
            per_set[key] = json.load(f)
    cost = measure_cost(model, predictor, space, corrupted_set(val_images[:cost_images], None, 0, size, None),
                        methods, repeats=cost_repeats, batch_size=batch_size, task="segmentation",
                        output_key=output_key) if cost_images else {}
    if cost and "oracle_k1" in methods:
        cost["oracle_k1"] = {"model_calls_per_image": float(len(space) + 1), "relative_time": None, "seconds": None}
    present = [m for m in methods if m in per_set["clean_0"]["miou"]]

    def mean_over(cs, field_name):
        keys = [f"{c}_{s}" for c in cs for s in severities]
        return {m: float(np.mean([per_set[k][field_name][m] for k in keys])) for m in present} if keys else {}

    ranking = {k: v["ranking"] for k, v in per_set.items() if "ranking" in v}
    selection = {k: [c / sum(v["choices"]) for c in v["choices"]] for k, v in per_set.items() if sum(v["choices"])}

    def mean_spearman(cs):
        return float(np.mean([ranking[f"{c}_{s}"]["spearman"] for c in cs for s in severities])) \
            if ranking and cs else None

    results = {
        "task": "segmentation", "methods": present, "labels": {m: SEG_LABELS[m] for m in present},
        "clean": {"miou": per_set["clean_0"]["miou"], "pixel_acc": per_set["clean_0"]["pixel_acc"]},
        "common_mean": {"miou": mean_over(corruptions, "miou"), "pixel_acc": mean_over(corruptions, "pixel_acc")},
        "held_out_mean": {"miou": mean_over(held_out, "miou"), "pixel_acc": mean_over(held_out, "pixel_acc")},
        "per_set": {k: {"miou": v["miou"], "pixel_acc": v["pixel_acc"]} for k, v in per_set.items()},
        "corruptions": list(corruptions), "held_out": list(held_out), "severities": list(severities),
        "n": per_set["clean_0"]["n"], "num_classes": num_classes, "loss": loss,
        "cost": cost, "candidate_names": list(space.names), "selection_rates": selection, "ranking": ranking,
        "spearman": {"clean": ranking.get("clean_0", {}).get("spearman"), "common": mean_spearman(corruptions),
                     "held_out": mean_spearman(held_out)},
    }
    atomic_write_json(os.path.join(out_dir, "results.json"), results)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(segmentation_markdown_table(results))
    return results
