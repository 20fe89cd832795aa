"""benchmarks/accuracy.py: the stratified subset, the seed aggregation and ordering checks, and one tiny real run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, load_module, write_mnist_idx
from timm_local.data import read_idx

acc = load_module("_accuracy_benchmark", ROOT / "benchmarks" / "accuracy.py")


def run(method: str, depth: int | None, seed: int, final: float) -> dict:
    return {"method": method, "aux_depth": depth, "seed": seed, "final_top1": final, "best_top1": final + 0.5,
            "train_time_s": 10.0 * (seed + 1), "gmacs": 0.1, "curve_epoch": [1, 2], "curve_top1": [final - 5, final],
            "curve_train_loss": [1.0, 0.5]}


def test_labels_name_non_default_head_settings():
    run = {"method": "auglocal", "aux_depth": 4, "method_config": {"aux_depth": 4, "tau": 0.5, "head_norm": "always"}}
    assert acc.label(run) == "auglocal d=4 head_norm=always"
    assert acc.label({"method": "dgl", "aux_depth": None, "method_config": {}}) == "dgl"
    assert acc.label({"method": "auglocal", "aux_depth": 2}) == "auglocal d=2"  # accuracy runs carry no config


def test_subset_is_stratified_and_keeps_the_test_set(tmp_path):
    x, y = write_mnist_idx(tmp_path / "src", n_train=60, n_test=12, size=8)
    out = Path(acc.make_subset("fashion_mnist", str(tmp_path / "src"), 30, 0, tmp_path / "subset"))
    images = read_idx(out / "train-images-idx3-ubyte.gz")
    labels = read_idx(out / "train-labels-idx1-ubyte.gz")
    assert images.shape == (30, 8, 8)
    assert np.bincount(labels, minlength=10).tolist() == [3] * 10
    # every kept image is an original training image with its own label
    originals = {img.tobytes(): lab for img, lab in zip(x, y)}
    assert all(originals[img.tobytes()] == lab for img, lab in zip(images, labels))
    assert read_idx(out / "t10k-labels-idx1-ubyte.gz").shape == (12,)


def test_subset_names_the_fix_when_data_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist, or pass --data-dir"):
        acc.make_subset("fashion_mnist", str(tmp_path / "nothing"), 30, 0, tmp_path / "subset")


def test_seed_statistics_and_ordering_checks_are_paired_by_seed():
    runs = [run("bp", None, 0, 90.0), run("bp", None, 1, 88.0),
            run("auglocal", 2, 0, 86.0), run("auglocal", 2, 1, 87.0),
            run("auglocal", 4, 0, 87.0), run("auglocal", 4, 1, 86.5),
            run("dgl", None, 0, 80.0), run("dgl", None, 1, 82.0),
            run("infopro", None, 0, 81.5)]
    groups = acc.group_runs(runs)
    assert groups["bp"]["mean"] == pytest.approx(89.0) and groups["bp"]["std"] == pytest.approx(1.0)
    assert groups["auglocal d=4"]["finals"] == [87.0, 86.5]
    assert groups["infopro"]["seeds"] == [0]
    checks = {c["claim"]: c for c in acc.ordering_checks(groups)}
    # goal: BP - d4 <= (BP - DGL)/3. Means: 2.25 <= 2.67 holds; seed 0: 3 <= 3.33 holds; seed 1: 1.5 <= 2 holds
    goal = checks["goal: BP - auglocal d=4 <= (BP - DGL) / 3"]
    assert (goal["on_means"], goal["seeds_holding"], goal["seeds"]) == (True, 2, 2)
    # deeper is better holds on the means (86.75 > 86.5) but only in seed 0
    deeper = checks["auglocal d=4 > auglocal d=2 (deeper is better)"]
    assert (deeper["on_means"], deeper["seeds_holding"], deeper["seeds"]) == (True, 1, 2)
    # infopro ran for seed 0 only: judged on that seed alone
    info = checks["infopro > dgl"]
    assert (info["on_means"], info["seeds_holding"], info["seeds"]) == (True, 1, 1)
    assert "dgl > predsim" not in checks  # no predsim runs: no claim about it
    text = acc.render_markdown({"dataset": "d", "model": "m", "epochs": 2, "train_subset": 30, "batch_size": 8,
                                "lr": 0.1, "warmup_epochs": 0, "machine": "x"}, groups, list(checks.values()), 1)
    assert "| bp | 89.00 ± 1.00 | 90.00 / 88.00 |" in text
    assert "| auglocal d=4 > auglocal d=2 (deeper is better) | yes | 1 of 2 |" in text


def test_tiny_real_run_writes_table_json_and_plot(tmp_path, monkeypatch):
    write_mnist_idx(tmp_path / "data", n_train=40, n_test=10, size=8)
    results = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", [
        "accuracy.py", "--data-dir", str(tmp_path / "data"), "--model", "resnet20_cifar",
        "--methods", "bp", "auglocal:2", "--epochs", "1", "--train-subset", "20", "--batch-size", "10",
        "--image-size", "8", "--seeds", "0", "--jobs", "1", "--runs-dir", str(tmp_path / "runs"),
        "--results-dir", str(results)])
    acc.main()
    saved = json.loads((results / "accuracy_fashion_mnist.json").read_text())
    assert [(r["method"], r["aux_depth"]) for r in saved["runs"]] == [("bp", None), ("auglocal", 2)]
    for r in saved["runs"]:
        assert 0.0 <= r["final_top1"] <= 100.0 and r["curve_epoch"] == [1] and len(r["curve_train_loss"]) == 1
        metrics = Path(r["run_dir"]) / "metrics.jsonl"
        evals = [json.loads(line) for line in metrics.read_text().splitlines() if '"eval"' in line]
        assert evals[-1]["top1"] == r["final_top1"] and evals[-1]["samples"] == 10
    assert saved["runs"][1]["gmacs"] > saved["runs"][0]["gmacs"]  # AugLocal adds its auxiliary network
    assert saved["meta"]["train_subset"] == 20
    assert "| auglocal d=2 |" in (results / "accuracy_fashion_mnist.md").read_text()
    assert (results / "accuracy_fashion_mnist.png").read_bytes()[:4] == b"\x89PNG"


def test_local_module_specs_name_runs_labels_and_papers_claims():
    assert acc.parse_spec("man@4") == ("man", None, 4)
    assert acc.parse_spec("auglocal:2@4") == ("auglocal", 2, 4)
    assert acc.parse_spec("hpff") == ("hpff", None, None)
    assert acc.run_name("resnet32_cifar", "auglocal:2@4", 1) == "resnet32_cifar-auglocal-d2-k4-s1"
    runs = [dict(run("infopro", None, s, 75.0 + s), local_modules=4) for s in (0, 1)]
    runs += [dict(run("man", None, s, 76.0 - 2 * s), local_modules=4) for s in (0, 1)]
    runs += [run("hpff", None, 0, 70.0), run("infopro", None, 0, 71.0)]
    runs += [run("auglocal", 2, 0, 80.0), dict(run("auglocal", 2, 0, 82.0), local_modules=4)]
    groups = acc.group_runs(runs)
    assert list(groups) == ["infopro K=4", "man K=4", "hpff", "infopro", "auglocal d=2", "auglocal d=2 K=4"]
    checks = {c["claim"]: c for c in acc.ordering_checks(groups)}
    assert not any("K=4 (deeper" in claim or "K=4 > auglocal" in claim for claim in checks)  # depth claims at K = N
    man = checks["man K=4 > infopro K=4 (same K)"]  # seed 0: 76 > 75 holds; seed 1: 74 > 76 fails
    assert (man["on_means"], man["seeds_holding"], man["seeds"]) == (False, 1, 2)
    assert checks["hpff > infopro (same K)"]["on_means"] is False


def accuracy_args(monkeypatch, tmp_path, *flags: str):
    monkeypatch.setattr(sys, "argv", ["accuracy.py", "--dataset", "d", "--results-dir", str(tmp_path), *flags])
    return acc.parse_args()


def test_keep_saved_drops_only_the_runs_being_rerun(tmp_path, monkeypatch):
    saved = [dict(run("infopro", None, 0, 75.0), local_modules=4), run("infopro", None, 0, 74.0),
             run("bp", None, 1, 80.0)]
    args = accuracy_args(monkeypatch, tmp_path)
    (tmp_path / "accuracy_d.json").write_text(json.dumps({"meta": acc.recipe_of(args), "runs": saved}))
    kept = acc.saved_runs_not_rerun(args, [("infopro@4", 0), ("bp", 0)])
    assert [(r["method"], r.get("local_modules"), r["seed"]) for r in kept] == [("infopro", None, 0), ("bp", None, 1)]


def test_keep_saved_refuses_rows_of_another_recipe(tmp_path, monkeypatch, capsys):
    """A table is one recipe: adding rows trained with other flags would put them under the saved header."""
    saved = {"meta": acc.recipe_of(accuracy_args(monkeypatch, tmp_path)), "runs": [run("bp", None, 0, 80.0)]}
    (tmp_path / "accuracy_d.json").write_text(json.dumps(saved))
    for flags, named in ((["--epochs", "7"], "epochs: saved 5, now 7"),
                         (["--extra", "--method-kwargs", "momentum=0.99"],
                          "extra_flags: saved [], now ['--method-kwargs', 'momentum=0.99']")):
        with pytest.raises(SystemExit) as stop:
            acc.saved_runs_not_rerun(accuracy_args(monkeypatch, tmp_path, *flags), [("man@4", 0)])
        assert named in str(stop.value) and "--results-dir" in str(stop.value)
    del saved["meta"]["extra_flags"]  # a table written before the extra flags were recorded had none
    (tmp_path / "accuracy_d.json").write_text(json.dumps(saved))
    assert len(acc.saved_runs_not_rerun(accuracy_args(monkeypatch, tmp_path), [("man@4", 0)])) == 1
