"""Reference rankers for a label cache: how much of the per-image candidate ranking is explained
without looking at the image.

For the held-out fold of ``fit_predictor`` (same split: by image, ``--val-fraction``, ``--seed``)
it prints the mean per-row Spearman correlation of

* **global**: one fixed ranking for every row (the training fold's mean loss per candidate);
* **group**: the training fold's mean rank per candidate *within the row's corruption and
  severity* (clean rows form one group) -- an oracle that knows exactly which corruption was
  applied, and nothing else about the image;

split into clean and corrupted rows. A predictor has to beat *group* to show it reads more than
the corruption off the image. Then the k=1 accuracy of the identity, of each group's best
candidate (from the training fold) and of the per-row oracle. (docs/BENCHMARKS.md, Tiny ImageNet benchmark.)

    python research/label_ceiling.py runs/tinyimagenet/labels runs/tinyimagenet/labels_seed1
"""

from __future__ import annotations

import argparse

import torch

from ttach_instance.training.labels import LabelCache
from ttach_instance.training.losses import hard_rank, spearman
from ttach_instance.training.trainer import split_rows


def load(dirs):
    parts, offset, n_images = [], 0, None
    for d in dirs:
        cache = LabelCache(d)
        m = cache.manifest()
        if n_images is not None and m["num_images"] != n_images:
            raise ValueError(f"{d}: {m['num_images']} images, the first cache has {n_images}")
        n_images = m["num_images"]
        data = cache.load()
        data.pop("images")
        data["rows"] = data["rows"] + offset  # rows stay unique; row % num_images is still the image
        offset += m["total_rows"]
        parts.append(data)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, n_images


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("caches", nargs="+", help="label cache directories (same images)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data, n_images = load(args.caches)
    losses, rows = data["losses"].float(), data["rows"]
    group = (data["corruption"] + 1) * 10 + data["severity"]
    train, val = split_rows(rows, n_images, args.val_fraction, args.seed)
    clean = data["corruption"][val] < 0
    global_rank = losses[train].mean(0).expand(int(val.sum()), -1).contiguous()
    group_rank = torch.zeros_like(losses)
    for g in group.unique():
        m = group == g
        group_rank[m] = hard_rank(losses[m & train]).mean(0) if (m & train).any() else losses[train].mean(0)
    print(f"{int(train.sum())} training rows, {int(val.sum())} held-out rows ({int(clean.sum())} clean)")
    for name, pred in (("global", global_rank), ("group", group_rank[val])):
        s = torch.nan_to_num(spearman(pred, losses[val]))
        print(f"{name:6s} spearman {s.mean():.4f}  clean {s[clean].mean():.4f}  corrupted {s[~clean].mean():.4f}")
    # k=1 accuracy of the group oracle: each group's candidate most often right on the training
    # fold, applied to every held-out row of the group (what a perfect corruption recogniser that
    # knows nothing else about the image would reach), against the identity and the per-row oracle
    correct = data["correct"].float()
    group_best = torch.zeros(losses.shape[0], dtype=torch.long)
    for g in group.unique():
        m = group == g
        group_best[m] = int(correct[m & train].mean(0).argmax()) if (m & train).any() else 0
    acc = {"identity": correct[val][:, 0],
           "group-best": correct[val].gather(1, group_best[val][:, None]).squeeze(1),
           "oracle": correct[val].gather(1, losses[val].argmin(1, keepdim=True)).squeeze(1)}
    for name, a in acc.items():
        print(f"k=1 accuracy {name:10s} {a.mean():.4f}  clean {a[clean].mean():.4f}  corrupted {a[~clean].mean():.4f}")


if __name__ == "__main__":
    main()
