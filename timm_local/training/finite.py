"""Nothing non-finite is ever stepped or saved: the checks around each optimizer step and each checkpoint.

A finite loss does not mean a finite step: with an exploding learning rate the gradients overflow, or
BatchNorm's running statistics do, while every loss still reads finite (a checkpoint written then holds the
poison and every resume from it fails again). So before each ``optimizer.step()`` the gradients, the
buffers the forward just updated and the parameters are checked -- one fused reduction
(``torch.nn.utils.get_total_norm`` with the max-norm, which never overflows) -- and before each
checkpoint the whole state including the optimizer's. A failing step restores the buffers of the previous
step, so the weights in memory are those of the last good step; the error names the newest checkpoint
verified finite and the flag to change.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from .checkpoint import CheckpointError, checkpoint_folders, checkpoint_step, verify_checkpoint

__all__ = ["FINITE_KEY", "FiniteGuard", "NonFiniteLossError", "all_finite", "good_checkpoint", "inputs_not_finite",
           "last_finite_checkpoint", "non_finite_advice", "non_finite_message"]

#: ``checkpoint_meta.json`` key: the state was checked finite before it was written.
FINITE_KEY = "verified_finite"


class NonFiniteLossError(RuntimeError):
    """A loss, gradient, parameter or buffer became NaN/inf. The run stopped without stepping or saving it."""


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of the floating-point ``tensors`` is finite (one fused reduction per device)."""
    floats = [t.detach() for t in tensors if t is not None and t.is_floating_point()]
    if not floats:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(floats, norm_type=float("inf"))))


def _describe(named: list[tuple[str, torch.Tensor]]) -> Optional[str]:
    """The non-finite tensors among ``named`` (the slow path, only once something failed)."""
    bad = [name for name, t in named if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return None
    return f"non-finite values in {len(bad)} tensor{'s' * (len(bad) > 1)} ({', '.join(bad[:4])}{', ...' * (len(bad) > 4)})"


class FiniteGuard:
    """The checks of one run's model (and optimizer, before checkpoints).

    ``check_gradients=False`` under fp16, where the grad scaler skips overflowing steps by design.
    """

    def __init__(self, model: torch.nn.Module, check_gradients: bool = True) -> None:
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # what a step changes without the optimizer: buffers (BatchNorm statistics) and parameters moved
        # without gradient (MAN's momentum copies), so a bad step's are checked and undone alike
        self.buffers = list(model.named_buffers()) + [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        self.check_gradients = check_gradients
        self.saved: Optional[list[torch.Tensor]] = None

    def before_step(self) -> None:
        """Keep the buffers the forward is about to update (BatchNorm statistics), to undo a bad step."""
        with torch.no_grad():
            if self.saved is None:
                self.saved = [b.detach().clone() for _, b in self.buffers]
            else:
                for keep, (_, b) in zip(self.saved, self.buffers):
                    keep.copy_(b)

    def undo_step(self) -> None:
        """Back to the buffers of the previous step (the parameters were never stepped)."""
        if self.saved is not None:
            with torch.no_grad():
                for keep, (_, b) in zip(self.saved, self.buffers):
                    b.copy_(keep)

    def _step_tensors(self) -> list[tuple[str, torch.Tensor]]:
        grads = [(f"gradient of {n}", p.grad) for n, p in self.params] if self.check_gradients else []
        return grads + [(n, b) for n, b in self.buffers] + [(n, p) for n, p in self.params]

    def check_step(self) -> Optional[str]:
        """None, or what is not finite, before ``optimizer.step()``."""
        named = self._step_tensors()
        return None if all_finite(t for _, t in named) else _describe(named)

    def check_state(self, optimizer: Any) -> Optional[str]:
        """None, or what is not finite, of everything a checkpoint would hold."""
        named = [(n, b) for n, b in self.buffers] + [(n, p) for n, p in self.params]
        for i, state in enumerate(optimizer.state_dict()["state"].values()):
            named += [(f"optimizer state {k} of parameter {i}", v) for k, v in state.items() if torch.is_tensor(v)]
        return None if all_finite(t for _, t in named) else _describe(named)


def last_finite_checkpoint(output_dir: Path, below: Optional[int] = None) -> Optional[Path]:
    """The newest checkpoint of a run that verifies and holds only finite weights (checked when it was
    written; a resume migrates older checkpoints, :mod:`.run_format`, which records it), of a step below
    ``below`` if given."""
    for folder in reversed(checkpoint_folders(output_dir)):
        if below is not None and checkpoint_step(folder) >= below:
            continue
        try:
            meta = verify_checkpoint(folder)
        except (FileNotFoundError, CheckpointError):
            continue
        if meta.get(FINITE_KEY):
            return folder
    return None


def inputs_not_finite(inputs: Any) -> bool:
    return torch.is_tensor(inputs) and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all())


def non_finite_advice(cfg: Any, inputs: Any) -> str:
    """The flag to change, from what the failure looks like."""
    if inputs_not_finite(inputs):
        return ("the input batch itself is not finite: fix the normalisation, --mean/--std (this run: "
                f"--std {cfg.std if cfg.std is not None else 'the dataset default'})")
    if cfg.mixed_precision == "fp16":
        return "fp16 overflowed: use --mixed-precision bf16 (or no)"
    return (f"lower the learning rate, e.g. --lr {cfg.lr / 10:g} (this run: --lr {cfg.lr:g}); --warmup-epochs "
            f"or --clip-grad also help")


def non_finite_message(what: str, epoch: int, step: int, checkpoint: Optional[Path], newest: bool,
                       advice: str) -> str:
    """The error of a non-finite stop: where, which checkpoint is good, what to change, how to resume."""
    if checkpoint is None:
        where = "No checkpoint to resume from was written yet; "
        resume = ", then start the run again"
    else:
        where = f"Checkpoint {checkpoint} is finite and its weights gave a finite step; "
        resume = f", then resume from it with --resume {'auto' if newest else checkpoint}"
    return (f"Non-finite {what} at epoch {epoch}, step {step}. Training stopped before the optimizer step; nothing "
            f"non-finite was saved. {where}{advice}{resume}.")


def good_checkpoint(output_dir: Path, step: int, inputs: Any) -> Optional[Path]:
    """The checkpoint a non-finite stop at ``step`` should resume from.

    When the inputs are finite, the weights are the suspect: the checkpoint of ``step`` itself holds the
    weights the failing step started from (finite, but exploding), so the newest one before it is named --
    its weights gave a finite step. Bad inputs leave the weights innocent: the newest finite checkpoint.
    """
    return last_finite_checkpoint(output_dir, below=None if inputs_not_finite(inputs) else step)
