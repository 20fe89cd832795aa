"""Local modules: the partition's blocks grouped into K consecutive runs, one local loss each.

Every local rule trains *local modules*. With K = N (the default) each block is its own module; with
K < N a module is a run of consecutive blocks whose head sits on its last block's output, and
gradients stop at module boundaries only. The split is, in order of precedence:

1. explicit ends (``local_module_ends``: the index of each module's last block);
2. for the ResNets InfoPro (and MAN, HPFF after it) publish split tables for, the official table of
   that K, so ``infopro`` at K = 4 on ``resnet32_cifar`` is InfoPro's own run;
3. otherwise the split minimising the most expensive module, with each block's cost its forward
   MACs: the measure and the rule (:func:`~timm_local.balance.min_max_split`) of the pipeline cut.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..balance import min_max_split
from ..macs import count_macs
from ..partition import Partition

#: Official splits: for each architecture, its number of blocks (stem included) and, per K, the
#: (stage, layer) of the last block of modules 1..K-1 (stage 0 is the stem). CIFAR ResNets: InfoPro's
#: ``Experiments on CIFAR-SVHN-STL10/networks/configs.py`` (table ``InfoPro``). ImageNet K = 2: InfoPro's
#: ``Experiments on ImageNet/networks/resnet.py`` (``k2_infopro``: the head after layer2[k]); ImageNet
#: K = 4: MAN's ``Exp on ImageNet/networks/configs.py`` (table ``Layer``, whose last entry is the
#: network's end), which HPFF's ImageNet code uses too.
_OFFICIAL_SPLITS: dict[str, tuple[int, dict[int, tuple[tuple[int, int], ...]]]] = {
    "resnet32_cifar": (16, {
        2: ((2, 1),),
        3: ((1, 4), (2, 4)),
        4: ((1, 2), (2, 1), (3, 0)),
        8: ((1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)),
        16: ((0, 0), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4),
             (3, 0), (3, 1), (3, 2), (3, 3)),
    }),
    "resnet110_cifar": (55, {
        2: ((2, 8),),
        3: ((1, 17), (2, 17)),
        4: ((1, 11), (2, 7), (3, 3)),
        8: ((1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)),
        16: ((1, 1), (1, 4), (1, 7), (1, 10), (1, 13), (1, 16), (2, 1), (2, 4), (2, 7), (2, 11), (2, 15),
             (3, 1), (3, 5), (3, 9), (3, 13)),
    }),
    "resnet34": (17, {4: ((2, 0), (3, 0), (3, 5))}),
    "resnet101": (34, {2: ((2, 0),), 4: ((3, 0), (3, 9), (3, 17))}),
    "resnet152": (51, {2: ((2, 5),), 4: ((3, 0), (3, 9), (3, 17))}),
}


def _official_module_ends(partition: Partition, num_modules: int) -> list[int] | None:
    """The official split of the partition's model into ``num_modules`` modules, if one is published.

    Looked up by the model's timm architecture name and checked against the partition (block count
    and block names ``stem`` / ``layer{stage}.{layer}``), so a variant of the same name never gets a
    table made for another depth.
    """
    cfg = getattr(partition.model, "pretrained_cfg", None) or {}
    entry = _OFFICIAL_SPLITS.get(str(cfg.get("architecture", "")))
    if entry is None or entry[0] != len(partition) or num_modules not in entry[1]:
        return None
    names = ["stem" if stage == 0 else f"layer{stage}.{layer}" for stage, layer in entry[1][num_modules]]
    if not set(names) <= set(partition.names):
        return None
    return [partition.names.index(n) for n in names] + [len(partition) - 1]


def block_macs(partition: Partition) -> list[float]:
    """Forward MACs per sample of each block at the partition's input size (eval mode: counts do not
    depend on the BatchNorm mode, and the model's running statistics stay untouched)."""
    model = partition.model
    param = next(model.parameters())
    h = torch.zeros(1, *partition.input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    costs: list[float] = []
    try:
        with torch.no_grad():
            for block in partition.blocks:
                out: list[torch.Tensor] = []
                costs.append(float(count_macs(lambda: out.append(block(h)), block)))
                h = out[0]
    finally:
        model.train(was_training)
    return costs


def _validate_module_ends(ends: Sequence[int], num_blocks: int) -> list[int]:
    """Explicit module ends as a list ending at the last block (which may be left out)."""
    ends = [int(e) for e in ends]
    if ends and ends[-1] != num_blocks - 1:
        ends.append(num_blocks - 1)
    if len(ends) < 2 or ends[0] < 0 or any(b <= a for a, b in zip(ends, ends[1:])) or ends[-1] >= num_blocks:
        raise ValueError(
            f"local_module_ends {ends} must be increasing block indices in 0..{num_blocks - 1}, the last block of "
            f"each local module (at least 2 modules); the model has {num_blocks} local blocks")
    return ends


def resolve_module_ends(
    partition: Partition, local_modules: int | None = None, local_module_ends: Sequence[int] | None = None
) -> list[int]:
    """Index of the last block of each local module (see the module docstring for the precedence)."""
    n = len(partition)
    if local_module_ends is not None:
        ends = _validate_module_ends(local_module_ends, n)
        if local_modules is not None and len(ends) != local_modules:
            raise ValueError(f"local_module_ends {ends} make {len(ends)} local modules, not local_modules="
                             f"{local_modules}; give one of the two")
        return ends
    if local_modules is None:
        return list(range(n))
    if not 2 <= local_modules <= n:
        raise ValueError(f"local_modules={local_modules} must be in 2..{n}: the model has {n} local blocks "
                         "(1 module is end-to-end training: method 'bp')")
    official = _official_module_ends(partition, local_modules)
    if official is not None:
        return official
    starts = min_max_split(block_macs(partition), local_modules)
    return [s - 1 for s in starts[1:]] + [n - 1]


class LocalModules:
    """The ``local_modules`` / ``local_module_ends`` hyper-parameters every local rule declares."""

    def _init_modules(self, local_modules: int | None, local_module_ends: Sequence[int] | None) -> None:
        if local_modules is not None and (not isinstance(local_modules, int) or isinstance(local_modules, bool)
                                          or local_modules < 2):
            raise ValueError(f"local_modules must be an integer >= 2 (the number of local modules), "
                             f"got {local_modules!r}")
        self.local_modules = local_modules
        self.local_module_ends = None if local_module_ends is None else [int(e) for e in local_module_ends]

    @property
    def modules_given(self) -> bool:
        """Whether the modules were chosen (else each block is a module, the rule's own default)."""
        return self.local_modules is not None or self.local_module_ends is not None

    def _modules_config(self) -> dict[str, Any]:
        # only when given, so checkpoints of per-block runs keep their configuration
        config: dict[str, Any] = {}
        if self.local_modules is not None:
            config["local_modules"] = self.local_modules
        if self.local_module_ends is not None:
            config["local_module_ends"] = list(self.local_module_ends)
        return config

    def module_ends(self, partition: Partition) -> list[int]:
        return resolve_module_ends(partition, self.local_modules, self.local_module_ends)
