"""Train a loss predictor on a label cache: ranking losses, cosine LR, EMA, resume, DDP.

The split is by *image* (all draws of one image fall in the same fold), ``val_fraction`` of
the images (default 20 %, as the paper) are held out; metrics on them after every epoch,
computed with the EMA weights; the fit ends with the EMA weights of the epoch that scored best
on them (``FitConfig.select_by``).

Runs unchanged under ``torchrun``: every rank sees the same global permutation and takes
its slice of each global batch; gradients are averaged by DistributedDataParallel; rank 0
writes checkpoints.

Reproducible: a fit seeds every generator it draws from with ``FitConfig.seed`` (torch's global
generator, which dropout uses, numpy's and Python's; the permutation, cutout and flips come from
a generator seeded per epoch from the seed, the held-out split and temporary heads from their
own seeded ones). The checkpoint written after every epoch holds the global generators' states,
so on the CPU a fit killed and resumed ends bit for bit where the uninterrupted one does. It
also records the configuration and a hash of its labels: it refuses to be continued with
either changed, saying what differs.
"""

from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..io import (atomic_save_tensors, atomic_write_json, load_module_tensors, load_tensors, module_tensors,
                  optimizer_from_tensors, optimizer_to_tensors, tensors_sha256)
from ..predictors import LossPredictorBase
from ..predictors.calibration import fit_identity_calibration, identity_index
from ..space import flip_permutation  # noqa: F401 - re-exported: FitConfig(flip_permutation=...)
from . import distributed as dist
from .corruptions import ALL, SEVERITIES
from .gain import format_gain, gain_record, heldout_gain
from .losses import ranking_loss, ranking_metrics

#: Version of the fit checkpoint (``checkpoint.safetensors``). 2: records its format, a hash of
#: its labels and the global generators' states (format 1, unversioned, recorded neither).
CHECKPOINT_FORMAT = 2

#: Classes of :func:`corruption_groups`: clean, then every corruption of ``ALL`` at every severity.
NUM_CORRUPTION_GROUPS = 1 + len(ALL) * len(SEVERITIES)


#: Held-out metrics an epoch can be selected by, and whether higher is better.
SELECTABLE_METRICS = {"spearman": True, "k1_accuracy": True, "top1_hit": True, "regret": False}


@dataclass
class FitConfig:
    epochs: int = 60
    batch_size: int = 128
    optimizer: str = "rmsprop"  # the paper's: RMSprop (TF-style) lr 0.01, alpha 0.9, momentum 0.9, eps 1e-3
    lr: float = 0.01
    weight_decay: float = 1e-5
    warmup_steps: int = 200
    ema_decay: float = 0.999
    listwise_weight: float = 1.0
    spearman_weight: float = 1.0
    tau: float = 1.0
    rank_temperature: float = 0.1
    val_fraction: float = 0.2
    cutout: float = 0.5  # probability of a cutout square (1/4 of the side) on the predictor input
    seed: int = 0
    grad_clip: float = 5.0
    #: Horizontal-flip augmentation of the predictor input: candidate ``j`` of a flipped image has
    #: the loss of candidate ``flip_permutation[j]`` of the original (see :func:`flip_permutation`).
    flip_permutation: Optional[List[int]] = None
    #: Weight of an auxiliary *corruption recognition* term during the ranking epochs: a temporary
    #: linear head on ``predictor.features`` classifies each row's corruption and severity (clean
    #: is one class; :func:`corruption_groups`), trained jointly and dropped afterwards, so the
    #: saved predictor and its cost are unchanged. Why: on the Tiny ImageNet labels a policy that
    #: knows only the corruption and takes that group's best candidate beats the plain predictor's
    #: k=1 choice (docs/BENCHMARKS.md); the term makes the features carry the corruption. ``0``: off.
    group_weight: float = 0.0
    #: Weight of an auxiliary *distillation* term: a temporary linear head on ``predictor.features``
    #: matches the target model's class distribution on the row's image (KL to the softmax of
    #: ``data["input_logits"]``, which :class:`~ttach_instance.training.labels.LabelCache`
    #: records), so the features learn what the target model sees. ``0``: off.
    distill_weight: float = 0.0
    #: After training, pick a margin by which the identity's predicted loss must be beaten, on the
    #: held-out fold: the best k=1 accuracy whose clean-image accuracy stays within this many
    #: points of the identity's (``None``: no calibration).
    clean_tolerance: Optional[float] = None
    #: With ``clean_tolerance``: make the margin depend on how clean each image looks
    #: (a gated :class:`~ttach_instance.predictors.calibration.IdentityCalibration`). For the same
    #: clean accuracy, corrupted images keep more of their gain (docs/BENCHMARKS.md).
    identity_gate: bool = False
    #: Which epoch's EMA weights the fit ends with: the best on this held-out metric (a key of
    #: :func:`~ttach_instance.training.losses.ranking_metrics`: ``"spearman"``, ``"k1_accuracy"``,
    #: ``"top1_hit"``; ``"regret"`` is minimised), or ``None`` for the last epoch's. Without a
    #: held-out fold it is always the last.
    select_by: Optional[str] = "spearman"
    #: Early stopping: end the fit when ``select_by`` has not improved on the held-out fold for this
    #: many epochs (``epochs`` is then the most it runs; the cosine schedule still spans ``epochs``).
    #: ``None``: run every epoch. Needs a held-out fold and ``select_by``.
    patience: Optional[int] = None

    def __post_init__(self):
        if self.optimizer not in ("rmsprop", "adamw", "sgd"):
            raise ValueError(f"optimizer must be 'rmsprop', 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.identity_gate and self.clean_tolerance is None:
            raise ValueError("identity_gate=True needs clean_tolerance (the calibration it gates)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("group_weight", "distill_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.select_by is not None and self.select_by not in SELECTABLE_METRICS:
            raise ValueError(f"select_by must be one of {sorted(SELECTABLE_METRICS)} or None, got {self.select_by!r}")
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(self.patience, int)
                                          or self.patience < 1 or self.select_by is None):
            raise ValueError(f"patience must be None or an integer >= 1 with select_by set, got {self.patience!r}")
        if self.flip_permutation is not None and sorted(self.flip_permutation) != list(range(len(self.flip_permutation))):
            raise ValueError(f"flip_permutation must be a permutation of 0..T-1, got {self.flip_permutation}")


def corruption_groups(corruption: Tensor, severity: Tensor) -> Tensor:
    """Class of each label row for the corruption-recognition term: ``0`` clean (``corruption < 0``),
    else ``1 + corruption * 5 + severity - 1`` (``corruption`` indexes
    :data:`~ttach_instance.training.corruptions.ALL`); :data:`NUM_CORRUPTION_GROUPS` classes."""
    groups = 1 + corruption.long() * len(SEVERITIES) + severity.long() - 1
    return torch.where(corruption < 0, torch.zeros_like(groups), groups)


def split_rows(rows: Tensor, num_images: int, val_fraction: float, seed: int):
    """Train/val row masks splitting by image id ``rows % num_images``."""
    g = torch.Generator().manual_seed(seed + 7919)
    perm = torch.randperm(num_images, generator=g)
    n_val = int(round(val_fraction * num_images))
    is_val_image = torch.zeros(num_images, dtype=torch.bool)
    is_val_image[perm[:n_val]] = True
    val = is_val_image[rows % num_images]
    return ~val, val


def make_optimizer(params, cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.9, momentum=0.9, eps=1e-3,
                                   weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)


def _cutout(x: Tensor, p: float, g: torch.Generator) -> Tensor:
    if p <= 0:
        return x
    b, _, h, w = x.shape
    s = max(1, h // 4)
    cy = torch.randint(0, h, (b,), generator=g)
    cx = torch.randint(0, w, (b,), generator=g)
    on = torch.rand(b, generator=g) < p
    ys = torch.arange(h)[None, :, None]
    xs = torch.arange(w)[None, None, :]
    mask = ((ys - cy[:, None, None]).abs() <= s // 2) & ((xs - cx[:, None, None]).abs() <= s // 2) & on[:, None, None]
    return x.masked_fill(mask[:, None], 0.5)


class _ScoresAndAux(nn.Module):
    """``predictor`` plus its temporary auxiliary heads on its features: one features pass gives
    the ranking scores and every head's output (what DDP wraps when an auxiliary term is on)."""

    def __init__(self, predictor: nn.Module, heads: nn.ModuleDict):
        super().__init__()
        self.predictor = predictor
        self.heads = heads

    def forward(self, x: Tensor):
        f = self.predictor.features(x)
        return self.predictor.head_scores(f), {name: head(f) for name, head in self.heads.items()}


def _temporary_head(in_features: int, out_features: int, generator: torch.Generator) -> nn.Linear:
    """A linear head drawn from ``generator`` (so every DDP rank builds the same one), zero bias."""
    head = nn.Linear(in_features, out_features)
    with torch.no_grad():
        head.weight.copy_(torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5)
        head.bias.zero_()
    return head


def _feature_width(predictor: nn.Module, probe: Tensor) -> int:
    """Width of ``predictor.features`` on two uint8 ``probe`` images (eval mode, no grad)."""
    was = predictor.training
    with torch.no_grad():
        width = predictor.eval().features(probe[:2].float() / 255).shape[1]
    predictor.train(was)
    return int(width)


def predict_losses(predictor: nn.Module, images: Tensor, batch_size: int = 500, device: str = "cpu") -> Tensor:
    """Predicted relative losses ``(N, T)`` for uint8 images ``(N, 3, H, W)``."""
    predictor.eval()
    out = [predictor(images[i:i + batch_size].to(device).float() / 255).float().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.is_floating_point():
            e.mul_(decay).add_(m.detach(), alpha=1 - decay)
        else:
            e.copy_(m)


def seed_everything(seed: int) -> None:
    """Seed torch's global generator (CPU and every GPU), numpy's and Python's with ``seed``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def rng_state() -> Tuple[Dict[str, Tensor], Dict]:
    """The global generators' states as ``(tensors, json)`` for a checkpoint (:func:`set_rng_state`)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": [name, int(pos), int(has_gauss), float(cached)],
                     "python": [version, list(internal), gauss_next]}


def set_rng_state(tensors: Dict[str, Tensor], meta: Dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def labels_record(data: Dict[str, Tensor], identity: Optional[Dict] = None) -> Dict:
    """What a fit checkpoint records of its labels: the sha256 of every tensor of ``data`` (the
    rows trained on, whatever caches they came from) and ``identity`` (JSON, e.g. the caches'
    paths and manifest hashes from :func:`~ttach_instance.training.labels.load_label_caches`)."""
    record = {"data_sha256": tensors_sha256({k: v for k, v in data.items() if isinstance(v, Tensor)})}
    if identity:
        record.update(identity)
    return record


def fit_predictor(
    predictor: nn.Module,
    data: Dict[str, Tensor],
    out_dir: Optional[str] = None,
    config: Optional[FitConfig] = None,
    num_images: Optional[int] = None,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    max_epochs_this_run: Optional[int] = None,
    labels_identity: Optional[Dict] = None,
) -> Dict:
    """Train ``predictor`` (pixels in [0, 1] -> ``(B, T)`` losses) on ``data`` (a loaded label cache).

    With ``out_dir``: ``checkpoint.safetensors`` after every epoch (model, EMA, optimiser, step,
    history), resumed when present; ``history.json`` with per-epoch metrics; at the end the EMA
    weights of the epoch selected by ``config.select_by`` (best held-out Spearman by default) are
    loaded into ``predictor`` (and saved as ``predictor.safetensors`` through ``predictor.save``
    when it has one). Returns ``{"history": [...], "final": the selected epoch's metrics,
    "selected_epoch": ...}``, and ``"heldout_gain"``: the fitted predictor's held-out k=1 gain
    over the identity on all, clean and corrupted rows
    (:func:`~ttach_instance.training.gain.heldout_gain`; logged, and recorded in the selected
    epoch's history), ``None`` without ``correct`` labels, a held-out fold or an identity candidate.

    A fresh fit first seeds every global generator with ``config.seed`` (:func:`seed_everything`);
    a resumed one restores their states from the checkpoint. A checkpoint of another format,
    configuration or labels (:func:`labels_record` of ``data`` and ``labels_identity``) is
    refused with a ``ValueError`` saying what differs.
    """
    from tqdm import tqdm

    cfg = config or FitConfig()
    for key in ("images", "losses", "rows"):
        if key not in data:
            raise ValueError(f"data must be a loaded label cache with {key!r} (LabelCache(dir).load()), missing {key!r}")
    images, losses, rows = data["images"], data["losses"].float(), data["rows"]
    correct = data.get("correct")
    if cfg.clean_tolerance is not None and not isinstance(predictor, LossPredictorBase):
        raise TypeError(f"clean_tolerance calibrates a LossPredictorBase's calibration slot; "
                        f"{type(predictor).__name__} has none (fit with clean_tolerance=None)")
    n_img = int(num_images or (int(rows.max()) + 1 if "num_images" not in data else data["num_images"]))
    train_mask, val_mask = split_rows(rows, n_img, cfg.val_fraction, cfg.seed)
    train_idx = train_mask.nonzero().squeeze(1)
    val_idx = val_mask.nonzero().squeeze(1)
    if train_idx.numel() == 0:
        raise ValueError("no training rows left after the validation split; lower val_fraction or add data")
    rank, world = dist.rank(), dist.world_size()
    predictor = predictor.to(device)
    ckpt = os.path.join(out_dir, "checkpoint.safetensors") if out_dir else None
    ema = copy.deepcopy(predictor).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    trained: nn.Module = predictor
    # Auxiliary terms: each a temporary linear head on the features, its per-row target and weight.
    aux_weights = {"group": cfg.group_weight, "distill": cfg.distill_weight}
    aux_weights = {name: w for name, w in aux_weights.items() if w}
    heads = nn.ModuleDict()
    groups, teacher = None, None
    if aux_weights:
        needs = {"group": ("corruption", "severity"), "distill": ("input_logits",)}
        for name in aux_weights:
            for key in needs[name]:
                if key not in data:
                    hint = (" (recorded by generate_labels for classification when the space has an identity "
                            "candidate; caches made before it lack it)") if key == "input_logits" else ""
                    raise ValueError(f"{name}_weight needs the label cache's {key!r} (LabelCache(dir).load()){hint}")
        if not (callable(getattr(predictor, "features", None)) and callable(getattr(predictor, "head_scores", None))):
            raise TypeError(f"{'/'.join(n + '_weight' for n in aux_weights)} needs a predictor with features(pixels) "
                            f"-> (B, F) and head_scores(features) methods, {type(predictor).__name__} lacks them")
        width = _feature_width(predictor, images[:2].to(device))
        if "group" in aux_weights:
            groups = corruption_groups(data["corruption"], data["severity"])
        if "distill" in aux_weights:
            teacher = data["input_logits"].float()
            if teacher.dim() != 2 or teacher.shape[0] != images.shape[0]:
                raise ValueError(f"data['input_logits'] must be (N, C) with N = {images.shape[0]} rows, "
                                 f"got {tuple(teacher.shape)}")
        outputs = {"group": NUM_CORRUPTION_GROUPS, "distill": 0 if teacher is None else teacher.shape[1]}
        for i, name in enumerate(aux_weights):  # the group head's draw is the one it always had
            heads[name] = _temporary_head(width, outputs[name],
                                          torch.Generator().manual_seed(cfg.seed * 1000003 + 777 + 101 * i)).to(device)
        trained = _ScoresAndAux(predictor, heads)
    net: nn.Module = trained
    if world > 1:
        net = nn.parallel.DistributedDataParallel(trained, device_ids=None if device == "cpu" else [torch.device(device).index])
    opt = make_optimizer([p for p in trained.parameters() if p.requires_grad], cfg)
    steps_per_epoch = math.ceil(train_idx.numel() / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    start_epoch, step, history = 0, 0, []
    # The selected epoch's EMA weights live beside the running ones (and in the checkpoint), so a
    # resumed fit selects among all its epochs.
    best_state, best_epoch = None, None
    labels = labels_record(data, labels_identity) if ckpt else None
    if ckpt and os.path.isfile(ckpt):
        tensors, meta = _checked_checkpoint(ckpt, cfg, labels)
        load_module_tensors(predictor, tensors, "model")
        load_module_tensors(ema, tensors, "ema")
        for name, head in heads.items():
            load_module_tensors(head, tensors, f"{name}_head")
        optimizer_from_tensors(opt, tensors, meta["optim"])
        start_epoch, step, history = meta["epoch"], meta["step"], meta["history"]
        best_epoch = meta.get("best_epoch")
        if best_epoch is not None:
            best_state = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        set_rng_state(tensors, meta["rng"])
        log(f"resumed predictor training at epoch {start_epoch}/{cfg.epochs}")
    else:
        seed_everything(cfg.seed)
    end_epoch = cfg.epochs if max_epochs_this_run is None else min(cfg.epochs, start_epoch + max_epochs_this_run)
    stopped = _patience_spent(cfg, history, best_epoch)  # a resumed fit that had stopped early
    for epoch in range(start_epoch, end_epoch):
        if stopped:
            break
        net.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
        perm = train_idx[torch.randperm(train_idx.numel(), generator=g)]
        bar = tqdm(range(steps_per_epoch), desc=f"fit epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress or rank != 0, leave=False)
        loss_sum, seen = 0.0, 0
        aux_sums = {name: 0.0 for name in heads}
        for s in bar:
            batch = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            mine = batch[rank::world]
            lr_scale = min(1.0, (step + 1) / max(1, cfg.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_scale
            # Augment the whole global batch, then slice: the random stream is the same for any world size.
            x = _cutout(images[batch].float() / 255, cfg.cutout, g)
            target = losses[batch]
            if cfg.flip_permutation is not None:
                flip = torch.rand(batch.numel(), generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                target = torch.where(flip[:, None], target[:, cfg.flip_permutation], target)
            x, target = x[rank::world], target[rank::world]
            target = target.to(device)  # (B, T) losses, candidate order flipped with the image
            if heads:
                pred, aux_out = net(x.to(device))
            else:
                pred, aux_out = net(x.to(device)), {}
            loss = ranking_loss(pred, target, cfg.listwise_weight, cfg.spearman_weight, cfg.tau, cfg.rank_temperature)
            for name, out in aux_out.items():
                if name == "group":
                    term = nn.functional.cross_entropy(out, groups[mine].to(device))
                else:
                    soft = torch.softmax(teacher[mine].to(device), 1)
                    term = nn.functional.kl_div(torch.log_softmax(out, 1), soft, reduction="batchmean")
                aux_sums[name] += float(term.detach()) * mine.numel()
                loss = loss + aux_weights[name] * term
            # DDP averages gradients over ranks: weight each rank's mean by its share of the global batch.
            scaled = loss * (mine.numel() * world / max(1, batch.numel()))
            opt.zero_grad(set_to_none=True)
            scaled.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            _ema_update(ema, predictor, decay)
            loss_sum += float(loss.detach()) * mine.numel()
            seen += mine.numel()
            bar.set_postfix(loss=f"{loss_sum / max(1, seen):.4f}", refresh=False)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "lr": cfg.lr * lr_scale}
        for name, total in aux_sums.items():
            record[f"train_{name}_loss"] = total / max(1, seen)
        if val_idx.numel():
            pred_val = predict_losses(ema, images[val_idx], device=device)
            record.update({f"val_{k}": v for k, v in ranking_metrics(
                pred_val, losses[val_idx], None if correct is None else correct[val_idx]).items()})
        history.append(record)
        if cfg.select_by is not None and _improves(record, history, best_epoch, cfg.select_by):
            best_epoch = epoch + 1
            best_state = {k: v.detach().clone() for k, v in ema.state_dict().items()}
        if rank == 0:
            log("fit " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            if ckpt:
                otensors, ometa = optimizer_to_tensors(opt)
                best = {f"best.{k}": v for k, v in best_state.items()} if best_state is not None else {}
                extra = {k: v for name, head in heads.items() for k, v in module_tensors(head, f"{name}_head").items()}
                rtensors, rmeta = rng_state()
                atomic_save_tensors(ckpt, {**module_tensors(predictor, "model"), **module_tensors(ema, "ema"), **best,
                                           **extra, **otensors, **rtensors},
                                    {"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "step": step, "history": history,
                                     "optim": ometa, "config": asdict(cfg), "labels": labels, "rng": rmeta,
                                     "best_epoch": best_epoch})
                atomic_write_json(os.path.join(out_dir, "history.json"), history)
        dist.barrier()
        stopped = _patience_spent(cfg, history, best_epoch)
        if stopped and rank == 0:
            log(f"early stop after epoch {epoch + 1}: held-out {cfg.select_by} not improved for {cfg.patience} epochs")
    done = end_epoch >= cfg.epochs or stopped
    chosen = best_epoch if (done and best_state is not None) else len(history)
    predictor.load_state_dict(best_state if chosen != len(history) else ema.state_dict())
    predictor.eval()
    if done and history and rank == 0 and chosen != len(history):
        log(f"selected epoch {chosen}/{len(history)} (best held-out {cfg.select_by})")
    margin = None
    calibrate = done and cfg.clean_tolerance is not None and correct is not None and "corruption" in data \
        and val_idx.numel() > 0
    if calibrate and identity_index(predictor.space) is None:
        calibrate = False
        if rank == 0:
            log(f"no identity calibration: space {predictor.space.name!r} has no identity candidate")
    if calibrate:
        clean = data["corruption"] < 0
        val_features = predict_features(predictor, images[val_idx], device=device)
        train_features = train_clean = None
        if cfg.identity_gate:
            g = torch.Generator().manual_seed(cfg.seed)
            gate_rows = train_idx[torch.randperm(train_idx.numel(), generator=g)[:50_000]]
            train_features = predict_features(predictor, images[gate_rows], device=device)
            train_clean = clean[gate_rows]
        info = fit_identity_calibration(predictor, val_features, correct[val_idx], clean[val_idx], cfg.clean_tolerance,
                                        train_features, train_clean)
        margin = info["margin"]
        if rank == 0:
            gated = f" gated (clean/corrupted told apart on {info['gate_accuracy']:.4f} of held-out rows)" \
                if cfg.identity_gate else ""
            log(f"identity margin {margin:.3f}{gated}: held-out k=1 accuracy {info['accuracy']:.4f} "
                f"(clean {info['clean']:.4f} vs identity {info['identity_clean']:.4f})")
        if history:
            history[chosen - 1]["identity_margin"] = margin
            if cfg.identity_gate:
                history[chosen - 1]["identity_gate_accuracy"] = info["gate_accuracy"]
    gain = None
    if done and correct is not None and val_idx.numel() > 0 and getattr(predictor, "space", None) is not None \
            and identity_index(predictor.space) is not None:
        # what the fit buys: held-out k=1 accuracy over the identity's, clean and corrupted rows apart
        gain = heldout_gain(predict_losses(predictor, images[val_idx], device=device), correct[val_idx],
                            identity_index(predictor.space),
                            clean=(data["corruption"] < 0)[val_idx] if "corruption" in data else None,
                            image_ids=rows[val_idx] % n_img)
        if rank == 0:
            log(format_gain(gain))
        if history:
            history[chosen - 1]["heldout_gain"] = gain_record(gain)
    if done:  # what the target model saw: the labels' images (the predictor resizes to its own size)
        predictor.model_image_size = (int(images.shape[-2]), int(images.shape[-1]))
    if done and out_dir and rank == 0 and hasattr(predictor, "save"):
        predictor.save(os.path.join(out_dir, "predictor.safetensors"))
    dist.barrier()
    if done and history:
        history[chosen - 1]["selected"] = True
        if out_dir and rank == 0:  # once, with the margin and the selection in it
            atomic_write_json(os.path.join(out_dir, "history.json"), history)
    return {"history": history, "final": history[chosen - 1] if history else {}, "selected_epoch": chosen if history else None,
            "complete": done, "identity_margin": margin, "heldout_gain": gain,
            "val_rows": val_idx, "train_rows": train_idx}


def _checked_checkpoint(ckpt: str, cfg: FitConfig, labels: Dict):
    """``(tensors, meta)`` of the fit checkpoint ``ckpt`` after checking it is of this format and
    was made with ``cfg`` on the labels ``labels`` (else a ``ValueError`` saying what differs)."""
    from .labels import check_format, describe_differences

    tensors, meta = load_tensors(ckpt)
    check_format(meta.get("format"), CHECKPOINT_FORMAT, f"fit checkpoint {ckpt!r}")
    old = {**asdict(FitConfig()), **(meta.get("config") or {})}  # options added since ran at their defaults
    diff = describe_differences(old, asdict(cfg))
    if diff:
        raise ValueError(f"fit checkpoint {ckpt!r} was made with another configuration (checkpoint -> now: "
                         f"{'; '.join(diff)}); use another out_dir or delete it")
    if (meta.get("labels") or {}).get("data_sha256") != labels["data_sha256"]:
        diff = describe_differences(meta.get("labels") or {}, labels)
        raise ValueError(f"fit checkpoint {ckpt!r} was trained on other labels (checkpoint -> now: "
                         f"{'; '.join(diff)}); continue it with the labels it was made with, or use another out_dir")
    return tensors, meta


def _patience_spent(cfg: FitConfig, history: List[Dict], best_epoch: Optional[int]) -> bool:
    """Whether ``cfg.patience`` epochs have passed since the selected one (held-out fold only)."""
    if not cfg.patience or not history or best_epoch is None or f"val_{cfg.select_by}" not in history[-1]:
        return False
    return len(history) - best_epoch >= cfg.patience


def _improves(record: Dict, history: List[Dict], best_epoch: Optional[int], metric: str) -> bool:
    """Whether ``record`` (just appended to ``history``) beats the selected epoch so far on
    ``val_<metric>`` (ties keep the earlier epoch); always true without a held-out fold."""
    key = f"val_{metric}"
    if key not in record:
        return True
    if best_epoch is None or key not in history[best_epoch - 1]:
        return True
    new, old = record[key], history[best_epoch - 1][key]
    return new > old if SELECTABLE_METRICS[metric] else new < old


@torch.no_grad()
def predict_features(predictor: nn.Module, images: Tensor, batch_size: int = 500, device: str = "cpu") -> Tensor:
    """``predictor.features`` ``(N, F)`` for uint8 images ``(N, 3, H, W)``, in eval mode."""
    predictor.eval()
    return torch.cat([predictor.features(images[i:i + batch_size].to(device).float() / 255).float().cpu()
                      for i in range(0, images.shape[0], batch_size)])
