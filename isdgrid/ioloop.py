"""IOLoop: the driver's one I/O thread, which owns every connection to the daemons.

Modelled on the manager thread of :class:`concurrent.futures.ProcessPoolExecutor`: one
thread waits on every socket at once (:mod:`selectors`, epoll on Linux), reads whatever
arrives and settles each Future as its reply lands, so ``concurrent.futures.wait``,
``as_completed``, callbacks and asyncio see a result the moment it is there. Heartbeats,
deadlines and reconnect back-off are timers of the same loop. Other threads hand it work
with :meth:`IOLoop.call_soon` (thread-safe; a byte on a socket pair wakes the loop).

The loop thread never blocks on anything but the selector (a send of a next batch aside:
see :mod:`isdgrid.server`), and survives any exception a callback raises, ``BaseException``
included. A callback that waits for another Result (``result()`` in a done-callback) is
served by running the loop nested in that call (:meth:`IOLoop.run_until`), so it cannot
deadlock the thread that would settle it.

One loop serves the whole driver process (:func:`get_loop`); a forked child starts a new
one if it ever needs one.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["IOLoop", "Timer", "get_loop"]

log = logging.getLogger(__name__)

MAX_WAIT = 1.0  # the selector waits at most this long when no timer is due sooner


class Timer:
    """A call scheduled by :meth:`IOLoop.call_later`; :meth:`cancel` drops it."""

    __slots__ = ("when", "fn", "args", "cancelled")

    def __init__(self, when: float, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Drop the call (a no-op once it ran)."""
        self.cancelled = True


class IOLoop:
    """A selector loop in a thread of its own: readers, timers, calls from other threads."""

    def __init__(self, name: str = "isdgrid-io") -> None:
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._woken = False
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._ident: int | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- from any thread -----------------------------------------------------------------
    def in_loop(self) -> bool:
        """True in the loop's own thread."""
        return threading.get_ident() == self._ident

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the loop thread, soon (in the order given)."""
        with self._lock:
            self._calls.append((fn, args))
            wake = not self._woken
            self._woken = True
        if wake:
            try:
                self._wake_w.send(b"\0")
            except BlockingIOError:  # the pipe is full: the loop is about to look anyway
                pass

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Run ``fn(*args)`` in the loop thread after ``delay`` seconds; cancel with the Timer."""
        timer = Timer(time.monotonic() + max(0.0, delay), fn, args)
        if self.in_loop():
            heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        else:
            self.call_soon(self._push_timer, timer)
        return timer

    def add_reader(self, sock: socket.socket, callback: Callable[[], None]) -> None:
        """Call ``callback()`` in the loop thread whenever ``sock`` has data (or is closed)."""
        self._in_loop(self._register, sock, callback)

    def remove_reader(self, sock: socket.socket) -> None:
        """Stop watching ``sock`` (before it is closed)."""
        self._in_loop(self._unregister, sock)

    # -- in the loop thread ----------------------------------------------------------------
    def run_until(self, done: Callable[[], bool], deadline: float | None) -> None:
        """Serve the loop from inside one of its callbacks until ``done()`` or ``deadline``.

        For a callback that waits on another Result: the reply it waits for is read here.
        """
        while not done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            self._run_once(MAX_WAIT if left is None else min(left, MAX_WAIT))

    # -- internals -----------------------------------------------------------------------
    def _in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.in_loop():
            fn(*args)
        else:
            self.call_soon(fn, *args)

    def _push_timer(self, timer: Timer) -> None:
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))

    def _register(self, sock: socket.socket, callback: Callable[[], None]) -> None:
        try:
            self._selector.register(sock, selectors.EVENT_READ, callback)
        except KeyError:
            self._selector.modify(sock, selectors.EVENT_READ, callback)
        except (ValueError, OSError):  # closed meanwhile: tell the owner at once
            self._guarded(callback, ())

    def _unregister(self, sock: socket.socket) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop thread (bounded) and let go of its selector (the process's loop runs on)."""
        def stop() -> None:
            self._closed = True

        self.call_soon(stop)
        if not self.in_loop():
            self._thread.join(timeout)

    def _run(self) -> None:
        self._ident = threading.get_ident()
        while not self._closed:
            try:
                self._run_once(MAX_WAIT)
            except BaseException:  # noqa: BLE001 - the loop outlives any error
                log.exception("isdgrid I/O loop error")
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run_once(self, longest: float) -> None:
        wait = longest
        if self._timers:
            wait = min(wait, max(0.0, self._timers[0][0] - time.monotonic()))
        with self._lock:
            if self._calls:
                wait = 0.0
        events = self._selector.select(wait)
        for key, _ in events:
            if key.data is None:
                self._drain_wakeups()
            else:
                self._guarded(key.data, ())
        self._run_calls()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True
                self._guarded(timer.fn, timer.args)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _run_calls(self) -> None:
        with self._lock:
            calls = list(self._calls)
            self._calls.clear()
            self._woken = False
        for fn, args in calls:
            self._guarded(fn, args)

    @staticmethod
    def _guarded(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except BaseException:  # noqa: BLE001 - one callback's error never stops the loop
            log.exception("error in an isdgrid I/O loop callback %r", fn)


_loop: IOLoop | None = None
_loop_lock = threading.Lock()


def _forget_in_child() -> None:
    # The loop thread does not exist in a forked child, and the lock may have been held.
    global _loop, _loop_lock
    _loop = None
    _loop_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def get_loop() -> IOLoop:
    """The process's I/O loop, started on first use (a forked child starts its own)."""
    global _loop
    loop = _loop
    if loop is not None:
        return loop
    with _loop_lock:
        if _loop is None:
            _loop = IOLoop()
        return _loop
