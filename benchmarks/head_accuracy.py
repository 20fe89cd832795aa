#!/usr/bin/env python
"""How well does each block's auxiliary head classify? Test accuracy per layer, from finished runs.

A local rule trains block ℓ only through its head G_ℓ, so the head's test accuracy says how much
class information the local objective has put into layer ℓ; the paper's argument for AugLocal is
that deeper, network-like heads make early layers more like BP's (docs/spec.md §1). Plotting it
per layer for several rules shows where a rule loses accuracy, which the final accuracy alone
cannot (issue 8's "is a head wrong?" question).

    python benchmarks/head_accuracy.py runs/accuracy/fashion_mnist/*-s[0-9]    # any runs of tools/train.py

Writes benchmarks/results/head_accuracy_<dataset>.{md,json,png}; the same test images for every run
(the first --test-samples of the run's test set).
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np

from accuracy import group_by_label  # a sibling script: one labelling for both reports

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders of tools/train.py (with config.yaml and checkpoints/)")
    p.add_argument("--test-samples", type=int, default=2000, help="first N test images (0 = all)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def head_blocks(lm: Any) -> list[int]:
    """The primary block whose output each head reads (the last block of its stage)."""
    return [stage.blocks[-1] for stage in lm.stages if stage.head is not None]


def measure_run(run_dir: Path, test_samples: int, batch_size: int, accelerator: Any) -> dict[str, Any]:
    from torch.utils.data import DataLoader, Subset

    from timm_local.training import evaluate, load_local_model, run_datasets

    lm, run = load_local_model(run_dir)
    cfg = run.cfg
    _, test_set, _ = run_datasets(cfg)
    if test_samples:
        test_set = Subset(test_set, range(min(test_samples, len(test_set))))
    loader = accelerator.prepare(DataLoader(test_set, batch_size=batch_size, shuffle=False))
    result = evaluate(lm.to(accelerator.device), loader, accelerator, heads=True)
    method_config = run.meta.get("method_config", {})
    return {"run_dir": str(run_dir), "method": run.meta["method"], "method_config": method_config,
            "aux_depth": method_config.get("aux_depth"), "seed": cfg.seed,
            "dataset": cfg.dataset, "model": cfg.model, "samples": result["samples"],
            "backbone_top1": result["top1"], "head_blocks": head_blocks(lm),
            "head_top1": result.get("head_top1", []), "num_blocks": len(lm.partition)}


def mean_over_seeds(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: the per-layer head accuracy averaged over its seeds (runs of one method share layers)."""
    out = {}
    for name, rs in group_by_label(results).items():
        if any(r["head_blocks"] != rs[0]["head_blocks"] for r in rs):
            raise ValueError(f"runs of {name} have different heads: {[r['run_dir'] for r in rs]}")
        out[name] = {"blocks": rs[0]["head_blocks"], "seeds": [r["seed"] for r in rs],
                     "head_top1": np.mean([r["head_top1"] for r in rs], axis=0).tolist() if rs[0]["head_top1"] else [],
                     "backbone_top1": float(np.mean([r["backbone_top1"] for r in rs]))}
    return out


def render(groups: dict[str, dict[str, Any]], results: list[dict[str, Any]]) -> str:
    first = results[0]
    num_blocks = max(r["num_blocks"] for r in results)
    columns = list(range(num_blocks - 1))
    lines = [f"# Auxiliary-head test accuracy per layer: {first['model']} on {first['dataset']}", "",
             f"Top-1 % of each block's own auxiliary head on the first {first['samples']} test images, mean over "
             f"the seeds listed; `backbone` is the whole network's top-1 on the same images. Produced by "
             f"`benchmarks/head_accuracy.py` from the runs of `benchmarks/accuracy.py`; machine: "
             f"{platform.machine()}, python {platform.python_version()}. Blocks without a head (the last "
             "ones, trained by the network's own loss) are blank.", "",
             "| method | seeds | backbone | " + " | ".join(f"b{b}" for b in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for name, g in groups.items():
        by_block = dict(zip(g["blocks"], g["head_top1"]))
        cells = [f"{by_block[b]:.1f}" if b in by_block else "" for b in columns]
        lines.append(f"| {name} | {len(g['seeds'])} | {g['backbone_top1']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(groups: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, g in groups.items():
        if not g["head_top1"]:
            ax.axhline(g["backbone_top1"], color="black", linestyle="--", linewidth=1, label=f"{name} (network)")
            continue
        ax.plot(g["blocks"], g["head_top1"], marker="o", label=name)
    ax.set(xlabel="block (local layer) index", ylabel="auxiliary head test top-1 %", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator

    import timm_local  # noqa: F401  (our architectures in timm's registry)

    args = parse_args(argv)
    accelerator = Accelerator()
    results = []
    for run_dir in map(Path, args.runs):
        r = measure_run(run_dir, args.test_samples, args.batch_size, accelerator)
        print(f"{run_dir.name}: backbone {r['backbone_top1']:.2f}, heads {[round(h, 1) for h in r['head_top1']]}",
              flush=True)
        results.append(r)
    groups = mean_over_seeds(results)
    stem = Path(args.results_dir) / f"head_accuracy_{results[0]['dataset']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"runs": results, "mean_over_seeds": groups}, indent=2))
    text = render(groups, results)
    stem.with_suffix(".md").write_text(text)
    print(text)
    plot(groups, f"{results[0]['model']} on {results[0]['dataset']}: per-layer head accuracy "
                 f"(first {results[0]['samples']} test images)", stem.with_suffix(".png"))
    print(f"wrote {stem}.md/.json/.png")


if __name__ == "__main__":
    main()
