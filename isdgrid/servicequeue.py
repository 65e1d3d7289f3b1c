"""ServerQueue: the thread-safe queue of the free servers of one service."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import GridTerminatedError, ServiceUnavailableError

if TYPE_CHECKING:
    from .server import Server

__all__ = ["ServerQueue"]

_WAKE = 1.0  # re-check the service's health at least this often while waiting


class ServerQueue:
    """Free servers of one service, first in first out.

    ``get`` waits while all servers are busy; it raises ``ServiceUnavailableError`` once no
    server can ever come back (all lost, no respawn) and ``GridTerminatedError`` once the
    service is terminated. ``take`` removes one given server (broadcast keeps server order).
    """

    def __init__(self, service_id: str, usable: Callable[[], bool]) -> None:
        self.service_id = service_id
        self._usable = usable
        self._free: deque[Server] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, server: Server) -> None:
        """Make ``server`` free (it must not be in the queue already)."""
        with self._cond:
            if self._closed or server in self._free:
                return
            self._free.append(server)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> Server:
        """Take a free server, waiting at most ``timeout`` seconds (None: while any can come)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise GridTerminatedError(f"service {self.service_id!r} was terminated")
                if self._free:
                    return self._free.popleft()
                if not self._usable():
                    raise ServiceUnavailableError(self.service_id)
                wait = _WAKE if deadline is None else min(_WAKE, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"no free server of service {self.service_id!r} within {timeout} s")
                self._cond.wait(wait)

    def take(self, server: Server, is_lost: Callable[[], bool], timeout: float | None = None) -> None:
        """Wait until ``server`` itself is free and remove it (return at once if it is lost)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise GridTerminatedError(f"service {self.service_id!r} was terminated")
                if server in self._free:
                    self._free.remove(server)
                    return
                if is_lost():
                    return
                wait = _WAKE if deadline is None else min(_WAKE, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"server {server} not free within {timeout} s")
                self._cond.wait(wait)

    def discard(self, server: Server) -> None:
        """Remove ``server`` if it is free (it was lost) and wake the waiters."""
        with self._cond:
            if server in self._free:
                self._free.remove(server)
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake every waiter so it re-checks the service."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Terminate: every waiter raises GridTerminatedError."""
        with self._cond:
            self._closed = True
            self._free.clear()
            self._cond.notify_all()

    def qsize(self) -> int:
        """Number of free servers now."""
        with self._cond:
            return len(self._free)

    def empty(self) -> bool:
        """True when no server is free now."""
        return self.qsize() == 0

    def __len__(self) -> int:
        return self.qsize()

    def __repr__(self) -> str:
        return f"<ServerQueue {self.service_id} free={self.qsize()}>"
