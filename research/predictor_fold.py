"""Predictor variants on the Tiny ImageNet benchmark's label caches, judged on the held-out fold.

``fit NAME --recipe FILE`` trains the predictor a recipe (a shipped name, ``ttach_instance/recipes/``, or a
file: the architecture, the label caches, the ``FitConfig``) describes into ``--out/exp_NAME``; ``--set
fit.KEY=VALUE`` / ``predictor.KEY=VALUE`` varies one setting; ``score DIR [DIR ...]`` prints the held-out fold's Spearman (all / clean /
corrupted rows), k=1 accuracy and regret of each fitted predictor, plain and flip-averaged, and
of the mean of the flip-averaged ones; ``probe`` trains an MLP on the frozen target model's own
features (the ranking a predictor that knew what the target knows could reach), or on a fitted
predictor's, optionally with measured candidate effects appended; ``selfscore`` ranks by the
target's own label-free confidence on all 12 views. The fold is
``fit_predictor``'s (20 % of the images, seed 0) over ``labels`` and the undeformed
``labels_seed*`` caches, so every variant is scored on the same rows.
(docs/research-log/, "What limits the predictor's ranking".)

    python research/predictor_fold.py fit in24_d270 --recipe tinyimagenet-in24-d270
    python research/predictor_fold.py fit sw1 --recipe tinyimagenet-in24-d270 --set fit.spearman_weight=1
    python research/predictor_fold.py score exp_in24_d270 exp_sw1
    python research/predictor_fold.py probe [--features exp_in24_d270 --candidate-deltas]
    python research/predictor_fold.py selfscore
    python research/predictor_fold.py margins exp_in24_d270 --tolerances 0.3 0.1 0
    python research/predictor_fold.py gate exp_in24_d270 in24_gate01 --clean-tolerance 0.1
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from ttach_instance import recipes
from ttach_instance.predictors import FlipAveragedPredictor, PredictorEnsemble, create_predictor, load_predictor
from ttach_instance.registry import get_space
from ttach_instance.training.labels import LabelCache, load_label_caches
from ttach_instance.training.losses import ranking_metrics, spearman
from ttach_instance.training.trainer import fit_predictor, predict_features, predict_losses, split_rows



def target(out):
    """The benchmark's target model (small ResNet, width 16) from ``out/target.safetensors``."""
    from safetensors.torch import load_file

    from ttach_instance.data import build_model

    model = build_model("ttach_instance.models:small_resnet", num_classes=20, kwargs={"width": 16})
    model.load_state_dict(load_file(os.path.join(out, "target.safetensors")))
    return model.eval()


def load_caches(out, names):
    data, manifest = load_label_caches([os.path.join(out, name) for name in names])
    return data, manifest["num_images"]


def load_recipe(name_or_path, settings=()):
    """A fit recipe (a shipped name, ``ttach_instance/recipes/``, or a ``.json`` file) with
    ``SECTION.KEY=VALUE`` settings applied (``VALUE`` read as JSON, else kept as a string), checked
    again after them (ttach_instance.recipes)."""
    recipe = json.loads(json.dumps(recipes.load_recipe(name_or_path)))
    for setting in settings:
        key, sep, value = setting.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and section in ("predictor", "fit")):
            raise SystemExit(f"--set takes SECTION.KEY=VALUE with SECTION predictor or fit, got {setting!r}")
        try:
            recipe[section][name] = json.loads(value)
        except json.JSONDecodeError:
            recipe[section][name] = value
    return recipes.check_recipe(recipe, f"recipe {name_or_path!r} with --set {list(settings)}")


def fit_config(recipe, space):
    """The recipe's ``FitConfig`` (``"flip": true``: the space's own flip permutation)."""
    fit = {**recipes.defaults()["fit"], **recipe["fit"]}
    return recipes.fit_config(fit, space, fit["tau"] if fit["tau"] is not None else 1.0)


def cmd_fit(args):
    recipe = load_recipe(args.recipe, args.set)
    caches = args.caches.split(",") if args.caches else recipe["label_caches"]
    data, n_images = load_caches(args.out, caches)
    space = get_space("paper12")
    cfg = fit_config(recipe, space)
    spec = {k: v for k, v in recipe["predictor"].items() if k != "init_from"}
    torch.manual_seed(cfg.seed)
    predictor = create_predictor(spec.pop("architecture"), space, **spec)
    if recipe["predictor"].get("init_from") == "target":  # the target's trained layers, a fresh ranking head
        predictor.init_from(target(args.out))
    res = fit_predictor(predictor, data, os.path.join(args.out, f"exp_{args.name}"), cfg, num_images=n_images,
                        progress=False, log=lambda m: print(m, flush=True))
    print(args.name, json.dumps({k: round(v, 4) for k, v in res["final"].items() if isinstance(v, float)}))


def fold_caches(out):
    """The caches every variant is scored on: ``labels`` and the undeformed ``labels_seed*``."""
    return ["labels"] + sorted(d for d in os.listdir(out) if d.startswith("labels_seed")
                               and LabelCache(os.path.join(out, d)).complete)


@torch.no_grad()
def target_features(model, images, batch_size=1000):
    """The target model's pooled features after each stage, its logits, top probability and
    entropy on uint8 ``images`` (what it "knows" about each one)."""
    from ttach_instance.data import normalizer

    norm, out = normalizer(model), []
    for i in range(0, images.shape[0], batch_size):
        h, pooled = model.stem(norm(images[i:i + batch_size].float() / 255)), []
        for layer in model.layers:
            h = layer(h)
            pooled.append(h.mean((2, 3)))
        p = model.head(pooled[-1]).softmax(1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(1, keepdim=True)
        out.append(torch.cat(pooled + [model.head(pooled[-1]), p.max(1, keepdim=True).values, entropy], 1))
    return torch.cat(out)


def plain_predictor(out, fit_dir):
    """``(predictor, undone)``: the fitted predictor of ``out/fit_dir`` without the identity
    calibration its fit made (``undone``: the constant margin, ``"gated"`` for a gate, ``None``
    for none)."""
    predictor = load_predictor(os.path.join(out, fit_dir, "predictor.safetensors"), get_space("paper12"))
    calibration, predictor.calibration = predictor.calibration, None
    if calibration is None:
        return predictor, None
    return predictor, "gated" if calibration.gated else float(calibration.margin)


def _undone(value):
    return "none" if value is None else value if isinstance(value, str) else f"{value:.3f}"


@torch.no_grad()
def predictor_features(predictor, images):
    """A fitted predictor's feature vector and its 12 scores on uint8 ``images``."""
    f = predict_features(predictor, images, batch_size=2000)
    return torch.cat([f, predictor.head_scores(f)], 1)


@torch.no_grad()
def candidate_deltas(space, images, batch_size=500):
    """What each candidate does to each image, measured: per candidate and channel, the mean
    absolute pixel change and the change of mean, standard deviation and mean absolute Laplacian
    (brightness, contrast, sharpness): ``(N, len(space) * 12)``."""
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)

    def stats(v):
        return v.mean((2, 3)), v.std((2, 3)), torch.nn.functional.conv2d(v, lap, padding=1, groups=3).abs().mean((2, 3))

    out, n = [], len(space)
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].float() / 255
        b = x.shape[0]
        views = space.apply_all(x)
        before = stats(x)
        after = [a.view(b, n, 3) for a in stats(views)]
        delta = (views.view(b, n, *x.shape[1:]) - x[:, None]).abs().mean((3, 4))
        out.append(torch.cat([delta] + [a - z[:, None] for a, z in zip(after, before)], 2).flatten(1))
    return torch.cat(out)


def cmd_probe(args):
    """How well a frozen representation ranks the candidates: an MLP on it, trained with the
    benchmark's ranking loss on the training fold, scored on the held-out fold each epoch.
    ``--features target`` (default): the target model's own features -- not a deployable
    predictor (it needs the target's full forward pass first), a reference for what a predictor
    that knew what the target model knows could reach. ``--features DIR``: a fitted predictor's
    features and scores. ``--candidate-deltas``: append what each candidate measurably does to
    the image (:func:`candidate_deltas`) -- does that add what the features miss?"""
    from ttach_instance.training.losses import ranking_loss

    data, n_images = load_caches(args.out, fold_caches(args.out))
    if args.features == "target":
        feats = target_features(target(args.out), data["images"])
    else:
        predictor = load_predictor(os.path.join(args.out, args.features, "predictor.safetensors"), get_space("paper12"))
        feats = predictor_features(predictor, data["images"])
    if args.candidate_deltas:
        feats = torch.cat([feats, candidate_deltas(get_space("paper12"), data["images"])], 1)
    train, val = split_rows(data["rows"], n_images, 0.2, 0)
    x = (feats - feats[train].mean(0)) / (feats[train].std(0) + 1e-6)
    losses, clean = data["losses"].float(), data["corruption"] < 0
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, losses.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05)
    train_idx, val_idx = train.nonzero().squeeze(1), val.nonzero().squeeze(1)
    print(f"{args.features} features{' + candidate deltas' if args.candidate_deltas else ''} {tuple(feats.shape)}; held-out fold {val_idx.numel()} rows")
    for epoch in range(args.epochs):
        net.train()
        perm = train_idx[torch.randperm(train_idx.numel())]
        for j in range(0, perm.numel(), 256):
            b = perm[j:j + 256]
            loss = ranking_loss(net(x[b]), losses[b], 1.0, 2.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            s = torch.nan_to_num(spearman(net(x[val_idx]), losses[val_idx]))
        print(f"epoch {epoch + 1} spearman {s.mean():.4f} clean {s[clean[val_idx]].mean():.4f} "
              f"corrupted {s[~clean[val_idx]].mean():.4f}", flush=True)


@torch.no_grad()
def cmd_selfscore(args):
    """The target model itself on all 12 views of each held-out row, scored without the label:
    how well its own confidence ranks the candidates. Not a predictor (12 target passes); a
    yardstick for the ranking goal. Scores: the negative top probability; the cross-entropy
    against the class the identity view predicts; against the class of the 12 views' mean."""
    from ttach_instance.data import normalizer

    data, n_images = load_caches(args.out, fold_caches(args.out))
    _, val = split_rows(data["rows"], n_images, 0.2, 0)
    idx = val.nonzero().squeeze(1)
    losses, clean, labels = data["losses"][idx].float(), data["corruption"][idx] < 0, data["labels"][idx]
    model, space = target(args.out), get_space("paper12")
    norm, logp = normalizer(model), []
    for i in range(0, idx.numel(), 250):
        x = data["images"][idx[i:i + 250]].float() / 255
        logp.append(model(norm(space.apply_all(x))).log_softmax(1).view(x.shape[0], len(space), -1))
    logp = torch.cat(logp)

    def ce(cls):
        return -logp.gather(2, cls.view(-1, 1, 1).expand(-1, len(space), 1)).squeeze(2)

    drift = float((ce(labels) - losses).abs().max())
    print(f"held-out fold: {idx.numel()} rows ({int(clean.sum())} clean); recomputed losses differ from the "
          f"cache's by at most {drift:.2e}")
    for name, scores in (("negative top probability", -logp.max(2).values),
                         ("CE vs the identity view's class", ce(logp[:, 0].argmax(1))),
                         ("CE vs the mean of the views' class", ce(logp.exp().mean(1).argmax(1)))):
        r = torch.nan_to_num(spearman(scores, losses))
        print(f"{name:36s} spearman {r.mean():.4f} clean {r[clean].mean():.4f} corrupted {r[~clean].mean():.4f}")


def cmd_margins(args):
    """What the identity margin's clean tolerance trades, on the held-out fold: for each fitted
    predictor (its calibrated margin undone) and each tolerance, the margin calibration picks,
    k=1 accuracy on all / clean / corrupted rows and how often a non-identity candidate is chosen."""
    from ttach_instance.predictors.calibration import calibrate_identity_margin

    data, n_images = load_caches(args.out, fold_caches(args.out))
    _, val = split_rows(data["rows"], n_images, 0.2, 0)
    idx = val.nonzero().squeeze(1)
    correct, clean = data["correct"][idx].float(), data["corruption"][idx] < 0
    for d in args.dirs:
        predictor, fitted = plain_predictor(args.out, d)
        pred = predict_losses(predictor, data["images"][idx])
        for tolerance in args.tolerances:
            margin, info = calibrate_identity_margin(pred, correct, clean, tolerance)
            choice = (pred - margin * torch.nn.functional.one_hot(torch.zeros((), dtype=torch.long), 12)).argmin(1)
            acc, moved = correct.gather(1, choice[:, None]).squeeze(1), (choice != 0).float()
            print(f"{d} (fitted margin {_undone(fitted)}) tolerance {tolerance}: margin {margin:.3f} k1 {acc.mean():.4f} "
                  f"clean {acc[clean].mean():.4f} (identity {correct[clean, 0].mean():.4f}) corrupted "
                  f"{acc[~clean].mean():.4f}; non-identity picks clean {moved[clean].mean():.3f} "
                  f"corrupted {moved[~clean].mean():.3f}")


def cmd_gate(args):
    """A fitted predictor with an identity gate in place of its constant margin, into
    ``--out/exp_NAME``. Fitted on the training fold of ``--caches``, calibrated on the held-out
    fold at ``--clean-tolerance``
    (:func:`~ttach_instance.predictors.calibration.fit_identity_calibration`)."""
    from ttach_instance.io import atomic_write_json
    from ttach_instance.predictors.calibration import fit_identity_calibration

    data, n_images = load_caches(args.out, args.caches.split(",") if args.caches else fold_caches(args.out))
    train, val = split_rows(data["rows"], n_images, 0.2, 0)
    predictor, fitted = plain_predictor(args.out, args.source)
    with open(os.path.join(args.out, args.source, "history.json")) as f:
        history = json.load(f)
    clean = data["corruption"] < 0
    info = fit_identity_calibration(predictor, predict_features(predictor, data["images"][val], batch_size=2000),
                                    data["correct"][val], clean[val], args.clean_tolerance,
                                    predict_features(predictor, data["images"][train], batch_size=2000), clean[train])
    margin = info["margin"]
    out = os.path.join(args.out, f"exp_{args.name}")
    os.makedirs(out, exist_ok=True)
    predictor.save(os.path.join(out, "predictor.safetensors"))
    for h in history:
        if h.get("selected"):
            h.update(identity_margin=margin, identity_gate_accuracy=info["gate_accuracy"],
                     gated_from=args.source, clean_tolerance=args.clean_tolerance)
    atomic_write_json(os.path.join(out, "history.json"), history)
    print(f"{args.name}: gated margin {margin:.3f} (was {_undone(fitted)}); held-out k=1 {info['accuracy']:.4f} "
          f"clean {info['clean']:.4f} (identity {info['identity_clean']:.4f}); gate right on "
          f"{info['gate_accuracy']:.4f} of held-out rows")


def cmd_score(args):
    names = fold_caches(args.out)
    data, n_images = load_caches(args.out, names)
    _, val = split_rows(data["rows"], n_images, 0.2, 0)
    idx = val.nonzero().squeeze(1)
    losses, correct, clean = data["losses"][idx].float(), data["correct"][idx], data["corruption"][idx] < 0
    space = get_space("paper12")

    def report(name, scores):
        s = torch.nan_to_num(spearman(scores, losses))
        r = ranking_metrics(scores, losses, correct)
        k1 = correct.float().gather(1, scores.argmin(1, keepdim=True)).squeeze(1)
        print(f"{name:32s} spearman {s.mean():.4f} clean {s[clean].mean():.4f} corrupted {s[~clean].mean():.4f} "
              f"k1 {r['k1_accuracy']:.4f} clean {k1[clean].mean():.4f} corrupted {k1[~clean].mean():.4f} "
              f"(identity {r['identity_accuracy']:.4f}, oracle {r['oracle_accuracy']:.4f}) regret {r['regret']:.4f}")

    print(f"held-out fold: {idx.numel()} rows ({int(clean.sum())} clean) of caches {names}")
    flipped = []
    for d in args.dirs:
        predictor = load_predictor(os.path.join(args.out, d, "predictor.safetensors"), space)
        report(f"{d} plain", predict_losses(predictor, data["images"][idx]))
        flipped.append(FlipAveragedPredictor(predictor))
        report(f"{d} flip-averaged", predict_losses(flipped[-1], data["images"][idx]))
    if len(flipped) > 1:
        report("mean of the flip-averaged", predict_losses(PredictorEnsemble(flipped), data["images"][idx]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tinyimagenet", help="the benchmark's directory (label caches, fits)")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit")
    f.add_argument("name")
    f.add_argument("--recipe", default="tinyimagenet-in24-d270",
                   help="recipe file: predictor, label caches, FitConfig (default: %(default)s)")
    f.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change one recipe setting, e.g. fit.epochs=3 or predictor.width=8 (repeatable)")
    f.add_argument("--caches", default="", help="comma list of label cache directories under --out "
                   "(default: the recipe's)")
    f.set_defaults(func=cmd_fit)
    pr = sub.add_parser("probe", help="MLP on the frozen target model's features: the ranking it supports")
    pr.add_argument("--epochs", type=int, default=6)
    pr.add_argument("--features", default="target",
                    help="'target' (the target model's own features) or a fit directory under --out")
    pr.add_argument("--candidate-deltas", action="store_true",
                    help="append what each candidate measurably does to the image (pixel change, contrast, sharpness)")
    pr.set_defaults(func=cmd_probe)
    ss = sub.add_parser("selfscore", help="the target on all 12 views, scored without the label: a yardstick")
    ss.set_defaults(func=cmd_selfscore)
    mg = sub.add_parser("margins", help="k=1 accuracy against the identity margin's clean tolerance")
    mg.add_argument("dirs", nargs="+", help="fit directories under --out")
    mg.add_argument("--tolerances", type=float, nargs="+", default=[0.3, 0.1, 0.0])
    mg.set_defaults(func=cmd_margins)
    gt = sub.add_parser("gate", help="a fitted predictor with an identity gate instead of its constant margin")
    gt.add_argument("source", help="fit directory under --out")
    gt.add_argument("name", help="writes --out/exp_NAME")
    gt.add_argument("--clean-tolerance", type=float, default=0.1)
    gt.add_argument("--caches", default="", help="comma list (default: the fold's caches)")
    gt.set_defaults(func=cmd_gate)
    s = sub.add_parser("score")
    s.add_argument("dirs", nargs="+", help="fit directories under --out holding predictor.safetensors")
    s.set_defaults(func=cmd_score)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
