"""Checkpoints of a run on disk: what they hold, atomic save, a manifest that lets every load verify the
files, listing, rotation.

A checkpoint is a folder of safetensors files -- no pickle, so loading one runs no code
(:mod:`~timm_local.training.safe_state`) -- and ``checkpoint_meta.json``::

    model.safetensors       the LocalModel (backbone and auxiliary heads)
    optimizer.safetensors   the optimizer's state (momentum buffers; param groups in the header)
    scheduler.safetensors   the learning-rate schedule's position (header only)
    scaler.safetensors      fp16's grad scaler (fp16 runs only)
    rng_N.safetensors       process N's python, numpy, torch and device generators
    checkpoint_meta.json    which run wrote it, its config, the loop position (``train_state``), and the size
                            and SHA-256 of every file (the manifest)

**More state.** Whatever else a run must carry across a resume (an EMA of the weights, say) is one more
named file: ``add_checkpoint_state(accelerator, "ema", obj)`` with ``obj`` having ``state_dict()`` and
``load_state_dict()`` (tensors, numbers, strings and containers of them); every save then writes
``ema.safetensors`` and every resume loads it (a checkpoint written before it existed leaves ``obj`` as it is,
with a warning). Checkpoints of the older pickle format are read with ``weights_only=True``
(:mod:`~timm_local.training.legacy`) and migrated once (:mod:`~timm_local.training.run_format`).

Why each step is hand-written:

* A save is written into a temporary folder and renamed into place, so a kill mid-save never leaves a half
  checkpoint that looks complete; an existing folder of the same step (a stale one of an abandoned
  continuation) is renamed away first, then replaced -- never kept under a new name.
* The manifest names a bad file before anything is loaded.
* Rotation renames a folder out of the ``step_*`` namespace before deleting it, so a kill during the
  deletion never leaves a half-deleted checkpoint that lists as complete.
* A write that fails (a full or read-only disk) on any process fails the save on every process: the
  temporary folder is removed and the previous checkpoints stay listed and intact.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import weakref
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from ..format_version import FORMAT_VERSION, VERSION_KEY, version_of
from .errors import CheckpointError, CheckpointWriteError, UnsafePickleError
from .legacy import legacy_files, legacy_state, load_pickle
from .safe_state import capture_rng, load_state_file, save_state_file, write_file
from .state import TrainState

__all__ = ["CHECKPOINT_DIR", "CHECKPOINT_PREFIX", "CheckpointError", "CheckpointWriteError", "FORMAT", "FORMAT_KEY",
           "META_NAME", "TMP_PREFIX", "TRASH_PREFIX", "UnsafePickleError", "add_checkpoint_state", "any_process",
           "checkpoint_folders", "checkpoint_states", "checkpoint_step", "checkpoint_version", "is_complete", "is_legacy",
           "latest_checkpoint", "list_checkpoints", "load_model_state", "load_state", "manifest", "newest_verified",
           "read_checkpoint_meta", "register_for_checkpointing", "remove_checkpoint", "rng_file", "save_checkpoint",
           "state_file", "verify_checkpoint", "write_error"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".old-"
META_NAME = "checkpoint_meta.json"
#: How a version-2 checkpoint said it was not of the pickle format (version 3 records ``format_version``).
FORMAT_KEY, FORMAT = "format", "safetensors"

_STATES: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()


def state_file(name: str) -> str:
    """The file of the state registered as ``name``."""
    return f"{name}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng_{rank}.safetensors"


def checkpoint_version(meta: dict[str, Any], where: Union[str, Path] = META_NAME) -> int:
    """The run-format version of a checkpoint (its ``checkpoint_meta.json``); a newer one than this code reads
    is a :class:`~timm_local.format_version.RunFormatError`. Before versions were recorded, version 2 said
    ``"format": "safetensors"`` and version 1 (Accelerate's pickles) nothing."""
    return version_of(meta, str(where), 2 if meta.get(FORMAT_KEY) == FORMAT else 1)


def is_legacy(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint (its ``checkpoint_meta.json``) is of the pickle format (run-format version 1)."""
    return checkpoint_version(meta) == 1


def add_checkpoint_state(accelerator: Any, name: str, obj: Any) -> None:
    """Save ``obj.state_dict()`` as ``NAME.safetensors`` with every checkpoint of the run ``accelerator``
    drives, and load it back on resume (``obj.load_state_dict``). Written by the main process: the state must
    be the same on every process (consolidated) when a checkpoint is saved."""
    if not name.replace("_", "").isalnum() or name.startswith("rng"):
        raise ValueError(f"checkpoint state name {name!r}: use letters, digits and '_' (not starting with 'rng')")
    _STATES.setdefault(accelerator, {})[name] = obj


def checkpoint_states(accelerator: Any) -> dict[str, Any]:
    """The states registered for ``accelerator``'s checkpoints, by name."""
    return dict(_STATES.get(accelerator, {}))


def register_for_checkpointing(accelerator: Any, model: Any, optimizer: Any, schedule: Any) -> None:
    """The run's own states: model, optimizer, schedule, and fp16's grad scaler."""
    for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", schedule),
                      ("scaler", accelerator.scaler)):
        if obj is not None:
            add_checkpoint_state(accelerator, name, obj)


# ------------------------------------------------------------------------------------------------
# reading and verifying
# ------------------------------------------------------------------------------------------------
def checkpoint_step(folder: Path) -> int:
    return int(folder.name[len(CHECKPOINT_PREFIX):])


def checkpoint_folders(output_dir: Union[str, Path]) -> list[Path]:
    """Every ``step_*`` folder of a run, complete or not, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def read_checkpoint_meta(checkpoint: Union[str, Path]) -> dict[str, Any]:
    """The ``checkpoint_meta.json`` of a checkpoint: which run wrote it, its loop position and its files."""
    path = Path(checkpoint) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete timm_local checkpoint (no {META_NAME})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint description (a JSON object)")
    return meta


def _expected_files(meta: dict[str, Any]) -> list[str]:
    return legacy_files(meta) if is_legacy(meta) else list(meta.get("files", {}))


def is_complete(checkpoint: Path) -> bool:
    """Cheap completeness (listing): a readable meta file and every file it names, at its recorded size."""
    try:
        meta = read_checkpoint_meta(checkpoint)
    except (FileNotFoundError, CheckpointError):
        return False
    sizes = {k: v.get("bytes") for k, v in meta.get("files", {}).items()}
    for name in _expected_files(meta):
        path = checkpoint / name
        if not path.is_file() or (sizes.get(name) is not None and path.stat().st_size != sizes[name]):
            return False
    return True


def list_checkpoints(output_dir: Union[str, Path]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (interrupted saves and half-deleted folders are ignored)."""
    return [p for p in checkpoint_folders(output_dir) if is_complete(p)]


def latest_checkpoint(output_dir: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_file(path: Path, recorded: Optional[dict[str, Any]], trust_pickle: bool) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if recorded is None:  # a pickle-format checkpoint written before the manifest: read it as its load would
        load_pickle(path, trust_pickle)
    elif path.stat().st_size != recorded["bytes"]:
        raise CheckpointError(f"{path} is truncated or overwritten ({path.stat().st_size} bytes, written with "
                              f"{recorded['bytes']})")
    elif _sha256(path) != recorded["sha256"]:
        raise CheckpointError(f"{path} is corrupt (its SHA-256 differs from the one recorded when it was written)")


def verify_checkpoint(checkpoint: Union[str, Path], trust_pickle: bool = False) -> dict[str, Any]:
    """Every file of ``checkpoint`` present and intact, else a :class:`CheckpointError` naming the file.

    Intact means the size and SHA-256 recorded when it was written; a pickle-format checkpoint written before
    the manifest existed is read file by file instead, without running code unless ``trust_pickle``.
    """
    checkpoint = Path(checkpoint)
    meta = read_checkpoint_meta(checkpoint)
    checkpoint_version(meta, checkpoint / META_NAME)  # a newer format is refused, not skipped as corrupt
    step = meta.get("train_state", {}).get("global_step")
    if checkpoint.name[len(CHECKPOINT_PREFIX):].isdigit() and step is not None and step != checkpoint_step(checkpoint):
        raise CheckpointError(f"{checkpoint / META_NAME} describes step {step}, not the folder's step (a renamed or "
                              f"copied checkpoint)")
    recorded = meta.get("files")
    if not is_legacy(meta) and not recorded:
        raise CheckpointError(f"{checkpoint / META_NAME} lists no files")
    for name in _expected_files(meta):
        _check_file(checkpoint / name, recorded[name] if recorded else None, trust_pickle)
    return meta


def newest_verified(output_dir: Union[str, Path], trust_pickle: bool = False
                    ) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest checkpoint of a run that verifies, and the newer ones skipped with the reason for each.

    A pickle that would run code is not skipped but refused (:class:`UnsafePickleError`): the older
    checkpoints of that folder are no safer."""
    skipped: list[tuple[Path, str]] = []
    for folder in reversed(checkpoint_folders(output_dir)):
        try:
            verify_checkpoint(folder, trust_pickle)
        except UnsafePickleError:
            raise
        except (FileNotFoundError, CheckpointError) as e:
            skipped.append((folder, str(e)))
            continue
        return folder, skipped
    return None, skipped


def load_state(checkpoint: Union[str, Path], name: str, trust_pickle: bool = False) -> Any:
    """The state ``name`` (``model``, ``optimizer``, ``scheduler``, ...) of a checkpoint, on the CPU."""
    checkpoint = Path(checkpoint)
    meta = read_checkpoint_meta(checkpoint)
    if is_legacy(meta):
        return legacy_state(checkpoint, meta, name, trust_pickle)
    return load_state_file(checkpoint / state_file(name))


def load_model_state(checkpoint: Union[str, Path], trust_pickle: bool = False) -> dict[str, Any]:
    """The LocalModel state dict (``backbone.*`` and the auxiliary heads) of a checkpoint, on the CPU."""
    return load_state(checkpoint, "model", trust_pickle)


# ------------------------------------------------------------------------------------------------
# writing, replacing, rotating
# ------------------------------------------------------------------------------------------------
def manifest(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of the files ``names`` of ``folder`` (flushed to disk when written)."""
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in sorted(names)}


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder: renamed out of the ``step_*`` names first, so it is never half a checkpoint."""
    trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def _clear_leftovers(root: Path) -> None:
    """Folders of a save or a deletion that a kill interrupted."""
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)


def write_error(e: OSError, what: str, output_dir: Path) -> CheckpointWriteError:
    """One line: the path, the errno, what is safe, what to do."""
    code = errno.errorcode.get(e.errno or 0, str(e.errno))
    previous = latest_checkpoint(output_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint was lost"
    return CheckpointWriteError(f"cannot write {what} {e.filename or ''} ({code}: {e.strerror}); {kept}. Free space "
                                f"or make {output_dir} writable, then continue with --resume auto")


def _write_files(accelerator: Any, tmp: Path) -> list[str]:
    """This process's files of a checkpoint: every registered state (main process) and its own RNG states."""
    written = []
    if accelerator.is_main_process:
        for name, obj in checkpoint_states(accelerator).items():
            save_state_file(tmp / state_file(name), obj.state_dict())
            written.append(state_file(name))
    save_state_file(tmp / rng_file(accelerator.process_index), {**capture_rng(), "step": int(accelerator.step)})
    return written


def any_process(accelerator: Any, flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective with several: every process calls it)."""
    import torch

    if accelerator.num_processes == 1:
        return flag
    flag = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _publish(tmp: Path, final: Path, output_dir: Path, keep: int) -> None:
    """Rename the written checkpoint into place (atomic on POSIX), then rotate."""
    root = final.parent
    if final.exists():  # a stale folder of this step (an abandoned continuation): replaced, never kept
        logger.warning("replacing the existing checkpoint folder %s", final)
        os.replace(final, root / f"{TRASH_PREFIX}{final.name}")
    os.replace(tmp, final)  # the checkpoint exists completely or not at all
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        remove_checkpoint(old)
    _clear_leftovers(root)


def save_checkpoint(accelerator: Any, output_dir: Path, state: TrainState, meta: dict[str, Any], keep: int) -> Path:
    """Every registered state and every process's RNG states into a temporary folder, then an atomic rename
    to ``step_XXXXXXXX`` (replacing a folder of that step), then rotation to the newest ``keep`` (0: all).

    A failed write (full or read-only disk) on any process raises :class:`CheckpointWriteError` on every
    process, with the temporary folder removed and the earlier checkpoints untouched."""
    root = output_dir / CHECKPOINT_DIR
    final = root / f"{CHECKPOINT_PREFIX}{state.global_step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    error: Optional[OSError] = None
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _clear_leftovers(root)
            tmp.mkdir()
        except OSError as e:
            error = e
    accelerator.wait_for_everyone()
    written: list[str] = []
    try:
        written = _write_files(accelerator, tmp) if tmp.is_dir() else []
    except OSError as e:
        error = error or e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and error is None:
        try:
            ranks = [rng_file(r) for r in range(accelerator.num_processes)]
            full = {VERSION_KEY: FORMAT_VERSION, **meta, "states": sorted(checkpoint_states(accelerator)),
                    "train_state": state.state_dict(), "files": manifest(tmp, written + ranks)}
            write_file(tmp / META_NAME, json.dumps(full, indent=2).encode())
        except OSError as e:
            error = e
    if any_process(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        if error is None:
            raise CheckpointWriteError(f"another process could not write its part of the checkpoint {tmp}; the "
                                       f"earlier checkpoints are intact (its own error names the path)")
        raise write_error(error, "the checkpoint", output_dir) from error
    if accelerator.is_main_process:
        try:
            _publish(tmp, final, output_dir, keep)
        except OSError as e:
            error = e
    if any_process(accelerator, error is not None):  # every process stops, not only the one that saw it
        raise write_error(error or OSError(errno.EIO, "see the main process's error"), "the checkpoint", output_dir)
    return final
