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


#: The most metadata bytes :func:`read_meta` parses (a checkpoint's is a few kilobytes).
MAX_METADATA_BYTES = 1 << 20
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_meta(path: str, where: str) -> Any:
    """The JSON under a safetensors file's ``"meta"`` key, read from the header alone (no tensor
    is loaded; ``{}`` when the file has none), for loaders that check a file before building
    anything. Not a readable safetensors file, metadata over :data:`MAX_METADATA_BYTES` or not
    JSON: a ``ValueError`` starting with ``where`` (e.g. ``"weights file 'w.safetensors'"``)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("meta", "")
    except Exception as e:  # noqa: BLE001 - truncated or not safetensors: name the file
        raise ValueError(f"{where} is not a readable safetensors file ({e})") from None
    if len(raw) > MAX_METADATA_BYTES:
        raise ValueError(f"{where}: metadata of {len(raw)} bytes (at most {MAX_METADATA_BYTES})")
    try:
        return json.loads(raw) if raw else {}
    except (ValueError, RecursionError) as e:  # bad JSON, integers of > 4300 digits, nesting too deep
        raise ValueError(f"{where}: metadata is not valid JSON ({e})") from None


def header_tensors(path: str, where: str) -> Dict[str, Tensor]:
    """The file's tensors as empty ``meta`` tensors of their shapes and dtypes (the header alone):
    what a loader compares with a model built on the ``meta`` device before allocating it."""
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise ValueError(f"tensor {name!r} has dtype {piece.get_dtype()}")
                out[name] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
        return out
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{where} has tensors this loader does not read ({e})") from None


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
