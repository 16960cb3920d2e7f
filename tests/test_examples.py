"""The examples run as a user runs them (a subprocess, small settings) and print what they say."""

import re
import subprocess
import sys
from pathlib import Path

import ttach_instance as ti

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_segmentation_example_runs_every_wrapper():
    res = subprocess.run([sys.executable, str(EXAMPLES / "segmentation.py"), "--model", "tiny", "--size", "32",
                          "--batch", "2", "--classes", "3"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = dict(re.findall(r"^(plain model|d4 \(8 views\)|paper12 \(12 views\)|loss-guided k=[12])\s+(\(.*?\))",
                           res.stdout, re.M))
    assert rows == {name: "(2, 3, 32, 32)" for name in ("plain model", "d4 (8 views)", "paper12 (12 views)",
                                                        "loss-guided k=1", "loss-guided k=2")}, res.stdout
    assert re.search(r"^plain model .* with the plain model 100\.0%$", res.stdout, re.M), res.stdout
    chosen = re.search(r"^chosen per image: \[(.*)\]$", res.stdout, re.M).group(1)
    names = [n.strip(" '") for n in chosen.split(",")]
    assert len(names) == 2 and set(names) <= set(ti.get_space("paper12").names), chosen
    assert re.search(r"^uncertainty map \(2, 1, 32, 32\), mean \d", res.stdout, re.M), res.stdout
