"""One writer per run folder: an advisory lock the main process holds while the run writes.

Two runs writing one folder (a second ``--resume auto`` launched by mistake, a requeued job racing its
predecessor) would interleave checkpoints, rotation and ``metrics.jsonl``. The lock is ``fcntl.flock`` on
``OUTPUT_DIR/.timm_local.lock``, which the kernel releases when the holder exits in any way (a SIGKILL
included), so a crashed run never leaves a lock behind. The file says who holds it (host, pid, start
time), for the one-line refusal. Where a filesystem offers no ``flock`` (some network mounts answer
``ENOLCK``), the file's content is the lock: a holder on this host whose process is gone is stale and
taken over; a holder on another host cannot be checked from here, so the refusal says how to clear it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from .checkpoint import any_process

__all__ = ["LOCK_NAME", "RunFolderLocked", "RunLock", "hold_run_folder"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".timm_local.lock"


class RunFolderLocked(UserError, FileExistsError):
    """Another run is writing the run folder (the message names it)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """The lock of one run folder; :meth:`acquire` raises :class:`RunFolderLocked` naming the holder."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.fd: Optional[int] = None
        self.created_folder = False

    def holder(self) -> dict[str, Any]:
        """Who wrote the lock file last (empty if nobody or unreadable)."""
        try:
            found = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def _refusal(self, holder: dict[str, Any], advice: str = "") -> RunFolderLocked:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {since}" if holder else "unknown"
        return RunFolderLocked(f"{self.path.parent} is being written by another run ({who}); stop it first or use "
                               f"another --output-dir{advice}")

    def acquire(self) -> None:
        self.created_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refusal(self.holder()) from None
        except OSError as e:  # no flock on this filesystem: the file's content is the lock
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            self._check_content_lock()
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}).encode())
        os.fsync(fd)

    def _check_content_lock(self) -> None:
        holder = self.holder()
        if not holder or holder.get("pid") == os.getpid():
            return
        if holder.get("host") == socket.gethostname():
            if _alive(int(holder.get("pid", 0))):
                raise self._refusal(holder)
            logger.warning("taking over the stale lock %s (pid %s is gone)", self.path, holder.get("pid"))
            return
        raise self._refusal(holder, f" (this filesystem has no flock: if that run is gone, delete {self.path})")

    def release(self) -> None:
        """Give the folder up. The file stays, emptied (removing it would race a waiting run's open) -- unless
        the lock created the folder and nothing else was written there (a run that failed during set-up):
        then the folder goes too, so that a failed start leaves nothing behind."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            if self.created_folder and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
                self.path.unlink()
                self.path.parent.rmdir()
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None


def hold_run_folder(accelerator: Any, folder: Path) -> Optional[RunLock]:
    """The main process's lock of ``folder`` (None on the others); every process raises if it is taken."""
    lock, refused = None, None
    if accelerator.is_main_process:
        lock = RunLock(folder)
        try:
            lock.acquire()
        except RunFolderLocked as e:
            lock, refused = None, e
    if any_process(accelerator, refused is not None):
        raise refused or RunFolderLocked(f"{folder} is being written by another run (see the main process's error)")
    return lock
