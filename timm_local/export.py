"""Export a trained backbone as an ordinary timm checkpoint, and load or publish it.

The export is timm's own format, written by ``timm.models.save_for_hf``: ``model.safetensors``
(the backbone's state_dict, timm's keys, no auxiliary heads) and ``config.json`` (architecture,
num_classes, ``model_args``, ``pretrained_cfg`` with the mean/std/input size the model was
trained with). Our training metadata rides along under the top-level ``"timm_local"`` key, which
timm ignores. Because nothing is special, every timm loader works on it:

* ``timm.create_model("local-dir:EXPORT_DIR", pretrained=True)``
* ``timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"))``
  -- when N differs from ARCH's default class count, also pass ``num_classes=N`` and put
  ``num_classes=N`` in the overlay (else timm treats the classifier as "to be adapted" and re-initialises
  it); :func:`pretrained_cfg_overlay` builds the complete overlay from the export
* after :func:`push_export_to_hub`, ``timm.create_model("hf-hub:OWNER/NAME", pretrained=True)``

(``import timm_local`` first when the architecture is one of ours, e.g. ``resnet110_cifar``,
so that it is in timm's registry.) The detectron2 plug-in consumes this same layout.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .format_version import version_of

__all__ = ["METADATA_KEY", "export_backbone", "load_exported", "loading_requirement", "pretrained_cfg_overlay",
           "push_export_to_hub", "read_export_metadata", "to_jsonable"]

#: Top-level config.json key under which the training metadata is stored.
METADATA_KEY = "timm_local"
WEIGHTS_NAME = "model.safetensors"


def export_backbone(
    backbone: nn.Module,
    export_dir: Union[str, Path],
    *,
    data_config: Optional[Mapping[str, Any]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    label_names: Optional[Sequence[str]] = None,
    model_card: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``backbone`` (a plain timm model) to ``export_dir`` in timm's hub format.

    ``data_config`` holds the preprocessing the model was trained with (``input_size``, ``mean``,
    ``std``, ``crop_pct``, ``interpolation``); it becomes the exported ``pretrained_cfg`` so that
    ``timm.data.resolve_data_config`` reproduces it. ``metadata`` (method, aux_depth, tau, dataset,
    accuracy, ...) is stored under ``config.json["timm_local"]``. A README model card is written too,
    so the folder can be pushed to the hub as is.
    """
    import timm.models

    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    if not hasattr(backbone, "pretrained_cfg"):
        raise TypeError(f"export expects a timm model (with pretrained_cfg); got {type(backbone).__name__}. "
                        f"Pass LocalModel.backbone, not the LocalModel.")
    model_config: dict[str, Any] = {}
    if label_names:
        model_config["label_names"] = list(label_names)
    metadata = dict(metadata or {})
    requirement = loading_requirement(backbone)
    if requirement:
        metadata["requires"] = requirement
    if metadata:
        model_config[METADATA_KEY] = to_jsonable(metadata)
    was_training = backbone.training
    backbone.eval()
    try:
        # save_for_hf writes the state_dict (on CPU tensors as stored) and the config; safetensors stores
        # contiguous tensors only, so a channels-last model is written from a contiguous copy
        state_device = next(backbone.parameters()).device
        if state_device.type != "cpu" or not all(t.is_contiguous() for t in backbone.state_dict().values()):
            backbone = _cpu_copy(backbone)
        timm.models.save_for_hf(backbone, str(export_dir), model_config=model_config,
                                data_config=dict(data_config) if data_config else None, safe_serialization=True)
    finally:
        backbone.train(was_training)
    (export_dir / "README.md").write_text(_model_card(export_dir, model_card, metadata), encoding="utf-8")
    return export_dir


def loading_requirement(backbone: nn.Module) -> Optional[str]:
    """What loading needs beyond timm: for an architecture timm_local defines (``*_cifar``), timm_local itself.

    Plain timm cannot know these architectures (``Unknown model``), so the export says so where a user
    looks: in ``config.json["timm_local"]["requires"]`` and in the model card.
    """
    if not type(backbone).__module__.startswith("timm_local."):
        return None
    arch = backbone.pretrained_cfg.get("architecture", type(backbone).__name__)
    return (f"the architecture {arch!r} is defined by timm_local: pip install timm_local, and import timm_local "
            f"before timm.create_model (plain timm raises 'Unknown model ({arch})')")


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)


def to_jsonable(value: Any) -> Any:
    """Make metadata JSON-serialisable (tuples -> lists, tensors/numpy -> numbers, paths -> str)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _model_card(export_dir: Path, card: Optional[Mapping[str, Any]], metadata: Optional[Mapping[str, Any]]) -> str:
    from timm.models._hub import generate_readme

    config = json.loads((export_dir / "config.json").read_text())
    arch = config["architecture"]
    meta = dict(metadata or {})
    details: dict[str, Any] = {"Model Type": "Image classification / feature backbone", "Architecture": arch}
    if meta.get("method"):
        details["Training"] = f"{meta['method']} local learning (timm_local) {meta.get('method_config', '')}".strip()
    if meta.get("dataset"):
        details["Dataset"] = str(meta["dataset"])
    for key in ("top1", "best_top1"):
        if meta.get(key) is not None:
            details[f"Test {key}"] = f"{float(meta[key]):.2f}"
    if meta.get("requires"):
        details["Requires"] = meta["requires"]
    if meta.get("weights_from"):
        details["Starting weights"] = str(meta["weights_from"])
    usage = (
        ("```python\nimport timm, timm_local  # needed: timm_local defines this architecture\n" if meta.get("requires")
         else "```python\nimport timm  # a timm architecture: timm alone loads it\n")
        + "model = timm.create_model('hf-hub:OWNER/NAME', pretrained=True).eval()\n"
        "cfg = timm.data.resolve_data_config({}, model=model)\n"
        "transform = timm.data.create_transform(**cfg)\n```\n"
    )
    full = {"details": details, "usage": usage, "tags": ["image-classification", "timm", "timm_local"],
            **dict(card or {})}
    readme = generate_readme(full, arch)
    if meta.get("base_model"):  # the hub's model-card key for "fine-tuned from" (generate_readme has none)
        head, sep, rest = readme.partition("\n---\n")
        readme = f"{head}\nbase_model: {meta['base_model']}{sep}{rest}"
    return readme


def read_export_metadata(export_dir: Union[str, Path]) -> dict[str, Any]:
    """The training metadata stored by :func:`export_backbone` (empty dict if none), with the method's
    hyper-parameters (``method_config``) also at the top level, where exports before run-format version 3
    stored them: readers of any export find ``meta["aux_depth"]`` alike. An export of a newer run format
    than this code reads is a :class:`~timm_local.format_version.RunFormatError`."""
    path = Path(export_dir) / "config.json"
    meta = dict(json.loads(path.read_text()).get(METADATA_KEY, {}))
    if meta:
        version_of(meta, str(path), 2)
    return {**(meta.get("method_config") or {}), **meta}


def pretrained_cfg_overlay(export_dir: Union[str, Path]) -> dict[str, Any]:
    """The ``pretrained_cfg_overlay`` that loads an export by file: weights path, classes, preprocessing.

    Use as ``timm.create_model(arch, pretrained=True, num_classes=cfg["num_classes"],
    pretrained_cfg_overlay=pretrained_cfg_overlay(path))``.
    """
    export_dir = Path(export_dir)
    config = json.loads((export_dir / "config.json").read_text())
    overlay = {k: tuple(v) if isinstance(v, list) else v for k, v in config["pretrained_cfg"].items()}
    overlay["num_classes"] = config["num_classes"]
    overlay["file"] = str((export_dir / WEIGHTS_NAME).resolve())
    return overlay


def load_exported(export_dir: Union[str, Path], **kwargs: Any) -> nn.Module:
    """``timm.create_model("local-dir:EXPORT_DIR", pretrained=True)``, with our architectures registered."""
    import timm

    from . import models  # noqa: F401  (registers the *_cifar architectures in timm)

    export_dir = Path(export_dir)
    if not (export_dir / "config.json").is_file():
        raise FileNotFoundError(f"{export_dir} is not an export folder (no config.json); run tools/export.py RUN_DIR")
    return timm.create_model(f"local-dir:{export_dir.resolve()}", pretrained=True, **kwargs)


def push_export_to_hub(
    export_dir: Union[str, Path],
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    commit_message: str = "Add timm_local model",
    create_pr: bool = False,
) -> Any:
    """Upload an export folder, unchanged, with huggingface_hub (what ``timm.models.push_to_hf_hub`` does).

    Uploading the folder itself (rather than re-serialising a model) publishes exactly the files whose
    round trip the tests check; timm then loads it with ``timm.create_model("hf-hub:REPO_ID", pretrained=True)``.
    """
    from huggingface_hub import HfApi

    export_dir = Path(export_dir)
    for name in (WEIGHTS_NAME, "config.json"):
        if not (export_dir / name).is_file():
            raise FileNotFoundError(f"{export_dir / name} missing: export the run first (tools/export.py RUN_DIR)")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo.repo_id, folder_path=str(export_dir), revision=revision,
                             commit_message=commit_message, create_pr=create_pr)
