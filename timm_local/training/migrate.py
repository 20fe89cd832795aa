"""Pickle-format checkpoints rewritten as safetensors, once, in place.

The new files are written beside the old ones, then ``checkpoint_meta.json`` is replaced atomically (its
manifest names the new files only), then the pickles are deleted: a kill at any moment leaves a checkpoint
that verifies, in the old format or the new. Reading goes through :mod:`~timm_local.training.legacy`, so a
pickle that names code is refused unless trusted -- and once migrated, the checkpoint is data for anyone.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .checkpoint import (FORMAT, FORMAT_KEY, META_NAME, CheckpointError, UnsafePickleError, checkpoint_folders,
                         is_legacy, manifest, read_checkpoint_meta, rng_file, state_file, verify_checkpoint)
from .legacy import legacy_files, read_legacy
from .safe_state import replace_file, save_state_file

__all__ = ["migrate_checkpoint", "migrate_run_folder"]

logger = logging.getLogger(__name__)


def migrate_checkpoint(checkpoint: Path, trust_pickle: bool = False) -> None:
    """Rewrite one pickle-format checkpoint as safetensors (the module's docstring says in which order)."""
    meta = verify_checkpoint(checkpoint, trust_pickle=trust_pickle)
    states = read_legacy(checkpoint, meta, trust_pickle)
    old = set(legacy_files(meta))
    rng = states.pop("rng")
    train_state = states.pop("train_state", meta.get("train_state"))
    files = {**{state_file(n): s for n, s in states.items()}, **{rng_file(r): s for r, s in rng.items()}}
    for file, state in files.items():
        save_state_file(checkpoint / file, state)
    written = list(files)
    new = {k: v for k, v in meta.items() if k not in ("files", "custom_objects")}
    new.update({FORMAT_KEY: FORMAT, "states": sorted(states), "train_state": train_state,
                "files": manifest(checkpoint, written), "migrated_from": "pickle"})
    replace_file(checkpoint / META_NAME, json.dumps(new, indent=2).encode())
    for name in old - set(written):
        (checkpoint / name).unlink(missing_ok=True)
    logger.warning("migrated checkpoint %s from the pickle format to safetensors (once: from now on it loads "
                   "without pickle)", checkpoint)


def migrate_run_folder(output_dir: Path, trust_pickle: bool = False) -> list[Path]:
    """Migrate every pickle-format checkpoint of a run folder that verifies; returns those migrated.

    One that does not verify is left as it is (no resume will pick it); one that names code is refused
    (:class:`UnsafePickleError`) unless ``trust_pickle``."""
    done = []
    for folder in checkpoint_folders(output_dir):
        try:
            if not is_legacy(read_checkpoint_meta(folder)):
                continue
            migrate_checkpoint(folder, trust_pickle)
        except UnsafePickleError:
            raise
        except (OSError, CheckpointError) as e:  # unreadable, or a full disk: it stays as it is, readable
            logger.warning("not migrating %s: %s", folder, e)
            continue
        done.append(folder)
    return done
