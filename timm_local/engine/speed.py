"""Speed options of a local step that leave its arithmetic alone: channels-last memory format, per-block compile.

Both are timm ``train.py``'s options (``--channels-last``, ``--torchcompile``), applied the local-learning
way:

* **channels-last** converts the backbone *and* the auxiliary heads (``LocalModel.to``); every engine
  then hands each stage its input in the memory format of the stage's first block
  (:func:`match_memory_format`), so the network input, activations received from another pipeline
  segment and the detached stage boundaries all stay channels-last without a copy per layer. The
  parameters keep their names and values; only their strides change.
* **compile** compiles each primary block and each auxiliary head on its own (``nn.Module.compile``, in
  place, so state_dict keys stay timm's). The local step itself is never compiled as a whole: its
  per-stage ``backward`` -- which frees each block's graph before the next block runs -- must stay.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

__all__ = ["compile_blocks_and_heads", "match_memory_format", "module_memory_format", "use_channels_last"]


def use_channels_last(model: nn.Module) -> nn.Module:
    """Channels-last strides for every 4-D parameter and buffer of ``model`` (backbone and heads alike)."""
    return model.to(memory_format=torch.channels_last)


def module_memory_format(module: nn.Module) -> torch.memory_format:
    """``channels_last`` when the module's 4-D weights are stored so, else ``contiguous_format``.

    The first weight whose strides tell the formats apart decides (a 1x1 kernel's do not).
    """
    for p in module.parameters():
        if p.dim() != 4:
            continue
        channels_last, contiguous = p.is_contiguous(memory_format=torch.channels_last), p.is_contiguous()
        if channels_last != contiguous:
            return torch.channels_last if channels_last else torch.contiguous_format
    return torch.contiguous_format


def match_memory_format(h: torch.Tensor, block: nn.Module) -> torch.Tensor:
    """``h`` in ``block``'s memory format where the block is channels-last (a no-op otherwise, and when it is)."""
    if h.dim() == 4 and module_memory_format(block) is torch.channels_last:
        return h.contiguous(memory_format=torch.channels_last)
    return h


def compile_blocks_and_heads(local_model: Any, backend: str = "inductor", mode: Optional[str] = None) -> int:
    """Compile, in place, each local block of ``local_model.partition`` and each auxiliary head; the number
    compiled.

    The first step after this is slow (one compilation per distinct block shape and train/eval mode).
    A deep network has more such variants of one block class than dynamo's default recompile limit (8),
    past which it would silently run the rest eagerly; the limit is raised to cover every module.
    """
    modules = [b for b in local_model.partition.blocks if isinstance(b, nn.Module)] + list(local_model.heads)
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * len(modules))  # train and eval
    for module in modules:
        module.compile(backend=backend, mode=mode)
    return len(modules)
