"""Run under torchrun: labels then one epoch of predictor training, exactly as a single process would."""

import os
import sys

import torch

# run as a script: its folder (tests/) is sys.path[0], so the helpers import as top-level modules
from _tiny import TinyPredictor, space, tiny_data, tiny_model

from ttach_instance.training import distributed as dist
from ttach_instance.training.labels import generate_labels
from ttach_instance.training.trainer import FitConfig, fit_predictor

SIZE = 32  # the TinyPredictor's input_size: the labels' images, not resized
LABEL_KW = dict(draws=2, corruption_p=0.5, corruptions=["gaussian_noise", "contrast"], shard_size=3, progress=False)
FIT = FitConfig(epochs=2, batch_size=8, optimizer="adamw", lr=0.01, warmup_steps=2, ema_decay=0.5, cutout=0.5)
# Both auxiliary terms (corruption recognition and distillation): two temporary heads under DDP.
FIT_GROUPS = FitConfig(epochs=2, batch_size=8, optimizer="adamw", lr=0.01, warmup_steps=2, ema_decay=0.5, cutout=0.5,
                       group_weight=1.0, distill_weight=1.0)


def main(out):
    rank, world = dist.init_from_env("cpu")
    torch.set_num_threads(1)
    cache = generate_labels(tiny_model(), *tiny_data(11), space(), os.path.join(out, "labels"), **LABEL_KW)
    data = cache.load()
    pred = TinyPredictor(12, SIZE)
    fit_predictor(pred, data, os.path.join(out, "fit"), FIT, num_images=11, progress=False,
                  max_epochs_this_run=1, log=lambda m: None)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in pred.state_dict().items()}, os.path.join(out, f"weights_rank{rank}.safetensors"))
    grouped = TinyPredictor(12, SIZE)  # the auxiliary terms (DDP over predictor + temporary heads)
    fit_predictor(grouped, data, None, FIT_GROUPS, num_images=11, progress=False, max_epochs_this_run=1,
                  log=lambda m: None)
    save_file({k: v.contiguous() for k, v in grouped.state_dict().items()}, os.path.join(out, f"grouped_rank{rank}.safetensors"))
    print(f"rank {rank}/{world} ok")


if __name__ == "__main__":
    main(sys.argv[1])
