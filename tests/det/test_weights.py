"""``MODEL.TIMM.WEIGHTS hf-hub:OWNER/NAME`` through the Hugging Face cache, offline.

The hub repository is a real huggingface_hub cache entry (refs/main -> snapshot folder) holding an export;
with ``HF_HUB_OFFLINE=1`` huggingface_hub serves it from the cache exactly as after a download, so the
route ``snapshot_download`` -> local export folder -> timm's ``local-dir:`` loader runs for real.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import subprocess_env

pytest.importorskip("detectron2", reason="detectron2 is not installed: run `make install-det`")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHECK = """
import json, sys, torch, timm, det
weights = det.resolve_weights("hf-hub:someone/tiny-resnet")
features = det.create_timm_features("", "hf-hub:someone/tiny-resnet", out_indices=(1, 2))
ref = timm.create_model("hf-hub:someone/tiny-resnet", pretrained=True, features_only=True, out_indices=(1, 2))
x = torch.randn(1, 3, 64, 64)
with torch.no_grad():
    same = all(torch.equal(a, b) for a, b in zip(features(x), ref(x)))
print(json.dumps({"file": weights.file.name, "arch": weights.architecture, "same": same}))
"""


def test_hub_weights_come_from_one_snapshot_folder(resnet34_run: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-resnet"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((resnet34_run / "export" / name).read_bytes())
    (snapshot / "README.md").write_text("not needed by the loader")
    env = subprocess_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["file"] == "model.safetensors" and result["arch"] == "resnet34"
    assert result["same"], "the detectron2 plug-in's features differ from timm's own hf-hub: loader"
