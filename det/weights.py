"""Find, check and load the weights of a timm backbone for detectron2.

The backbone that timm_local exports is a plain timm model (``model.safetensors`` +
``config.json`` written by ``timm.models.save_for_hf``), so loading goes through timm's own
mechanisms (``local-dir:``, ``hf-hub:``, ``pretrained_cfg_overlay=dict(file=...)``) with
``features_only=True``. What timm does *not* do for us is be strict: a features-only model
drops the classifier and therefore loads with ``strict=False``, so a checkpoint of another
architecture (resnet18 weights into a resnet34) would load partially and silently. This module
checks the checkpoint's keys and shapes against the requested architecture before loading, and
checks afterwards that every tensor of the feature extractor equals the file's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import timm
import torch
from torch import nn

from timm_local.errors import UserError

from .feature_names import stride_feature_name, wrapper_to_model_names

__all__ = [
    "TimmWeights",
    "WeightsMismatchError",
    "resolve_weights",
    "checkpoint_shapes",
    "check_checkpoint_matches",
    "create_timm_features",
    "detection_settings",
]

logger = logging.getLogger(__name__)

# The file names timm's save_for_hf / local-dir loader use, in timm's order of preference.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class WeightsMismatchError(UserError, RuntimeError):
    """The checkpoint was not saved from the architecture it is being loaded into."""


@dataclass
class TimmWeights:
    """A resolved ``MODEL.TIMM.WEIGHTS`` value.

    Attributes:
        spec: the string the user gave.
        file: the weights file that will be read.
        folder: the export folder to load with ``local-dir:`` (None for a file or a hub id
            whose files are not side by side: those load with ``pretrained_cfg_overlay``).
        config: the parsed ``config.json`` (``architecture``, ``pretrained_cfg``, ...), if any.
    """

    spec: str
    file: Path
    folder: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> str | None:
        """The timm model name recorded at export time, if the export recorded one."""
        return self.config.get("architecture")

    @property
    def model_args(self) -> dict[str, Any]:
        """Constructor arguments recorded at export time (timm's ``model_args``)."""
        return dict(self.config.get("model_args") or {})

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The preprocessing config recorded at export time (mean, std, input size, ...)."""
        cfg = self.config.get("pretrained_cfg")
        if cfg is None and self.config:  # timm's legacy flat config.json layout
            cfg = {k: v for k, v in self.config.items() if k != "architecture"}
        return dict(cfg or {})


def _weights_in_folder(folder: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    for suffix in _WEIGHT_SUFFIXES:
        found = sorted(folder.glob(f"*{suffix}"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"No weights file in {folder}: expected one of {', '.join(_WEIGHT_FILES)} "
        f"(as written by timm.models.save_for_hf / timm_local's export)."
    )


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _resolve_hub(model_id: str) -> TimmWeights:
    """Download an ``hf-hub:`` repo's config and weights (only those) into the HF cache.

    ``snapshot_download`` puts them in one snapshot folder, so the hub becomes the local export-folder
    case and shares its checks; timm would download the very same files itself.
    """
    from huggingface_hub import snapshot_download
    from timm.models._hub import hf_split  # the ``repo@revision`` convention timm uses

    repo_id, revision = hf_split(model_id)
    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["config.json", *_WEIGHT_FILES]))
    try:
        weights = _weights_in_folder(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"hf-hub:{model_id} has none of {_WEIGHT_FILES}") from None
    return TimmWeights(f"hf-hub:{model_id}", weights, folder, _read_config(folder))


def resolve_weights(spec: str | Path) -> TimmWeights:
    """Turn a ``MODEL.TIMM.WEIGHTS`` value into a weights file (and its export config).

    Accepted forms, tried in this order:
        ``hf-hub:org/name[@rev]``; ``local-dir:FOLDER``; a run directory with ``export/``;
        an export folder (``model.safetensors`` and ``config.json``); a weights file
        (``.safetensors``, or a torch ``.bin``/``.pth``), with ``config.json`` beside it used if
        present.
    """
    spec = str(spec)
    if spec.startswith("hf-hub:"):
        return _resolve_hub(spec[len("hf-hub:"):])
    path = Path(spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"MODEL.TIMM.WEIGHTS={spec!r} does not exist. Give a run directory (with export/), "
            f"an export folder, a .safetensors file, a local-dir: folder or an hf-hub: id."
        )
    if path.is_dir():
        if (path / "export").is_dir() and not (path / "config.json").is_file():
            path = path / "export"  # a training run directory
        return TimmWeights(spec, _weights_in_folder(path), path, _read_config(path))
    # A file is loaded as a file (pretrained_cfg_overlay); a config.json beside it still tells
    # the architecture, its constructor arguments and its preprocessing.
    return TimmWeights(spec, path, None, _read_config(path.parent))


def checkpoint_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint, read without loading safetensors data."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in _load_tensors(file).items() if isinstance(v, torch.Tensor)}


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """timm's own reader: safetensors or torch files, a ``state_dict``/``model`` entry, DDP prefixes removed."""
    return dict(timm.models.load_state_dict(str(file), use_ema=False))


def _listing(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _reference_model(name: str, model_args: Mapping[str, Any]) -> nn.Module:
    """The full classification model ``name`` without allocating its weights (meta device)."""
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **model_args)
    except Exception:  # noqa: BLE001 - an init that does not support meta tensors; pay for it
        return timm.create_model(name, pretrained=False, **model_args)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not classifier:
        return ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(n + "." for n in names)


_DETECTION_NEEDS = "Detection needs a CNN whose features_only stages have strides that double."


def detection_settings(arch: str, model_args: Mapping[str, Any] | None = None) -> str:
    """The MODEL.TIMM / FPN settings that make ``arch`` a detection backbone, as advice, or why it cannot be one.

    Read from timm's own ``features_only`` default for the architecture, so the advice never names
    feature indices the model does not have (a CIFAR ResNet has 3 stages at strides 1, 2, 4).
    """
    try:
        with torch.device("meta"):
            features = timm.create_model(arch, features_only=True, **dict(model_args or {}))
    except Exception as e:  # noqa: BLE001 - a model timm cannot turn into a feature extractor
        return (f"but {arch!r} cannot serve as a detection backbone: timm cannot build its features_only extractor "
                f"({type(e).__name__}: {e}). {_DETECTION_NEEDS}")
    indices = list(features.feature_info.out_indices)
    strides = features.feature_info.reduction()
    names = [stride_feature_name(r) for r in strides]
    if None in names:
        return (f"but {arch!r} cannot serve as a detection backbone: its features_only strides {strides} are not "
                f"all powers of two. {_DETECTION_NEEDS}")
    if len(set(strides)) < len(strides):
        return (f"its default features {indices} repeat a stride ({strides}); set MODEL.TIMM.NAME to {arch!r} and "
                f"MODEL.TIMM.OUT_INDICES to one index per stride.")
    return (f"set MODEL.TIMM.NAME to {arch!r} (or leave NAME empty to take it from config.json), "
            f"MODEL.TIMM.OUT_INDICES to {indices} and MODEL.FPN.IN_FEATURES to {names} (strides {strides}).")


def check_checkpoint_matches(
    name: str,
    weights: TimmWeights,
    model_args: Mapping[str, Any] | None = None,
    reference: nn.Module | None = None,
) -> None:
    """Raise :class:`WeightsMismatchError` unless ``weights`` fits timm architecture ``name``.

    Classifier tensors are ignored on both sides (a detection backbone never uses them, and a
    backbone trained on CIFAR has another class count); every other tensor must be present
    with the same shape, and the checkpoint must hold nothing else.
    """
    if reference is None:
        reference = _reference_model(name, model_args or {})
    skip = _classifier_prefixes(reference)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.startswith(skip)}
    found = {k: s for k, s in checkpoint_shapes(weights.file).items() if not k.startswith(skip)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {list(found[k])} vs model {list(expected[k])}"
        for k in set(expected) & set(found)
        if expected[k] != found[k]
    )
    if not (missing or unexpected or shapes):
        return
    recorded = weights.architecture
    hint = (
        f" Its config.json says it was exported from {recorded!r}; {detection_settings(recorded, weights.model_args)}"
        if recorded and recorded != name
        else " Was it exported from another architecture?"
    )
    parts = [f"Checkpoint {weights.spec!r} ({weights.file}) does not fit timm model {name!r}."]
    if missing:
        parts.append(f"{len(missing)} missing keys: {_listing(missing)}.")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}.")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {_listing(shapes)}.")
    raise WeightsMismatchError(" ".join(parts) + hint)


def _verify_loaded(features: nn.Module, weights: TimmWeights, reference: nn.Module) -> None:
    """Every tensor of the feature extractor must equal the file's tensor of the same name."""
    tensors = _load_tensors(weights.file)
    renames = wrapper_to_model_names(reference)
    not_in_file: list[str] = []
    different: list[str] = []
    for key, value in features.state_dict().items():
        candidates = [key]
        head, _, rest = key.partition(".")
        if head in renames and renames[head] != head:
            candidates.append(f"{renames[head]}.{rest}" if rest else renames[head])
        source = next((tensors[c] for c in candidates if c in tensors), None)
        if source is None:
            not_in_file.append(key)
        elif source.shape != value.shape or not torch.equal(source.to(value.dtype), value.cpu()):
            different.append(key)
    if not_in_file or different:
        raise WeightsMismatchError(
            f"timm did not load {weights.spec!r} exactly into the feature extractor: "
            f"{len(not_in_file)} tensors not found in the file ({_listing(not_in_file)}), "
            f"{len(different)} tensors differ from it ({_listing(different)})."
        )


def create_timm_features(
    name: str,
    weights: str | Path | None = None,
    out_indices: Iterable[int] = (1, 2, 3, 4),
    in_chans: int = 3,
) -> nn.Module:
    """Create ``timm.create_model(name, features_only=True, out_indices=...)`` with checked weights.

    Args:
        name: timm model name; may be empty when the weights' ``config.json`` names it.
        weights: any form :func:`resolve_weights` accepts; empty/None means random init.
        out_indices: indices into timm's ``feature_info``.
        in_chans: input channels (3 for RGB).

    Raises:
        WeightsMismatchError: the checkpoint belongs to another architecture (the message names
            the missing and unexpected keys), or timm did not load it exactly.
    """
    out_indices = tuple(int(i) for i in out_indices)
    common = dict(features_only=True, out_indices=out_indices)
    if in_chans != 3:
        common["in_chans"] = in_chans
    if not weights:
        if not name:
            raise ValueError("MODEL.TIMM.NAME is empty and no MODEL.TIMM.WEIGHTS names an architecture.")
        return timm.create_model(name, pretrained=False, **common)

    resolved = resolve_weights(weights)
    arch = name or resolved.architecture
    if not arch:
        raise ValueError(
            f"MODEL.TIMM.NAME is empty and {resolved.spec!r} has no config.json naming the architecture."
        )
    same_arch = resolved.architecture == arch
    model_args = resolved.model_args if same_arch else {}
    reference = _reference_model(arch, model_args)
    check_checkpoint_matches(arch, resolved, model_args, reference)

    if resolved.folder is not None and same_arch:
        # timm's own route for an exported folder: config.json's pretrained_cfg and model_args.
        features = timm.create_model(f"local-dir:{resolved.folder}", pretrained=True, **common)
    else:
        features = timm.create_model(
            arch,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(resolved.file)),
            **{**model_args, **common},
        )
    if in_chans == 3:  # otherwise timm adapts the first conv on purpose, so it differs
        _verify_loaded(features, resolved, reference)
    logger.info("Loaded timm %s backbone weights from %s: %d tensors into features %s (verified exact).", arch,
                resolved.file, len(features.state_dict()), out_indices)
    return features
