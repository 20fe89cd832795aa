"""Preemption that saves: SIGTERM / SIGUSR1 finish the step, write a checkpoint, exit with :data:`PREEMPTED_EXIT`.

SLURM (``--signal``), Kubernetes (pod deletion) and spot instances send a signal some seconds before the
kill; the default action of SIGTERM ends the process at once and loses everything since the last
checkpoint. Here the handler only records the signal: the loop finishes its step, every process agrees at
the step's end (one all-reduce of a flag, so the ranks stop at the same step even when only some got the
signal), a verified checkpoint is written and the run stops with :class:`Preempted`. A second signal during
that save is recorded and ignored -- the save is never cut short by us (only the final SIGKILL could, and a
save is atomic). ``--resume auto`` continues exactly there.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any, Optional

from .checkpoint import any_process

__all__ = ["PREEMPTED_EXIT", "Preempted", "PreemptionWatch", "parse_signals"]

logger = logging.getLogger(__name__)

#: Exit code of a preempted run (``EX_TEMPFAIL``: try again -- a requeue with ``--resume auto``).
PREEMPTED_EXIT = 75


class Preempted(Exception):
    """The run stopped on a preemption signal after writing a checkpoint (the message names both)."""

    def __init__(self, message: str, checkpoint: Optional[Path]) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def parse_signals(spec: Optional[str]) -> list[signal.Signals]:
    """``--preempt-signals``: a comma list such as ``TERM,USR1`` (``SIG`` prefix optional); ``none``: none."""
    if spec is None or spec.strip().lower() in ("", "none", "no"):
        return []
    found = []
    for name in (s.strip().upper() for s in spec.split(",") if s.strip()):
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"--preempt-signals: {name} is not a signal a process can catch (e.g. TERM,USR1)")
        found.append(signal.Signals[name])
    return found


class PreemptionWatch:
    """Records the preemption signals while installed (:meth:`install` / :meth:`close`)."""

    def __init__(self, signals: list[signal.Signals]) -> None:
        self.signals = signals
        self.received: list[str] = []
        self.previous: dict[signal.Signals, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if len(self.received) > 1:  # logging from a handler is best effort; the flag is what counts
            logger.warning("%s received again: already stopping at the end of this step (the save goes on)", name)

    def install(self) -> "PreemptionWatch":
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: preemption signals keep their default action")
            return self
        for sig in self.signals:
            self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def requested(self, accelerator: Any) -> bool:
        """Whether any process got a signal (a collective with several processes: all call it each step)."""
        return any_process(accelerator, bool(self.received))

    def stopped(self, step: int, checkpoint: Optional[Path]) -> Preempted:
        what = self.received[0] if self.received else "a preemption signal on another process"
        return Preempted(f"preempted by {what} at step {step}: checkpoint {checkpoint} written; continue with "
                         f"--resume auto (exit code {PREEMPTED_EXIT})", checkpoint)
