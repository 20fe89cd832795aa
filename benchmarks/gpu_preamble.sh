# Sourced by the GPU benchmark scripts (bash benchmarks/gpu_*.sh): the interpreter, the import path and
# the results folder they share, and a clear stop on a machine without CUDA.
#
# Sets PY (.venv/bin/python when present, else $PYTHON, else python3), exports PYTHONPATH with the
# repository root, sets OUT_DIR (default benchmarks/results), prints the GPU, or exits naming the script.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT_DIR:-benchmarks/results}"

GPU_SCRIPT="$(basename "$0")" "$PY" - <<'PY'
import os, sys, torch
if not torch.cuda.is_available():
    sys.exit(f"{os.environ['GPU_SCRIPT']}: torch {torch.__version__} sees no CUDA device; run it on a GPU machine")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
