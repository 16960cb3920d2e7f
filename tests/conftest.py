"""Shared test set-up.

The helper modules beside the tests (``_tiny.py``: tiny deterministic problems, ``pil_reference.py``:
the paper's PIL pipeline) are importable as top-level modules because pyproject.toml's
``[tool.pytest.ini_options] pythonpath`` names this folder; no test edits ``sys.path``.
Scripts run in a subprocess get the same through :func:`helpers_env`. Why: one declared place
for the test path, whatever pytest's import mode, instead of an insert at the top of each file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import pytest
import torch

TESTS = Path(__file__).resolve().parent

# One intra-op thread for the tests and every subprocess they start: their models are tiny, and
# two OpenMP threads per process on a busy 2-core machine spin against each other (a 4-epoch
# toy fit measured 96 s with two threads under load, 11 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def helpers_env() -> Dict[str, str]:
    """The environment for a subprocess that imports the test helpers (``from _tiny import ...``):
    this one's, with this folder first on ``PYTHONPATH`` and one intra-op thread."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
