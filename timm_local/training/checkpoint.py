"""Checkpoints of a run on disk: atomic save, a manifest that lets every load verify the files, listing,
rotation.

A checkpoint is ``accelerator.save_state`` (optimizer, grad scaler, every process's RNG states) plus the
objects registered here in :data:`CUSTOM_OBJECTS` order (the LocalModel with its auxiliary heads, the
schedule, the loop position), and ``checkpoint_meta.json`` saying which run wrote it, with what config, and
the size and SHA-256 of every file (the manifest). Why each step is hand-written:

* Accelerate writes in place, so a kill mid-save would leave a half checkpoint that looks complete: ours is
  written into a temporary folder and renamed into place; an existing folder of the same step (a stale one
  of an abandoned continuation) is renamed away first, then replaced -- never kept under a new name.
* Accelerate skips an unreadable RNG file with an INFO line and fails on other bad files with torch's or
  pickle's own errors: the manifest names the bad file before anything is loaded.
* Rotation renames a folder out of the ``step_*`` namespace before deleting it, so a kill during the
  deletion never leaves a half-deleted checkpoint that lists as complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from .state import TrainState

__all__ = ["CHECKPOINT_DIR", "CHECKPOINT_PREFIX", "CUSTOM_OBJECTS", "CheckpointError", "META_NAME", "TMP_PREFIX",
           "TRASH_PREFIX", "checkpoint_folders", "checkpoint_step", "is_complete", "latest_checkpoint",
           "list_checkpoints", "load_model_state", "newest_verified", "read_checkpoint_meta",
           "register_for_checkpointing", "remove_checkpoint", "save_checkpoint", "verify_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".old-"
META_NAME = "checkpoint_meta.json"
#: The order of ``accelerator.register_for_checkpointing``: object i is saved as Accelerate's custom state i.
CUSTOM_OBJECTS = ("model", "scheduler", "train_state")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: a file missing, truncated or unreadable (named in the message)."""


def register_for_checkpointing(accelerator: Any, model: Any, schedule: Any, state: TrainState) -> None:
    """Register the run's own objects with ``save_state``/``load_state``, in :data:`CUSTOM_OBJECTS` order."""
    accelerator.register_for_checkpointing(model, schedule, state)


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
    """The files a checkpoint must hold: its manifest, or (checkpoints written before the manifest) the
    files Accelerate writes for it."""
    if "files" in meta:
        return list(meta["files"])
    names = ["optimizer.bin"] + [f"custom_checkpoint_{i}.pkl" for i in range(len(meta.get("custom_objects", [])))]
    return names + [f"random_states_{r}.pkl" for r in range(int(meta.get("num_processes", 1)))]


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


def verify_checkpoint(checkpoint: Union[str, Path]) -> dict[str, Any]:
    """Every file of ``checkpoint`` present and intact, else a :class:`CheckpointError` naming the file.

    Intact means the size and SHA-256 recorded when it was written; a checkpoint written before the
    manifest existed is read file by file instead (as its load would).
    """
    checkpoint = Path(checkpoint)
    meta = read_checkpoint_meta(checkpoint)
    step = meta.get("train_state", {}).get("global_step")
    if checkpoint.name[len(CHECKPOINT_PREFIX):].isdigit() and step is not None and step != checkpoint_step(checkpoint):
        raise CheckpointError(f"{checkpoint / META_NAME} describes step {step}, not the folder's step (a renamed or "
                              f"copied checkpoint)")
    manifest = meta.get("files")
    for name in _expected_files(meta):
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if manifest:
            size, digest = manifest[name]["bytes"], manifest[name]["sha256"]
            if path.stat().st_size != size:
                raise CheckpointError(f"{path} is truncated or overwritten ({path.stat().st_size} bytes, "
                                      f"written with {size})")
            if _sha256(path) != digest:
                raise CheckpointError(f"{path} is corrupt (its SHA-256 differs from the one recorded when it "
                                      f"was written)")
        else:
            import torch

            try:
                torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e:  # any failure to read means the file is unusable; say which and why
                raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    return meta


def newest_verified(output_dir: Union[str, Path]) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest checkpoint of a run that verifies, and the newer ones skipped with the reason for each."""
    skipped: list[tuple[Path, str]] = []
    for folder in reversed(checkpoint_folders(output_dir)):
        try:
            verify_checkpoint(folder)
        except (FileNotFoundError, CheckpointError) as e:
            skipped.append((folder, str(e)))
            continue
        return folder, skipped
    return None, skipped


class _StateHolder:
    """Receives a state dict from :func:`accelerate.checkpointing.load_custom_state`."""

    state: dict[str, Any]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def load_model_state(checkpoint: Union[str, Path]) -> dict[str, Any]:
    """The LocalModel state dict (``backbone.*`` and the auxiliary heads) of a checkpoint, on the CPU."""
    from accelerate import PartialState
    from accelerate.checkpointing import load_custom_state

    PartialState()  # accelerate's loader logs through its state; outside a run this is a plain single process
    meta = read_checkpoint_meta(checkpoint)
    holder = _StateHolder()
    load_custom_state(holder, str(checkpoint), index=meta.get("custom_objects", list(CUSTOM_OBJECTS)).index("model"))
    return holder.state


# ------------------------------------------------------------------------------------------------
# writing, replacing, rotating
# ------------------------------------------------------------------------------------------------
def _files(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.rglob("*")) if p.is_file())


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file, after flushing it to disk (the rename below must not outrun the data)."""
    manifest = {}
    for p in _files(folder):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        manifest[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    return manifest


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


def save_checkpoint(accelerator: Any, output_dir: Path, state: TrainState, meta: dict[str, Any], keep: int,
                    extra: Optional[Callable[[Path], None]] = None) -> Path:
    """``accelerator.save_state`` into a temporary folder, then an atomic rename to ``step_XXXXXXXX``
    (replacing a folder of that step), then rotation to the newest ``keep`` (0: keep all).

    ``extra(folder)`` (main process) adds files of the run's own (the EMA's ``ema.safetensors``) before the
    manifest is taken, so they are verified and renamed with the rest."""
    root = output_dir / CHECKPOINT_DIR
    final = root / f"{CHECKPOINT_PREFIX}{state.global_step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(root)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra is not None:
            extra(tmp)
        full = {**meta, "train_state": state.state_dict(), "files": _manifest(tmp)}
        (tmp / META_NAME).write_text(json.dumps(full, indent=2))
        with open(tmp / META_NAME, "rb") as f:
            os.fsync(f.fileno())
        if final.exists():  # a stale folder of this step (an abandoned continuation): replaced, never kept
            logger.warning("replacing the existing checkpoint folder %s", final)
            os.replace(final, root / f"{TRASH_PREFIX}{final.name}")
        os.replace(tmp, final)  # atomic on POSIX: the checkpoint exists completely or not at all
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            remove_checkpoint(old)
        _clear_leftovers(root)
    accelerator.wait_for_everyone()
    return final
