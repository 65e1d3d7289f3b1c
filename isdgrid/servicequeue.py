"""ServerQueue: the thread-safe, first-come-first-served queue of the free servers of one service."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from .errors import GridTerminatedError, ServiceUnavailableError
from .timeouts import check_timeout

if TYPE_CHECKING:
    from .server import Server

__all__ = ["ServerQueue"]

log = logging.getLogger(__name__)

_WAKE = 1.0  # re-check the service's health at least this often while waiting
WARN_EVERY = 30.0  # a wait this long (and each such stretch after it) logs a warning naming the holders


class _Waiter:
    __slots__ = ("event", "server", "wanted")

    def __init__(self, wanted: Server | None, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()
        self.server: Server | None = None
        self.wanted = wanted  # a given server (broadcast keeps server order), or any


class ServerQueue:
    """Free servers of one service, handed out first come, first served.

    A server put back goes straight to the thread that has waited longest (so a thread
    that loops acquire/release cannot starve the others). ``get`` raises
    ``ServiceUnavailableError`` once no server can ever come back (all lost, no respawn)
    and ``GridTerminatedError`` once the service is terminated; ``take`` removes one
    given server. A wait is never refused for who holds the servers (any thread may
    release them, a lost one may be respawned): it lasts until a server is free or the
    caller's timeout; the ``TimeoutError``, and a warning logged every ``WARN_EVERY``
    seconds of waiting, say who holds what (``describe``).
    """

    def __init__(
        self, service_id: str, usable: Callable[[], bool], describe: Callable[[], str] = lambda: ""
    ) -> None:
        self.service_id = service_id
        self._usable = usable
        self._describe = describe
        self._free: dict[Server, None] = {}  # in the order freed (a dict: O(1) to find and remove one)
        self._waiters: deque[_Waiter] = deque()
        self._lock = threading.Lock()
        self._closed = False

    def put(self, server: Server) -> None:
        """Make ``server`` free: to the longest waiter that wants it, else into the queue."""
        with self._lock:
            if self._closed or server in self._free:
                return
            for waiter in self._waiters:
                if waiter.wanted is None or waiter.wanted is server:
                    self._waiters.remove(waiter)
                    waiter.server = server
                    waiter.event.set()
                    return
            self._free[server] = None

    def get(self, timeout: float | None = None) -> Server:
        """Take a free server, waiting at most ``timeout`` seconds (None: while any can come)."""
        return self._wait(None, lambda: False, check_timeout(timeout, "get"))

    def line_up(self, event: threading.Event) -> Server | object:
        """A free server now if no one waits before us, else a place in the line (a ticket).

        Never blocks: ``event`` is set when a server is handed to the ticket; the holder
        reads it with :meth:`handed` and must end its turn with :meth:`leave_line`, which
        returns a server handed meanwhile (to use or put back). For a consumer that waits
        on several things at once (``Grid.map``: its results and a free server).
        """
        waiter = _Waiter(None, event)
        with self._lock:
            self._check()
            server = self._first_unwanted()
            if server is not None:
                return server
            self._waiters.append(waiter)
            return waiter

    @staticmethod
    def handed(ticket: object) -> Server | None:
        """The server handed to a ticket of :meth:`line_up`, if any yet (it stays the ticket's)."""
        assert isinstance(ticket, _Waiter)
        return ticket.server

    def leave_line(self, ticket: object) -> Server | None:
        """End a ticket's turn: out of the line, or the server handed to it (now the caller's)."""
        assert isinstance(ticket, _Waiter)
        with self._lock:
            if ticket in self._waiters:
                self._waiters.remove(ticket)
                return None
            return ticket.server

    def take_all(self, servers: Sequence[Server]) -> bool:
        """Remove every one of ``servers`` at once if all are free and no one waits; else take none."""
        with self._lock:
            if self._closed or self._waiters or len(self._free) < len(servers):
                return False
            free = self._free
            for server in servers:
                if server not in free:
                    return False
            for server in servers:
                del free[server]
            return True

    def take(self, server: Server, is_lost: Callable[[], bool], timeout: float | None = None) -> Server | None:
        """Wait until ``server`` itself is free and remove it; None at once if it is lost."""
        try:
            return self._wait(server, is_lost, timeout)
        except _Lost:
            return None

    def _wait(self, wanted: Server | None, is_lost: Callable[[], bool], timeout: float | None) -> Server:
        with self._lock:
            self._check()
            server = self._first_unwanted(wanted)
            if server is not None:
                return server
            waiter = _Waiter(wanted)
            self._waiters.append(waiter)
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        warn_at = started + WARN_EVERY
        what = "free server" if wanted is None else f"free server {wanted.index} ({wanted.slot.label})"
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                waiter.event.wait(_WAKE if left is None else max(0.0, min(_WAKE, left)))
                with self._lock:
                    if waiter.server is not None:
                        return waiter.server
                    waiter.event.clear()
                    self._check()
                    if wanted is not None and is_lost():
                        raise _Lost()
                    if wanted is None and not self._usable():
                        raise ServiceUnavailableError(self.service_id)
                    if left is not None and left <= 0:
                        raise TimeoutError(
                            f"no {what} of service {self.service_id!r} within {timeout} s; {self._describe()}"
                        )
                now = time.monotonic()
                if now >= warn_at:
                    warn_at = now + WARN_EVERY
                    log.warning("still waiting for a %s of service %r after %.0f s; %s",
                                what, self.service_id, now - started, self._describe())
        except BaseException:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                    handed = None
                else:
                    handed = waiter.server
            if handed is not None:  # it came just as we gave up: pass it on
                self.put(handed)
            raise

    def _first_unwanted(self, wanted: Server | None = None) -> Server | None:
        """Remove and return a free server (``wanted``, or any) no earlier waiter wants (lock held)."""
        if wanted is not None:
            candidates: Iterable[Server] = (wanted,) if wanted in self._free else ()
        else:
            candidates = self._free
        for server in candidates:
            if not self._waiters or not any(w.wanted is None or w.wanted is server for w in self._waiters):
                del self._free[server]
                return server
        return None

    def _check(self) -> None:
        if self._closed:
            raise GridTerminatedError(f"service {self.service_id!r} was terminated")

    def discard(self, server: Server) -> None:
        """Remove ``server`` if it is free (it was lost) and wake the waiters."""
        with self._lock:
            self._free.pop(server, None)
        self.wake()

    def wake(self) -> None:
        """Have every waiter re-check the service now (a server was lost or respawned)."""
        with self._lock:
            for waiter in self._waiters:
                waiter.event.set()

    def close(self) -> None:
        """Terminate: every waiter raises GridTerminatedError."""
        with self._lock:
            self._closed = True
            self._free.clear()
            waiters = list(self._waiters)
            self._waiters.clear()
        for waiter in waiters:
            waiter.event.set()

    def qsize(self) -> int:
        """Number of free servers now."""
        with self._lock:
            return len(self._free)

    def empty(self) -> bool:
        """True when no server is free now."""
        return self.qsize() == 0

    def __len__(self) -> int:
        return self.qsize()

    def __repr__(self) -> str:
        return f"<ServerQueue {self.service_id} free={self.qsize()}>"


class _Lost(Exception):  # noqa: N818 - internal signal: the wanted server is lost
    pass
