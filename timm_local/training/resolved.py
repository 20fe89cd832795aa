"""The values a run used where its config said "the default" (None): the dataset, d and tau.

Why: config.yaml, checkpoints and the export should say what was trained, not "dataset: null". The same
filling brings the configuration of a checkpoint written before runs recorded these values to the current
run format (:mod:`.run_format`), so it compares equal to the run that resumes it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from ..config import TrainConfig

__all__ = ["RESOLVED_KEYS", "fill_resolved", "resolve_choices"]

#: Config keys whose None means "the default": a run records the value it used in their place.
RESOLVED_KEYS = ("dataset", "aux_depth", "tau")


def fill_resolved(values: Mapping[str, Any], dataset: Optional[str], method_config: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """``values`` (a config as a dict) with the defaults it left open (None) replaced by what the run used.

    Used on a new run's config and by the migration of an older checkpoint's stored config alike.
    """
    used = {"dataset": dataset, **{k: method_config.get(k) for k in ("aux_depth", "tau")}}
    return {**values, **{k: used[k] for k in RESOLVED_KEYS if values.get(k) is None and used[k] is not None}}


def resolve_choices(cfg: TrainConfig, data: Any, lm: Any) -> TrainConfig:
    """``cfg`` with the dataset, d and tau the run actually uses (config.yaml's top level then says them)."""
    filled = fill_resolved(cfg.to_dict(), data.dataset, lm.method_config)
    return dataclasses.replace(cfg, **{k: filled[k] for k in RESOLVED_KEYS})
