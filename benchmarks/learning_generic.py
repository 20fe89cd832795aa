#!/usr/bin/env python
"""Do models cut by the generic family *learn* with AugLocal? BP vs AugLocal d=3 on three new kinds.

One short real run per kind -- a ConvNeXt, a MobileNetV3 and a DeiT-style ViT (patch 4, so a 32 px
image gives an 8x8 token grid) -- on the Fashion-MNIST subset of ``benchmarks/accuracy.py`` (5 000
training images, stratified; the full 10 000 test images; 28 px resized to 32), 3 epochs, the same
recipe and seed for BP and AugLocal: AdamW (lr 1e-3, weight decay 0.05, the optimiser these
architectures are trained with in timm; SGD at this budget barely moves a ViT), cosine schedule.
Every run is a ``tools/train.py`` run made by ``accuracy.run_one``, one at a time (one thread
each; the machine has 2 shared cores).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/learning_generic.py      # ~1 h on 2 CPU cores
Writes benchmarks/results/learning_generic.{md,json}; docs/families.md shows the table.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

from accuracy import make_subset, run_one  # the same subset and the same tools/train.py runs
from results_io import write_results

ROOT = Path(__file__).resolve().parents[1]
# (label, timm model, model kwargs)
MODELS: list[tuple[str, str, dict[str, Any]]] = [
    ("ConvNeXt", "convnext_atto", {}),
    ("MobileNetV3", "mobilenetv3_small_100", {}),
    ("DeiT (patch 4)", "deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}),
]
METHODS = ("bp", "auglocal:3")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--opt", default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default="runs/learning_generic")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "learning_generic")
    return p.parse_args()


def run_args(args: argparse.Namespace, model: str, kwargs: dict[str, Any]) -> argparse.Namespace:
    """The namespace ``accuracy.run_one`` reads (one run at a time: jobs=1)."""
    extra = ["--opt", args.opt, "--weight-decay", str(args.weight_decay)]
    extra += ["--model-kwargs", json.dumps(kwargs)] if kwargs else []
    return argparse.Namespace(dataset=args.dataset, model=model, epochs=args.epochs, batch_size=args.batch_size,
                              lr=args.lr, warmup_epochs=args.warmup_epochs, image_size=32, tau=0.5,
                              runs_dir=str(Path(args.runs_dir) / model), extra=extra, jobs=1)


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Learning with the generic family: BP vs AugLocal d=3, {meta['epochs']} epochs",
        "",
        f"Fashion-MNIST, stratified {meta['train_subset']}-image training subset, full 10k test set, 32 px; "
        f"{meta['opt']}, lr {meta['lr']}, weight decay {meta['weight_decay']}, batch {meta['batch_size']}, cosine "
        f"with {meta['warmup_epochs']} warm-up epoch, seed {meta['seed']}, the same for BP and AugLocal; one run "
        f"per cell, on {meta['machine']}. Final test top-1; times are each run's training loop. "
        "Produced by `benchmarks/learning_generic.py`.",
        "",
        "| kind | model | local blocks | BP top-1 % | AugLocal d=3 top-1 % | BP s | AugLocal s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, model, _ in MODELS:
        runs = {r["method"]: r for r in rows if r["model"] == model}
        if len(runs) < 2:
            continue
        bp, aug = runs["bp"], runs["auglocal"]
        lines.append(f"| {label} | {model} | {aug.get('local_blocks', '')} | {bp['final_top1']:.2f} | "
                     f"{aug['final_top1']:.2f} | {bp['train_time_s']:.0f} | {aug['train_time_s']:.0f} |")
    return "\n".join(lines) + "\n"


def local_blocks(model: str, kwargs: dict[str, Any]) -> int:
    import timm_local

    lm = timm_local.create_local_model(model, "bp", num_classes=10, input_size=(3, 32, 32), **kwargs)
    return len(lm.partition)


def main() -> None:
    args = parse_args()
    data_dir = make_subset(args.dataset, args.data_dir, args.train_subset, 0,
                           Path(args.runs_dir) / "data" / f"{args.dataset}_{args.train_subset}")
    rows = []
    for _, model, kwargs in MODELS:
        blocks = local_blocks(model, kwargs)
        for spec in METHODS:
            run = run_args(args, model, kwargs)
            (Path(run.runs_dir) / args.dataset).mkdir(parents=True, exist_ok=True)
            row = run_one(run, spec, args.seed, data_dir)
            # the run folder relative to --runs-dir (no machine paths in the saved results)
            row["run_dir"] = Path(row["run_dir"]).relative_to(args.runs_dir).as_posix()
            row.update(model=model, model_kwargs=kwargs, local_blocks=blocks)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("model", "method", "final_top1", "train_time_s")}), flush=True)
    import timm
    import torch

    meta = {"dataset": args.dataset, "epochs": args.epochs, "train_subset": args.train_subset,
            "batch_size": args.batch_size, "opt": args.opt, "lr": args.lr, "weight_decay": args.weight_decay,
            "warmup_epochs": args.warmup_epochs, "seed": args.seed,
            "machine": "a shared 2-core CPU, one thread per run", "torch": torch.__version__,
            "timm": timm.__version__, "python": platform.python_version()}
    write_results(args.out, {"meta": meta, "results": rows}, to_markdown(rows, meta))


if __name__ == "__main__":
    main()
