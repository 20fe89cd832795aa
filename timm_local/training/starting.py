"""Where a run's weights start: timm's pretrained weights (``--pretrained``), a file or one of our exports
(``--initial-checkpoint``), or a fresh initialisation.

Both go through ``timm.create_model(pretrained=True, pretrained_cfg_overlay=...)``, so timm does what it
does for any fine-tuning: the hub weights come through huggingface_hub (an offline cache works), the first
convolution is adapted to another channel count, and the classifier is re-initialised when the class count
differs -- timm decides that by comparing the overlay's ``num_classes`` (the source's) with the model's, so
the overlay carries the source's count, read from the export's config.json or the file's classifier.
The auxiliary heads are never part of a source: every method builds them fresh around the loaded backbone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, TrainConfig

__all__ = ["StartingWeights", "architecture_only", "starting_weights", "weights_source"]


@dataclass
class StartingWeights:
    """What ``timm.create_model`` needs to start from a source, and how the run names that source."""

    pretrained: bool = False
    overlay: dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None  # recorded in config.yaml: where the weights came from
    base_model: Optional[str] = None  # the model card's base_model: a hub id, or the source path


def _classes_in_file(path: Path, model: str) -> Optional[int]:
    """The class count of a weights file: rows of its classifier (timm's ``pretrained_cfg['classifier']``)."""
    from timm.models import get_pretrained_cfg, load_state_dict

    default = get_pretrained_cfg(model)
    classifier = default.classifier if default is not None else None
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    if not classifier:
        return None
    weight = load_state_dict(str(path)).get(f"{classifier}.weight")
    return None if weight is None else int(weight.shape[0])


def _from_checkpoint(cfg: TrainConfig) -> StartingWeights:
    path = Path(str(cfg.initial_checkpoint))
    if path.is_dir():  # one of our exports (timm's save_for_hf layout)
        config_file, weights = path / "config.json", path / "model.safetensors"
        if not (config_file.is_file() and weights.is_file()):
            raise ConfigError(f"--initial-checkpoint {path}: a folder must be an export (config.json and "
                              f"model.safetensors); give the export folder or a weights file")
        config = json.loads(config_file.read_text())
        if config.get("architecture") not in (None, cfg.model):
            raise ConfigError(f"--initial-checkpoint {path} holds a {config['architecture']} and this run trains "
                              f"--model {cfg.model}; give the same --model")
        return StartingWeights(True, {"file": str(weights.resolve()), "num_classes": config.get("num_classes")},
                               *weights_source(cfg))
    if not path.is_file():
        raise ConfigError(f"--initial-checkpoint {path}: no such file or export folder")
    classes = _classes_in_file(path, cfg.model)
    overlay = {"file": str(path.resolve()), **({"num_classes": classes} if classes else {})}
    return StartingWeights(True, overlay, *weights_source(cfg))


def starting_weights(cfg: TrainConfig) -> StartingWeights:
    """The source ``cfg`` names: ``--initial-checkpoint``, ``--pretrained`` or none (a fresh start)."""
    if cfg.pretrained and cfg.initial_checkpoint:
        raise ConfigError("--pretrained and --initial-checkpoint both name the starting weights; give one")
    if cfg.initial_checkpoint:
        return _from_checkpoint(cfg)
    if cfg.pretrained:
        from timm.models import get_pretrained_cfg

        default = get_pretrained_cfg(cfg.model)
        if default is None or not (default.hf_hub_id or default.url):
            raise ConfigError(f"--pretrained: timm has no pretrained weights for {cfg.model!r}; choose a tag that "
                              f"has some (timm.list_pretrained('{cfg.model.split('.')[0]}*')), or start from a file "
                              f"with --initial-checkpoint")
        return StartingWeights(True, {}, *weights_source(cfg))
    return StartingWeights()


def weights_source(cfg: TrainConfig) -> tuple[Optional[str], Optional[str]]:
    """(where the run's weights came from, the model card's ``base_model``), read from ``cfg`` alone: also
    valid when the source is no longer there (exporting a finished run)."""
    if cfg.initial_checkpoint:
        kind = "export" if Path(str(cfg.initial_checkpoint)).suffix == "" else "file"
        return f"{kind} {cfg.initial_checkpoint}", str(cfg.initial_checkpoint)
    if cfg.pretrained:
        from timm.models import get_pretrained_cfg

        default = get_pretrained_cfg(cfg.model)
        where = default and (default.hf_hub_id or default.url)
        return f"timm pretrained {cfg.model} ({where})", where or cfg.model
    return None, None


def architecture_only(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` without its starting weights: what rebuilds a model whose trained weights come from a checkpoint
    (a resume, reading a finished run), where the starting weights need not be fetched again, or exist."""
    return replace(cfg, pretrained=False, initial_checkpoint=None)
