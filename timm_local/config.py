"""Run configuration: one dataclass, YAML recipes with ``_base_`` inheritance, and command-line overrides.

"Configs are data" (DESIGN.md): a recipe plus overrides fully describes a run, and the resolved
config is written next to the run's outputs. Every field of :class:`TrainConfig` is a YAML key and a
command-line flag (``batch_size`` <-> ``--batch-size``), generated from the dataclass so the three can
never drift apart. Precedence: dataclass defaults < YAML (bases first) < flags given on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

__all__ = ["TrainConfig", "load_yaml", "build_parser", "parse_config", "config_from_dict"]


@dataclass
class TrainConfig:
    """Everything that defines a training run. Field docs are the ``--help`` texts."""

    # --- model and local learning rule --------------------------------------------------------
    model: str = field(default="resnet20_cifar", metadata={"help": "timm model name (or one of ours, *_cifar)"})
    method: str = field(default="auglocal", metadata={"help": "local learning rule (timm_local.list_methods())"})
    aux_depth: Optional[int] = field(default=None, metadata={
        "help": "the paper's d: layers in each auxiliary net incl. the final linear (AugLocal); None = method default"})
    tau: Optional[float] = field(default=None, metadata={"help": "pyramidal depth coefficient (AugLocal); None = default"})
    method_kwargs: dict = field(default_factory=dict, metadata={"help": "extra method hyper-parameters (YAML dict)"})
    model_kwargs: dict = field(default_factory=dict, metadata={
        "help": "extra timm.create_model arguments, e.g. '{drop_rate: 0.1}' (YAML dict)"})
    num_classes: Optional[int] = field(default=None, metadata={"help": "classifier size; None = from the dataset"})
    in_chans: int = field(default=3, metadata={"help": "model input channels (grayscale data is expanded to 3)"})
    freeze_bn: bool = field(default=False, metadata={
        "help": "run BatchNorm in eval mode (running statistics) while training; makes multi-process "
                "updates bit-comparable to single-process ones"})

    # --- data ---------------------------------------------------------------------------------
    dataset: Optional[str] = field(default=None, metadata={
        "help": "built-in name (digits, cifar10, ...), a local folder, or hf-hub:OWNER/NAME; None = digits"})
    data_dir: Optional[str] = field(default=None, metadata={
        "help": "where a named dataset's files are (torchvision root, save_to_disk, parquet, class folders, "
                "or hf-hub:ID)"})
    image_size: Optional[int] = field(default=None, metadata={"help": "model input size; None = dataset's own"})
    augment: bool = field(default=True, metadata={"help": "the paper's training augmentation for the dataset"})
    mean: Optional[list] = field(default=None, metadata={"help": "normalisation mean override (YAML list)"})
    std: Optional[list] = field(default=None, metadata={"help": "normalisation std override (YAML list)"})
    image_column: Optional[str] = field(default=None, metadata={"help": "HF datasets image column (auto)"})
    label_column: Optional[str] = field(default=None, metadata={"help": "HF datasets label column (auto)"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes per training process"})

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

    # --- run control -------------------------------------------------------------------------
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and augmentation"})
    cpu: bool = field(default=False, metadata={
        "help": "train on the CPU even if a GPU is present (multi-process CPU runs select it automatically)"})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16 (Accelerate)"})
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

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        dataset = Path(self.dataset).name if self.dataset else "digits"
        return Path("runs") / f"{dataset.replace('/', '_')}-{self.model}-{self.method}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        raise ValueError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
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


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, getattr(types, "UnionType", Union)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, with an error naming the key."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if not optional:
            raise ValueError(f"config key {name!r} may not be null")
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
        raise ValueError(f"config key {name!r}: cannot use {value!r} as {getattr(base, '__name__', base)}") from None
    return value


def config_from_dict(values: dict[str, Any], base: Optional[TrainConfig] = None) -> TrainConfig:
    """A :class:`TrainConfig` from a mapping; unknown keys are an error that lists the valid ones."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(names))}")
    types_ = _field_types()
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for k, v in values.items():
        setattr(cfg, k, _coerce(k, v, types_[k]))
    return cfg


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """An argparse parser with ``--config`` and one flag per :class:`TrainConfig` field.

    Flags default to ``SUPPRESS`` so that only the flags actually given override the YAML.
    """
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", "-c", action="append", default=[],
                        help="YAML recipe (repeatable; later files override earlier ones)")
    types_ = _field_types()
    for f in fields(TrainConfig):
        base, _ = _unwrap_optional(types_[f.name])
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        help_ = f.metadata.get("help", "")
        if base is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_)
        else:
            parser.add_argument(*flags, dest=f.name, type=str, metavar=f.name.upper(), help=help_)
    return parser


def parse_config(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> TrainConfig:
    """Defaults < ``--config`` files (in order) < explicit flags."""
    args = vars(build_parser(description).parse_args(argv))
    values: dict[str, Any] = {}
    for path in args.pop("config", []):
        _merge(values, load_yaml(path))
    cfg = config_from_dict(values)
    return config_from_dict(args, base=cfg)
