"""A checkpoint loaded into a live run: every registered state, the loop position, this process's RNGs."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from .checkpoint import checkpoint_states, is_legacy, read_checkpoint_meta, rng_file, state_file
from .legacy import read_legacy
from .safe_state import load_state_file, restore_rng
from .state import TrainState

__all__ = ["restore_checkpoint"]

logger = logging.getLogger(__name__)


def _read(checkpoint: Path, meta: dict[str, Any], rank: int, names: set[str], trust_pickle: bool
          ) -> tuple[dict[str, Any], Optional[dict[str, Any]], dict[str, Any]]:
    """(states by name, this rank's RNG states or None, the loop position) of either format."""
    if is_legacy(meta):
        states = read_legacy(checkpoint, meta, trust_pickle)
        rng = states.pop("rng").get(rank)
        return states, rng, states.pop("train_state", meta.get("train_state", {}))
    states = {n: load_state_file(checkpoint / state_file(n)) for n in meta["states"] if n in names}
    path = checkpoint / rng_file(rank)
    return states, (load_state_file(path) if path.is_file() else None), meta["train_state"]


def restore_checkpoint(accelerator: Any, checkpoint: Path, state: TrainState, trust_pickle: bool = False) -> None:
    """Load ``checkpoint`` into the states registered for ``accelerator`` and into ``state``, and set this
    process's generators (a process the checkpoint has no RNG file for keeps its own: a resume with more
    processes). A state registered but absent from the checkpoint keeps its value, with a warning."""
    meta = read_checkpoint_meta(checkpoint)
    registered = checkpoint_states(accelerator)
    states, rng, position = _read(checkpoint, meta, accelerator.process_index, set(registered), trust_pickle)
    for name, obj in registered.items():
        if name in states:
            obj.load_state_dict(states[name])
        else:
            logger.warning("%s holds no %r state: it starts from its initial value", checkpoint, name)
    state.load_state_dict(position)
    if rng is not None:
        accelerator.step = int(rng.pop("step", 0))
        restore_rng(rng)
