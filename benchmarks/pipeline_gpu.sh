#!/usr/bin/env bash
# Short device check of the pipelined engine (issue 7); about 5 minutes on one H100.
#
#   bash benchmarks/pipeline_gpu.sh        # results: benchmarks/results/pipeline_speed_*.json
#
# One GPU: the W=2 pipeline processes SHARE it and gloo stages activations through host memory
# (NCCL refuses two ranks on one GPU). That is a functional + exactness run; its speed-up says
# how well two processes overlap on one GPU, not what W GPUs give.
# >= 2 GPUs: NCCL with one GPU per process (--backend nccl is chosen automatically): a real run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
"$PY" -c "import torch; print('torch', torch.__version__, 'gpus', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"

# 1. exactness on the GPU: pipelined vs sequential weights after a few steps (deterministic kernels)
"$PY" benchmarks/pipeline_speed.py --device cuda --deterministic --model resnet32_cifar --batch-size 128 \
    --steps 3 --warmup 1 --no-bp --out benchmarks/results/pipeline_speed_cuda_exact.json

# 2. speed: ResNet-110, AugLocal d=3, the paper's batch of 1024, cut by measured stage time
"$PY" benchmarks/pipeline_speed.py --device cuda --model resnet110_cifar --batch-size 1024 --steps 8 \
    --warmup 3 --cost time --threads 4 --out benchmarks/results/pipeline_speed_cuda.json

# 3. the CPU benchmark again on this (quieter, many-core) machine: 1 thread per process
"$PY" benchmarks/pipeline_speed.py --device cpu --model resnet32_cifar --repeats 2 \
    --out benchmarks/results/pipeline_speed_cpu_devicehost.json --json
