"""MeTTA's evaluation on the Tiny ImageNet target: single-view vs mean embeddings.

Mean-embedding TTA (Ashukha et al., 2021) averages the embeddings of augmented views of a test
image and applies a linear head trained on single augmented views. This driver measures it
with :class:`ttach_instance.EmbeddingTTAWrapper` on the 20-class Tiny ImageNet target that
``research/tiny_imagenet.py`` trained (``small_resnet``, 32 px):

* embeddings: the pooled output of ``layers`` (64-d, what the classifier's head receives);
* a linear probe (multinomial logistic regression, L-BFGS, in torch) trained on single
  augmented-view embeddings of the train split (``--train-views`` random-resized-crop + flip
  draws per image, each one row);
* val accuracy of (a) a single view: the plain image, one random view; (b) the mean embedding
  of S = 1, 4, 8 random views, the ``hflip`` / ``flips`` spaces and the paper's five / ten
  crops, with spatial features pooled per view (MeTTA's rule) or de-augmented to the input
  frame first; beside each, the probe's probabilities averaged over the same views (ordinary
  prediction TTA) and the target's own head on the mean embedding;
* k-NN accuracy (k = 20, cosine similarity, votes weighted by exp(similarity / 0.07) as in
  Wu et al. 2018, the bank the plain train embeddings) of the single and the mean embeddings.

    OMP_NUM_THREADS=1 python research/metta_tinyimagenet.py --runs runs/tinyimagenet \\
        --out runs/metta

About 1.5 CPU minutes on one thread (one stage: a rerun starts over). Results:
``--out/results.json`` and a markdown table on stdout (docs/BENCHMARKS.md "Mean-embedding TTA").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List

import torch
from torch import Tensor

from ttach_instance import EmbeddingTTAWrapper, RandomResizedCropSampler
from ttach_instance.data import build_model, load_image_folder, model_mean_std, resize_uint8
from ttach_instance.io import atomic_write_json, load_tensors
from ttach_instance.normalization import to_model_input

HERE = os.path.dirname(os.path.abspath(__file__))
LAYER = "layers"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_split(args, split: str):
    """uint8 images and labels of ``split``: the benchmark's decoded cache when present, else
    the image folder."""
    cached = os.path.join(args.runs, f"data_{split}.safetensors")
    if os.path.isfile(cached):
        tensors, _ = load_tensors(cached)
        return tensors["images"], tensors["labels"]
    ds = load_image_folder(os.path.join(args.data, split))
    return ds.images, ds.labels


def load_target(args):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.path.join(args.runs, "target.safetensors")
    with safe_open(path, "pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    state = load_file(path)
    classes = state["head.weight"].shape[0]
    model = build_model("ttach_instance.models:small_resnet", num_classes=classes,
                        kwargs={"width": int(meta.get("width", 16))})
    model.load_state_dict(state)
    return model.eval(), int(meta.get("size", 32))


@torch.no_grad()
def embed(wrapper: EmbeddingTTAWrapper, x: Tensor, batch: int, views: bool = False):
    """Mean embeddings ``(N, C)`` (and each view's pooled embedding ``(N, v, C)``) in batches."""
    means, per_view = [], []
    for i in range(0, x.shape[0], batch):
        r = wrapper.run(x[i:i + batch])
        means.append(r["mean"])
        if views:
            per_view.append(r["views"])
    return torch.cat(means), (torch.cat(per_view) if views else None)


def train_probe(feats: Tensor, labels: Tensor, classes: int, l2: float, iters: int) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS)."""
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    probe = torch.nn.Linear(feats.shape[1], classes)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    z = (feats - mu) / sd
    opt = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(z), labels) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    # fold the standardisation into the layer: probe(f) = W (f - mu) / sd + b
    with torch.no_grad():
        w = probe.weight / sd
        probe.bias -= (w * mu).sum(1)
        probe.weight.copy_(w)
    return probe.eval()


def knn_accuracy(bank: Tensor, bank_labels: Tensor, queries: Tensor, labels: Tensor, classes: int, k: int = 20,
                 tau: float = 0.07) -> float:
    bank = torch.nn.functional.normalize(bank, dim=1)
    q = torch.nn.functional.normalize(queries, dim=1)
    sim, idx = (q @ bank.T).topk(k, dim=1)
    votes = torch.zeros(q.shape[0], classes).scatter_add_(1, bank_labels[idx], (sim / tau).exp())
    return 100.0 * float((votes.argmax(1) == labels).float().mean())


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(os.path.dirname(HERE), "..", "shared", "data", "tinyimagenet-dev20"))
    p.add_argument("--runs", default="runs/tinyimagenet", help="the Tiny ImageNet run: target.safetensors (and the "
                   "decoded data_{train,val}.safetensors, else --data is decoded)")
    p.add_argument("--out", default="runs/metta")
    p.add_argument("--train-views", type=int, default=2, help="random views per train image for the probe")
    p.add_argument("--train-limit", type=int, default=None, help="every n-th train image, about this many")
    p.add_argument("--scale", default="0.25,1", help="random resized crop area range (min,max)")
    p.add_argument("--l2", type=float, default=1e-4)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    scale = tuple(float(v) for v in args.scale.split(","))
    model, size = load_target(args)
    mean, std = model_mean_std(model)
    classes = model.head.out_features

    def inputs(images: Tensor) -> Tensor:
        return to_model_input(resize_uint8(images, size).float() / 255, mean, std)

    train_u8, train_y = load_split(args, "train")
    if args.train_limit:
        keep = torch.arange(0, train_u8.shape[0], max(1, train_u8.shape[0] // args.train_limit))
        train_u8, train_y = train_u8[keep], train_y[keep]
    val_u8, val_y = load_split(args, "val")
    x_train, x_val = inputs(train_u8), inputs(val_u8)
    log(f"target {size} px, {classes} classes; train {x_train.shape[0]}, val {x_val.shape[0]}; scale {scale}")

    def wrapper(views, deaugment=False):
        return EmbeddingTTAWrapper(model, views, layer=LAYER, deaugment=deaugment, mean=mean, std=std)

    # -- the probe: single augmented views of the train split, each a row
    plain_train, _ = embed(wrapper("identity"), x_train, args.batch)
    rows = [embed(wrapper(RandomResizedCropSampler(1, scale=scale, seed=args.seed * 1000 + v)), x_train,
                  args.batch)[0] for v in range(args.train_views)]
    probe = train_probe(torch.cat(rows), train_y.repeat(args.train_views), classes, args.l2, args.iters)
    log(f"probe trained on {sum(r.shape[0] for r in rows)} single-view embeddings "
        f"(train acc on plain images {accuracy(probe(plain_train), train_y):.2f} %)")

    # -- val: single views and mean embeddings
    settings: Dict[str, object] = {
        "single: plain image": "identity",
        "single: one random view (S=1)": RandomResizedCropSampler(1, scale=scale, seed=10_000 + args.seed),
        "mean: S=4 random views": RandomResizedCropSampler(4, scale=scale, seed=10_000 + args.seed),
        "mean: S=8 random views": RandomResizedCropSampler(8, scale=scale, seed=10_000 + args.seed),
        "mean: hflip space (2)": "hflip",
        "mean: flips space (4)": "flips",
        "mean: five_crops_paper (5)": "five_crops_paper",
        "mean: ten_crops_paper (10)": "ten_crops_paper",
    }
    table: List[Dict[str, object]] = []
    for name, views in settings.items():
        for deaugment in (False, True):
            geometric_spatial = not isinstance(views, str) or views not in ("identity", "hflip", "flips")
            if deaugment and not geometric_spatial:
                continue  # flips are permutations: de-augmenting changes nothing
            if isinstance(views, RandomResizedCropSampler):
                views.reset()
            emb, per_view = embed(wrapper(views, deaugment), x_val, args.batch, views=True)
            probs_mean = probe(per_view).softmax(-1).mean(1)
            row = {"setting": name, "pooling": "de-augmented" if deaugment else "per view",
                   "views": per_view.shape[1], "probe_mean_embedding": accuracy(probe(emb), val_y),
                   "probe_mean_probs": accuracy(probs_mean, val_y),
                   "head_mean_embedding": accuracy(model.head(emb), val_y),
                   "head_mean_probs": accuracy(model.head(per_view).softmax(-1).mean(1), val_y),
                   "knn_mean_embedding": knn_accuracy(plain_train, train_y, emb, val_y, classes)}
            table.append(row)
            log(f"{name} [{row['pooling']}]: probe {row['probe_mean_embedding']:.1f} (probs {row['probe_mean_probs']:.1f}), "
                f"head {row['head_mean_embedding']:.1f} (probs {row['head_mean_probs']:.1f}), k-NN "
                f"{row['knn_mean_embedding']:.1f}")
    result = {"command": "python research/metta_tinyimagenet.py " + " ".join(argv or []), "args": vars(args),
              "train_rows": int(sum(r.shape[0] for r in rows)), "val": int(x_val.shape[0]), "rows": table,
              "seconds": round(time.time() - t0, 1)}
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "results.json"), result)
    print("\n| views | pooling | probe: mean emb. | probe: mean probs | head: mean emb. | head: mean probs | "
          "k-NN: mean emb. |\n|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['setting']} | {r['pooling']} | {r['probe_mean_embedding']:.1f} | {r['probe_mean_probs']:.1f} | "
              f"{r['head_mean_embedding']:.1f} | {r['head_mean_probs']:.1f} | {r['knn_mean_embedding']:.1f} |")
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
