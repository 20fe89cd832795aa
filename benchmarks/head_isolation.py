#!/usr/bin/env python
"""One local stage alone: the stem of ResNet-32 trained only through one auxiliary head, head variants side by side.

In local learning the stem (block 0) learns only from its own head G_0, and every later block
builds on what it learned. Training "stem + G_0" alone, for the heads AugLocal builds at several
depths and for controlled variants of them, separates the head's architecture from everything
else in the network -- the question issue 8 asks when AugLocal d=4 came out below d=2 and d=6.

    python benchmarks/head_isolation.py                      # Fashion-MNIST, ~15 min on 2 CPU cores
    python benchmarks/head_isolation.py --epochs 1 --seeds 0 --variants d4_paper d4_bn1d

Same data as benchmarks/accuracy.py (its stratified 5,000-image subset, full 10k test set, the
training augmentation of tools/train.py); SGD Nesterov 0.9, wd 1e-4, lr 0.05, batch 64, cosine with
a 0.5-epoch linear warm-up. Writes benchmarks/results/head_isolation_<dataset>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from accuracy import make_subset  # a sibling script: the same stratified subset as the accuracy table

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    """G_0 copies ``selection`` at ``strides``; ``norm``: BatchNorm1d before the classifier (None = paper rule)."""

    description: str
    selection: tuple[int, ...]
    strides: tuple[int, ...]
    norm: bool | None = None


# Block indices of ResNet-32 (stem 0; 1-5 at 32 px/16 ch; 6-10 at 16 px/32 ch; 11-15 at 8 px/64 ch).
# The *_paper variants are exactly AugLocal's G_0 at that depth (checked in tests/benchmarks/test_head_isolation.py).
VARIANTS = {
    "d2_paper": Variant("d=2 as specified: 1 block (copy of 15), BN1d", (15,), (2,)),
    "d4_paper": Variant("d=4 as specified: copies of 5, 10, 15; last block is a projection block", (5, 10, 15), (1, 2, 2)),
    "d4_bn1d": Variant("d=4 + BN1d before the classifier", (5, 10, 15), (1, 2, 2), True),
    "d6_paper": Variant("d=6 as specified: copies of 3, 6, 9, 12, 15; last block identity", (3, 6, 9, 12, 15),
                        (1, 2, 1, 2, 1)),
    "d6_bn1d": Variant("d=6 + BN1d", (3, 6, 9, 12, 15), (1, 2, 1, 2, 1), True),
    "3blk_identity_end": Variant("3 blocks (copies of 6, 11, 15), last block identity, no BN1d", (6, 11, 15), (2, 2, 1)),
    "3blk_projection_end": Variant("3 blocks (copies of 5, 10, 15) downsampling early, last block a stride-1 "
                                   "projection (32->64), no BN1d", (5, 10, 15), (2, 2, 1)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--runs-dir", default="runs/accuracy")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def build_stage0(variant: Variant, num_classes: int, image_size: int) -> tuple[nn.Module, nn.Module]:
    """A fresh ResNet-32 stem and the variant's head, built by AugLocal's own head builder."""
    import timm_local
    from timm_local.methods.auglocal import AuxPlan, build_auglocal_head

    lm = timm_local.create_local_model("resnet32_cifar", "bp", num_classes=num_classes,
                                       input_size=(3, image_size, image_size))
    plan = AuxPlan(0, len(variant.selection), variant.selection, variant.strides)
    rule = {None: "paper", True: "always", False: "never"}[variant.norm]
    return lm.partition.blocks[0], build_auglocal_head(lm.partition, plan, num_classes, head_norm=rule)


def train_and_test(variant: Variant, seed: int, args: argparse.Namespace, data_dir: str | None) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from timm_local.data import create_datasets

    torch.manual_seed(seed)
    train_set, test_set, data = create_datasets(args.dataset, data_dir, image_size=args.image_size, seed=seed)
    stem, head = build_stage0(variant, data.num_classes, args.image_size)
    params = list(stem.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=generator)
    total, warmup = args.epochs * len(loader), max(1, round(args.warmup_epochs * len(loader)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup
                                              else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    losses, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        train_set.set_epoch(epoch)
        stem.train(), head.train()
        epoch_loss = []
        for x, y in loader:
            loss = F.cross_entropy(head(stem(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_loss.append(loss.item())
        losses.append(float(np.mean(epoch_loss)))
    stem.eval(), head.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test_set, batch_size=500):
            correct += int((head(stem(x)).argmax(1) == y).sum())
    return {"seed": seed, "test_top1": 100.0 * correct / len(test_set), "train_loss_per_epoch": losses,
            "head_blocks": len(head.layers), "bn1d": isinstance(head.norm, nn.BatchNorm1d),
            "train_time_s": time.perf_counter() - start}


def render(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [f"# One local stage alone: ResNet-32 stem + auxiliary head G_0 on {args.dataset}", "",
             f"Stem trained only through the head, {args.epochs} epochs on the {args.train_subset}-image stratified "
             f"subset, full test set; SGD Nesterov, lr {args.lr}, batch {args.batch_size}, cosine, "
             f"{args.warmup_epochs}-epoch warm-up; seeds {args.seeds}. Produced by `benchmarks/head_isolation.py` "
             f"on {platform.machine()}, python {platform.python_version()}.", "",
             "| variant | head | BN1d | test top-1 % (mean) | per seed | last-epoch train loss |", "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        v = VARIANTS[name]
        accs = [r["test_top1"] for r in runs]
        lines.append(f"| {name} | {v.description} | {'yes' if runs[0]['bn1d'] else 'no'} | {np.mean(accs):.2f} | "
                     f"{' / '.join(f'{a:.2f}' for a in accs)} | "
                     f"{np.mean([r['train_loss_per_epoch'][-1] for r in runs]):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import timm_local  # noqa: F401  (our architectures in timm's registry)

    args = parse_args(argv)
    data_dir = args.data_dir
    if args.train_subset:
        data_dir = make_subset(args.dataset, args.data_dir, args.train_subset, 0,
                               Path(args.runs_dir) / args.dataset / f"subset-{args.train_subset}")
    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.variants:
        for seed in args.seeds:
            r = train_and_test(VARIANTS[name], seed, args, data_dir)
            print(f"{name} seed {seed}: {r['test_top1']:.2f} % ({r['train_time_s']:.0f} s)", flush=True)
            results.setdefault(name, []).append(r)
    stem = Path(args.results_dir) / f"head_isolation_{args.dataset}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(
        {"meta": {k: v for k, v in vars(args).items() if not k.endswith("_dir")},  # no machine paths in results
         "variants": {k: VARIANTS[k].__dict__ for k in results},
         "results": results}, indent=2, default=list))
    text = render(results, args)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
