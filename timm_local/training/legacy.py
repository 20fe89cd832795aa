"""Checkpoints of the pickle format (Accelerate's ``save_state``): read without running code, migrated once.

Such a checkpoint holds ``custom_checkpoint_{0,1,2}.pkl`` (model, schedule, loop position),
``optimizer.bin``, ``random_states_N.pkl`` and, under fp16, ``scaler.pt`` -- all pickles. Each is read with
``torch.load(weights_only=True)`` (numpy's array types allowed, as Accelerate's own loader does: arrays of
numbers, no code), whose unpickler refuses any other global *before* calling it; a file it refuses is an
:class:`UnsafePickleError` naming :data:`TRUST_FLAG`, which reads it with full pickle, knowingly.

:func:`~timm_local.training.run_format.migrate` rewrites such a checkpoint as safetensors, once.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .errors import CheckpointError, UnsafePickleError

__all__ = ["LEGACY_OBJECTS", "TRUST_FLAG", "legacy_files", "legacy_state", "load_pickle", "read_legacy"]

TRUST_FLAG = "--trust-pickle"
#: Accelerate's custom objects of the pickle format, in ``register_for_checkpointing`` order.
LEGACY_OBJECTS = ("model", "scheduler", "train_state")
_OPTIMIZER, _SCALER = "optimizer.bin", "scaler.pt"


def legacy_files(meta: dict[str, Any]) -> list[str]:
    """The files a pickle-format checkpoint holds: its manifest, or (written before the manifest) Accelerate's."""
    if "files" in meta:
        return list(meta["files"])
    objects = meta.get("custom_objects", LEGACY_OBJECTS)
    names = [_OPTIMIZER] + [f"custom_checkpoint_{i}.pkl" for i in range(len(objects))]
    return names + [f"random_states_{r}.pkl" for r in range(int(meta.get("num_processes", 1)))]


def load_pickle(path: Union[str, Path], trust_pickle: bool = False) -> Any:
    """One pickle file of the old format: data only, unless ``trust_pickle``."""
    from accelerate.utils import load

    try:
        return load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle or "weights_only" not in str(e).lower():
            raise CheckpointError(f"{path} cannot be read (UnpicklingError: {str(e).splitlines()[0]})") from None
        try:
            names = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) or "code"
        except Exception:  # not a zip checkpoint: the unpickler's refusal is all there is
            names = "code"
        raise UnsafePickleError(
            f"{path} is a pickle that names {names}, which loading it would run; refusing it (a checkpoint is "
            f"data). Pass {TRUST_FLAG} to load it anyway, only for a run folder you trust") from None
    except Exception as e:  # truncated, not a torch file: name it
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def legacy_state(checkpoint: Path, meta: dict[str, Any], name: str, trust_pickle: bool = False) -> Any:
    """One state (``model``, ``optimizer``, ``scheduler``, ``train_state``) of a pickle-format checkpoint."""
    if name == "optimizer":
        return load_pickle(checkpoint / _OPTIMIZER, trust_pickle)
    index = list(meta.get("custom_objects", LEGACY_OBJECTS)).index(name)
    return load_pickle(checkpoint / f"custom_checkpoint_{index}.pkl", trust_pickle)


def _rng(states: dict[str, Any]) -> dict[str, Any]:
    """Accelerate's ``random_states_N.pkl`` dict as :func:`~timm_local.training.safe_state.capture_rng`'s."""
    version, mt, gauss = states["random_state"]
    name, keys, pos, has_gauss, cached = states["numpy_random_seed"]
    out: dict[str, Any] = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": states["torch_manual_seed"],
        "step": int(states.get("step", 0)),
    }
    device = [v for k, v in states.items() if k.startswith("torch_") and k.endswith("_manual_seed")
              and k != "torch_manual_seed"]
    if device:
        out["device"] = list(device[0]) if isinstance(device[0], (list, tuple)) else [device[0]]
    return out


def read_legacy(checkpoint: Path, meta: dict[str, Any], trust_pickle: bool = False) -> dict[str, Any]:
    """Every state of a pickle-format checkpoint (``meta``: its ``checkpoint_meta.json``): ``model``,
    ``scheduler``, ``train_state``, ``optimizer``, ``scaler`` (fp16 only) and ``rng`` (one per process, by rank)."""
    objects = meta.get("custom_objects", LEGACY_OBJECTS)
    states = {name: load_pickle(checkpoint / f"custom_checkpoint_{i}.pkl", trust_pickle)
              for i, name in enumerate(objects)}
    states["optimizer"] = load_pickle(checkpoint / _OPTIMIZER, trust_pickle)
    if (checkpoint / _SCALER).is_file():
        states["scaler"] = load_pickle(checkpoint / _SCALER, trust_pickle)
    ranks = sorted(int(p.stem.rsplit("_", 1)[1]) for p in checkpoint.glob("random_states_*.pkl"))
    states["rng"] = {r: _rng(load_pickle(checkpoint / f"random_states_{r}.pkl", trust_pickle)) for r in ranks}
    return states
