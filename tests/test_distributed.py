import os
import subprocess
import sys

import pytest
import torch

from _ddp_job import FIT, FIT_GROUPS, LABEL_KW, SIZE
from _tiny import TinyPredictor, space, tiny_data, tiny_model, two_class_folder

from ttach_instance.training.labels import LabelCache, generate_labels
from ttach_instance.training.trainer import fit_predictor

HERE = os.path.dirname(os.path.abspath(__file__))


def test_torchrun_two_processes_match_and_continue_single_process(tmp_path, helpers_env):
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path / "ddp")
    env = helpers_env  # _ddp_job.py imports the helpers (OMP_NUM_THREADS=1 included)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(HERE, "_ddp_job.py"), out], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "rank 0/2 ok" in res.stdout and "rank 1/2 ok" in res.stdout

    # labels: shards were split by rank (both ranks wrote some), the cache is complete without duplicates,
    # and it equals the single-process cache exactly
    ddp_cache = LabelCache(os.path.join(out, "labels"))
    ddp = ddp_cache.load()
    assert torch.equal(ddp["rows"], torch.arange(22))
    from ttach_instance.io import load_tensors

    writers = {s: load_tensors(ddp_cache.shard_path(s))[1]["rank"] for s in ddp_cache.done_shards()}
    assert writers == {s: s % 2 for s in range(8)}
    single = generate_labels(tiny_model(), *tiny_data(11), space(), str(tmp_path / "single_labels"), **LABEL_KW).load()
    for key in single:
        assert torch.allclose(single[key].float(), ddp[key].float(), atol=1e-6), key

    # training: both ranks hold the same weights after the first epoch ...
    from safetensors.torch import load_file

    w0, w1 = (load_file(os.path.join(out, f"weights_rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # ... and a single process continuing the DDP checkpoint ends where an uninterrupted single run ends
    cont = TinyPredictor(12, SIZE)
    fit_predictor(cont, ddp, os.path.join(out, "fit"), FIT, num_images=11, progress=False, log=lambda m: None)
    straight = TinyPredictor(12, SIZE)
    fit_predictor(straight, single, str(tmp_path / "single_fit"), FIT, num_images=11, progress=False,
                  log=lambda m: None)
    for (k, a), b in zip(straight.state_dict().items(), cont.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k
    # the auxiliary terms (corruption recognition + distillation) under DDP: the same
    g0, g1 = (load_file(os.path.join(out, f"grouped_rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    grouped = TinyPredictor(12, SIZE)
    fit_predictor(grouped, single, None, FIT_GROUPS, num_images=11, progress=False, max_epochs_this_run=1,
                  log=lambda m: None)
    plain = TinyPredictor(12, SIZE)
    fit_predictor(plain, single, None, FIT, num_images=11, progress=False, max_epochs_this_run=1, log=lambda m: None)
    assert not torch.allclose(grouped.conv.weight, plain.conv.weight)  # the terms changed the features
    for k, a in grouped.state_dict().items():
        assert torch.allclose(a, g0[k], atol=1e-5), k


def test_eval_command_under_torchrun_matches_one_process_and_reports_once(tmp_path, helpers_env):
    """``torchrun ... ttach_instance.cli eval``: the ranks share the sets (each rank evaluates its
    share, rank 0 summarises and prints), and the results equal a single process's. Before the
    CLI initialised the process group, every process believed it was rank 0 of 1: all of them
    evaluated every set and each printed the table."""
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import json


    from ttach_instance.cli import main
    from ttach_instance.data import build_model

    two_class_folder(tmp_path, {"val": 3})
    torch.manual_seed(0)
    weights = str(tmp_path / "w.pt")
    torch.save(build_model("ttach_instance.models:small_resnet", num_classes=2).state_dict(), weights)
    args = ["eval", "--model", "ttach_instance.models:small_resnet", "--weights", weights, "--data",
            str(tmp_path / "ds"), "--corruptions", "contrast", "--held-out", "saturate", "--severities", "1,2",
            "--methods", "identity,hflip,random_k2", "--cost-images", "0"]
    ddp_out, single_out = str(tmp_path / "ddp"), str(tmp_path / "single")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "ttach_instance.cli", *args, "--out", ddp_out],
                         capture_output=True, text=True, timeout=240, env=helpers_env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert res.stdout.count("wrote ") == 1 and res.stdout.count("| Identity |") == 1, res.stdout[-3000:]
    assert main(args + ["--out", single_out]) == 0
    for key in ("clean", "common_mean", "held_out_mean", "per_corruption"):
        with open(os.path.join(ddp_out, "results.json")) as f, open(os.path.join(single_out, "results.json")) as g:
            assert json.load(f)[key] == json.load(g)[key], key
