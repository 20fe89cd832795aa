"""State files that hold data, never code: any state dict as one safetensors file.

A pickle is a program: loading one runs whatever it names, so a checkpoint written as pickles makes
"resume a run folder someone sent you" mean "run their code". A safetensors file is a JSON header plus
raw tensor bytes and nothing else. Optimizer, scheduler, grad-scaler and RNG states are nested
dicts/lists/tuples of tensors and plain numbers, so each is written as one safetensors file: its tensors
under their path names (``state.0.momentum_buffer``), and the structure around them -- numbers, strings,
tuples, integer keys -- as JSON in the file's own header (safetensors' ``__metadata__``, key
:data:`STRUCTURE_KEY`). Reading it back rebuilds the same object, bit for bit.

Why hand-written: safetensors stores flat ``str -> tensor`` maps only, and Accelerate pickles everything
but the model. Bytes go to disk through :func:`write_file` (one ``os.write`` loop and an ``fsync``), so a
full or read-only disk surfaces as one :class:`OSError` naming the file.
"""
from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

__all__ = ["STRUCTURE_KEY", "StateFormatError", "capture_rng", "from_tensors", "load_state_file", "restore_rng",
           "replace_file", "save_state_file", "state_bytes", "to_tensors", "write_file"]

#: The header metadata key holding the JSON structure of a state file.
STRUCTURE_KEY = "timm_local.state"
_TENSOR, _TUPLE, _DICT, _ARRAY = "$tensor", "$tuple", "$dict", "$ndarray"


class StateFormatError(ValueError):
    """A state that cannot be written without pickle (a type other than tensors, arrays, numbers, strings and
    containers of them), or a state file whose structure does not match its tensors."""


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = path or "tensor"
        while name in tensors:  # two paths that join to one name ("a.b" and "a" -> "b")
            name += "#"
        tensors[name] = obj
        return {_TENSOR: name}
    if isinstance(obj, np.ndarray):
        return {_ARRAY: _encode(torch.from_numpy(np.ascontiguousarray(obj)), path, tensors)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{path}.{i}" if path else str(i), tensors) for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) and not k.startswith("$") for k in obj)
        pairs = [(k, _encode(v, f"{path}.{k}" if path else str(k), tensors)) for k, v in obj.items()]
        return dict(pairs) if plain else {_DICT: [[_encode(k, "", {}), v] for k, v in pairs]}
    raise StateFormatError(f"{path or 'the state'} is a {type(obj).__name__}, which cannot be stored without pickle")


def to_tensors(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """``obj`` split into its tensors (by path name) and a JSON-able structure that refers to them."""
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _encode(obj, "", tensors)


def from_tensors(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The object :func:`to_tensors` split."""
    if isinstance(structure, list):
        return [from_tensors(v, tensors) for v in structure]
    if not isinstance(structure, dict):
        return structure
    if _TENSOR in structure:
        if structure[_TENSOR] not in tensors:
            raise StateFormatError(f"the structure names a tensor {structure[_TENSOR]!r} the file does not hold")
        return tensors[structure[_TENSOR]]
    if _ARRAY in structure:
        return from_tensors(structure[_ARRAY], tensors).numpy()
    if _TUPLE in structure:
        return tuple(from_tensors(v, tensors) for v in structure[_TUPLE])
    if _DICT in structure:
        return {from_tensors(k, tensors): from_tensors(v, tensors) for k, v in structure[_DICT]}
    return {k: from_tensors(v, tensors) for k, v in structure.items()}


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous and not sharing storage (safetensors refuses aliases: tied weights are stored twice)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


def state_bytes(obj: Any) -> bytes:
    """``obj`` as the bytes of one safetensors file (its structure in the header)."""
    from safetensors.torch import save

    tensors, structure = to_tensors(obj)
    return save(_plain(tensors), metadata={"format": "pt", STRUCTURE_KEY: json.dumps(structure)})


def write_file(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to the disk before returning.

    A failure (``ENOSPC``, ``EROFS``, ``EACCES``...) is an :class:`OSError` whose filename is ``path``; the
    partial file is left for the caller, whose temporary folder it is.
    """
    path = str(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, os.strerror(e.errno or errno.EIO), path) from None
    finally:
        os.close(fd)


def replace_file(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` beside ``path`` and rename it into place: a kill or a full disk leaves the old file
    (or none), never half of the new one. Errors are :func:`write_file`'s, naming the temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write_file(tmp, data)
    os.replace(tmp, path)


def save_state_file(path: Union[str, Path], obj: Any) -> None:
    """``obj`` (a state dict, or any nest of tensors and plain values) as the safetensors file ``path``."""
    write_file(path, state_bytes(obj))


def load_state_file(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Any:
    """What :func:`save_state_file` wrote; a file without a structure (any safetensors file) is its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if STRUCTURE_KEY not in meta:
        return tensors
    return from_tensors(json.loads(meta[STRUCTURE_KEY]), tensors)


# ------------------------------------------------------------------------------------------------
# random number generators
# ------------------------------------------------------------------------------------------------
def _device_module() -> Any:
    """torch's module of the accelerator in use (``torch.cuda``, ``torch.xpu``, ...), or None."""
    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        return torch.get_device_module(torch.accelerator.current_accelerator().type)
    return torch.cuda if torch.cuda.is_available() else None


def capture_rng() -> dict[str, Any]:
    """This process's generators -- python, numpy, torch CPU, every device generator -- as tensors and numbers
    (what Accelerate's ``random_states_N.pkl`` held, without the pickle)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    module = _device_module()
    if module is not None:
        getter = getattr(module, "get_rng_state_all", None)
        state["device"] = list(getter()) if getter else [module.get_rng_state()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set this process's generators to :func:`capture_rng`'s ``state``."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]),
                         float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    module = _device_module()
    if module is not None and state.get("device"):
        setter = getattr(module, "set_rng_state_all", None)
        if setter is not None:
            setter(state["device"])
        else:
            module.set_rng_state(state["device"][0])
