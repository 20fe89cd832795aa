"""Run configuration: one dataclass, YAML recipes with ``_base_`` inheritance, and validation.

"Configs are data" (DESIGN.md): a recipe plus overrides fully describes a run, and the resolved
config is written next to the run's outputs. Every field of :class:`TrainConfig` is a YAML key and a
command-line flag (``batch_size`` <-> ``--batch-size``; :mod:`timm_local.cli` builds the flags from the dataclass),
so the three can never drift apart. Precedence: dataclass defaults < YAML (bases first) < flags given on the command line.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import yaml

from .errors import UserError
from .format_version import version_of
from .timm_options import TIMM_RULES, TimmOptions

__all__ = ["CONFIG_NAME", "ConfigError", "ENGINES", "FIXED_ON_RESUME", "INVOCATION_KEYS", "MIXED_PRECISIONS",
           "SCHEDULE_KEYS", "TrainConfig", "config_changes", "config_from_dict", "is_resuming", "key_types",
           "load_yaml", "previous_run_config", "resolve_config", "unwrap_optional", "validate_config"]

logger = logging.getLogger(__name__)

#: The resolved configuration a run writes into its folder (and a resume without --config continues from).
CONFIG_NAME = "config.yaml"
ENGINES = ("sequential", "pipeline")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
#: Keys that belong to one invocation, not to the run: a resume never inherits them from the run's config.yaml
#: (``max_steps`` is a stop point: a resumed run continues to ``epochs`` unless it is given again).
INVOCATION_KEYS = ("output_dir", "resume", "max_steps", "trust_pickle")
#: Keys whose change on resume restarts the learning-rate schedule at the current step (docs/training.md).
SCHEDULE_KEYS = ("lr", "epochs", "sched", "warmup_epochs", "warmup_lr", "min_lr")
#: Keys a resume may not change: the checkpoint's optimizer state, data order or input pipeline depend on them
#: (model, method and its hyper-parameters, classes and channels are checked against the weights themselves).
FIXED_ON_RESUME = ("batch_size", "dataset", "image_size", "seed", "opt", "momentum", "weight_decay",
                   "filter_bias_and_bn", "model_kwargs")


class ConfigError(UserError, ValueError):
    """A configuration that cannot work, found before anything is written; the message names the flag."""


@dataclass
class TrainConfig(TimmOptions):
    """Everything that defines a training run. Field docs are the ``--help`` texts; timm's recipe keys
    (starting weights, smoothing, mixup, EMA, ...) come from :class:`~timm_local.timm_options.TimmOptions`."""

    # --- model and local learning rule --------------------------------------------------------
    model: str = field(default="resnet20_cifar", metadata={"help": "timm model name (or one of ours, *_cifar)"})
    method: str = field(default="auglocal", metadata={"help": "local learning rule (timm_local.list_methods())"})
    aux_depth: Optional[int] = field(default=None, metadata={
        "help": "the paper's d: layers in each auxiliary net incl. the final linear (AugLocal); None = method default"})
    tau: Optional[float] = field(default=None, metadata={"help": "pyramidal depth coefficient (AugLocal); None = default"})
    method_kwargs: dict = field(default_factory=dict, metadata={"help": "extra method hyper-parameters (YAML dict)"})
    local_modules: Optional[int] = field(default=None, metadata={
        "help": "K local modules of consecutive blocks (official split table where one exists, else balanced by "
                "MACs); None = every block is a module"})
    local_module_ends: Optional[list] = field(default=None, metadata={
        "help": "explicit last block index of each local module (YAML list, e.g. '[3, 7, 11]')"})
    model_kwargs: dict = field(default_factory=dict, metadata={
        "help": "extra timm.create_model arguments, e.g. '{drop_rate: 0.1}' (YAML dict)"})
    num_classes: Optional[int] = field(default=None, metadata={"help": "classifier size; None = from the dataset"})
    in_chans: int = field(default=3, metadata={"help": "model input channels (grayscale data is expanded to 3)"})
    freeze_bn: bool = field(default=False, metadata={
        "help": "run BatchNorm in eval mode (running statistics) while training; makes multi-process "
                "updates bit-comparable to single-process ones"})

    # --- data ---------------------------------------------------------------------------------
    dataset: Optional[str] = field(default=None, metadata={
        "help": "built-in name (digits, cifar10, ...), a local folder, hf-hub:OWNER/NAME, or timm's hfds/NAME, "
                "hfids/NAME, wds/ (with --data-dir); None = digits"})
    data_dir: Optional[str] = field(default=None, metadata={
        "help": "where a named dataset's files are (torchvision root, save_to_disk, parquet, class folders, "
                "or hf-hub:ID)"})
    image_size: Optional[int] = field(default=None, metadata={
        "help": "model input size (also --img-size); None = the dataset recipe's, else the timm model's "
                "pretrained_cfg, else the image files'"})
    augment: bool = field(default=True, metadata={"help": "the paper's training augmentation for the dataset"})
    mean: Optional[list] = field(default=None, metadata={"help": "normalisation mean override (YAML list)"})
    std: Optional[list] = field(default=None, metadata={"help": "normalisation std override (YAML list)"})
    image_column: Optional[str] = field(default=None, metadata={"help": "HF datasets image column (auto)"})
    label_column: Optional[str] = field(default=None, metadata={"help": "HF datasets label column (auto)"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes per training process"})
    streaming: bool = field(default=False, metadata={
        "help": "read an HF dataset (save_to_disk folder or hf-hub:ID) as a stream of shards split over processes "
                "and workers; wds/ and hfids/ specs always stream (docs/training.md, ImageNet)"})
    device_normalize: Optional[bool] = field(default=None, metadata={
        "help": "workers hand over uint8 images, copied asynchronously and normalised on the device (same "
                "values); None = on a GPU"})

    # --- optimisation (paper A.2: SGD Nesterov 0.9, wd 1e-4, cosine with linear warm-up) -------
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={
        "help": "GLOBAL batch size (split across processes, as in the paper's single-GPU runs)"})
    eval_batch_size: Optional[int] = field(default=None, metadata={"help": "global eval batch; None = batch_size"})
    lr: float = field(default=0.1, metadata={"help": "peak learning rate"})
    opt: str = field(default="sgd", metadata={"help": "timm optimizer name ('sgd' = SGD with Nesterov momentum)"})
    momentum: float = field(default=0.9, metadata={"help": "momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay"})
    filter_bias_and_bn: bool = field(default=False, metadata={
        "help": "exempt biases and norm weights from weight decay (the paper decays everything)"})
    sched: str = field(default="cosine", metadata={"help": "timm scheduler name, stepped every optimizer update"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear warm-up epochs before the cosine decay"})
    warmup_lr: float = field(default=1e-5, metadata={"help": "learning rate at the start of warm-up"})
    min_lr: float = field(default=0.0, metadata={"help": "final learning rate of the cosine decay"})
    clip_grad: Optional[float] = field(default=None, metadata={
        "help": "clip the global gradient norm (pipeline engine: the norm of each segment's own parameters)"})

    # --- engine (docs/pipeline.md) -------------------------------------------------------------
    engine: str = field(default="sequential", metadata={
        "help": "sequential (every process runs the whole local step, data parallel) | pipeline (the local "
                "stages cut into --pipeline-segments W segments across processes; launch W*R processes)"})
    pipeline_segments: Optional[int] = field(default=None, metadata={
        "help": "pipeline engine: W, processes per pipeline (world = W*R replicas); None = the world size"})
    pipeline_cut: Optional[list] = field(default=None, metadata={
        "help": "pipeline engine: start stage index of each segment (YAML list); None = balanced cut"})
    pipeline_cost: Optional[str] = field(default=None, metadata={
        "help": "pipeline engine: cost measure of the balanced cut, time | macs; None = time"})
    collective_timeout: float = field(default=1800.0, metadata={
        "help": "seconds a process waits for the others in a collective (gradient all-reduce, broadcast, pipeline "
                "send/recv, the start-up checks) before the run stops with an error naming the absent processes "
                "(docs/distributed.md)"})

    # --- speed (timm train.py's flag names; docs/memory.md) ------------------------------------
    channels_last: bool = field(default=False, metadata={
        "help": "channels-last memory format for the backbone, the heads and the input (same losses; faster on "
                "CPU for the CIFAR ResNets, docs/memory.md)"})
    torchcompile: Optional[str] = field(default=None, metadata={
        "help": "compile each local block and head with this torch.compile backend, e.g. inductor (the local "
                "step's per-stage backward is kept); None = eager"})

    # --- run control -------------------------------------------------------------------------
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and augmentation"})
    cpu: bool = field(default=False, metadata={
        "help": "train on the CPU even if a GPU is present (multi-process CPU runs select it automatically)"})
    mixed_precision: Optional[str] = field(default=None, metadata={
        "help": "no | fp16 | bf16; None = what Accelerate resolved (accelerate config, ACCELERATE_MIXED_PRECISION)"})
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "run folder; None = runs/<dataset>-<model>-<method>"})
    resume: Optional[str] = field(default=None, metadata={"help": "'auto' (latest in output_dir) or a checkpoint folder"})
    max_steps: Optional[int] = field(default=None, metadata={
        "help": "stop after this many optimizer steps (smoke runs; checkpoints, evaluates and exports at the stop)"})
    eval_every: int = field(default=1, metadata={"help": "evaluate every N epochs (and always at the end)"})
    eval_heads: bool = field(default=True, metadata={
        "help": "also report test accuracy of each auxiliary classifier (diagnostic)"})
    checkpoint_every_steps: Optional[int] = field(default=None, metadata={
        "help": "also checkpoint every N optimizer steps (always at each epoch end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "complete checkpoints to keep (oldest removed)"})
    log_every: int = field(default=20, metadata={"help": "write a train metrics row every N steps"})
    trackers: str = field(default="auto", metadata={
        "help": "Accelerate trackers: auto (tensorboard if installed), none, or a comma list"})
    export: bool = field(default=True, metadata={"help": "export the backbone to OUTPUT_DIR/export at the end"})
    preempt_signals: str = field(default="TERM,USR1", metadata={
        "help": "signals that make every process finish its step, write a checkpoint and exit with code 75 "
                "(continue with --resume auto; docs/distributed.md); none: their default action"})
    trust_pickle: bool = field(default=False, metadata={
        "help": "load the pickle files of a checkpoint written by an older version even where they name code "
                "(which loading runs): only for a run folder you trust; it is then migrated to safetensors"})

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        dataset = Path(self.dataset).name if self.dataset else "digits"
        return Path("runs") / f"{dataset.replace('/', '_')}-{self.model}-{self.method}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _number(v: Any) -> Optional[float]:
    """``v`` as a float (YAML reads ``1e-3`` without a dot as a string), or None."""
    try:
        return None if isinstance(v, bool) else float(v)
    except (TypeError, ValueError):
        return None


def _positive(v: Any) -> bool:
    return v > 0 and math.isfinite(v)


def _non_negative(v: Any) -> bool:
    return v >= 0 and math.isfinite(v)


#: (key, test, what the value must be); keys whose value is None (= default / off) are not tested.
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("epochs", _positive, "a positive integer"),
    ("batch_size", _positive, "a positive integer"),
    ("eval_batch_size", _positive, "a positive integer"),
    ("lr", _positive, "a positive number"),
    ("workers", _non_negative, "0 (load in the training process) or more"),
    ("momentum", _non_negative, ">= 0"),
    ("weight_decay", _non_negative, ">= 0"),
    ("warmup_epochs", _non_negative, ">= 0"),
    ("warmup_lr", _non_negative, ">= 0"),
    ("min_lr", _non_negative, ">= 0"),
    ("clip_grad", _positive, "a positive number (or none)"),
    ("image_size", _positive, "a positive integer (or none: the dataset's own)"),
    ("num_classes", _positive, "a positive integer (or none: from the dataset)"),
    ("in_chans", _positive, "a positive integer"),
    ("aux_depth", lambda v: v >= 2, "an integer >= 2 (the paper's d counts the final linear layer)"),
    ("tau", lambda v: 0.0 <= v <= 1.0, "in [0, 1] (0 disables the pyramidal depth)"),
    ("local_modules", lambda v: v >= 2, "an integer >= 2 (1 module is end-to-end training: --method bp)"),
    ("pipeline_segments", _positive, "a positive integer"),
    ("pipeline_cost", lambda v: v in ("time", "macs"), "time or macs"),
    ("engine", lambda v: v in ENGINES, " or ".join(ENGINES)),
    ("mixed_precision", lambda v: v in MIXED_PRECISIONS, " | ".join(MIXED_PRECISIONS)),
    ("max_steps", _positive, "a positive integer (or none)"),
    ("eval_every", _positive, "a positive integer"),
    ("log_every", _positive, "a positive integer"),
    ("checkpoint_every_steps", _positive, "a positive integer (or none: only at epoch ends)"),
    ("keep_checkpoints", _non_negative, "0 (keep all) or more"),
)


def validate_config(cfg: TrainConfig) -> None:
    """Refuse values that cannot work, before a run builds or writes anything (one :class:`ConfigError`)."""
    for key, ok, requirement in (*_RULES, *TIMM_RULES):
        value = getattr(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{_flag(key)} must be {requirement}, got {value!r}")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"--min-lr {cfg.min_lr} exceeds --lr {cfg.lr}: the schedule decays from --lr to --min-lr")
    for key in ("mean", "std"):
        values = getattr(cfg, key)
        numbers = [_number(v) for v in values] if values is not None else []
        if values is not None and (not numbers or not all(v is not None and math.isfinite(v) for v in numbers)):
            raise ConfigError(f"{_flag(key)} must be a list of numbers, one per channel, got {values!r}")
        if key == "std" and not all(v > 0 for v in numbers):
            raise ConfigError(f"--std must be positive (it divides the pixels), got {values!r}")


# ------------------------------------------------------------------------------------------------
# resume: a run continues with its own configuration
# ------------------------------------------------------------------------------------------------
def is_resuming(resume: Optional[str]) -> bool:
    """Whether a ``--resume`` value asks to continue a run (``auto`` or a path)."""
    return resume not in (None, "", "none", "no")


def previous_run_config(cfg: TrainConfig) -> Optional[tuple[Path, dict[str, Any]]]:
    """The ``config.yaml`` a resume of ``cfg`` continues from (its run folder's, else that of the
    ``--resume`` folder's run) as ``(path, TrainConfig values without the invocation keys)``, or None."""
    candidates = [cfg.resolved_output_dir() / CONFIG_NAME]
    if cfg.resume and cfg.resume != "auto":
        resume = Path(cfg.resume)
        candidates += [resume / CONFIG_NAME, resume.parent.parent / CONFIG_NAME]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        return None
    saved = yaml.safe_load(path.read_text()) or {}
    version_of(saved, str(path), 2)  # a newer timm_local's run folder is refused in its own words
    names = {f.name for f in fields(TrainConfig)}
    return path, {k: v for k, v in saved.items() if k in names and k not in INVOCATION_KEYS}


def config_changes(before: Mapping[str, Any], after: TrainConfig) -> dict[str, dict[str, Any]]:
    """``{key: {"was": old, "now": new}}`` for every key of ``before`` that ``after`` sets differently
    (compared as stored in JSON, so tuples equal lists); the invocation keys are not changes."""
    now = json.loads(json.dumps(after.to_dict()))
    was = json.loads(json.dumps(dict(before)))
    return {k: {"was": was[k], "now": now[k]} for k in was
            if k in now and k not in INVOCATION_KEYS and was[k] != now[k]}


# ------------------------------------------------------------------------------------------------
def load_yaml(path: Union[str, Path]) -> dict[str, Any]:
    """Read a recipe, resolving ``_base_`` (a path or list of paths relative to the file) first.

    Bases are merged in order, then the file's own keys on top; dicts merge key by key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        _merge(merged, load_yaml(path.parent / base))
    _merge(merged, data)
    return merged


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def key_types() -> dict[str, Any]:
    """Each key's type (resolved annotations of :class:`TrainConfig` and its timm options)."""
    return typing.get_type_hints(TrainConfig)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``Optional[T]``, else ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin in (Union, getattr(types, "UnionType", Union)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, with an error naming the key."""
    base, optional = unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if not optional:
            raise ConfigError(f"config key {name!r} may not be null")
        return None
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        if base in (dict, list) or typing.get_origin(base) in (dict, list):
            container = dict if base is dict or typing.get_origin(base) is dict else list
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if container is list and isinstance(value, (int, float)):
                value = [value]
            if not isinstance(value, container):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name!r}: cannot use {value!r} as {getattr(base, '__name__', base)}") from None
    return value


def config_from_dict(values: dict[str, Any], base: Optional[TrainConfig] = None) -> TrainConfig:
    """A :class:`TrainConfig` from a mapping; unknown keys are an error that lists the valid ones."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(names))}")
    types_ = key_types()
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for k, v in values.items():
        setattr(cfg, k, _coerce(k, v, types_[k]))
    return cfg


def resolve_config(files: Sequence[Union[str, Path]], flags: dict[str, Any]) -> TrainConfig:
    """The run's configuration: defaults < the YAML ``files`` (in order) < ``flags`` (the keys given on the
    command line).

    A resume (``flags['resume']``) without files continues the run as it was configured: defaults < the
    run folder's ``config.yaml`` (:func:`previous_run_config`) < ``flags``.
    """
    values: dict[str, Any] = {}
    for path in files:
        _merge(values, load_yaml(path))
    if not files and is_resuming(flags.get("resume")):
        previous = previous_run_config(config_from_dict(flags))
        if previous is not None:
            logger.info("continuing with the configuration of %s (flags given override it)", previous[0])
            values = previous[1]
    return config_from_dict(flags, base=config_from_dict(values))
