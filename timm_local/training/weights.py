"""Which backbone weights a run keeps besides its checkpoints: the best epoch's, and an EMA of the weights.

* **Best** (``--export-weights best``, the default): the backbone of the epoch best by ``--eval-metric``,
  written to ``OUTPUT_DIR/best_backbone.safetensors`` when an epoch-end evaluation beats the previous best.
  Evaluations at a ``--max-steps`` stop inside an epoch are not candidates, so a run stopped and resumed
  picks the same epoch as an uninterrupted one.
* **EMA** (``--model-ema``): timm's ``ModelEmaV3`` of the backbone, updated after every optimizer step; its
  state is a checkpoint's ``ema.safetensors``, registered with the checkpoint's states
  (:func:`.checkpoint.add_checkpoint_state`), so it is verified, saved and resumed with the rest.

Files are written to a temporary name and renamed, so a kill never leaves half a file under the real name.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import ConfigError, TrainConfig
from .safe_state import replace_file

__all__ = ["BEST_NAME", "best_is_later", "create_ema", "is_better", "read_best", "weights_to_export", "write_best"]

logger = logging.getLogger(__name__)

BEST_NAME = "best_backbone.safetensors"


def _write(module: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    replace_file(path, save(state, metadata=metadata))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# ------------------------------------------------------------------------------------------------
# best epoch
# ------------------------------------------------------------------------------------------------
def is_better(metric: str, value: float, best: Optional[float]) -> bool:
    """Whether ``value`` of ``--eval-metric`` beats ``best`` (loss: lower; accuracies: higher)."""
    return best is None or (value < best if metric == "loss" else value > best)


def write_best(backbone: nn.Module, output_dir: Path, epoch: int, step: int, metric: str, value: float) -> None:
    _write(backbone, output_dir / BEST_NAME, {"epoch": str(epoch), "step": str(step), "metric": metric,
                                               "value": repr(float(value))})


def read_best(output_dir: Path) -> Optional[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    path = output_dir / BEST_NAME
    return _read(path) if path.is_file() else None


def best_is_later(output_dir: Path, state: Any) -> bool:
    """On resume: whether the best file was written after the resumed step. It then belongs to the continuation
    being redone: the caller removes it, and (done here) the next epoch-end evaluation chooses again."""
    found = read_best(output_dir)
    if found is None or int(found[1].get("step", 0)) <= state.global_step:
        return False
    logger.warning("%s was written after step %d, the step resumed: it is removed, and the best epoch is chosen "
                   "again from here on", output_dir / BEST_NAME, state.global_step)
    state.best_metric = None
    return True


# ------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------
def create_ema(cfg: TrainConfig, backbone: nn.Module) -> Optional[Any]:
    """timm's ``ModelEmaV3`` of the backbone (``--model-ema``), or None."""
    if not cfg.model_ema:
        if cfg.export_weights == "ema":
            raise ConfigError("--export-weights ema needs --model-ema (there is no EMA to export)")
        return None
    if cfg.engine != "sequential":
        raise ConfigError("--model-ema runs on the sequential engine (a pipeline rank holds only its segment's "
                          "current weights); use --engine sequential")
    from timm.utils import ModelEmaV3

    return ModelEmaV3(backbone, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
def weights_to_export(cfg: TrainConfig, backbone: nn.Module, ema: Optional[Any], output_dir: Path
                      ) -> tuple[nn.Module, str]:
    """The backbone ``--export-weights`` chooses, and a line saying which weights they are."""
    if cfg.export_weights == "ema" and ema is not None:
        return ema.module, f"EMA of the weights (decay {cfg.model_ema_decay})"
    if cfg.export_weights == "best":
        found = read_best(output_dir)
        if found is not None:
            best = copy.deepcopy(backbone)
            best.load_state_dict(found[0])
            meta = found[1]
            return best, f"best epoch by {meta['metric']}: epoch {meta['epoch']} ({meta['metric']} {meta['value']})"
        logger.warning("no epoch-end evaluation chose a best epoch (the run stopped inside its first epoch): "
                       "exporting the last weights")
    return backbone, "last weights"
