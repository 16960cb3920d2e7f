"""A fit is a function of its seed, labels and configuration: two fresh fits agree bit for bit, and
a fit interrupted after an epoch and resumed (in this process or in two others) ends bit for bit
where the uninterrupted one does, with a predictor that draws dropout masks from torch's global
generator. Its checkpoint refuses other labels, another configuration and older formats."""

import inspect
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from ttach_instance.io import atomic_save_tensors, load_tensors
from ttach_instance.training.trainer import FitConfig, fit_predictor


class DropoutPredictor(nn.Module):
    """Pixels -> (B, 4) scores through a conv, a 2x2 pool, dropout (p = 0.5) and a linear head;
    a fixed init whatever the global generator holds, so only the fit's own draws vary."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(24, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def features(self, x):
        return self.drop(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1))

    def head_scores(self, f):
        return self.head(f)

    def forward(self, x):
        return self.head_scores(self.features(x))


def synthetic(n=96):
    """Losses that are a fixed linear function of the channel means of 8x8 images."""
    g = torch.Generator().manual_seed(0)
    images = (torch.randint(0, 256, (n, 3, 1, 1), generator=g) + torch.randint(-20, 21, (n, 3, 8, 8), generator=g))
    images = images.clamp(0, 255).to(torch.uint8)
    w = torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.0, 1.0, -1.0, 0.5], [-0.5, 0.0, 1.0, -1.0]])
    return {"images": images, "losses": (images.float().mean((2, 3)) / 255) @ w * 4, "rows": torch.arange(n)}


CFG = dict(epochs=2, batch_size=16, optimizer="adamw", lr=0.01, warmup_steps=2, ema_decay=0.5, cutout=0.5,
           flip_permutation=[1, 0, 3, 2], seed=3)


def fit(out_dir, epochs_this_run=None, **overrides):
    pred = DropoutPredictor()
    out = fit_predictor(pred, synthetic(), out_dir, FitConfig(**{**CFG, **overrides}), progress=False,
                        log=lambda m: None, max_epochs_this_run=epochs_this_run)
    return pred, out


def assert_bit_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def scramble_global_generators(seed):
    """What another caller or process would have done to the global generators meanwhile."""
    torch.manual_seed(seed)
    torch.rand(1000)
    np.random.seed(seed)
    random.seed(seed)


def test_two_fresh_fits_are_bit_identical():
    scramble_global_generators(1)
    a, out_a = fit(None)
    scramble_global_generators(2)
    b, out_b = fit(None)
    assert_bit_identical(a, b)
    assert out_a["history"] == out_b["history"]
    # the draws do matter: dropout off gives other weights from the same seed
    c, _ = fit(None)
    c_nodrop = DropoutPredictor()
    c_nodrop.drop.p = 0.0
    fit_predictor(c_nodrop, synthetic(), None, FitConfig(**CFG), progress=False, log=lambda m: None)
    assert not torch.equal(c.head.weight, c_nodrop.head.weight)


def test_fit_seeds_numpy_and_python_too():
    fit(None)
    after_a = (np.random.random(), random.random(), torch.rand(1).item())
    scramble_global_generators(5)
    fit(None)
    assert (np.random.random(), random.random(), torch.rand(1).item()) == after_a


def test_interrupted_fit_resumes_bit_for_bit_in_this_process(tmp_path):
    straight, out = fit(str(tmp_path / "straight"))
    fit(str(tmp_path / "resumed"), epochs_this_run=1)
    scramble_global_generators(123)
    resumed, out_r = fit(str(tmp_path / "resumed"))
    assert out_r["complete"] and out_r["history"] == out["history"]
    assert_bit_identical(straight, resumed)
    # the checkpoints after epoch 2 agree too (model, EMA, optimiser, generators)
    ta, _ = load_tensors(str(tmp_path / "straight" / "checkpoint.safetensors"))
    tb, _ = load_tensors(str(tmp_path / "resumed" / "checkpoint.safetensors"))
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


SCRIPT = """
import random, sys
import numpy as np
import torch
from torch import nn
from ttach_instance.training.trainer import FitConfig, fit_predictor
{source}
torch.manual_seed(11)  # the process starts from another global state
np.random.seed(11)
random.seed(11)
fit_predictor(DropoutPredictor(), synthetic(), sys.argv[1], FitConfig(**{cfg!r}), progress=False,
              log=lambda m: None, max_epochs_this_run=1)
"""


def test_fit_stopped_after_an_epoch_in_another_process_resumes_bit_identical(tmp_path):
    source = textwrap.dedent(inspect.getsource(DropoutPredictor)) + "\n\n" + textwrap.dedent(inspect.getsource(synthetic))
    out = str(tmp_path / "fit")
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    res = subprocess.run([sys.executable, "-c", SCRIPT.format(source=source, cfg=CFG), out], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(out, "history.json")) as f:
        assert [h["epoch"] for h in json.load(f)] == [1]
    scramble_global_generators(12)
    resumed, out_r = fit(out)  # this process finishes the fit the other one started
    straight, out_s = fit(None)
    assert out_r["complete"] and out_r["history"] == out_s["history"]
    assert_bit_identical(straight, resumed)


def test_checkpoint_refuses_other_labels_other_config_and_older_formats(tmp_path):
    out = str(tmp_path / "fit")
    pred = DropoutPredictor()
    identity = {"caches": ["labels_a"], "identities": ["a" * 64]}
    fit_predictor(pred, synthetic(), out, FitConfig(**CFG), progress=False, log=lambda m: None, max_epochs_this_run=1,
                  labels_identity=identity)
    other = synthetic()
    other["losses"][5, 0] += 1e-3  # one label of one row
    with pytest.raises(ValueError, match=r"trained on other labels \(checkpoint -> now: caches: \[\"labels_a\"\] -> "
                                         r"\[\"labels_b\"\]; data_sha256: \"[0-9a-f]{12}\.\.\.\" -> .*identities: "
                                         r"\[\"aaaaaaaaaaaa\.\.\.\"\] -> \[\"bbbbbbbbbbbb\.\.\.\"\]"):
        fit_predictor(DropoutPredictor(), other, out, FitConfig(**CFG), progress=False, log=lambda m: None,
                      labels_identity={"caches": ["labels_b"], "identities": ["b" * 64]})
    # the same rows from a moved cache continue
    same = fit_predictor(DropoutPredictor(), synthetic(), out, FitConfig(**CFG), progress=False, log=lambda m: None,
                         max_epochs_this_run=0, labels_identity={"caches": ["moved"], "identities": ["a" * 64]})
    assert len(same["history"]) == 1
    with pytest.raises(ValueError, match=r"another configuration \(checkpoint -> now: lr: 0\.01 -> 0\.02; "
                                         r"seed: 3 -> 4\)"):
        fit_predictor(DropoutPredictor(), synthetic(), out, FitConfig(**{**CFG, "lr": 0.02, "seed": 4}),
                      progress=False, log=lambda m: None)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    tensors, meta = load_tensors(ckpt)
    for fmt, words in ((None, "older ttach-instance (no format version"), (1, "older ttach-instance (format 1;"),
                       (3, "newer ttach-instance (format 3)")):
        atomic_save_tensors(ckpt, tensors, {**meta, "format": fmt})
        with pytest.raises(ValueError) as info:
            fit_predictor(DropoutPredictor(), synthetic(), out, FitConfig(**CFG), progress=False, log=lambda m: None)
        assert words in str(info.value) and "fit checkpoint" in str(info.value)


def test_cli_fit_seed_fixes_the_whole_fit_and_its_checkpoint_refuses_other_labels(tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    from ttach_instance.cli import main
    from ttach_instance.data import build_model

    rng = np.random.default_rng(0)
    for i in range(8):
        d = tmp_path / "ds" / ("ants", "bees")[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    factory = "ttach_instance.models:small_resnet"
    torch.manual_seed(0)
    w = str(tmp_path / "w.pt")
    torch.save(build_model(factory, num_classes=2, kwargs={"width": 16}).state_dict(), w)
    labels = {}
    for name, extra in (("a", ["--corruption-p", "0"]), ("b", ["--seed", "1", "--corruptions", "contrast"])):
        labels[name] = str(tmp_path / f"labels_{name}")
        assert main(["labels", "--model", factory, "--weights", w, "--data", str(tmp_path / "ds"), "--out",
                     labels[name], "--space", "flips", *extra]) == 0

    def fit(out, seed, cache="a"):
        return main(["fit", "--labels", labels[cache], "--out", str(tmp_path / out), "--predictor", "small",
                     "--width", "4", "--epochs", "1", "--batch-size", "4", "--optimizer", "adamw",
                     "--val-fraction", "0.25", "--seed", str(seed)])

    assert fit("one", 3) == 0 and fit("two", 3) == 0 and fit("other_seed", 4) == 0
    one, two, other = (load_file(str(tmp_path / d / "predictor.safetensors")) for d in ("one", "two", "other_seed"))
    assert sorted(one) == sorted(two) and all(torch.equal(one[k], two[k]) for k in one)  # initialisation included
    assert not torch.equal(one["head.weight"], other["head.weight"])
    # --weight-decay reaches the optimiser: the same seed with another decay trains other weights
    assert main(["fit", "--labels", labels["a"], "--out", str(tmp_path / "decayed"), "--predictor", "small",
                 "--width", "4", "--epochs", "1", "--batch-size", "4", "--optimizer", "adamw",
                 "--val-fraction", "0.25", "--seed", "3", "--weight-decay", "0.5"]) == 0
    decayed = load_file(str(tmp_path / "decayed" / "predictor.safetensors"))
    assert not torch.equal(one["head.weight"], decayed["head.weight"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        fit("one", 3, cache="b")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "was trained on other labels" in err and f'caches: ["{labels["a"]}"] -> ["{labels["b"]}"]' in err


@pytest.mark.parametrize("seed", [-1, 2 ** 32, 1.5, True])
def test_seed_out_of_range_is_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        FitConfig(seed=seed)
