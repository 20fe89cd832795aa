"""Export: a trained run's backbone is an ordinary timm checkpoint that every timm loader reads."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import timm
from timm_local.config import config_from_dict
from timm_local.export import (export_backbone, load_exported, pretrained_cfg_overlay, push_export_to_hub,
                               read_export_metadata)
from timm_local.training import latest_checkpoint, train
from timm_local.training.checkpoint import load_model_state



from tests.helpers import ROOT, load_module as _load, write_cifar10


export_tool = _load("_export_tool", ROOT / "tools" / "export.py")
push_tool = _load("_push_tool", ROOT / "tools" / "push_to_hub.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny AugLocal run on CIFAR-10-layout data at 12x12 (not the architecture's default 32x32)."""
    root = tmp_path_factory.mktemp("export")
    write_cifar10(root / "data", n_train=8, n_test=4)
    cfg = config_from_dict(dict(dataset="cifar10", data_dir=str(root / "data"), image_size=12, batch_size=8,
                                epochs=1, workers=0, trackers="none", lr=0.05, method="auglocal", aux_depth=3,
                                tau=0.5, output_dir=str(root / "run")))
    return train(cfg)


def test_export_layout_and_metadata(run):
    export = run.export_dir
    assert sorted(p.name for p in export.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == "resnet20_cifar" and config["num_classes"] == 10
    assert config["label_names"][:2] == ["airplane", "automobile"]
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 12, 12] and pcfg["mean"] == [0.4914, 0.4822, 0.4465]
    assert pcfg["std"] == [0.247, 0.2435, 0.2616]
    meta = read_export_metadata(export)
    assert meta["method"] == "auglocal" and meta["aux_depth"] == 3 and meta["tau"] == 0.5
    assert meta["dataset"] == "cifar10" and meta["top1"] == pytest.approx(run.top1)
    # backbone alone: timm's keys, no auxiliary heads
    weights = load_file(str(export / "model.safetensors"))
    assert set(weights) == set(timm.create_model("resnet20_cifar").state_dict())


def test_all_timm_loaders_give_the_trained_logits(run):
    export = run.export_dir
    state = load_model_state(latest_checkpoint(run.output_dir))
    trained = timm.create_model("resnet20_cifar", num_classes=10)
    trained.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    x = torch.randn(3, 3, 12, 12)
    local_dir = timm.create_model(f"local-dir:{export}", pretrained=True)
    by_file = timm.create_model("resnet20_cifar", pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(export / "model.safetensors")))
    by_overlay = timm.create_model("resnet20_cifar", pretrained=True, pretrained_cfg_overlay=pretrained_cfg_overlay(export))
    with torch.no_grad():
        ref = trained.eval()(x)
        for model in (local_dir, by_file, by_overlay, load_exported(export)):
            assert torch.equal(model.eval()(x), ref)
    # the preprocessing travels with the weights
    data_cfg = timm.data.resolve_data_config({}, model=local_dir)
    assert data_cfg["input_size"] == (3, 12, 12) and tuple(data_cfg["mean"]) == (0.4914, 0.4822, 0.4465)


def test_export_tool_rebuilds_the_same_files_from_a_checkpoint(run, tmp_path):
    out = tmp_path / "again"
    assert export_tool.main([str(run.output_dir), "--out", str(out)]) == 0
    a, b = load_file(str(run.export_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = json.loads((run.export_dir / "config.json").read_text()), json.loads((out / "config.json").read_text())
    # each says which weights it holds: the run's choice (--export-weights), the tool's checkpoint
    assert ca["timm_local"].pop("exported_weights").startswith("best epoch by top1")
    assert cb["timm_local"].pop("exported_weights").startswith("the weights of checkpoint step_")
    assert ca == cb
    assert export_tool.main([str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("arch", [
    "test_resnet",
    "resnet20_cifar",
])
def test_export_keeps_input_channels_and_classes(arch, tmp_path):
    model = timm.create_model(arch, num_classes=7, in_chans=1).eval()
    export_backbone(model, tmp_path / "e", data_config=dict(input_size=(1, 28, 28), mean=(0.286,), std=(0.353,)),
                    metadata={"method": "bp"})
    loaded = load_exported(tmp_path / "e").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.num_classes == 7
    with pytest.raises(TypeError, match="LocalModel.backbone"):
        export_backbone(torch.nn.Linear(2, 2), tmp_path / "bad")


def test_push_to_hub_dry_run_and_missing_export(run, tmp_path, capsys):
    assert push_tool.main([str(run.output_dir), "someone/model", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "model.safetensors" in listed and "config.json" in listed and "README.md" in listed
    with pytest.raises(FileNotFoundError, match="export the run first"):
        push_export_to_hub(tmp_path, "someone/model")


def test_export_says_what_loading_needs(tmp_path):
    """Our architectures need timm_local to load (plain timm does not know them); timm's own do not."""
    import subprocess
    import sys

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    export_backbone(timm.create_model("resnet20_cifar"), ours, metadata={"method": "auglocal"})
    export_backbone(timm.create_model("test_resnet"), theirs, metadata={"method": "auglocal"})
    requires = read_export_metadata(ours)["requires"]
    assert "pip install timm_local" in requires and "import timm_local" in requires
    assert "resnet20_cifar" in requires
    assert "requires" not in read_export_metadata(theirs)
    assert "pip install timm_local" in (ours / "README.md").read_text()
    assert "timm alone loads it" in (theirs / "README.md").read_text()
    # what the hint is for: plain timm, without timm_local imported, does not know the architecture
    code = f"import timm; timm.create_model('local-dir:{ours}', pretrained=True)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Unknown model (resnet20_cifar)" in proc.stderr
