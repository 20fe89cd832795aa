"""Starting weights: --initial-checkpoint (one of our exports, or a weights file) and --pretrained (timm's
hub weights through huggingface_hub, from an offline cache the test lays out as huggingface_hub does).

The backbone a run trains starts as the source model: the same logits before the first step; a class
count that differs gets a new classifier (as timm does) and every other tensor of the source.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import timm_local  # noqa: F401  (our architectures in timm's registry)
from timm_local.cli import parse_config
from timm_local.config import ConfigError
from timm_local.export import export_backbone, read_export_metadata
from timm_local.training import build_local_model, run_datasets

from tests.helpers import subprocess_env, train

DIGITS8 = ["--dataset", "digits", "--image-size", "8", "--model", "resnet20_cifar", "--method", "auglocal"]


@pytest.fixture(scope="module")
def source_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet20_cifar for digits' 10 classes, exported as a run exports (timm's save_for_hf layout)."""
    torch.manual_seed(1)
    model = timm.create_model("resnet20_cifar", num_classes=10)
    return export_backbone(model, tmp_path_factory.mktemp("source") / "export",
                           data_config={"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3})


def built(flags: list[str]):
    cfg = parse_config([*DIGITS8, *flags])
    _, _, data = run_datasets(cfg)
    return build_local_model(cfg, data).eval()


def test_an_export_gives_the_source_models_logits_before_the_first_step(source_export):
    source = timm.create_model(f"local-dir:{source_export}", pretrained=True).eval()
    lm = built(["--initial-checkpoint", str(source_export)])
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(lm(x), source(x))
    fresh = built([])
    with torch.no_grad():
        assert not torch.equal(fresh(x), source(x))


@pytest.mark.parametrize("as_file", [False, True])
def test_another_class_count_gets_a_new_classifier_and_every_other_tensor(source_export, as_file, tmp_path):
    start = source_export
    if as_file:  # a bare weights file: the class count is read from its classifier
        start = tmp_path / "weights.safetensors"
        save_file(load_file(str(source_export / "model.safetensors")), str(start))
    lm = built(["--initial-checkpoint", str(start), "--num-classes", "12"])
    source = load_file(str(source_export / "model.safetensors"))
    state = lm.backbone.state_dict()
    assert state["fc.weight"].shape == (12, source["fc.weight"].shape[1])
    assert [k for k in source if not k.startswith("fc.") and not torch.equal(state[k], source[k])] == []


def test_refusals_name_the_problem(source_export, tmp_path):
    with pytest.raises(ConfigError, match="give one"):
        built(["--initial-checkpoint", str(source_export), "--pretrained"])
    with pytest.raises(ConfigError, match="no such file"):
        built(["--initial-checkpoint", str(tmp_path / "absent.safetensors")])
    with pytest.raises(ConfigError, match="timm has no pretrained weights for 'resnet20_cifar'"):
        built(["--pretrained"])


def test_a_run_records_its_starting_weights_and_the_export_its_base_model(source_export, tmp_path):
    out = tmp_path / "run"
    assert train("--initial-checkpoint", source_export, "--max-steps", 1, "--output-dir", out) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["initial_checkpoint"] == str(source_export)
    assert saved["runtime"]["weights_from"] == f"export {source_export}"
    assert read_export_metadata(out / "export")["base_model"] == str(source_export)
    card = (out / "export" / "README.md").read_text()
    assert f"base_model: {source_export}\n---\n" in card


HUB_SNIPPET = """
import sys, torch
from safetensors.torch import save_file
from timm_local.cli import parse_config
from timm_local.training import build_local_model, run_datasets
cfg = parse_config(["--dataset", "digits", "--image-size", "16", "--model", "test_resnet.r160_in1k",
                    "--method", "bp", "--pretrained"])
lm = build_local_model(cfg, run_datasets(cfg)[2])
save_file({k: v.contiguous() for k, v in lm.backbone.state_dict().items()}, sys.argv[1])
"""


def test_pretrained_from_an_offline_hub_cache(tmp_path):
    """HF_HUB_OFFLINE=1 and a cache in huggingface_hub's layout: timm's pretrained tag loads from it."""
    torch.manual_seed(2)
    hub_weights = timm.create_model("test_resnet.r160_in1k").state_dict()
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file(hub_weights, str(repo / "snapshots" / revision / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    out = tmp_path / "built.safetensors"
    proc = subprocess.run([sys.executable, "-c", HUB_SNIPPET, str(out)], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = load_file(str(out))
    assert loaded["fc.weight"].shape[0] == 10  # digits' classes: a new classifier, not the 1000 of the hub's
    assert [k for k in hub_weights if not k.startswith("fc.") and not torch.equal(loaded[k], hub_weights[k])] == []
