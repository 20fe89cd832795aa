"""Which W x R layout for G GPUs: the balanced cut's predicted speed-up at each W, and A.1's prediction over BP.

For a training recipe (default: the paper's ImageNet ResNet-34 with AugLocal d=3, tau=0.5, 224 px, global
batch 1024, ``configs/imagenet/resnet34/auglocal_d3.yaml``), every local stage's training-forward MACs are counted
(:func:`timm_local.engine.local_stage_costs` with ``"macs"``: deterministic, the same on any device), cut
into W segments with :func:`timm_local.engine.balanced_cut` -- what ``--engine pipeline --pipeline-cost
macs`` does -- and reported per W:

* ``speedup`` = total / slowest segment (communication free), ``efficiency`` = speedup / W: what a GPU of
  a W-segment pipeline delivers against one running the sequential engine (data parallelism: 1.0);
* ``vs_bp_macs`` = (AugLocal MACs / BP MACs) / speedup: one pipelined replica's step time over BP's on
  one GPU, from MACs; ``a1`` = L(d+1) / (W(L+1)), the paper's A.1 unit-cost estimate of the same ratio
  (every layer costs one unit, a local step d+1, BP L+1), ideal (d+1)/(L+1) at W = L;
* ``speedup_cap`` = total / heaviest stage: no W pipelines faster (a stage is never split);
* for G GPUs (``--gpus``): R = G / W replicas, the per-GPU batch B / R, and G x efficiency, the throughput
  in sequential-engine GPUs.

    python benchmarks/pipeline_layout.py                     # ResNet-34 (ImageNet), AugLocal d=3
    python benchmarks/pipeline_layout.py --config configs/imagenet/resnet101/auglocal_d3.yaml

Results: ``benchmarks/results/pipeline_layout_<model>_d<d>.{md,json}``. MACs only: no timing, so the
numbers do not depend on the machine (a time-balanced cut on a real GPU can differ, docs/pipeline.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import timm_local
from results_io import write_results
from timm_local.config import config_from_dict, load_yaml
from timm_local.data import get_recipe
from timm_local.engine import balanced_cut, local_stage_costs, segment_ranges
from timm_local.training.builders import method_kwargs

RESULTS = Path(__file__).resolve().parent / "results"


def layout_rows(stage_macs: list[float], bp_macs: float, blocks: int, aux_depth: int,
                segments: list[int]) -> list[dict[str, Any]]:
    """Per W: the balanced cut, its predicted speed-up and efficiency, and the two predictions over BP."""
    total = sum(stage_macs)
    rows = []
    for w in segments:
        starts = balanced_cut(stage_macs, w)
        slowest = max(sum(stage_macs[i] for i in r) for r in segment_ranges(starts, len(stage_macs)))
        speedup = total / slowest
        rows.append({"segments": w, "cut": starts, "speedup": speedup, "efficiency": speedup / w,
                     "vs_bp_macs": total / bp_macs / speedup,
                     "a1": blocks * (aux_depth + 1) / (w * (blocks + 1))})
    return rows


def gpu_rows(rows: list[dict[str, Any]], gpus: list[int], batch_size: int) -> list[dict[str, Any]]:
    """For each G and each W dividing it: R, the per-GPU batch and the throughput in sequential-engine GPUs."""
    out = []
    for g in gpus:
        for row in rows:
            w = row["segments"]
            if g % w or batch_size % (g // w):
                continue
            out.append({"gpus": g, "segments": w, "replicas": g // w, "per_gpu_batch": batch_size // (g // w),
                        "throughput_gpus": g * row["efficiency"]})
    return out


def markdown(result: dict[str, Any]) -> str:
    r = result
    lines = [f"# Pipeline layout: {r['model']} {r['method']} d={r['aux_depth']} tau={r['tau']}, "
             f"{r['image_size']} px, {r['num_classes']} classes, global batch {r['batch_size']} "
             f"(`{r['config']}`)", "",
             f"L = {r['local_blocks']} local blocks, {r['local_stages']} local stages; training-forward MACs per "
             f"sample: AugLocal {r['auglocal_gmacs']:.2f} G, BP {r['bp_gmacs']:.2f} G "
             f"(sequential AugLocal / BP = {r['auglocal_gmacs'] / r['bp_gmacs']:.2f}). "
             f"A.1 ideal (W = L): (d+1)/(L+1) = {r['a1_ideal']:.3f}. No W can beat total / heaviest stage = "
             f"{r['speedup_cap']:.2f}x (stage {r['heaviest_stage']}). Measured by counting MACs "
             f"(`{r['command']}`), no timing.", "",
             "| W | balanced cut (segment starts) | predicted speed-up | efficiency | time / BP (MACs) "
             "| A.1: L(d+1)/(W(L+1)) |",
             "|---|---|---|---|---|---|"]
    for row in r["layouts"]:
        lines.append(f"| {row['segments']} | `{row['cut']}` | {row['speedup']:.2f}x | {row['efficiency']:.2f} | "
                     f"{row['vs_bp_macs']:.2f} | {row['a1']:.2f} |")
    lines += ["", "| GPUs | W x R | per-GPU batch | throughput (sequential-engine GPUs) |", "|---|---|---|---|"]
    for row in r["gpus"]:
        lines.append(f"| {row['gpus']} | {row['segments']} x {row['replicas']} | {row['per_gpu_batch']} | "
                     f"{row['throughput_gpus']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/imagenet/resnet34/auglocal_d3.yaml",
                        help="the training recipe (model, method, d, tau, dataset, image size, global batch)")
    parser.add_argument("--segments", type=int, nargs="+", default=[1, 2, 4, 8], help="W values")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64], help="G values")
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/pipeline_layout_...)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # MAC counting only; no OpenMP contention on a shared machine
    config = Path(args.config)
    cfg = config_from_dict(load_yaml(config if config.is_file() else RESULTS.parents[1] / config))
    recipe = get_recipe(cfg.dataset)
    size = (cfg.in_chans, cfg.image_size or recipe.image_size, cfg.image_size or recipe.image_size)
    num_classes = cfg.num_classes or recipe.num_classes
    lm = timm_local.create_local_model(cfg.model, cfg.method, num_classes=num_classes, input_size=size,
                                       **method_kwargs(cfg))
    bp = timm_local.create_local_model(cfg.model, "bp", num_classes=num_classes, input_size=size)
    stage_macs = local_stage_costs(lm, size, "macs")
    bp_macs = sum(local_stage_costs(bp, size, "macs"))
    blocks, d = len(lm.partition), int(lm.method_config.get("aux_depth", 1))
    rows = layout_rows(stage_macs, bp_macs, blocks, d, [w for w in args.segments if w <= len(lm.stages)])
    result = {
        "config": args.config, "model": cfg.model, "method": lm.method_name, "aux_depth": d,
        "tau": lm.method_config.get("tau"), "image_size": size[-1], "num_classes": num_classes,
        "batch_size": cfg.batch_size, "local_blocks": blocks, "local_stages": len(lm.stages),
        "stage_macs": stage_macs, "auglocal_gmacs": sum(stage_macs) / 1e9, "bp_gmacs": bp_macs / 1e9,
        "a1_ideal": (d + 1) / (blocks + 1), "layouts": rows,
        "speedup_cap": sum(stage_macs) / max(stage_macs), "heaviest_stage": stage_macs.index(max(stage_macs)),
        "gpus": gpu_rows(rows, args.gpus, cfg.batch_size),
        "command": " ".join(["python benchmarks/pipeline_layout.py", *(argv or [])]),
        "torch": torch.__version__,
    }
    write_results(Path(args.out) if args.out else RESULTS / f"pipeline_layout_{cfg.model}_d{d}", result,
                  markdown(result))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
