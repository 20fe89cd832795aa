#!/usr/bin/env bash
# The CUDA side of docs/memory.md on one GPU, < 8 minutes: allocated vs reserved, the caching allocator's
# default vs expandable segments (tools/train.py's default), channels-last with bf16 autocast.
#
#   bash benchmarks/gpu_memory.sh                      # writes benchmarks/results/real_memory_resnet110_cifar_cuda.{md,json}
#   OUT_DIR=/somewhere bash benchmarks/gpu_memory.sh   # elsewhere (e.g. a folder that is copied back)
#   bash benchmarks/gpu_memory.sh --batch-size 256     # extra arguments go to real_memory.py
#
# ResNet-110 at the paper's batch 1024; BP, checkpointing, DGL, AugLocal d=2 and d=6; one fresh process per
# case (about 10-20 s each: start-up, one warm-up and 3 timed SGD steps), one round; hard stop at 7.5 min.
# Uses .venv/bin/python when present (else $PYTHON, else python3).
set -euo pipefail
source "$(dirname "$0")/gpu_preamble.sh"   # PY, PYTHONPATH, OUT_DIR; stops without CUDA

timeout --signal=INT 450 "$PY" benchmarks/real_memory.py --device cuda \
  --model resnet110_cifar --batch-size 1024 --threads 0 --rounds 1 --steps 3 \
  --methods bp,checkpoint,dgl,auglocal:2,auglocal:6 --out-dir "$OUT_DIR" "$@"
