"""benchmarks/pipeline_layout.py: the W x R table docs/distributed.md quotes, on the CIFAR ResNet-32 recipe."""
from __future__ import annotations


import pytest

from tests.helpers import ROOT, load_module

layout = load_module("_pipeline_layout", ROOT / "benchmarks" / "pipeline_layout.py")


def test_layout_table_of_resnet32_has_the_mac_balanced_cuts_and_speedups(tmp_path):
    result = layout.main(["--config", "configs/cifar10/resnet32_cifar/auglocal_d3.yaml", "--segments", "1", "2", "4",
                          "--gpus", "8", "--out", str(tmp_path / "layout")])
    assert (result["model"], result["aux_depth"], result["batch_size"], result["local_blocks"]) == \
        ("resnet32_cifar", 3, 1024, 16)
    rows = {r["segments"]: r for r in result["layouts"]}
    assert rows[1]["cut"] == [0] and rows[1]["speedup"] == 1.0 and rows[1]["efficiency"] == 1.0
    assert rows[2]["cut"] == [0, 8]  # the MAC-balanced cut docs/pipeline.md prints for ResNet-32
    assert 1.8 < rows[2]["speedup"] <= 2 and rows[4]["efficiency"] < rows[2]["efficiency"] < 1
    assert rows[4]["speedup"] <= result["speedup_cap"]
    assert rows[2]["a1"] == pytest.approx(16 * 4 / (2 * 17))
    ratio = result["auglocal_gmacs"] / result["bp_gmacs"]
    assert rows[1]["vs_bp_macs"] == pytest.approx(ratio)
    assert rows[2]["vs_bp_macs"] == pytest.approx(ratio / rows[2]["speedup"])
    assert [(g["segments"], g["replicas"], g["per_gpu_batch"]) for g in result["gpus"]] == \
        [(1, 8, 128), (2, 4, 256), (4, 2, 512)]
    assert result["gpus"][1]["throughput_gpus"] == pytest.approx(8 * rows[2]["efficiency"])
    text = (tmp_path / "layout.md").read_text()
    assert text.startswith("# Pipeline layout: resnet32_cifar auglocal d=3") and "| 2 | `[0, 8]` |" in text
    assert (tmp_path / "layout.json").is_file()
