"""Starting weights and modern recipes under local learning, measured on scikit-learn's digits (CPU, minutes).

Two comparisons, each run as a user runs it (``tools/train.py``, one fresh process per run):

* **fine-tuning**: resnet20_cifar trained end to end (BP) for a few epochs and exported; then AugLocal d=3
  from that export (``--initial-checkpoint``) versus AugLocal d=3 from scratch, for the same short schedule.
  The export was trained on the same data, so this measures how much of a BP-trained backbone a local
  rule keeps and builds on, not a transfer between tasks.
* **recipe**: DeiT-tiny with 4x4 patches (digits' native 8x8 pixels: 2x2 patches), BP and AugLocal d=3, AdamW + warm-up cosine either alone or with
  the modern recipe (label smoothing 0.1, mixup 0.8 + cutmix 1.0, random erasing 0.25, drop-path 0.1, EMA).

Writes ``benchmarks/results/timm_recipes_<part>.{md,json,png}``::

    python benchmarks/timm_recipes.py --part finetune
    python benchmarks/timm_recipes.py --part deit --deit-depth 4    # DeiT-tiny's width, 4 of its 12 blocks
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from results_io import write_results
from timm_local.cost import describe_machine
from timm_local.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DIGITS = ["--dataset", "digits", "--image-size", "8", "--workers", "0", "--trackers", "none", "--seed", "0",
          "--log-every", "50", "--no-eval-heads", "--keep-checkpoints", "1"]
CNN = ["--model", "resnet20_cifar", "--batch-size", "64", "--lr", "0.05", "--warmup-epochs", "0"]
DEIT = ["--model", "deit_tiny_patch16_224", "--batch-size", "64",
        "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05", "--filter-bias-and-bn", "--warmup-epochs", "0.5",
        "--warmup-lr", "1e-5", "--min-lr", "1e-5"]
RECIPE = ["--smoothing", "0.1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--drop-path", "0.1",
          "--model-ema", "--model-ema-decay", "0.99"]
AUGLOCAL = ["--method", "auglocal", "--aux-depth", "3", "--tau", "0.5"]


def run(name: str, args: list[str], out: Path, threads: int) -> dict[str, Any]:
    """One ``tools/train.py`` run in its own process: its eval rows, wall time and best result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), *DIGITS, *args, "--output-dir", str(out)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed: {proc.stderr[-2000:]}")
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    row = {"name": name, "wall_s": round(wall, 1), "top1_per_epoch": [round(r["top1"], 2) for r in evals],
           "final_top1": round(evals[-1]["top1"], 2), "best_top1": round(max(r["top1"] for r in evals), 2)}
    if "ema_top1" in evals[-1]:
        row["final_ema_top1"] = round(evals[-1]["ema_top1"], 2)
    print(f"{name}: {row}", flush=True)
    return row


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["# Starting weights and modern recipes under local learning (digits, 8x8)", "",
             f"Measured with `{result['command']}` on a {m['cpu_count']}-core {m['cpu']} CPU (no GPU; load average "
             f"{m['load_average_1_5_15'][0]} at the end, the machine shared with other work), "
             f"{result['threads']} thread(s) per run.",
             "", "| run | top-1 per epoch (%) | final top-1 (%) | final EMA top-1 (%) | wall (s) |",
             "|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['name']} | {', '.join(map(str, r['top1_per_epoch']))} | {r['final_top1']} | "
                     f"{r.get('final_ema_top1', '')} | {r['wall_s']} |")
    lines += ["", "The fine-tuning source is a BP run on the same data (see the script's docstring): its rows say "
              "how much a local rule keeps of a BP-trained backbone, not how it transfers between tasks. The "
              "recipe's regularisation (smoothing, mixup/cutmix, erasing, drop-path) is meant for hundreds of "
              "epochs; a run of a few epochs shows what it costs early, not what it gains at the end. One seed "
              "each: differences of a point or two are within run-to-run noise.", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in result["runs"]:
        ax.plot(range(1, len(r["top1_per_epoch"]) + 1), r["top1_per_epoch"], marker="o", label=r["name"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def finetune_runs(args: argparse.Namespace, t: Path) -> list[dict[str, Any]]:
    runs = [run("fine-tuning source: BP", [*CNN, "--method", "bp", "--epochs", str(args.source_epochs)],
                t / "source", args.threads)]
    short = [*CNN, *AUGLOCAL, "--epochs", str(args.epochs)]
    runs.append(run("fine-tuning: AugLocal d=3 from the BP export",
                    [*short, "--initial-checkpoint", str(t / "source" / "export")], t / "ft", args.threads))
    runs.append(run("fine-tuning: AugLocal d=3 from scratch", short, t / "scratch", args.threads))
    return runs


def deit_runs(args: argparse.Namespace, t: Path) -> list[dict[str, Any]]:
    deit = [*DEIT, "--model-kwargs", "patch_size=4", "img_size=8", f"depth={args.deit_depth}",
            "--epochs", str(args.deit_epochs)]
    name = f"DeiT-tiny/4{'' if args.deit_depth == 12 else f' ({args.deit_depth} blocks)'}"
    runs = []
    for method, flags in (("BP", ["--method", "bp"]), ("AugLocal d=3", AUGLOCAL)):
        runs.append(run(f"{name} {method}, AdamW + cosine", [*deit, *flags], t / f"{method}-plain", args.threads))
        runs.append(run(f"{name} {method}, + recipe", [*deit, *flags, *RECIPE], t / f"{method}-recipe",
                        args.threads))
    return runs


PARTS = {"finetune": finetune_runs, "deit": deit_runs}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), required=True,
                        help="which comparison (each stays within a few minutes on 2 cores)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the fine-tuning comparison")
    parser.add_argument("--source-epochs", type=int, default=2, help="epochs of the BP source run")
    parser.add_argument("--deit-epochs", type=int, default=2, help="epochs of the DeiT runs")
    parser.add_argument("--deit-depth", type=int, default=12, help="transformer blocks (DeiT-tiny has 12)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = PARTS[args.part](args, Path(tmp))
    result = {"command": " ".join(["python benchmarks/timm_recipes.py", *(argv or sys.argv[1:])]),
              "machine": describe_machine(), "threads": args.threads, "runs": runs}
    stem = RESULTS / f"timm_recipes_{args.part}"
    write_results(stem, result, markdown(result))
    plot(result, stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
