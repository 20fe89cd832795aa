"""The run format version by version, and :func:`migrate`: an older run folder brought to the current one.

A run folder outlives the code that wrote it, so what it holds is versioned (``format_version``,
:mod:`timm_local.format_version`) and every older version has exactly one way forward, step by step:

* **1 -> 2** (checkpoint files): Accelerate's pickles (``custom_checkpoint_*.pkl``, ``optimizer.bin``,
  ``random_states_*.pkl``), read without running code (:mod:`.legacy`), rewritten as safetensors files with
  a manifest; the loop position moves into ``checkpoint_meta.json``.
* **2 -> 3** (descriptions): the checkpoint's configuration is stored once, under ``config``, with the
  dataset, d and tau the run used (:func:`~.resolved.fill_resolved`; older checkpoints kept batch size,
  epochs, lr and the dataset at the top level too, and the oldest had no ``config``); ``verified_finite``
  says whether the weights are finite (checked here, once, for checkpoints written before that check);
  ``config.yaml`` gets the ``history`` it lacked (a start whose configuration is unknown).

Reading never needs a migrated folder: :func:`current_meta` and :func:`read_run_config` give an older
checkpoint's or config's description in the current shape in memory (a resume compares against it before
anything is written; an export may read a folder it must not change). :func:`migrate` then rewrites the
folder once, in place, when a resume starts writing into it -- crash-safe: new files first, the meta file
replaced atomically, old files deleted last -- with one log line per checkpoint.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import CONFIG_NAME
from ..format_version import FORMAT_VERSION, VERSION_KEY, version_of
from .checkpoint import (FORMAT_KEY, META_NAME, CheckpointError, UnsafePickleError, checkpoint_folders,
                         checkpoint_version, load_model_state, manifest, read_checkpoint_meta, rng_file, state_file,
                         verify_checkpoint)
from .finite import FINITE_KEY, all_finite
from .legacy import legacy_files, read_legacy
from .resolved import fill_resolved
from .safe_state import replace_file, save_state_file

__all__ = ["DUPLICATED_KEYS", "config_version", "current_config", "current_meta", "migrate", "migrate_checkpoint",
           "read_run_config"]

logger = logging.getLogger(__name__)

#: Configuration keys checkpoints before version 3 stored beside ``config`` as well (version 3: only in
#: ``config``; the top level keeps what the weights belong to, which a resume checks).
DUPLICATED_KEYS = ("batch_size", "epochs", "lr", "dataset")
#: Keys of the pickle format's meta that version 2 replaced (``states``, ``files``).
_V1_KEYS = ("custom_objects", FORMAT_KEY)


def current_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``checkpoint_meta.json`` description in the current version's shape (its files are left
    as they are: a version-1 checkpoint in memory is still read through :mod:`.legacy`)."""
    if checkpoint_version(meta) == FORMAT_VERSION:
        return meta
    new = {k: v for k, v in meta.items() if k not in DUPLICATED_KEYS}
    config = meta.get("config") or {k: meta[k] for k in DUPLICATED_KEYS[:3] if k in meta}
    new["config"] = fill_resolved(config, meta.get("dataset"), meta.get("method_config") or {})
    return new


def config_version(config: dict[str, Any], where: Path) -> int:
    """The run-format version of a ``config.yaml`` (versions 1 and 2 wrote the same one: 2 when unrecorded)."""
    return version_of(config, str(where), 2)


def current_config(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """A ``config.yaml``'s content in the current version's shape."""
    if config_version(config, where) == FORMAT_VERSION:
        return config
    history = config.get("history") or [{"event": "start", "step": 0, "config": None}]
    return {VERSION_KEY: FORMAT_VERSION, **{k: v for k, v in config.items() if k != VERSION_KEY}, "history": history}


def read_run_config(path: Path) -> dict[str, Any]:
    """A run's ``config.yaml``, in the current version's shape (refused if a newer timm_local wrote it)."""
    return current_config(yaml.safe_load(path.read_text()) or {}, path)


def _pickle_to_safetensors(checkpoint: Path, meta: dict[str, Any], trust_pickle: bool) -> tuple[dict[str, Any], set]:
    """Step 1 -> 2: every state of a pickle checkpoint written as a safetensors file; returns the version-2
    meta (files not yet published) and the pickle files it replaces."""
    states = read_legacy(checkpoint, meta, trust_pickle)
    rng = states.pop("rng")
    train_state = states.pop("train_state", meta.get("train_state"))
    files = {**{state_file(n): s for n, s in states.items()}, **{rng_file(r): s for r, s in rng.items()}}
    for file, state in files.items():
        save_state_file(checkpoint / file, state)
    new = {k: v for k, v in meta.items() if k not in ("files", *_V1_KEYS)}
    new.update({"states": sorted(states), "train_state": train_state, "files": manifest(checkpoint, list(files)),
                "migrated_from": "pickle"})
    new.setdefault(FINITE_KEY, all_finite(states["model"].values()))
    return new, set(legacy_files(meta)) - set(files)


def _describe_once(checkpoint: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Step 2 -> 3: each value once, the finite check recorded, the version written."""
    new = {k: v for k, v in current_meta(meta).items() if k != FORMAT_KEY}
    if FINITE_KEY not in new:
        new[FINITE_KEY] = all_finite(load_model_state(checkpoint).values())
    return {VERSION_KEY: FORMAT_VERSION, **new}


def migrate_checkpoint(checkpoint: Path, trust_pickle: bool = False) -> Optional[int]:
    """Bring one checkpoint to the current version in place; returns the version it had (None: current)."""
    meta = verify_checkpoint(checkpoint, trust_pickle=trust_pickle)
    version = checkpoint_version(meta, checkpoint / META_NAME)
    if version == FORMAT_VERSION:
        return None
    old: set = set()
    if version == 1:
        meta, old = _pickle_to_safetensors(checkpoint, meta, trust_pickle)
    replace_file(checkpoint / META_NAME, json.dumps(_describe_once(checkpoint, meta), indent=2).encode())
    for name in old:
        (checkpoint / name).unlink(missing_ok=True)
    logger.warning("migrated checkpoint %s from run-format version %d to %d (once: it now loads without the "
                   "older code paths%s)", checkpoint, version, FORMAT_VERSION, ", and without pickle" * (version == 1))
    return version


def _migrate_config(run_dir: Path) -> None:
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return
    config = yaml.safe_load(path.read_text()) or {}
    if config_version(config, path) < FORMAT_VERSION:
        replace_file(path, yaml.safe_dump(current_config(config, path), sort_keys=False).encode())


def migrate(run_dir: Path, trust_pickle: bool = False) -> list[Path]:
    """Bring a run folder (``config.yaml`` and every checkpoint that verifies) to the current run-format
    version, in place; returns the checkpoints migrated.

    A checkpoint that does not verify is left as it is (no resume will pick it); a pickle that names code is
    refused (:class:`UnsafePickleError`) unless ``trust_pickle``."""
    _migrate_config(run_dir)
    done = []
    for folder in checkpoint_folders(run_dir):
        try:
            if checkpoint_version(read_checkpoint_meta(folder), folder / META_NAME) == FORMAT_VERSION:
                continue
            migrate_checkpoint(folder, trust_pickle)
        except UnsafePickleError:
            raise
        except (OSError, CheckpointError) as e:  # unreadable, or a full disk: it stays as it is, readable
            logger.warning("not migrating %s: %s", folder, e)
            continue
        done.append(folder)
    return done
