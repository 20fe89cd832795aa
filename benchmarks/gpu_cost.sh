#!/usr/bin/env bash
# The cost table at the paper's setting (ResNet-110, 32x32, batch 1024) on one GPU, < 8 minutes.
#
#   bash benchmarks/gpu_cost.sh                      # writes benchmarks/results/cost_table_resnet110_cifar_cuda.{md,json}
#   OUT_DIR=/somewhere bash benchmarks/gpu_cost.sh   # elsewhere (e.g. a folder that is copied back)
#   bash benchmarks/gpu_cost.sh --methods bp,auglocal:3   # extra arguments go to cost_table.py
#
# Uses .venv/bin/python when present (else $PYTHON, else python3). Needs torch with CUDA, timm
# and this repository (importable as timm_local: installed, or run from the repo root).
# Budget: about 1-2 min of MAC counting and model building, 3 warm-up + 10 timed interleaved
# rounds of 10 methods (about 0.1-0.8 s per step on an H100/3090-class GPU); hard stop at 7.5 min.
set -euo pipefail
source "$(dirname "$0")/gpu_preamble.sh"   # PY, PYTHONPATH, OUT_DIR; stops without CUDA

timeout --signal=INT 450 "$PY" benchmarks/cost_table.py \
  --model resnet110_cifar --input-size 32 --batch-size 1024 \
  --device cuda --warmup 3 --steps 10 --out-dir "$OUT_DIR" "$@"
