"""What a timm ``train.py`` user brings: its recipe keys (starting weights, label smoothing, mixup/cutmix,
augmentation, EMA, evaluation) and its flag spellings.

Why a module of its own: these keys are :class:`~timm_local.config.TrainConfig` fields like any other
(``TrainConfig`` inherits :class:`TimmOptions`), but they carry timm's names and meanings, and the flags
that only *spell* one of our keys differently (``-j``, ``--output``, ``--amp``, ``--log-wandb``) need a
translation table. Keeping both here keeps the table next to the keys it translates, and the rest of the
configuration readable. A timm flag whose meaning differs from ours (``-b`` is timm's per-process batch;
our ``--batch-size`` is global) is refused with a line saying the difference, never taken silently.
"""
from __future__ import annotations

import argparse
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import yaml

from .errors import UsageError

__all__ = ["DIST_BN", "EVAL_METRICS", "EXPORT_WEIGHTS", "FLAG_ALIASES", "MIXUP_MODES", "TIMM_RULES", "TimmOptions",
           "add_timm_flags", "timm_flag_values", "uses_soft_targets"]

EVAL_METRICS = ("top1", "top5", "loss")
DIST_BN = ("reduce", "broadcast", "none")
EXPORT_WEIGHTS = ("best", "last", "ema")
MIXUP_MODES = ("batch", "pair", "elem")
AMP_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}


@dataclass
class TimmOptions:
    """The timm recipe keys (timm train.py's names). Field docs are the ``--help`` texts."""

    # --- starting weights ---------------------------------------------------------------------
    pretrained: bool = field(default=False, metadata={
        "help": "start from timm's pretrained weights of --model (its tag, e.g. resnet18.a1_in1k), through "
                "huggingface_hub: an offline cache (HF_HUB_OFFLINE=1) works; a new classifier when the class "
                "count differs"})
    initial_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "start from this file (.safetensors / timm .pth checkpoint) or timm_local export folder; a new "
                "classifier when the class count differs"})
    drop_rate: Optional[float] = field(default=None, metadata={"help": "classifier dropout (timm --drop)"})
    drop_path_rate: Optional[float] = field(default=None, metadata={"help": "stochastic depth (timm --drop-path)"})

    # --- targets: label smoothing and mixup/cutmix, applied to every local loss ---------------
    smoothing: float = field(default=0.0, metadata={"help": "label smoothing of every local loss"})
    mixup: float = field(default=0.0, metadata={"help": "mixup alpha (timm.data.Mixup); 0 = off"})
    cutmix: float = field(default=0.0, metadata={"help": "cutmix alpha; 0 = off"})
    cutmix_minmax: Optional[list] = field(default=None, metadata={"help": "cutmix min/max area ratio (2 numbers)"})
    mixup_prob: float = field(default=1.0, metadata={"help": "probability of mixing a batch"})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "probability of cutmix when both are on"})
    mixup_mode: str = field(default="batch", metadata={"help": "batch | pair | elem"})

    # --- augmentation (timm.data.create_transform's knobs) -------------------------------------
    aa: Optional[str] = field(default=None, metadata={
        "help": "auto-augment policy, e.g. rand-m9-mstd0.5-inc1, augmix-m5-w3, v0r; None = off"})
    reprob: float = field(default=0.0, metadata={"help": "random erasing probability"})
    remode: str = field(default="pixel", metadata={"help": "random erasing mode: const | rand | pixel"})
    recount: int = field(default=1, metadata={"help": "random erasing count"})
    color_jitter: Optional[float] = field(default=None, metadata={"help": "colour jitter factor; None = off"})
    crop_pct: Optional[float] = field(default=None, metadata={
        "help": "evaluation centre-crop fraction (ImageNet-style data); None = the dataset's"})
    interpolation: Optional[str] = field(default=None, metadata={
        "help": "resize interpolation (bilinear, bicubic, ...; ImageNet-style data); None = the dataset's"})

    # --- optimisation ------------------------------------------------------------------------
    grad_accum_steps: Optional[int] = field(default=None, metadata={
        "help": "sum the local gradients of N micro-batches (each 1/N of --batch-size), then one synchronisation "
                "and one optimizer step; None = what Accelerate resolved (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, "
                "else 1)"})

    # --- EMA, evaluation, export ---------------------------------------------------------------
    model_ema: bool = field(default=False, metadata={
        "help": "keep an exponential moving average of the backbone (timm.utils.ModelEmaV3), evaluated beside it"})
    model_ema_decay: float = field(default=0.9998, metadata={"help": "EMA decay per optimizer step"})
    model_ema_warmup: bool = field(default=False, metadata={"help": "EMA decay warm-up (timm's use_warmup)"})
    eval_metric: str = field(default="top1", metadata={"help": "top1 | top5 | loss: what 'best' means"})
    dist_bn: str = field(default="reduce", metadata={
        "help": "BatchNorm statistics across processes before evaluation and checkpoints: reduce (average) | "
                "broadcast (process 0's) | none"})
    export_weights: str = field(default="best", metadata={
        "help": "what OUTPUT_DIR/export holds: best (the epoch best by --eval-metric) | last | ema"})


def _unit(v: Any) -> bool:
    return 0.0 <= v <= 1.0


def _non_negative(v: Any) -> bool:
    return v >= 0 and math.isfinite(v)


#: (key, test, what the value must be), in :data:`timm_local.config` 's rule format.
TIMM_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("grad_accum_steps", lambda v: v > 0, "a positive integer (or none: what Accelerate resolved)"),
    ("drop_rate", _unit, "in [0, 1]"),
    ("drop_path_rate", _unit, "in [0, 1]"),
    ("smoothing", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("mixup", _non_negative, ">= 0 (0 = off)"),
    ("cutmix", _non_negative, ">= 0 (0 = off)"),
    ("cutmix_minmax", lambda v: len(v) == 2, "two numbers: min and max area ratio"),
    ("mixup_prob", _unit, "in [0, 1]"),
    ("mixup_switch_prob", _unit, "in [0, 1]"),
    ("mixup_mode", lambda v: v in MIXUP_MODES, " | ".join(MIXUP_MODES)),
    ("reprob", _unit, "in [0, 1]"),
    ("remode", lambda v: v in ("const", "rand", "pixel"), "const | rand | pixel"),
    ("recount", lambda v: v >= 1, "a positive integer"),
    ("color_jitter", _non_negative, ">= 0 (or none)"),
    ("crop_pct", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    ("model_ema_decay", lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    ("eval_metric", lambda v: v in EVAL_METRICS, " | ".join(EVAL_METRICS)),
    ("dist_bn", lambda v: v in DIST_BN, " | ".join(DIST_BN)),
    ("export_weights", lambda v: v in EXPORT_WEIGHTS, " | ".join(EXPORT_WEIGHTS)),
)


def uses_soft_targets(cfg: Any) -> bool:
    """Whether the run's targets are class distributions (label smoothing or mixup/cutmix) instead of labels."""
    return cfg.smoothing > 0 or cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None


# ------------------------------------------------------------------------------------------------
# flags
# ------------------------------------------------------------------------------------------------
#: timm's spellings of our keys (same meaning): extra option strings of the key's flag.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "image_size": ("--img-size",), "workers": ("-j",), "output_dir": ("--output",), "log_every": ("--log-interval",),
    "keep_checkpoints": ("--checkpoint-hist",), "drop_rate": ("--drop",), "drop_path_rate": ("--drop-path",),
    "aa": ("--auto-augment",),
}

#: timm flags whose meaning differs from ours: refused with the difference.
_DIFFERENT = {
    ("-b",): "-b is timm's per-process batch; here --batch-size is the GLOBAL batch of one optimizer step (all "
             "processes, all accumulated micro-batches): pass --batch-size <timm's -b x processes x "
             "--grad-accum-steps>",
    ("-vb", "--validation-batch-size"): "timm's --validation-batch-size is per process; here --eval-batch-size is "
                                        "the GLOBAL evaluation batch: pass --eval-batch-size <per-process x "
                                        "processes>",
}


class _Refuse(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Optional[str] = None) -> None:
        raise UsageError(self.help)


def add_timm_flags(parser: argparse.ArgumentParser) -> None:
    """timm's flags that are not one of our keys' spellings: ``--amp``/``--amp-dtype``, ``--log-wandb``,
    ``--no-aug``, and the refused ones of a different meaning (:func:`timm_flag_values` translates)."""
    parser.add_argument("--amp", dest="amp", action="store_true", help="timm's mixed precision: = "
                        "--mixed-precision fp16, or bf16 with --amp-dtype bfloat16")
    parser.add_argument("--amp-dtype", dest="amp_dtype", choices=sorted(AMP_DTYPES), help="with --amp")
    parser.add_argument("--log-wandb", dest="log_wandb", action="store_true", help="= --trackers wandb (added)")
    parser.add_argument("--no-aug", dest="no_aug", action="store_true", help="= --no-augment")
    for flags, why in _DIFFERENT.items():
        parser.add_argument(*flags, action=_Refuse, nargs="?", help=why)


def _joined(name: str, values: Any, is_dict: bool) -> Any:
    """A list or dict flag's words (``nargs='+'``) as the one value our keys take: ``--mean 0.5 0.5 0.5``
    as a list, ``--model-kwargs drop_rate=0.1 act_layer=gelu`` (timm's form) as a dict; a single word is
    YAML as before (``'[0.5, 0.5]'``, ``'{drop_rate: 0.1}'``)."""
    if not isinstance(values, list):
        return values
    if is_dict:
        if len(values) == 1 and isinstance(yaml.safe_load(values[0]), (dict, type(None))):
            return values[0]
        pairs = [v.partition("=") for v in values]
        bad = [v for v, (_, eq, _) in zip(values, pairs) if not eq]
        if bad:
            raise UsageError(f"--{name.replace('_', '-')}: {bad[0]!r} is not key=value (or give one YAML dict)")
        return {k: yaml.safe_load(v) for k, _, v in pairs}
    return values[0] if len(values) == 1 else [yaml.safe_load(v) for v in values]


def _container(tp: Any) -> Optional[type]:
    """``list`` or ``dict`` for a key of that (optional) type, else None."""
    for arg in [a for a in typing.get_args(tp) if a is not type(None)] or [tp]:
        if (typing.get_origin(arg) or arg) in (list, dict):
            return typing.get_origin(arg) or arg
    return None


def timm_flag_values(args: dict[str, Any], key_types: dict[str, Any]) -> dict[str, Any]:
    """Parsed flags as config values (``key_types``: the config's type hints): timm's flags translated to our
    keys, the words of list and dict flags joined."""
    kinds = {k: _container(tp) for k, tp in key_types.items()}
    args = {k: _joined(k, v, kinds[k] is dict) if kinds.get(k) else v for k, v in args.items()}
    amp, dtype = args.pop("amp", False), args.pop("amp_dtype", None)
    if amp:
        precision = AMP_DTYPES[dtype or "float16"]
        if args.get("mixed_precision", precision) != precision:
            raise UsageError(f"--amp{f' --amp-dtype {dtype}' if dtype else ''} means --mixed-precision {precision}, "
                             f"but --mixed-precision {args['mixed_precision']} was given too; give one")
        args["mixed_precision"] = precision
    elif dtype:
        raise UsageError("--amp-dtype without --amp does nothing: add --amp (or use --mixed-precision)")
    if args.pop("log_wandb", False):
        trackers = [t for t in str(args.get("trackers", "")).split(",") if t.strip() not in ("", "auto", "none")]
        args["trackers"] = ",".join([*trackers, "wandb"] if "wandb" not in trackers else trackers)
    if args.pop("no_aug", False):
        args["augment"] = False
    return args
