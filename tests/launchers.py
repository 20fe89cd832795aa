"""Launch tools/train.py the ways a user does: in this process, or as several processes under torchrun."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from timm_local.engine.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "tools" / "train.py"


def subprocess_env(**extra: str) -> dict[str, str]:
    """This checkout first on the path, one intra-op thread, quiet warnings."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               **extra)
    return env


def torchrun(nproc: int, args: Sequence[object], timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC tools/train.py ARGS`` on a free local port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(TRAIN), *map(str, args)]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
