"""Run folders: what a training run leaves on disk, read back and exported.

```
OUTPUT_DIR/
  config.yaml        the resolved configuration (+ data, method_config, runtime)
  metrics.jsonl      one JSON row per train window / evaluation (timm_local.training.metrics)
  checkpoints/       step_XXXXXXXX/ (timm_local.training.checkpoint)
  export/            the backbone alone, as a timm checkpoint (timm_local.export)
```
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..config import CONFIG_NAME, TrainConfig
from ..data import DataConfig
from ..export import export_backbone
from ..format_version import FORMAT_VERSION, VERSION_KEY
from ..version import __version__
from .builders import build_backbone, build_local_model
from .checkpoint import CHECKPOINT_DIR, load_model_state, newest_verified, verify_checkpoint
from .metrics import read_metrics
from .run_format import current_meta, read_run_config
from .starting import architecture_only, weights_source
from .state import TrainState

__all__ = ["CONFIG_NAME", "EXPORT_DIR", "SavedRun", "export_run", "export_trained", "load_local_model",
           "read_metrics", "read_run"]

EXPORT_DIR = "export"

logger = logging.getLogger(__name__)


def _export_metadata(cfg: TrainConfig, data: DataConfig, state: TrainState, method_name: str,
                     method_config: dict[str, Any], which: Optional[str] = None) -> dict[str, Any]:
    return {
        VERSION_KEY: FORMAT_VERSION, "method": method_name, "method_config": method_config,
        "dataset": data.dataset, "model": cfg.model, "image_size": data.image_size,
        "top1": state.last_top1, "best_top1": state.best_top1, "best_epoch": state.best_epoch,
        "epochs": state.epoch, "global_step": state.global_step, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "seed": cfg.seed, "timm_local_version": __version__,
        **dict(zip(("weights_from", "base_model"), weights_source(cfg))), "exported_weights": which,
    }


def export_trained(backbone: nn.Module, method_name: str, method_config: dict[str, Any], export_dir: Path,
                   cfg: TrainConfig, data: DataConfig, state: TrainState, which: Optional[str] = None) -> Path:
    """Export a trained backbone with the run's preprocessing, class names and training metadata (``which``:
    the weights these are, e.g. the best epoch's)."""
    return export_backbone(
        backbone, export_dir, data_config=data.pretrained_cfg(),
        metadata=_export_metadata(cfg, data, state, method_name, method_config, which), label_names=data.classes)


@dataclass
class SavedRun:
    """What a run folder holds for one checkpoint: its resolved config, data description and model state."""

    run_dir: Path
    checkpoint: Path
    cfg: TrainConfig
    data: DataConfig
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]  # the whole LocalModel: "backbone.*" and the auxiliary heads
    rebuild_cfg: TrainConfig  # ``cfg`` without its starting weights: what rebuilds the architecture


def read_run(run_dir: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None,
             trust_pickle: bool = False) -> SavedRun:
    """Read a run's ``config.yaml`` and one checkpoint (by default the newest that verifies); a checkpoint of
    the older pickle format is read without running code unless ``trust_pickle``."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (no {CONFIG_NAME})")
    resolved = read_run_config(config_path)
    ckpt, skipped = (Path(checkpoint), []) if checkpoint else newest_verified(run_dir, trust_pickle)
    for folder, why in skipped:
        logger.warning("skipping checkpoint %s: %s", folder, why)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint under {CHECKPOINT_DIR}/")
    meta = current_meta(verify_checkpoint(ckpt, trust_pickle))  # an older checkpoint read in today's shape
    field_names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in resolved.items() if k in field_names})
    rebuild = architecture_only(cfg)
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    data = DataConfig(**{k: v for k, v in resolved["data"].items() if k in data_fields})
    data.mean, data.std = tuple(data.mean), tuple(data.std)
    return SavedRun(run_dir, ckpt, cfg, data, meta, load_model_state(ckpt, trust_pickle), rebuild)


def load_local_model(run_dir: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None) -> tuple[Any, SavedRun]:
    """A run's whole LocalModel -- backbone *and* auxiliary heads -- as trained, for diagnostics on the heads.

    An export keeps only the backbone (that is what inference needs); this is for questions about the
    local objectives themselves, e.g. how well each block's head classifies (benchmarks/head_accuracy.py).
    """
    run = read_run(run_dir, checkpoint)
    lm = build_local_model(run.rebuild_cfg, run.data)
    lm.load_state_dict(run.model_state)
    return lm, run


def export_run(run_dir: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None,
               export_dir: Optional[Union[str, Path]] = None, trust_pickle: bool = False) -> Path:
    """Export the backbone of a run's checkpoint (latest by default) to ``RUN_DIR/export``.

    Rebuilds only the timm backbone from the run's ``config.yaml`` and loads the ``backbone.*`` part of
    the checkpointed LocalModel state -- the auxiliary heads are not part of an export.
    """
    run = read_run(run_dir, checkpoint, trust_pickle)
    cfg, data = run.cfg, run.data
    backbone_state = {k[len("backbone."):]: v for k, v in run.model_state.items() if k.startswith("backbone.")}
    backbone = build_backbone(run.rebuild_cfg, data)
    backbone.load_state_dict(backbone_state)
    state = TrainState()
    state.load_state_dict(run.meta.get("train_state", {}))
    return export_trained(backbone, run.meta["method"], run.meta.get("method_config", {}),
                          Path(export_dir) if export_dir else run.run_dir / EXPORT_DIR, cfg, data, state,
                          f"the weights of checkpoint {run.checkpoint.name}")
