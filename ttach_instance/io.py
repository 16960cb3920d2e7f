"""Atomic safetensors checkpoints with JSON metadata (no pickle anywhere).

A checkpoint is one ``.safetensors`` file: tensors under prefixed names (``model.*``,
``ema.*``, ``optim.<param>.<key>``) and a JSON string under the ``"meta"`` metadata key
(epoch, step, optimiser hyper-parameters, RNG seeds, anything JSON-serialisable). Written to
a temporary file then ``os.replace``d, so a killed job leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor


def atomic_save_tensors(path: str, tensors: Dict[str, Tensor], meta: Optional[Dict[str, Any]] = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, tmp, metadata={"meta": json.dumps(meta or {})})
    os.replace(tmp, path)


def load_tensors(path: str) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    return load_file(path), meta


def atomic_write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON (scalars, param groups)."""
    sd = optimizer.state_dict()
    tensors: Dict[str, Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"optim.{pid}.{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> None:
    state: Dict[int, Dict[str, Any]] = {}
    for name, val in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = val
    for pid, sc in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def module_tensors(module: torch.nn.Module, prefix: str) -> Dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module_tensors(module: torch.nn.Module, tensors: Dict[str, Tensor], prefix: str) -> None:
    p = prefix + "."
    module.load_state_dict({k[len(p):]: v for k, v in tensors.items() if k.startswith(p)})
