"""The ``ttach-instance`` command line.

Each subcommand lives in its own ``_cmd_*`` function registered in :func:`build_parser`;
heavy imports happen inside the command so ``ttach-instance plugins`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional


# ----------------------------------------------------------------------------- argument types
# argparse reports a type's ArgumentTypeError as "argument --flag: <message>", naming the flag.
def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _checked(parse, ok, expected: str, name: str):
    """An argparse ``type``: ``parse(text)``, refused unless ``ok(value)`` ("must be <expected>")."""
    def convert(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    convert.__name__ = name
    return convert


#: Sizes, batch sizes, epochs, draws, limits, k, class counts.
positive_int = _checked(_integer, lambda v: v >= 1, "a positive integer (>= 1)", "positive_int")
#: Counts where 0 means none.
non_negative_int = _checked(_integer, lambda v: v >= 0, "a non-negative integer (>= 0)", "non_negative_int")
#: Seeds (numpy's generator takes 32 bits).
seed_int = _checked(_integer, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 4294967295]", "seed_int")
probability = _checked(_number, lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]", "probability")
#: Held-out fraction, EMA decay.
fraction_below_one = _checked(_number, lambda v: 0.0 <= v < 1.0, "in [0, 1)", "fraction_below_one")
positive_number = _checked(_number, lambda v: v > 0, "a number > 0", "positive_number")
non_negative_number = _checked(_number, lambda v: v >= 0, "a number >= 0", "non_negative_number")
percentage_points = _checked(_number, lambda v: 0.0 <= v <= 100.0, "in [0, 100] (accuracy points)",
                             "percentage_points")


def device(text: str) -> str:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``) this machine has."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu or cuda:0, got {text!r}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r} is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda[:N] or mps, got {text!r}")
    return text


def tau_value(text: str):
    """``auto`` or a number > 0."""
    return "auto" if text == "auto" else positive_number(text)


def severities(text: str) -> List[int]:
    """Comma-separated ImageNet-C severities, each in 1..5."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [int(t) for t in items]
    except ValueError:
        values = []
    if not values or any(v not in range(1, 6) for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers in 1..5, got {text!r}")
    return values


def _cmd_plugins(args: argparse.Namespace) -> int:
    """List every plugin seen (built-ins, loaded, failed, disabled) with its package, version,
    spaces and ops, then name clashes. ``--strict`` exits 1 when a plugin failed or names clash."""
    import warnings

    from .registry import PluginWarning, registry

    with warnings.catch_warnings():  # the listing below reports every problem itself
        warnings.simplefilter("ignore", PluginWarning)
        reg = registry()
    infos = list(reg.plugins.values())
    clashes = [("space", n, p) for n, p in sorted(reg.clashes.items())]
    clashes += [("op", n, p) for n, p in sorted(reg.op_clashes.items())]
    if args.json:
        payload = {
            "plugins": [info.to_dict() for info in infos],
            "clashes": [{"kind": k, "name": n, "providers": p} for k, n, p in clashes],
            "problems": list(reg.problems),
        }
        print(json.dumps(payload, indent=2))
    else:
        for info in infos:
            package = f"{info.package} {info.version or '(unknown version)'}" if info.package else "(no distribution)"
            print(f"{info.name}  [{package}]  {info.status.upper() if info.status == 'error' else info.status}")
            print(f"  module: {info.module}")
            if info.status != "disabled":
                print(f"  spaces: {', '.join(info.spaces) or '-'}")
                print(f"  ops:    {', '.join(info.ops) or '-'}")
            for err in info.errors:
                print(f"  {'note' if info.status == 'disabled' else 'error'}:  {err}")
        for kind, name, providers in clashes:
            labels = " and ".join(reg.plugins[p].label for p in providers)
            qualified = ", ".join(f"{p}:{name}" for p in providers)
            print(f"clash: {kind} {name!r} is provided by {labels}; unusable bare, use {qualified}")
        for problem in reg.problems:
            print(f"problem: {problem}")
    failed = any(info.status == "error" for info in infos) or reg.problems
    return 1 if args.strict and (failed or clashes) else 0


def _cmd_spaces(args: argparse.Namespace) -> int:
    from .registry import get_space, list_spaces, registry

    reg = registry()
    for name in list_spaces():
        entry = reg.spaces[name]
        try:
            space = get_space(name)
            detail = f"{len(space)} candidates, fingerprint {space.fingerprint}"
            names = ", ".join(space.names)
        except Exception as exc:  # a plugin's factory may need parameters or be broken
            detail, names = f"not buildable without parameters ({exc})", ""
        print(f"{name}  [{entry.provider}]  {detail}")
        if entry.description:
            print(f"  {entry.description}")
        if names and args.verbose:
            print(f"  {names}")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from .demo import render_space

    path = render_space(args.space, args.output, size=args.size)
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- pipeline commands
def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", default=None,
                   help="timm model name (timm:NAME or NAME, built with pretrained=False) or package.module:factory; "
                        "default: the spec recorded in --weights (files saved by ttach-instance)")
    p.add_argument("--weights", default=None, help="model weights: .safetensors or a torch state dict (weights_only)")
    p.add_argument("--model-kwargs", type=_json_object, default=None, metavar="JSON",
                   help='more constructor arguments of the model, as a JSON object, e.g. \'{"width": 8}\'')
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="classes of the model (default: from the data)")
    p.add_argument("--device", type=device, default="cpu")
    p.set_defaults(model_required=required)


def _json_object(text: str) -> dict:
    """argparse type: a JSON object of constructor arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"width\": 8}}', got {text!r} ({e})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"width\": 8}}', got {text!r}")
    return value


def _model_from_weights(args) -> None:
    """Without ``--model``: take the model's spec from ``--weights`` (a file saved with one by
    :func:`~ttach_instance.model_spec.save_model`; only allow-listed factories are honoured)."""
    if getattr(args, "model", "") is not None:
        return
    if not getattr(args, "weights", None):
        if args.model_required:  # search makes no model without --data
            raise ValueError("--model is required (or --weights FILE saved by ttach-instance with its model spec)")
        return
    from .model_spec import read_model_spec

    spec = read_model_spec(args.weights)
    if spec is None:
        raise ValueError(f"--model is required: --weights {args.weights!r} records no model spec (only .safetensors "
                         f"files saved by ttach-instance do)")
    if args.model_kwargs:
        raise ValueError("--model-kwargs goes with --model: the spec in --weights records the constructor arguments")
    kwargs = dict(spec["kwargs"])
    recorded = kwargs.pop("num_classes", None)
    if args.num_classes is not None and recorded is not None and args.num_classes != recorded:
        raise ValueError(f"--num-classes {args.num_classes}: --weights {args.weights!r} holds a model of {recorded} "
                         f"classes")
    args.model, args.model_kwargs, args.model_from_weights = spec["factory"], kwargs, True
    args.num_classes = args.num_classes or recorded


def _load_model(args, num_classes):
    from .data import build_model

    if getattr(args, "model_from_weights", False):  # built from the allow-list, nothing imported by name
        from .model_spec import load_model

        return load_model(args.weights, num_classes=args.num_classes or num_classes)[0].to(args.device)
    return build_model(args.model, num_classes=args.num_classes or num_classes, weights=args.weights,
                       kwargs=getattr(args, "model_kwargs", None)).to(args.device)


def _model_spec(args, num_classes: int) -> dict:
    """What the CLI built the model from, recorded with results next to its weights' hash."""
    return {"model": args.model, "num_classes": args.num_classes or num_classes,
            "kwargs": getattr(args, "model_kwargs", None) or {}}


def _parse_list(text: str, arg: str):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{arg} must be a comma-separated list, got {text!r}")
    return items


def _corruption_list(text: str, arg: str, task: str = "classification"):
    """Corruption names; for segmentation the named groups leave out those that move pixels
    (``elastic_transform``: the mask would no longer match the image)."""
    from .training.corruptions import check_names

    if text in ("common", "held_out", "all", "none"):
        names = () if text == "none" else check_names(text, arg)
        if task == "segmentation":
            from .evaluation import GEOMETRIC_CORRUPTIONS

            names = tuple(n for n in names if n not in GEOMETRIC_CORRUPTIONS)
        return names
    return check_names(_parse_list(text, arg), arg)


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="classification", choices=["classification", "segmentation"],
                   help="segmentation: --data holds boxes.tsv (box masks) or images/ + masks/ (PNG class maps)")
    p.add_argument("--seg-loss", default="ce", choices=["ce", "dice"],
                   help="segmentation: per-image loss (mean pixel cross-entropy, or 1 - mean soft Dice)")
    p.add_argument("--ignore-index", type=non_negative_int, default=255,
                   help="segmentation: mask value of unlabelled pixels")


def _load_data(args: argparse.Namespace):
    """``--data``/``--split`` as an ImageSet (or a SegmentationSet with ``--task segmentation``):
    images of mixed sizes resized to ``--size`` when given, unreadable files skipped and counted
    with ``--skip-bad-images``."""
    from .data import load_dataset, load_segmentation_dataset

    if args.task == "segmentation":
        ds = load_segmentation_dataset(args.data, split=args.split, num_classes=args.num_classes,
                                       ignore_index=args.ignore_index, progress=False,
                                       skip_bad=args.skip_bad_images, mixed_size=args.size)
    else:
        ds = load_dataset(args.data, split=args.split, skip_bad=args.skip_bad_images, mixed_size=args.size)
    if ds.skipped:
        print(f"skipped {len(ds.skipped)} unreadable image(s) of {args.data!r} (first: {ds.skipped[0]!r}); "
              f"{len(ds)} loaded", file=sys.stderr)
    return ds


def _cmd_labels(args: argparse.Namespace) -> int:
    from .registry import get_space
    from .training import distributed as dist
    from .training.labels import generate_labels

    dist.init_from_env(args.device)
    ds = _load_data(args)
    if args.task == "segmentation":
        from .training.tasks import SegmentationTask

        targets, task = ds.masks, SegmentationTask(loss=args.seg_loss, ignore_index=args.ignore_index)
    else:
        targets, task = ds.labels, None
    model = _load_model(args, len(ds.classes))
    cache = generate_labels(model, ds.images, targets, get_space(args.space), args.out, task=task, size=args.size,
                            draws=args.draws, corruption_p=args.corruption_p,
                            corruptions=_corruption_list(args.corruptions, "--corruptions", args.task),
                            severities=args.severities, seed=args.seed,
                            shard_size=args.shard_size, batch_size=args.batch_size, device=args.device,
                            deformation=_deformation(args.deform), model_spec=_model_spec(args, len(ds.classes)))
    if dist.is_main():
        print(f"label cache {args.out}: {len(cache.done_shards())}/{cache.manifest()['num_shards']} shards, "
              f"{cache.manifest()['total_rows']} rows")
    return 0


def _deformation(text):
    """``--deform`` value ``ROTATE,ZOOM,BRIGHTNESS`` (or ``None``) -> a Deformation (or ``None``)."""
    if text is None:
        return None
    from .training.deformations import Deformation

    parts = _parse_list(text, "--deform")
    if len(parts) != 3:
        raise ValueError(f"--deform must be ROTATE,ZOOM,BRIGHTNESS (degrees, fractions), got {text!r}")
    try:
        rotate, zoom, brightness = (float(x) for x in parts)
    except ValueError:
        raise ValueError(f"--deform must be three numbers ROTATE,ZOOM,BRIGHTNESS, got {text!r}") from None
    try:
        return Deformation(rotate, zoom, brightness)
    except ValueError as e:
        raise ValueError(f"--deform {text!r}: {e}") from None


#: fit's flags that a recipe may also set: dest -> (recipe section, key). Their parser default is
#: None (not given); the built-in defaults live in ttach_instance.recipes.defaults().
FIT_RECIPE_FLAGS = {
    "predictor": ("predictor", "architecture"), "backbone": ("predictor", "backbone"), "width": ("predictor", "width"),
    "input_size": ("predictor", "input_size"), "pretrained": ("predictor", "pretrained"),
    "init_from": ("predictor", "init_from"), "ema": ("fit", "ema_decay"),
    **{dest: ("fit", dest) for dest in ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "val_fraction",
                                        "listwise_weight", "spearman_weight", "group_weight", "distill_weight", "tau",
                                        "flip", "clean_tolerance", "identity_gate", "seed", "select_by",
                                        "patience")},
}


def _fit_settings(args, manifest, data):
    """``(settings, sources, name)``: the built-in defaults, then ``--recipe`` (a shipped name, a
    file or ``auto``), then the flags given (ttach_instance.recipes.resolve)."""
    from . import recipes

    recipe = None
    if args.recipe == "auto":
        width = None
        if args.init_weights:
            from .model_spec import read_model_spec

            width = ((read_model_spec(args.init_weights) or {}).get("kwargs") or {}).get("width")
        recipe = recipes.auto_recipe(manifest, data, target_width=width, has_target_weights=bool(args.init_weights))
    elif args.recipe is not None:
        try:
            recipe = recipes.load_recipe(args.recipe)
        except ValueError as e:
            raise ValueError(f"--recipe: {e}") from None
    explicit = {key: getattr(args, dest) for dest, key in FIT_RECIPE_FLAGS.items() if getattr(args, dest) is not None}
    settings, sources = recipes.resolve(recipe, explicit)
    return settings, sources, (recipe or {}).get("name", "built-in defaults")


def _cmd_fit(args: argparse.Namespace) -> int:
    from . import recipes
    from .predictors import create_predictor
    from .registry import get_space, space_from_record
    from .training import distributed as dist
    from .training.labels import load_label_caches
    from .training.trainer import fit_predictor, seed_everything

    dist.init_from_env(args.device)
    try:
        data, manifest = load_label_caches(args.labels)
    except ValueError as e:
        raise ValueError(f"--labels: {e}") from None
    # the labels' space as they record it (name and parameters: a policy file's path too)
    space = get_space(args.space) if args.space else space_from_record(
        manifest, f"--labels: label cache {args.labels[0]!r}", "give --space")
    if space.fingerprint != manifest["space_fingerprint"]:
        raise ValueError(f"--space {space.name!r} (fingerprint {space.fingerprint}) is not the space the labels were "
                         f"made with ({manifest['space']!r}, {manifest['space_fingerprint']})")
    settings, sources, name = _fit_settings(args, manifest, data)
    if dist.is_main():
        print(recipes.describe(name, settings, sources))
    pred, fit = settings["predictor"], settings["fit"]
    tau = fit["tau"] if fit["tau"] is not None else (
        "auto" if manifest.get("task", {}).get("name") == "segmentation" else 1.0)
    if tau == "auto":
        from .training.losses import tau_from_spread

        tau = tau_from_spread(data["losses"])
        print(f"listwise temperature from the labels' spread: tau {tau:.4g}")
    if fit["identity_gate"] and fit["clean_tolerance"] is None:
        raise ValueError("--identity-gate needs --clean-tolerance (the gate scales the identity margin that "
                         "calibration picks)")
    cfg = recipes.fit_config(fit, space, tau)
    init_model = _init_model(args, data, manifest, pred["init_from"])
    input_size = pred["input_size"] if pred["input_size"] is not None else manifest["size"]
    start = [f for f, on in (("--pretrained", pred["pretrained"]), ("--backbone-weights", args.backbone_weights),
                             ("--init-from/--init-weights", init_model is not None)) if on]
    if len(start) > 1:
        raise ValueError(f"{' and '.join(start)}: the predictor starts from one of them, not several")
    if pred["architecture"] == "small" and (pred["backbone"] or pred["pretrained"] or args.backbone_weights):
        raise ValueError("--backbone, --pretrained and --backbone-weights are --predictor timm options; "
                         "--predictor small takes --width")

    def build():
        seed_everything(fit["seed"])  # the predictor's initialisation draws from the global generator
        if pred["architecture"] == "small":
            predictor = create_predictor("small", space, width=pred["width"], input_size=input_size)
        else:
            kwargs = {"backbone": pred["backbone"]} if pred["backbone"] else {}
            predictor = create_predictor("timm", space, input_size=input_size, pretrained=pred["pretrained"], **kwargs)
            if args.backbone_weights:
                predictor.load_backbone_weights(args.backbone_weights)
        if init_model is not None:
            predictor.init_from(init_model)
        return predictor

    identity = {"caches": manifest["caches"], "identities": manifest["identities"]}
    if args.curve_steps is not None and args.learning_curve is None:
        raise ValueError("--curve-steps is a --learning-curve option")
    if args.learning_curve is not None:
        args.curve_steps = args.curve_steps or "same"
        return _fit_learning_curve(args, build, data, manifest, cfg, identity)
    res = fit_predictor(build(), data, args.out, cfg, num_images=manifest["num_images"], device=args.device,
                        labels_identity=identity)
    if dist.is_main():
        print(f"predictor: {args.out}/predictor.safetensors; held-out " +
              ", ".join(f"{k[4:]} {v:.4f}" for k, v in res["final"].items() if k.startswith("val_") and isinstance(v, float)))
        if res.get("heldout_gain") is not None:
            from .training.gain import format_gain

            print(format_gain(res["heldout_gain"]))
    return 0


def _fit_learning_curve(args, build, data, manifest, cfg, identity) -> int:
    """``fit --learning-curve``: the same fit on nested fractions of the training rows (the smaller
    ones under OUT/learning_curve_same_steps/rows_N, or OUT/learning_curve/rows_N with
    ``--curve-steps epochs``; the whole set in OUT as a plain fit), one held-out fold;
    OUT/learning_curve.json and .png, the table and the last step's verdict printed. Same steps
    by default: with the recipe's epochs a small budget is also a short fit, and the curve then
    credits labels with what steps bought (docs/BENCHMARKS.md, "Label budget: learning curve")."""
    from .training import distributed as dist
    from .training.curve import format_curve, learning_curve, parse_fractions, plot_curve

    try:
        fractions = parse_fractions(args.learning_curve)
    except ValueError as e:
        raise ValueError(f"--learning-curve: {e}") from None
    if "correct" not in data:
        raise ValueError("--learning-curve: the labels hold no per-candidate 'correct' (k=1 accuracy needs it)")
    if cfg.val_fraction <= 0:
        raise ValueError("--learning-curve is measured on the held-out fold: --val-fraction must be > 0")

    def point_dir(fraction, label_rows):
        sub = "learning_curve" if args.curve_steps == "epochs" else "learning_curve_same_steps"
        return args.out if fraction == 1 else os.path.join(args.out, sub, f"rows_{label_rows}")

    curve = learning_curve(build, data, cfg, fractions, point_dir, num_images=manifest["num_images"],
                           device=args.device, labels_identity=identity, steps=args.curve_steps,
                           out_json=os.path.join(args.out, "learning_curve.json") if dist.is_main() else None)
    if dist.is_main():
        plot_curve(curve, os.path.join(args.out, "learning_curve.png"))
        print(format_curve(curve))
        print(f"predictor: {args.out}/predictor.safetensors (all rows); curve: {args.out}/learning_curve.json, "
              f"learning_curve.png")
    return 0


def _init_model(args, data, manifest, init_from):
    """The classifier the predictor starts from (usually the target model), or ``None``:
    ``--init-from MODEL`` with ``--init-weights``; or ``--init-weights`` alone (or a recipe's
    ``init_from: "target"``) from the spec that file records, checked for ``"target"`` to be the
    labels' model (its weights' sha256)."""
    if init_from is None and not args.init_weights:
        return None
    if init_from in (None, "target"):
        from .io import tensors_sha256
        from .model_spec import load_model

        if not args.init_weights:
            raise ValueError("the recipe starts the predictor from the target model: give its weights, --init-weights "
                             "FILE (saved with its model spec), or --init-from MODEL --init-weights FILE")
        model = load_model(args.init_weights, num_classes=args.init_num_classes)[0]
        recorded = (manifest.get("model") or {}).get("weights_sha256")
        if init_from == "target" and recorded and tensors_sha256(model.state_dict()) != recorded:
            raise ValueError(f"--init-weights {args.init_weights!r} is not the model the labels were made with (its "
                             f"weights' sha256 differs from the labels' {recorded[:12]}...)")
        return model
    from .data import build_model

    classes = args.init_num_classes
    if classes is None and "input_logits" in data:
        classes = int(data["input_logits"].shape[1])  # the labels' model's classes
    if classes is None:
        raise ValueError("--init-from needs --init-num-classes (the labels do not record the model's outputs)")
    return build_model(init_from, num_classes=classes, weights=args.init_weights)


def _policy_args(items: Optional[List[str]]) -> dict:
    """``--policy NAME=FILE`` (repeatable) as ``{name: file}``; each file is loaded and checked by
    the evaluation (an unreadable or foreign one is refused naming it)."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--policy must be NAME=FILE (e.g. gps=runs/search/gps.json), got {item!r}")
        if name in out:
            raise ValueError(f"--policy: the name {name!r} is given twice")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--policy {name}: no policy file {path!r}")
        out[name] = path
    return out


def _fusion_args(paths: Optional[List[str]]) -> dict:
    """``--fusion FILE`` (repeatable) as policy rows ``{"fusion": FILE, "fusion2": ...}``: learned
    fusion weights (``fuse weights``), each loaded and checked by the evaluation."""
    out = {}
    for i, path in enumerate(paths or []):
        if not path.endswith(".safetensors") or not os.path.isfile(path):
            raise FileNotFoundError(f"--fusion: no fusion weights file {path!r} (a .safetensors file written by "
                                    f"`ttach-instance fuse weights`)")
        out["fusion" if i == 0 else f"fusion{i + 1}"] = path
    return out


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import METHODS, evaluate, markdown_table
    from .training import distributed as dist
    from .wrappers import resolve_space

    if args.task == "segmentation":
        if args.policy:
            raise ValueError("--policy: policy rows are classification methods, not --task segmentation")
        if args.fusion:
            raise ValueError("--fusion: eval's learned-fusion row is a classification method; for segmentation use "
                             "SegmentationTTAWrapper(model, space, fusion=FILE)")
        return _eval_segmentation(args)
    dist.init_from_env(args.device)  # under torchrun each rank evaluates its share of the sets
    ds = _load_data(args)
    if args.limit is not None:
        ds = ds.subset(range(0, len(ds), max(1, len(ds) // args.limit)))
    model = _load_model(args, len(ds.classes))
    space = resolve_space(args.space, "--space")  # a registered name or a policy file (Ours over GPS)
    predictor = _load_predictor_arg(args, space)
    methods = METHODS if args.methods == "all" else _parse_list(args.methods, "--methods")
    res = evaluate(model, ds.images, ds.labels, space, args.out, predictor=predictor, size=args.size,
                   corruptions=_corruption_list(args.corruptions, "--corruptions"),
                   held_out=_corruption_list(args.held_out, "--held-out"),
                   severities=args.severities, methods=methods,
                   seed=args.seed, cost_images=args.cost_images, model_spec=_model_spec(args, len(ds.classes)),
                   policies={**_policy_args(args.policy), **_fusion_args(args.fusion)})
    if dist.is_main():  # the other ranks return no results
        print(markdown_table(res))
        print(f"wrote {args.out}/table.md, results.json and plots")
    return 0


def _load_predictor_arg(args: argparse.Namespace, space=None):
    """``--predictor`` loaded (for ``space`` when given; ``None`` without the option), wrapped in a
    :class:`~ttach_instance.predictors.FlipAveragedPredictor` with ``--predictor-flip``."""
    if not args.predictor:
        if getattr(args, "predictor_flip", False):
            raise ValueError("--predictor-flip needs --predictor")
        return None
    from .predictors import FlipAveragedPredictor, load_predictor

    predictor = load_predictor(args.predictor, space=space)
    if getattr(args, "predictor_flip", False):
        predictor = FlipAveragedPredictor(predictor)
    return predictor


def _eval_segmentation(args: argparse.Namespace) -> int:
    from .evaluation import SEG_METHODS, evaluate_segmentation, segmentation_markdown_table
    from .registry import get_space

    ds = _load_data(args)
    if args.limit is not None:
        ds = ds.subset(range(0, len(ds), max(1, len(ds) // args.limit)))
    model = _load_model(args, ds.num_classes)
    space = get_space(args.space)
    predictor = _load_predictor_arg(args, space)
    methods = SEG_METHODS if args.methods == "all" else _parse_list(args.methods, "--methods")
    res = evaluate_segmentation(model, ds.images, ds.masks, space, args.out, ds.num_classes, predictor=predictor,
                                size=args.size, corruptions=_corruption_list(args.corruptions, "--corruptions", "segmentation"),
                                held_out=_corruption_list(args.held_out, "--held-out", "segmentation"),
                                severities=args.severities,
                                methods=methods, loss=args.seg_loss, ignore_index=args.ignore_index,
                                batch_size=args.batch_size, seed=args.seed, cost_images=args.cost_images,
                                cost_repeats=args.cost_repeats, progress=False,
                                model_spec=_model_spec(args, ds.num_classes))
    print(segmentation_markdown_table(res))
    print(f"wrote {args.out}/table.md and results.json")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .data import model_mean_std, read_image
    from .normalization import to_model_input
    from .wrappers import LossGuidedWrapper

    if not args.images:
        raise ValueError("images: give at least one image file")
    if args.num_classes is None:
        raise ValueError("--num-classes is required for predict (the classes the model was trained with)")
    predictor = _load_predictor_arg(args)
    space = predictor.space
    if not 1 <= args.k <= len(space):
        raise ValueError(f"--k must be in 1..{len(space)} (the candidates of the predictor's space "
                         f"{space.name!r}), got {args.k}")
    model = _load_model(args, args.num_classes)
    size = _predict_image_size(args.size, predictor, model)
    classes = None
    if args.classes:
        with open(args.classes) as f:
            classes = [line.strip() for line in f if line.strip()]
    pixels = []
    for path in args.images:
        if not os.path.isfile(path):
            raise ValueError(f"images: {path!r} is not a file")
        img = Image.fromarray(read_image(path))  # an unreadable file: an error naming it
        img = img.resize((size[1], size[0]), Image.BICUBIC)
        pixels.append(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1))
    x = torch.stack(pixels).float() / 255
    # The CLI's models get the same normalisation as in labels/eval (data.model_mean_std); the
    # wrapper averages the views' probabilities (merge_space="probs") and returns their log.
    mean, std = model_mean_std(model)
    wrapper = LossGuidedWrapper(model.eval(), predictor, k=args.k, flip=args.flip, mean=mean, std=std,
                                return_selection=True)
    with torch.no_grad():
        log_probs, selection = wrapper(to_model_input(x, tuple(mean), tuple(std)))
    probs = log_probs.exp()
    names = predictor.candidate_names
    for i, path in enumerate(args.images):
        cls = int(probs[i].argmax())
        label = classes[cls] if classes and cls < len(classes) else str(cls)
        views = ", ".join(names[j] for j in selection.index[i].tolist())
        print(f"{path}: class {label} (p={float(probs[i, cls]):.3f}); views: {views}" + (" (+ h-flips)" if args.flip else ""))
    return 0


def _predict_image_size(size, predictor, model):
    """``(H, W)`` the images are resized to for ``predict``: ``--size``, else what the model saw
    when the predictor's labels were made (``predictor.model_image_size``), else the model's timm
    data config; the predictor's own ``input_size`` is not the model's and is never used."""
    if size is not None:
        return int(size), int(size)
    known = getattr(predictor, "model_image_size", None)
    if known:
        return int(known[0]), int(known[1])
    from .normalization import timm_data_config

    cfg = timm_data_config(model) or {}
    if isinstance(cfg.get("input_size"), (list, tuple)) and len(cfg["input_size"]) == 3:
        return int(cfg["input_size"][1]), int(cfg["input_size"][2])
    raise ValueError("--size is required: the predictor checkpoint does not record the image size its labels were "
                     "made at (fitted before it was recorded) and the model has no timm data config")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo_run import run_demo

    run_demo(out_dir=args.out, size=args.size, seed=args.seed)
    return 0


SPACE_HELP = ("a registered space (`ttach-instance spaces`), with parameters as name:key=value,key=value (values read "
              "as JSON where they parse, e.g. five_crops:crop_size=0.8), or a policy file written by `search` "
              "(FILE.json, or FILE.json:n=N for its first N candidates)")
SKIP_HELP = ("leave out image files that cannot be decoded (corrupt, truncated) and print how many; without it "
             "such a file is an error naming it")
PREDICTOR_FLIP_HELP = ("score each image and its mirror and average (the paper's test-time option; "
                       "twice the predictor's cost)")


def _add_pipeline_commands(sub) -> None:
    p = sub.add_parser("labels", help="loss labels: the model's loss under every candidate, cached on disk (resumable)")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="ImageFolder root (with train/ val/ or classes directly) or cifar10:ROOT")
    p.add_argument("--split", default="train")
    p.add_argument("--space", default="paper12", help=SPACE_HELP)
    p.add_argument("--out", required=True, help="label cache directory")
    p.add_argument("--size", type=positive_int, default=None,
                   help="resize to the model's input size (after corruption); images of mixed sizes are resized to "
                        "it when loaded")
    p.add_argument("--draws", type=positive_int, default=1, help="passes over the data (different corruption draws)")
    p.add_argument("--corruption-p", type=probability, default=0.4)
    p.add_argument("--corruptions", default="common", help="common | all | none | comma-separated names")
    p.add_argument("--severities", type=severities, default=[1, 2, 3, 4, 5], help="comma-separated, each in 1..5")
    p.add_argument("--shard-size", type=positive_int, default=500)
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per model call (x |T| views)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--skip-bad-images", action="store_true", help=SKIP_HELP)
    p.add_argument("--deform", nargs="?", const="10,0.1,0.15", default=None, metavar="ROTATE,ZOOM,BRIGHTNESS",
                   help="small random deformation of every row's image before the corruption (the paper's recipe; "
                        "no two rows of an image alike): rotation degrees, zoom and brightness fractions "
                        "(bare --deform: 10,0.1,0.15)")
    _add_task_args(p)
    p.set_defaults(func=_cmd_labels)

    p = sub.add_parser("fit", help="train a loss predictor on label caches (resumable; torchrun-ready)")
    p.add_argument("--labels", required=True, nargs="+", metavar="DIR",
                   help="one or more label caches of the same images, space and size (e.g. other --seed or --deform "
                        "runs of `labels`), trained on as one set")
    p.add_argument("--out", required=True)
    p.add_argument("--space", default=None, help="default: the labels' space; " + SPACE_HELP)
    p.add_argument("--predictor", default="timm", choices=["timm", "small"],
                   help="predictor architecture (ttach_instance.predictors registry): timm, a timm backbone read at "
                        "every level; small, a light plain CNN that ranks better when trained from scratch on small "
                        "images (docs/BENCHMARKS.md)")
    p.add_argument("--backbone", default=None, help="--predictor timm: the backbone's timm model name")
    p.add_argument("--width", type=positive_int, default=8, help="SmallLossPredictor width (--predictor small)")
    p.add_argument("--input-size", type=positive_int, default=None,
                   help="predictor input size (default: the labels' size)")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="start the predictor from this classifier's layers (usually the target model, of the "
                        "predictor's architecture: a timm name for --backbone, ttach_instance.models:small_resnet "
                        "for --predictor small); with --init-weights")
    p.add_argument("--init-weights", default=None, help="weights of the --init-from classifier")
    p.add_argument("--init-num-classes", type=positive_int, default=None,
                   help="classes of the --init-from classifier (default: from the labels' input_logits)")
    p.add_argument("--epochs", type=positive_int, default=60)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--optimizer", default="rmsprop", choices=["rmsprop", "adamw", "sgd"])
    p.add_argument("--lr", type=positive_number, default=0.01)
    p.add_argument("--weight-decay", type=non_negative_number, default=1e-5,
                   help="the optimiser's weight decay (>= 0)")
    p.add_argument("--ema", type=fraction_below_one, default=0.999, help="EMA decay of the weights, in [0, 1)")
    p.add_argument("--val-fraction", type=fraction_below_one, default=0.2, help="held-out images, in [0, 1)")
    p.add_argument("--listwise-weight", type=non_negative_number, default=1.0)
    p.add_argument("--spearman-weight", type=non_negative_number, default=1.0)
    p.add_argument("--group-weight", type=non_negative_number, default=0.0,
                   help="auxiliary corruption recognition while training (a temporary head on the predictor's "
                        "features classifies each row's corruption and severity; the saved predictor is unchanged)")
    p.add_argument("--distill-weight", type=non_negative_number, default=0.0,
                   help="auxiliary distillation while training (a temporary head on the predictor's features matches "
                        "the target model's class distribution on each row's image, the labels' input_logits)")
    p.add_argument("--tau", type=tau_value, default=None,
                   help="listwise temperature: a number or 'auto' (from the labels' spread); default 1 (the paper's) "
                        "for classification labels, auto for segmentation labels (losses differ by hundredths)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="flip augmentation (candidates permuted to their mirrors)")
    p.add_argument("--clean-tolerance", type=percentage_points, default=None,
                   help="calibrate an identity margin keeping held-out clean accuracy within this many points")
    p.add_argument("--identity-gate", action=argparse.BooleanOptionalAction,
                   help="with --clean-tolerance: scale the margin by how clean each image looks (a logistic gate "
                        "on the predictor's features, saved with it); corrupted images keep more of their gain")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seeds every generator the fit draws from (initialisation, dropout, shuffling, cutout)")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--select-by", choices=("spearman", "k1_accuracy", "top1_hit", "regret"), default=None,
                   help="the held-out fold's metric that picks the epoch kept (and that --patience watches); "
                        "default spearman, --recipe auto k1_accuracy")
    p.add_argument("--patience", type=positive_int, default=None,
                   help="early stopping: end when the held-out --select-by metric has not improved for this many "
                        "epochs")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction,
                   help="--predictor timm: start the backbone from timm's pretrained weights (downloaded from the hub; "
                        "offline, use --backbone-weights)")
    p.add_argument("--backbone-weights", default=None, metavar="FILE",
                   help="--predictor timm: start the backbone from this .safetensors file of its timm model's weights "
                        "(e.g. the hub's model.safetensors, fetched elsewhere)")
    p.add_argument("--recipe", default=None, metavar="NAME|FILE|auto",
                   help="settings from a recipe: a shipped one (ttach_instance/recipes/: "
                        "tinyimagenet-cut, ...), a recipe .json file, or auto (chosen from the labels' target model); "
                        "flags given explicitly override it; default: none (the flags' defaults)")
    p.add_argument("--learning-curve", nargs="?", const="1/4,1/2", default=None, metavar="FRACTIONS",
                   help="also fit on nested fractions of the training rows (comma-separated, a/b or decimals; bare "
                        "flag: 1/4,1/2), one held-out fold: held-out k=1 gain over the identity (clean, corrupted) "
                        "per label budget in OUT/learning_curve.json and .png, and whether more labels likely pay")
    p.add_argument("--curve-steps", choices=["epochs", "same"], default=None,
                   help="--learning-curve: same (default), every point takes about the whole set's optimiser steps "
                        "(epochs x 1/fraction), so only the labels differ; epochs, every point runs the recipe's "
                        "epochs (smaller budgets also take fewer steps)")
    # A flag not given is None, so that a recipe's value can stand (ttach_instance.recipes.resolve).
    p.set_defaults(func=_cmd_fit, **{dest: None for dest in FIT_RECIPE_FLAGS})

    p = sub.add_parser("eval", help="Table 1: methods x clean / corrupted data (markdown, JSON, plots)")
    _add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--predictor", default=None, help="predictor .safetensors (without it: baselines only)")
    p.add_argument("--predictor-flip", action="store_true", help=PREDICTOR_FLIP_HELP)
    p.add_argument("--space", default="paper12", help=SPACE_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=positive_int, default=None,
                   help="model input size (images of mixed sizes are resized to it when loaded)")
    p.add_argument("--corruptions", default="common")
    p.add_argument("--held-out", default="held_out")
    p.add_argument("--severities", type=severities, default=[1, 2, 3, 4, 5], help="comma-separated, each in 1..5")
    p.add_argument("--methods", default="all")
    p.add_argument("--policy", action="append", default=None, metavar="NAME=FILE",
                   help="add a searched policy's rows (repeatable): a GPS file gives 'GPS n=1/2/4/N', a budget "
                        "file 'Budget N=<its size>'; each is plain TTA over the policy's candidates")
    p.add_argument("--fusion", action="append", default=None, metavar="FILE",
                   help="add a 'Learned fusion (<space>)' row (repeatable): every candidate of the weights' space, "
                        "fused with the weights `fuse weights` fitted")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate on about this many images (evenly spaced)")
    p.add_argument("--cost-images", type=non_negative_int, default=256,
                   help="images for timing the real wrappers (0: skip)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="segmentation: images per batch (x |T| views)")
    p.add_argument("--cost-repeats", type=positive_int, default=3, help="segmentation: timing repeats (best of)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--skip-bad-images", action="store_true", help=SKIP_HELP)
    _add_task_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="classify image files with loss-guided TTA")
    _add_model_args(p)
    p.add_argument("--predictor", required=True)
    p.add_argument("--predictor-flip", action="store_true", help=PREDICTOR_FLIP_HELP)
    p.add_argument("--k", type=positive_int, default=1, help="views per image (1..|T|)")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped views")
    p.add_argument("--size", type=positive_int, default=None,
                   help="resize images to this (default: the size the predictor's labels were made at)")
    p.add_argument("--classes", default=None, help="text file with one class name per line")
    p.add_argument("images", nargs="*")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("demo", help="train a small model and predictor on bundled photos and print the methods table")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--size", type=positive_int, default=32)
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(func=_cmd_demo)


# ----------------------------------------------------------------------------- policy search
def search_temperature(text: str):
    """``fit`` (per step, as GPS), ``none`` (unscaled) or a fixed number > 0."""
    if text in ("fit", "none"):
        return None if text == "none" else "fit"
    return positive_number(text)


def _cmd_search(args: argparse.Namespace) -> int:
    """GPS, the best fixed policy for a budget or Dufour's staged search on a prediction cache
    (made or finished first when --model and --data are given); prints the chosen candidates and
    writes a policy file."""
    from .io import atomic_write_json
    from .search import budget_policy_search, greedy_policy_search, policy_document
    from .training import distributed as dist
    from .training.predictions import generate_predictions, load_predictions

    if (args.model is None) != (args.data is None):
        raise ValueError("--model and --data go together: give both to make (or finish) the prediction cache, "
                         "or neither to search an existing one")
    staged_flags = args.no_composites or args.composite_pool is not None or args.composite_predictions is not None
    if staged_flags and args.method != "staged":
        raise ValueError("--no-composites, --composite-pool and --composite-predictions are `search staged` options")
    made = None  # (model, data) when --model is given: stage (c) runs the model on composites
    if args.model is not None:
        dist.init_from_env(args.device)
        ds = _load_data(args)
        model = _load_model(args, len(ds.classes))
        generate_predictions(model, ds.images, ds.labels, _search_pool(args), args.predictions, size=args.size,
                             shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype,
                             device=args.device, model_spec=_model_spec(args, len(ds.classes)))
        made = (model, ds)
        if not dist.is_main() and args.method != "staged":  # staged: every rank predicts the composites
            return 0
    try:
        cache = load_predictions(args.predictions)
    except ValueError as e:
        raise ValueError(f"--predictions: {e}") from None
    m, log_probs, labels = cache["manifest"], cache["log_probs"], cache["labels"]
    names = m["candidate_names"]
    count, samples = log_probs.shape[:2]
    if args.method == "gps":
        result = greedy_policy_search(log_probs, labels, args.n, temperature=args.temperature)
        settings = {"n": args.n, "temperature": args.temperature}
        header, score_name = f"GPS, {args.n} step(s), temperature {args.temperature or 'none'}", "log-likelihood"
    elif args.method == "staged":
        from .staged_search import composite_specs, op_families, staged_budget_search

        identity = _identity_index(args.identity, m)
        source = None if args.no_composites else _composite_source(args, m, cache["labels"], made)
        result = staged_budget_search(log_probs, labels, args.budget, op_families(m["candidate_specs"]),
                                      identity=identity, objective=args.objective, composite_log_probs=source,
                                      composite_pool=args.composite_pool, exhaustive_limit=args.exhaustive_limit)
        if not dist.is_main():
            return 0
        extra = composite_specs(m["candidate_specs"], result.details["composites"])
        names = names + [s["name"] for s in extra]
        settings = {"budget": args.budget, "identity": identity, "objective": args.objective,
                    "exhaustive_limit": args.exhaustive_limit, "composites": not args.no_composites,
                    "composite_pool": args.composite_pool}
        stages = result.details["stages"]
        print(f"stage a, magnitude sweep paired with {names[identity]!r} ({args.objective}):")
        for family, rec in stages["sweep"].items():
            print(f"  {family:<16} " + ", ".join(f"{names[i]} {v:.4f}" + (" *" if i == rec["winner"] else "")
                                              for i, v in zip(rec["candidates"], rec["scores"])))
        for stage in ("combinations", "composites"):
            if stage in stages:
                rec = stages[stage]
                print(f"stage {'b' if stage == 'combinations' else 'c'}, {stage} of {len(rec['pool'])} "
                      f"({rec['method']}): {[names[i] for i in rec['indices']]} {args.objective} {rec['score']:.6f}")
        header = (f"staged budget {args.budget} (stage {result.details['final_stage']}, {len(extra)} composites), "
                  f"always with {names[identity]!r}")
        score_name = args.objective
    else:
        if args.budget > count:
            raise ValueError(f"--budget must be at most the pool's {count} candidates, got {args.budget}")
        identity = _identity_index(args.identity, m)
        result = budget_policy_search(log_probs, labels, args.budget, identity=identity, objective=args.objective,
                                      exhaustive_limit=args.exhaustive_limit)
        settings = {"budget": args.budget, "identity": identity, "objective": args.objective,
                    "exhaustive_limit": args.exhaustive_limit}
        header, score_name = f"budget {args.budget} ({result.method}), always with {names[identity]!r}", args.objective
    print(f"{header}: pool {m['space']!r} ({count} candidates), {samples} validation images")
    print(f"  step  candidate{' ' * 22}{score_name:>15}  temperature")
    for step, (i, score, t) in enumerate(zip(result.indices, result.scores, result.temperatures), 1):
        print(f"  {step:4d}  [{i:3d}] {names[i]:<24} {score:15.6f}  {t:11.4g}")
    doc = policy_document(result, args.method, m, settings,
                          {"directory": os.path.abspath(args.predictions), "identity": cache["identity"]},
                          extra_candidates=extra if args.method == "staged" else None)
    atomic_write_json(args.out, doc)
    print(f"wrote {args.out}")
    return 0


def _search_pool(args: argparse.Namespace):
    """search's pool: ``--space``; without it the existing cache's (its recorded name and
    parameters, so continuing it needs no --space), else paper12."""
    from .registry import get_space, space_from_record
    from .training.predictions import PredictionCache

    if args.space is not None:
        return get_space(args.space)
    cache = PredictionCache(args.predictions)
    if os.path.isfile(cache.manifest_path):
        return space_from_record(cache.manifest(), f"--predictions: prediction cache {args.predictions!r}",
                                 "give --space")
    return get_space("paper12")


def _composite_source(args: argparse.Namespace, manifest: dict, labels, made):
    """Stage (c)'s ``composite_log_probs(pairs)``: the composites' log-probabilities from a second
    prediction cache (``--composite-predictions``, default ``<--predictions>-composites``), made
    or finished with the model when ``made`` = (model, data) -- it refuses another model, data or
    composite list, naming the difference -- or, without --model, read when complete and made by
    the same model on the same images for exactly these composites."""
    from .registry import space_from_specs
    from .space import TransformSpace
    from .staged_search import composite_specs
    from .training.predictions import generate_predictions, load_predictions

    directory = args.composite_predictions or args.predictions.rstrip("/\\") + "-composites"

    def source(pairs):
        specs = composite_specs(manifest["candidate_specs"], pairs)
        if made is not None:
            model, ds = made
            space = TransformSpace(space_from_specs(specs).candidates, name=f"{manifest['space']}+composites")
            generate_predictions(model, ds.images, ds.labels, space, directory, size=args.size,
                                 shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype,
                                 device=args.device, model_spec=_model_spec(args, len(ds.classes)))
        try:
            cache = load_predictions(directory)
        except (ValueError, FileNotFoundError) as e:
            hint = "" if made is not None else " (stage c runs the model on the composites: give --model and --data, " \
                                                "or --no-composites)"
            raise ValueError(f"--composite-predictions: {e}{hint}") from None
        found = cache["manifest"]
        for key, what in (("model", "model"), ("dataset", "images"), ("size", "size")):
            if found[key] != manifest[key]:
                raise ValueError(f"--composite-predictions {directory!r} holds another {what} than --predictions; "
                                 f"delete it or give --model and --data to make it again")
        if found["candidate_specs"] != specs or not bool((cache["labels"] == labels).all()):
            raise ValueError(f"--composite-predictions {directory!r} holds other composites than the {len(specs)} "
                             f"this search composes; give --model and --data to make them (another directory), or "
                             f"delete it")
        return cache["log_probs"]

    return source


def _identity_index(text, manifest) -> int:
    """``--identity``: a candidate name or index of the pool; default its first candidate without ops."""
    names = manifest["candidate_names"]
    if text is None:
        found = [i for i, spec in enumerate(manifest["candidate_specs"]) if not spec.get("ops")]
        if not found:
            raise ValueError(f"--identity is required: pool {manifest['space']!r} has no candidate without ops")
        return found[0]
    if text in names:
        return names.index(text)
    try:
        index = int(text)
    except ValueError:
        index = -1
    if not 0 <= index < len(names):
        raise ValueError(f"--identity must be a candidate name or an index in 0..{len(names) - 1} of pool "
                         f"{manifest['space']!r}, got {text!r}")
    return index


def _add_search_command(sub) -> None:
    p = sub.add_parser("search", help="policy search on cached validation predictions: GPS (greedy, with repeats), "
                                      "the best fixed policy for a budget of forward passes, or Dufour's staged "
                                      "procedure for that budget")
    p.add_argument("method", choices=["gps", "budget", "staged"])
    p.add_argument("--predictions", required=True, metavar="DIR",
                   help="prediction cache (made, or finished, here when --model and --data are given)")
    p.add_argument("--out", required=True, help="policy file to write (JSON)")
    _add_model_args(p, required=False)
    p.add_argument("--data", default=None, help="validation images: ImageFolder root or cifar10:ROOT (with --model)")
    p.add_argument("--split", default="val")
    p.add_argument("--space", default=None, help="the pool (with --model; default: an existing --predictions cache's, "
                                                 "else paper12): " + SPACE_HELP)
    p.add_argument("--size", type=positive_int, default=None, help="model input size (with --model)")
    p.add_argument("--shard-size", type=positive_int, default=500)
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per model call (x candidates views)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="stored log-probabilities (float16: half the size, ~1e-3 rounding)")
    p.add_argument("--skip-bad-images", action="store_true", help=SKIP_HELP)
    p.add_argument("--n", type=positive_int, default=4, help="gps: policy length (candidates, repeats allowed)")
    p.add_argument("--temperature", type=search_temperature, default="fit",
                   help="gps: 'fit' (per step, as GPS), 'none' or a fixed temperature > 0")
    p.add_argument("--budget", type=positive_int, default=2,
                   help="budget, staged: forward passes (the original included)")
    p.add_argument("--identity", default=None,
                   help="budget: the original's candidate (name or index; default: the pool's candidate without ops)")
    p.add_argument("--objective", default="accuracy", choices=["accuracy", "nll"],
                   help="budget, staged: what to maximise")
    p.add_argument("--exhaustive-limit", type=non_negative_int, default=20_000,
                   help="budget, staged: search every subset when there are at most this many, else greedily")
    p.add_argument("--no-composites", action="store_true",
                   help="staged: stop after stage b (no composites of the family winners, no model calls)")
    p.add_argument("--composite-pool", type=positive_int, default=None,
                   help="staged: compose pairs among the best this many family winners only (default: all)")
    p.add_argument("--composite-predictions", default=None, metavar="DIR",
                   help="staged: the composites' prediction cache (default: <--predictions>-composites)")
    p.set_defaults(func=_cmd_search, task="classification")


# ----------------------------------------------------------------------------- learned fusion
def _cmd_fuse(args: argparse.Namespace) -> int:
    """``fuse weights``: learned fusion weights for every candidate of --space, fitted on --data
    (the model frozen, its views computed once); ``fuse temperature``: the temperature of
    ``merge_mode="weighted"`` for --predictor at --k, fitted and written with a copy of the predictor."""
    from .data import model_mean_std, resize_masks, resize_uint8
    from .fusion import collect_views, fit_fusion, fit_weighted_temperature, store_temperature
    from .normalization import to_model_input
    from .registry import get_space
    from . import wrappers as W

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must be a .safetensors file, got {args.out!r}")
    seg = args.task == "segmentation"
    if args.what == "weights" and (args.predictor or args.k is not None or args.flip):
        raise ValueError("--predictor, --k and --flip are `fuse temperature` options; `fuse weights` fits every "
                         "candidate of --space")
    if args.what == "temperature" and (args.per_class or not args.predictor):
        raise ValueError("`fuse temperature` needs --predictor (and takes no --per-class)")
    ds = _load_data(args)
    if args.limit is not None:  # exactly --limit images, evenly spaced
        ds = ds.subset(list(range(0, len(ds), max(1, len(ds) // args.limit)))[:args.limit])
    images, targets = ds.images, (ds.masks if seg else ds.labels)
    if args.size is not None and images.shape[-1] != args.size:
        images = resize_uint8(images, args.size)
        targets = resize_masks(targets, args.size) if seg else targets
    model = _load_model(args, ds.num_classes if seg else len(ds.classes)).eval()
    mean, std = model_mean_std(model)
    key = {"output_mask_key" if seg else "output_label_key": None}
    if args.what == "weights":
        space = get_space(args.space)
        cls = W.SegmentationTTAWrapper if seg else W.FullSpaceWrapper
        wrapper = cls(model, space, mean=mean, std=std, **key)
    else:
        from .predictors import load_predictor

        predictor = load_predictor(args.predictor).eval()
        k = args.k if args.k is not None else 2
        cls = W.LossGuidedSegmentationWrapper if seg else W.LossGuidedWrapper
        wrapper = cls(model, predictor, k=k, flip=args.flip, merge_mode="weighted", mean=mean, std=std, **key)
    batches = (to_model_input(images[i:i + args.batch_size].float().to(args.device) / 255, mean, std)
               for i in range(0, images.shape[0], args.batch_size))
    got = collect_views(wrapper, batches)
    ignore = args.ignore_index if seg else None
    if args.what == "weights":
        fusion = fit_fusion(got["views"], targets.long(), space, validity=got["validity"], per_class=args.per_class,
                            epochs=args.epochs, lr=args.lr, batch_size=args.fit_batch_size, seed=args.seed,
                            ignore_index=ignore)
        fusion.save(args.out)
        info, metric = fusion.fit_info, "pixel accuracy" if seg else "accuracy"
        weights = fusion.view_weights()
        shown = weights if weights.dim() == 1 else weights.mean(1)
        print(f"fusion weights for space {space.name!r} on {info['images']} images of {args.data!r} "
              f"({info['steps']} Adam steps, lr {info['lr']:g})" + (" (per class: means over classes)" if args.per_class else ""))
        for name, w in zip(space.names, shown.tolist()):
            print(f"  {name:<24} {w:.4f}")
        print(f"fit data: NLL {info['uniform']['nll']:.4f} -> {info['fitted']['nll']:.4f}, {metric} "
              f"{100 * info['uniform']['accuracy']:.2f} % -> {100 * info['fitted']['accuracy']:.2f} % (uniform -> fitted)")
    else:
        temperature, info = fit_weighted_temperature(got["views"], got["losses"], targets.long(), got["validity"],
                                                     merge_space=wrapper.merge_space, ignore_index=ignore)
        store_temperature(predictor, temperature, info, k=k, flip=args.flip)
        predictor.save(args.out)
        print(f"weighted-merge temperature for k={k}{' + flip' if args.flip else ''} on {info['images']} images: "
              f"{temperature:.4g}" + (" (at the search's bound)" if info["at_bound"] else ""))
        print(f"NLL {info['nll']:.4f} (temperature 1: {info['nll_at_1']:.4f}; plain mean: {info['nll_mean']:.4f})")
    print(f"wrote {args.out}")
    return 0


def _add_fuse_command(sub) -> None:
    p = sub.add_parser("fuse", help="fit a merge on validation data with the model frozen: learned fusion weights "
                                    "for a space, or the weighted merge's temperature for a predictor")
    p.add_argument("what", choices=["weights", "temperature"],
                   help="weights: one weight per candidate of --space (softmax), fitted by NLL (ttach_instance.fusion); "
                        "temperature: merge_mode='weighted''s temperature for --predictor at --k, stored with a copy of "
                        "the predictor")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="validation images: ImageFolder root or cifar10:ROOT (segmentation: "
                                                 "boxes.tsv or images/ + masks/)")
    p.add_argument("--split", default="val")
    p.add_argument("--space", default="flips", help="weights: the space whose candidates are fused (the recipe's: "
                                                    "flips = original, h-flip, v-flip, both)")
    p.add_argument("--limit", type=positive_int, default=100, help="fit on this many images (evenly spaced; the "
                                                                   "recipe's 100)")
    p.add_argument("--size", type=positive_int, default=None,
                   help="model input size (images of mixed sizes are resized to it when loaded)")
    p.add_argument("--out", required=True, help=".safetensors file to write (weights; or the predictor with its "
                                                "temperature)")
    p.add_argument("--per-class", action="store_true", help="weights: one weight per candidate and class")
    p.add_argument("--epochs", type=positive_int, default=5, help="weights: passes over the images (Adam)")
    p.add_argument("--lr", type=positive_number, default=0.01, help="weights: Adam's learning rate")
    p.add_argument("--fit-batch-size", type=positive_int, default=1, help="weights: images per Adam step")
    p.add_argument("--predictor", default=None, help="temperature: the predictor .safetensors")
    p.add_argument("--k", type=positive_int, default=None, help="temperature: views per image (default 2)")
    p.add_argument("--flip", action="store_true", help="temperature: the wrapper adds each view's h-flip")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per model call (x views)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--skip-bad-images", action="store_true", help=SKIP_HELP)
    _add_task_args(p)
    p.set_defaults(func=_cmd_fuse)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttach-instance", description="Instance-aware test-time augmentation (Learning Loss for TTA) on ttach."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins, their package, version, spaces and ops")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--strict", action="store_true", help="exit 1 if a plugin failed to load or names clash")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("spaces", help="list registered transform spaces")
    p.add_argument("-v", "--verbose", action="store_true", help="also list candidate names")
    p.set_defaults(func=_cmd_spaces)

    p = sub.add_parser("render", help="render every candidate of a space on a bundled photo to a PNG grid")
    p.add_argument("--space", default="paper12", help=SPACE_HELP)
    p.add_argument("--size", type=positive_int, default=224)
    p.add_argument("--output", default="outputs/space_grid.png")
    p.set_defaults(func=_cmd_render)
    _add_pipeline_commands(sub)
    _add_search_command(sub)
    _add_fuse_command(sub)
    return parser


#: What a user's mistake raises (bad values, missing or unreadable files): reported in one line,
#: exit status 2, no traceback (``TTACH_INSTANCE_TRACEBACK=1`` shows it). Anything else is a bug
#: and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _model_from_weights(args)
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if os.environ.get("TTACH_INSTANCE_TRACEBACK"):
            raise
        parser.exit(2, f"ttach-instance {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
