"""Wall time of the policy searches on a synthetic prediction cache (tensor work, no model calls).

    python benchmarks/search_speed.py                           # 100 candidates x 1,000 images x 200 classes, GPS n=4
    python benchmarks/search_speed.py --classes 20 --n 10       # the dev20 split's class count, a longer policy
    python benchmarks/search_speed.py --budget 3                # also the budget search (exhaustive or greedy)

The synthetic log-probabilities look like a model's on a validation set: each image has a
class signal (``--signal`` logits on its label) and its own noise shared by every candidate,
and each candidate adds independent noise (``--spread``), so candidates differ and the
temperature fit has a real optimum. Times are wall seconds of one run each (the first call of
each search is timed, as a user runs it; input validation included) and CPU seconds, with the
torch thread count printed: on a machine shared with other jobs, wall time well above CPU time
means waiting, and ``OMP_NUM_THREADS=1`` avoids the threads' synchronisation stalls.
"""

from __future__ import annotations

import argparse
import time

import torch

from ttach_instance.search import budget_policy_search, greedy_policy_search


def synthetic(candidates: int, samples: int, classes: int, signal: float, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (samples,), generator=g)
    base = 2.0 * torch.randn(samples, classes, generator=g)
    base[torch.arange(samples), labels] += signal
    logits = base + spread * torch.randn(candidates, samples, classes, generator=g)
    return torch.log_softmax(logits, dim=2), labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--n", type=int, default=4, help="GPS policy length")
    p.add_argument("--budget", type=int, default=0, help="also time budget_policy_search with this budget (0: skip)")
    p.add_argument("--signal", type=float, default=4.0)
    p.add_argument("--spread", type=float, default=1.5)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    lp, labels = synthetic(args.candidates, args.samples, args.classes, args.signal, args.spread, args.seed)
    lp = lp.to(getattr(torch, args.dtype))
    print(f"log_probs {tuple(lp.shape)} {args.dtype}, torch threads {torch.get_num_threads()}")
    start, cpu = time.perf_counter(), time.process_time()
    res = greedy_policy_search(lp, labels, args.n)
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"GPS n={args.n}: {took:.2f} s wall, {cpu:.2f} s CPU ({took / args.n:.2f} s per step); chosen {res.indices}; "
          f"log-likelihood {res.scores[0]:.4f} -> {res.scores[-1]:.4f}; T {res.temperatures[-1]:.3f}")
    if args.budget:
        start, cpu = time.perf_counter(), time.process_time()
        res = budget_policy_search(lp, labels, args.budget, identity=0)
        took, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"budget {args.budget} ({res.method}, {res.details['subsets']} subsets): {took:.2f} s wall, {cpu:.2f} s "
              f"CPU; chosen "
              f"{res.indices}; accuracy {res.scores[0]:.3f} -> {res.scores[-1]:.3f}")


if __name__ == "__main__":
    main()
