"""Atomic, fsynced safetensors and JSON files (no pickle anywhere): checkpoints and caches.

A tensor file is one ``.safetensors`` file: tensors under prefixed names (``model.*``,
``ema.*``, ``optim.<param>.<key>``) and a JSON string under the ``"meta"`` metadata key
(epoch, step, optimiser hyper-parameters, RNG states, anything JSON-serialisable).

Every write goes to a temporary file in the same directory, is flushed and ``fsync``ed, then
``os.replace``d over the target, and the directory is ``fsync``ed too: a killed job or a power
cut leaves either the previous file or the new one, never a torn one. Writers return the size
and sha256 of what they wrote, so caches can list their files and verify them later.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, payload: bytes) -> Dict[str, Any]:
    """Write ``payload`` to ``path`` atomically and durably; returns ``{"bytes", "sha256"}``."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)
    return {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def atomic_save_tensors(path: str, tensors: Dict[str, Tensor], meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``tensors`` (moved to the CPU) and ``meta`` (JSON) as one safetensors file, written with
    :func:`atomic_write_bytes`; returns its ``{"bytes", "sha256"}``."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(tensors, metadata={"meta": json.dumps(meta or {})}))


def load_tensors(path: str) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """``(tensors, meta)`` of a file written by :func:`atomic_save_tensors`. A missing file or one
    that is not a whole safetensors file (truncated, damaged, another format) is a ``ValueError``
    naming it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path!r} is not a readable safetensors file (truncated or damaged?): {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path!r}: its metadata must be a JSON object, got {type(meta).__name__}")
    return tensors, meta


def atomic_write_json(path: str, obj: Any) -> Dict[str, Any]:
    """``obj`` as indented, key-sorted JSON, written with :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def file_digest(path: str) -> Dict[str, Any]:
    """``{"bytes", "sha256"}`` of the file at ``path`` (what the writers above return)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            size += len(block)
    return {"bytes": size, "sha256": h.hexdigest()}


def tensors_sha256(tensors: Dict[str, Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (a state dict, a data set),
    in sorted name order: equal for equal contents, whatever device or memory layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.cpu().contiguous().reshape(-1)
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


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
