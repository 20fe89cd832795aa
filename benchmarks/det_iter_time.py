"""Time per Mask R-CNN training iteration on CPU with the timm ResNet-34 FPN recipe.

Why: the detection experiment (paper A.7) is a COCO 1x run (90k iterations at batch 16); this
measures what one iteration costs here, so the docs can say honestly what a full run needs.

What is timed: ``configs/det/mask_rcnn_R34_FPN_1x.yaml`` as shipped (ResNet-34 + FPN P2-P6,
FrozenBN, FREEZE_AT 2, full-size RPN/box/mask heads, AdamW), one iteration = forward with losses,
backward, optimizer step, on a batch of 2 images (the per-GPU batch of the recipe: 16 over 8
GPUs) of SIZE x SIZE pixels with 3 polygon-mask instances each. Data loading is excluded
(synthetic tensors), as is evaluation. Backbone weights are random (timing does not depend on
them). Writes benchmarks/results/det_iter_time.{md,json}, one row per (input size, threads).

    python benchmarks/det_iter_time.py [--size 512] [--iters 5] [--warmup 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

import det  # installed with the project

REPO = Path(__file__).resolve().parents[1]


def synthetic_batch(size: int, n_images: int, generator: torch.Generator) -> list[dict]:
    """Images with 3 square instances each (boxes, classes, polygon masks), as the mapper makes."""
    batch = []
    for _ in range(n_images):
        inst = Instances((size, size))
        boxes, polys = [], []
        for _ in range(3):
            w = int(torch.randint(size // 8, size // 3, (1,), generator=generator))
            x, y = (int(v) for v in torch.randint(0, size - w, (2,), generator=generator))
            boxes.append([x, y, x + w, y + w])
            polys.append([[x, y, x + w, y, x + w, y + w, x, y + w]])
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.randint(0, 80, (3,), generator=generator)
        inst.gt_masks = PolygonMasks(polys)
        image = torch.randint(0, 256, (3, size, size), generator=generator).float()
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input side in pixels")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = det.add_timm_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "det" / "mask_rcnn_R34_FPN_1x.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = det.Trainer.build_model(cfg)
    model.train()
    optimizer = det.Trainer.build_optimizer(cfg, model)
    generator = torch.Generator().manual_seed(0)
    per_gpu_batch = 2

    load_before = os.getloadavg()
    times, cpu_times = [], []
    with EventStorage(0):
        for i in range(args.warmup + args.iters):
            batch = synthetic_batch(args.size, per_gpu_batch, generator)
            start, cpu_start = time.perf_counter(), time.process_time()
            losses = model(batch)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if i >= args.warmup:
                times.append(elapsed)
                cpu_times.append(cpu)
            print(f"iter {i}: {elapsed:.2f} s wall, {cpu:.2f} s CPU, loss {float(loss):.3f}", flush=True)

    model.eval()
    infer = []
    with torch.no_grad():
        for i in range(3):
            batch = [{k: v for k, v in b.items() if k != "instances"} for b in synthetic_batch(args.size, 1, generator)]
            start = time.perf_counter()
            model(batch)
            if i:
                infer.append(time.perf_counter() - start)
    load_after = os.getloadavg()

    result = {
        "what": "Mask R-CNN R34-FPN (configs/det/mask_rcnn_R34_FPN_1x.yaml) training iteration on CPU",
        "input": f"{args.size}x{args.size}",
        "images_per_iteration": per_gpu_batch,
        "train_s_per_iter_median": statistics.median(times),
        "train_s_per_iter_all": times,
        "train_cpu_s_per_iter_median": statistics.median(cpu_times),
        "inference_s_per_image_median": statistics.median(infer),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_before_after": [load_before[0], load_after[0]],
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "note": "synthetic inputs, data loading excluded; the machine was shared with other jobs "
                "when the load average exceeds the core count, which inflates the times",
    }
    write_results(result, args.out)


def write_results(result: dict, out: Path) -> None:
    """Keep one row per (input, threads) in det_iter_time.json and render them all as Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "det_iter_time.json"
    runs = json.loads(path.read_text()).get("runs", []) if path.is_file() else []
    key = (result["input"], result["torch_threads"])
    runs = [r for r in runs if (r["input"], r["torch_threads"]) != key] + [result]
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    md = [
        "# Mask R-CNN R34-FPN: time per training iteration on CPU",
        "",
        "Written by `benchmarks/det_iter_time.py`: recipe `configs/det/mask_rcnn_R34_FPN_1x.yaml` as shipped "
        "(FrozenBN, FREEZE_AT 2, full-size RPN/box/mask heads, AdamW). One iteration = forward + backward + "
        "optimizer step on 2 synthetic images (the recipe's per-GPU batch) with 3 mask instances each; "
        "data loading excluded.",
        "",
        "| input | images/iter | train s/iter, wall (median) | train CPU-s/iter | inference s/image "
        "| torch threads | CPU cores | load avg (1 min) before/after | timed iterations (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        load = r["load_average_1min_before_after"]
        md.append(
            f"| {r['input']} | {r['images_per_iteration']} | {r['train_s_per_iter_median']:.2f} | "
            f"{r['train_cpu_s_per_iter_median']:.2f} | {r['inference_s_per_image_median']:.2f} | "
            f"{r['torch_threads']} | {r['cpu_count']} | {load[0]:.1f} / {load[1]:.1f} | "
            + ", ".join(f"{t:.1f}" for t in r["train_s_per_iter_all"]) + " |"
        )
    md += [
        "",
        "A load average above the core count means other jobs shared the CPU during the measurement",
        "(wall time inflated); CPU-s/iter (process time summed over threads) is less sensitive to that.",
    ]
    (out / "det_iter_time.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
