"""Tiny ImageNet benchmark (20-class dev split): target from scratch -> loss labels -> predictor -> Table 1.

Every stage caches its result under ``--out`` (default ``runs/tinyimagenet``) and is skipped
when done; kill it at any point and run the same command again to continue.

    python benchmarks/tiny_imagenet.py --data ../shared/data/tinyimagenet-dev20 --size 32

Stages: data (decode JPEGs once) -> target (small ResNet, from scratch) -> labels (paper12
losses, corruption p=0.4 from the 15 common corruptions, several draws per image; extra seeds,
optionally with the images deformed first) -> fit (loss predictor, listwise KL + soft Spearman +
the corruption-recognition term [+ distillation, from the target's layers], 80/20 split, best
held-out epoch; every complete cache under --out) -> eval (clean / 15 common x severities / 4
held-out; Table 1 as markdown + JSON + plots).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from ttach_instance.data import ImageSet, build_model, load_image_folder, normalizer, resize_uint8  # noqa: E402
from ttach_instance.io import atomic_save_tensors, load_tensors  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage_data(args) -> dict:
    sets = {}
    for split in ("train", "val"):
        path = os.path.join(args.out, f"data_{split}.safetensors")
        if not os.path.isfile(path):
            ds = load_image_folder(os.path.join(args.data, split))
            atomic_save_tensors(path, {"images": ds.images, "labels": ds.labels}, {"classes": ds.classes})
            log(f"data {split}: {len(ds)} images {tuple(ds.images.shape[1:])}")
        tensors, meta = load_tensors(path)
        sets[split] = ImageSet(tensors["images"], tensors["labels"], meta["classes"], source=split)
    return sets


def target_model(args, num_classes):
    return build_model("ttach_instance.models:small_resnet", num_classes=num_classes, kwargs={"width": args.width})


def stage_target(args, sets):
    from ttach_instance.training.target import accuracy, train_classifier

    final = os.path.join(args.out, "target.safetensors")
    nc = len(sets["train"].classes)
    model = target_model(args, nc)
    norm = normalizer(model)
    if not os.path.isfile(final):
        train = resize_uint8(sets["train"].images, args.size)
        train_classifier(model, train, sets["train"].labels, norm, epochs=args.target_epochs, seed=args.seed,
                         checkpoint=os.path.join(args.out, "target_ckpt.safetensors"), log=log)
        atomic_save_tensors(final, model.state_dict(), {"width": args.width, "size": args.size})
    from safetensors.torch import load_file

    model.load_state_dict(load_file(final))
    model.eval()
    acc = accuracy(model, resize_uint8(sets["val"].images, args.size), sets["val"].labels, norm)
    log(f"target: clean val error {100 * (1 - acc):.2f}%")
    return model


def stage_labels(args, sets, model):
    from ttach_instance.registry import get_space
    from ttach_instance.training.deformations import Deformation
    from ttach_instance.training.labels import generate_labels

    # seed 0 -> labels/, every extra seed s -> labels_seed<s>/ (independent corruption draws),
    # every deformed seed s -> labels_deform_seed<s>/ (each row's image deformed first)
    caches = [("labels" if seed == args.seed else f"labels_seed{seed}", seed, None)
              for seed in [args.seed] + [int(x) for x in args.extra_label_seeds.split(",") if x.strip()]]
    caches += [(f"labels_deform_seed{seed}", seed, Deformation())
               for seed in [int(x) for x in args.deformed_label_seeds.split(",") if x.strip()]]
    for name, seed, deformation in caches:
        cache = generate_labels(model, sets["train"].images, sets["train"].labels, get_space("paper12"),
                                os.path.join(args.out, name), size=args.size, draws=args.draws,
                                corruption_p=args.corruption_p, seed=seed, shard_size=1000, batch_size=64,
                                deformation=deformation)
        log(f"{name}: {len(cache.done_shards())}/{cache.manifest()['num_shards']} shards")


def make_predictor(args, space):
    """``--predictor loss``: the library's LossPredictor (timm backbone, multi-level features);
    ``--predictor small``: the light SmallLossPredictor CNN (the first benchmark's predictor)."""
    if args.predictor == "small":
        from ttach_instance.models import SmallLossPredictor

        return SmallLossPredictor(space, width=args.pred_width, input_size=args.pred_size, unshuffle=args.pred_unshuffle,
                                  levels=args.pred_levels, detail_channels=args.pred_detail_channels)
    from ttach_instance.predictor import DEFAULT_BACKBONE, LossPredictor

    return LossPredictor(space, backbone=args.pred_backbone or DEFAULT_BACKBONE, input_size=args.pred_size,
                         pretrained=False)


def load_fitted_predictor(path, space):
    from ttach_instance.models import load_predictor

    return load_predictor(path, space=space)


def evaluation_predictor(args, space):
    """The predictor evaluated: ``--fit-dir`` (a comma list: the mean of their scores), each
    flip-averaged with ``--predictor-flip``."""
    from ttach_instance.predictor import FlipAveragedPredictor, PredictorEnsemble

    members = []
    for fit_dir in args.fit_dir.split(","):
        pred = load_fitted_predictor(os.path.join(args.out, fit_dir, "predictor.safetensors"), space)
        if args.uncalibrated:  # undo the identity margin or gate calibrated after training: the plain predictor
            from ttach_instance.training.trainer import remove_identity_calibration

            with open(os.path.join(args.out, fit_dir, "history.json")) as f:
                margin = remove_identity_calibration(pred, json.load(f))
            log(f"{fit_dir}: evaluating without the identity "
                + ("gate" if margin is None else f"margin ({margin:.3f})"))
        members.append(FlipAveragedPredictor(pred) if args.predictor_flip else pred)
    return members[0] if len(members) == 1 else PredictorEnsemble(members)


def training_label_caches(args):
    """The main label cache plus any extra complete caches (other seeds, deformed draws), trained on as one set."""
    from ttach_instance.training.labels import LabelCache, load_label_caches

    names = sorted(d for d in os.listdir(args.out) if d.startswith("labels_seed") or d.startswith("labels_deform_seed"))
    dirs = []
    for name in ["labels"] + names:
        cache = LabelCache(os.path.join(args.out, name))
        if not cache.complete:
            log(f"skipping incomplete label cache {name}")
            continue
        dirs.append(cache.directory)
        log(f"label cache {name}: {cache.manifest()['total_rows']} rows")
    return load_label_caches(dirs)[0]


@torch.no_grad()
def add_input_logits(data, model, batch_size=1000):
    """The target model's logits on the cached images (what the label stage records as
    ``input_logits`` since the distillation term exists) for caches made before it."""
    if "input_logits" in data:
        return data
    from ttach_instance.data import normalizer

    norm, model = normalizer(model), model.eval()
    images = data["images"]
    out = [model(norm(images[i:i + batch_size].float() / 255)).to(torch.float16)
           for i in range(0, images.shape[0], batch_size)]
    log(f"input logits of {images.shape[0]} cached images computed (caches made before they were recorded)")
    return {**data, "input_logits": torch.cat(out)}


def stage_fit(args, sets, model):
    from ttach_instance.registry import get_space
    from ttach_instance.training.trainer import FitConfig, fit_predictor, flip_permutation

    space = get_space("paper12")
    out = os.path.join(args.out, args.fit_dir)
    final = os.path.join(out, "predictor.safetensors")
    if os.path.isfile(final):
        return load_fitted_predictor(final, space)
    data = training_label_caches(args)
    if args.distill_weight:
        data = add_input_logits(data, model)
    cfg = FitConfig(epochs=args.fit_epochs, batch_size=128, optimizer=args.optimizer, lr=args.lr,
                    weight_decay=args.weight_decay, warmup_steps=200, ema_decay=args.ema, seed=args.seed,
                    flip_permutation=flip_permutation(space), clean_tolerance=args.clean_tolerance,
                    identity_gate=args.identity_gate,
                    pretrain_epochs=args.pretrain_epochs, spearman_weight=args.spearman_weight,
                    rank_temperature=args.rank_temperature, group_weight=args.group_weight,
                    distill_weight=args.distill_weight)
    torch.manual_seed(args.init_seed)  # the predictor's initial weights (and its dropout draws)
    pred = make_predictor(args, space)
    if args.pred_init_from_target:
        pred.init_from(model)
    res = fit_predictor(pred, data, out, cfg, num_images=len(sets["train"]), log=log)
    log(f"fit done: {res['final']}")
    return pred


def stage_eval(args, sets, model):
    from ttach_instance.evaluation import evaluate, markdown_table
    from ttach_instance.registry import get_space
    from ttach_instance.training.corruptions import COMMON, HELD_OUT

    space = get_space("paper12")
    pred = evaluation_predictor(args, space)
    tag = ("_uncalibrated" if args.uncalibrated else "") + ("_pflip" if args.predictor_flip else "")
    val = sets["val"]
    if args.val_limit:
        val = val.subset(range(0, len(val), max(1, len(val) // args.val_limit)))
    sev = [int(s) for s in args.severities.split(",")]
    res = evaluate(model, val.images, val.labels, space, os.path.join(args.out, f"eval_{args.fit_dir.replace(',', '+')}_sev{''.join(map(str, sev))}_n{len(val)}{tag}"),
                   predictor=pred, size=args.size, corruptions=COMMON, held_out=HELD_OUT, severities=sev,
                   seed=args.seed, log=log)
    if res:
        print(markdown_table(res))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(os.path.dirname(HERE), "..", "shared", "data", "tinyimagenet-dev20"))
    p.add_argument("--out", default="runs/tinyimagenet")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--target-epochs", type=int, default=25)
    p.add_argument("--draws", type=int, default=3, help="corruption draws per training image for the labels")
    p.add_argument("--corruption-p", type=float, default=0.4)
    p.add_argument("--extra-label-seeds", default="1,2", help="more label caches with these seeds (comma list)")
    p.add_argument("--deformed-label-seeds", default="",
                   help="more label caches labels_deform_seed<s>, every row's image deformed first "
                        "(the library's default Deformation; comma list)")
    p.add_argument("--fit-epochs", type=int, default=6)
    p.add_argument("--predictor", choices=["loss", "small"], default="loss",
                   help="loss: LossPredictor (timm backbone); small: SmallLossPredictor CNN")
    p.add_argument("--pred-backbone", default=None, help="timm backbone of the LossPredictor (default: the library's)")
    p.add_argument("--pred-size", type=int, default=64, help="predictor input size (images are resized to it)")
    p.add_argument("--pred-width", type=int, default=8, help="SmallLossPredictor width (--predictor small)")
    p.add_argument("--pred-unshuffle", type=int, default=1,
                   help="SmallLossPredictor unshuffle: the image at unshuffle x --pred-size folded into channels")
    p.add_argument("--pred-levels", choices=["last", "all"], default="last", help="SmallLossPredictor levels")
    p.add_argument("--pred-detail-channels", type=int, default=0,
                   help="SmallLossPredictor detail_channels (a full-resolution detail branch; 0: none)")
    p.add_argument("--pred-init-from-target", action="store_true",
                   help="start the predictor from the target model's layers (init_from; it must have the target's "
                        "architecture: --predictor small --pred-width = the target's --width)")
    p.add_argument("--fit-dir", default="fit", help="sub-directory of --out holding the fitted predictor "
                   "(eval: a comma list evaluates the mean of their scores)")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the predictor's initial weights (fit)")
    p.add_argument("--predictor-flip", action="store_true",
                   help="eval: average the predictor's scores over each image and its mirror")
    p.add_argument("--pretrain-epochs", type=int, default=0,
                   help="epochs of feature pretraining (classifying the training fold) before the ranking epochs")
    p.add_argument("--spearman-weight", type=float, default=2.0, help="soft-Spearman term's weight (listwise KL: 1)")
    p.add_argument("--group-weight", type=float, default=1.0,
                   help="weight of the auxiliary corruption-recognition term (FitConfig.group_weight; 0: off)")
    p.add_argument("--distill-weight", type=float, default=0.0,
                   help="weight of the auxiliary distillation term (FitConfig.distill_weight; 0: off)")
    p.add_argument("--rank-temperature", type=float, default=0.1, help="soft rank temperature")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--clean-tolerance", type=float, default=0.3,
                   help="identity margin calibrated so held-out clean k=1 accuracy stays within this many points")
    p.add_argument("--identity-gate", action="store_true",
                   help="gate the identity margin by how clean each image looks (FitConfig.identity_gate)")
    p.add_argument("--severities", default="1,2,3,4,5")
    p.add_argument("--val-limit", type=int, default=None)
    p.add_argument("--uncalibrated", action="store_true", help="evaluate the predictor without its identity margin")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", default="data,target,labels,fit,eval")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ttach_instance.training import distributed as dist

    dist.init_from_env("cpu")  # under torchrun: labels shards and eval sets are split by rank
    os.makedirs(args.out, exist_ok=True)
    stages = args.stages.split(",")
    t0 = time.time()
    sets = stage_data(args)
    model = stage_target(args, sets) if "target" in stages or any(s in stages for s in ("labels", "fit", "eval")) else None
    if "labels" in stages:
        stage_labels(args, sets, model)
    if "fit" in stages:
        stage_fit(args, sets, model)
    if "eval" in stages:
        stage_eval(args, sets, model)
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
