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
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT_DIR:-benchmarks/results}"

"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_cost.sh: torch {torch.__version__} sees no CUDA device; run it on a GPU machine")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

timeout --signal=INT 450 "$PY" benchmarks/cost_table.py \
  --model resnet110_cifar --input-size 32 --batch-size 1024 \
  --device cuda --warmup 3 --steps 10 --out-dir "$OUT_DIR" "$@"
