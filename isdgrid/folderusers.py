"""Who uses a host's temp folder: the folder is removed only by its last user.

Every daemon holds a shared ``flock`` on a lock file in its temp folder while it runs (the
kernel drops it when the process ends, however it ends). The daemon that may remove the
folder (slot 0, when the grid made the folder) takes the lock exclusively first: while
another daemon holds it (a slot that replaced a lost one after a network partition, say),
the folder stays. The other daemons of a driver that is gone end at about the same time,
so the remover waits a little for them before it gives up and leaves the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time

__all__ = ["LOCK_NAME", "FolderUsers"]

log = logging.getLogger(__name__)

LOCK_NAME = ".isdgrid-users.lock"
POLL = 0.05


class FolderUsers:
    """This process's share of the use of ``path`` (a shared lock on its lock file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._locking = True
        try:
            self._fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        except OSError as exc:  # a file system without locks (some network mounts): remove as before
            log.warning("%s: no lock on its users (%s); slot 0 removes it without checking for them", path, exc)
            self.close()
            self._locking = False

    def remove_if_last(self, wait: float) -> bool:
        """Remove the folder once no other process uses it, waiting at most ``wait`` seconds; True if removed."""
        if not self._locking:
            shutil.rmtree(self.path, ignore_errors=True)
            return True
        fd = self._fd
        if fd is None:
            return False
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    log.info("%s is still used by another daemon: left in place", self.path)
                    return False
                time.sleep(POLL)
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()
        return True

    def close(self) -> None:
        """Give up this process's share (also done by the kernel at exit)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
