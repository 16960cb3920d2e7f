"""Tiny ImageNet benchmark (20-class dev split): target from scratch -> loss labels -> Table 1.

Every stage caches its result under ``--out`` (default ``runs/tinyimagenet``) and is skipped
when done; kill it at any point and run the same command again to continue.

    python research/tiny_imagenet.py --data ../shared/data/tinyimagenet-dev20 --stages data,target,labels
    python research/predictor_fold.py fit in24_gate_e3 --recipe tinyimagenet-in24-gate-e3
    python research/tiny_imagenet.py --stages eval --fit-dir exp_in24_gate_e3

Stages: data (decode JPEGs once) -> target (small ResNet, from scratch) -> labels (paper12
losses, corruption p=0.4 from the 15 common corruptions, several draws per image; extra seeds,
optionally with the images deformed first) -> eval (clean / 15 common x severities / 4
held-out; Table 1 as markdown + JSON + plots, every method through its wrapper). The predictor
is fitted between labels and eval by ``predictor_fold.py fit`` from a recipe file
(``ttach_instance/recipes/``), so a published predictor is one file, not a set of flags.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ttach_instance.data import ImageSet, build_model, load_image_folder, normalizer, resize_uint8
from ttach_instance.io import atomic_save_tensors, load_tensors
from ttach_instance.model_spec import save_model

HERE = os.path.dirname(os.path.abspath(__file__))


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
    if args.arch != "small_resnet":  # a timm architecture, from scratch (the second target)
        return build_model(args.arch, num_classes=num_classes)
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
        # with its spec, so the CLI's labels/eval/predict need no --model for it
        factory, kwargs = (("ttach_instance.models:small_resnet", {"width": args.width}) if args.arch == "small_resnet"
                           else (args.arch if args.arch.startswith("timm:") else f"timm:{args.arch}", {}))
        save_model(final, model, factory, {**kwargs, "num_classes": nc}, {"arch": args.arch, "size": args.size})
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


def evaluation_predictor(args, space):
    """The predictor evaluated: ``--fit-dir`` (a comma list: the mean of their scores), each
    flip-averaged with ``--predictor-flip``."""
    from ttach_instance.predictors import FlipAveragedPredictor, PredictorEnsemble, load_predictor

    members = []
    for fit_dir in args.fit_dir.split(","):
        pred = load_predictor(os.path.join(args.out, fit_dir, "predictor.safetensors"), space=space)
        if args.uncalibrated and pred.calibration is not None:  # the plain ranking, without the identity calibration
            log(f"{fit_dir}: evaluating without its identity calibration ({pred.calibration.extra_repr()})")
            pred.calibration = None
        members.append(FlipAveragedPredictor(pred) if args.predictor_flip else pred)
    return members[0] if len(members) == 1 else PredictorEnsemble(members)


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
    p.add_argument("--arch", default="small_resnet",
                   help="target: small_resnet (with --width) or a timm model name trained from scratch")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--target-epochs", type=int, default=25)
    p.add_argument("--draws", type=int, default=3, help="corruption draws per training image for the labels")
    p.add_argument("--corruption-p", type=float, default=0.4)
    p.add_argument("--extra-label-seeds", default="1,2", help="more label caches with these seeds (comma list)")
    p.add_argument("--deformed-label-seeds", default="",
                   help="more label caches labels_deform_seed<s>, every row's image deformed first "
                        "(the library's default Deformation; comma list)")
    p.add_argument("--fit-dir", default="exp_in24_gate01", help="sub-directory of --out holding the fitted predictor "
                   "(predictor_fold.py fit NAME writes exp_NAME; a comma list evaluates the mean of their scores)")
    p.add_argument("--predictor-flip", action="store_true",
                   help="eval: average the predictor's scores over each image and its mirror")
    p.add_argument("--severities", default="1,2,3,4,5")
    p.add_argument("--val-limit", type=int, default=None)
    p.add_argument("--train-limit", type=int, default=None,
                   help="use every n-th train image, about this many (quick runs; give them their own --out)")
    p.add_argument("--uncalibrated", action="store_true",
                   help="evaluate the predictor without its identity calibration (margin or gate)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", default="data,target,labels,eval")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ttach_instance.training import distributed as dist

    dist.init_from_env("cpu")  # under torchrun: labels shards and eval sets are split by rank
    os.makedirs(args.out, exist_ok=True)
    stages = args.stages.split(",")
    t0 = time.time()
    sets = stage_data(args)
    if args.train_limit:
        n = len(sets["train"])
        sets["train"] = sets["train"].subset(range(0, n, max(1, n // args.train_limit)))
    if "fit" in stages:
        raise SystemExit("the fit stage is research/predictor_fold.py fit NAME --recipe NAME|FILE.json")
    model = stage_target(args, sets) if any(s in stages for s in ("target", "labels", "eval")) else None
    if "labels" in stages:
        stage_labels(args, sets, model)
    if "eval" in stages:
        stage_eval(args, sets, model)
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
