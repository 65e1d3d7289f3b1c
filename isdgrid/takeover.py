"""Takeover: a new reader for a calls connection whose batch runs long, at no cost per call.

A daemon's connection thread runs a batch of an idle service itself (no thread switch per
call). Should the batch run longer than ``TAKEOVER`` seconds, another thread must read on,
so the other services of the slot and the driver's heartbeats are never held up behind it.

Noticing that needs a clock that fires only when a batch is still running: a thread woken
for every batch (the earlier watchdog) cost three thread wake-ups per call in every daemon,
which on a host of a thousand slots took more CPU than the calls themselves (a 1,000-way
broadcast + gather: 380 ms with it, 161 ms without). So the kernel keeps the time: a batch
arms ``ITIMER_REAL`` as it starts and disarms it as it ends, two system calls; only a batch
still running when the timer fires costs a wake-up, of the main thread (the only thread
that takes ``SIGALRM``: every thread the daemon starts blocks it, and threads started
from those inherit that), which starts the new reader.

``SIGALRM`` belongs to the daemon: a published object must not use ``signal.alarm`` or
``ITIMER_REAL`` (it could not set a handler anyway: its calls never run in the main
thread). Where the daemon does not run in the main thread (a test embedding it), a
``threading.Timer`` per armed period does the same at a thread per batch.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["TAKEOVER", "Takeover", "start_thread"]

log = logging.getLogger(__name__)

TAKEOVER = 0.005  # a batch running longer than this in a connection's thread gets a new reader
_ALARM = {signal.SIGALRM}


class Channel(Protocol):
    """A calls connection as the takeover sees it."""

    def take_over_due(self, now: float) -> float | None:
        """0 when a new reader is due (the channel is marked as taken over), else the seconds
        left until it is; None when no batch of it waits for one any more."""

    def read_loop(self) -> None:
        """Read and run batches (a new reader's thread)."""


def start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread that never takes ``SIGALRM`` (nor do the threads it starts)."""

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _ALARM)
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    # Blocked here too while it starts: a signal in the moment before run() blocks it
    # would be taken by a thread that cannot run the handler.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _ALARM)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return thread


class Takeover:
    """Starts a reader for each channel whose batch runs past ``TAKEOVER`` seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[Channel] = set()  # channels whose reading thread runs a batch
        self._armed = False
        self._signals = False
        self._timer: threading.Timer | None = None
        self._in_handler = False

    def install(self) -> None:
        """Take ``SIGALRM`` (in the main thread); elsewhere fall back to a timer thread."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, self._on_alarm)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _ALARM)
            self._signals = True

    def uninstall(self) -> None:
        """Disarm and give ``SIGALRM`` back (the daemon stops)."""
        with self._lock:
            self._running.clear()
            self._disarm()
        if self._signals:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            self._signals = False

    def started(self, channel: Channel) -> None:
        """``channel``'s reading thread runs a batch from now on."""
        with self._lock:
            self._running.add(channel)
            if not self._armed:
                self._arm(TAKEOVER)

    def ended(self, channel: Channel) -> None:
        """``channel``'s batch ended (in the thread that ran it)."""
        with self._lock:
            self._running.discard(channel)
            if not self._running and self._armed:
                self._disarm()

    def _arm(self, delay: float) -> None:  # lock held
        self._armed = True
        if self._signals:
            signal.setitimer(signal.ITIMER_REAL, delay)
        else:
            self._timer = threading.Timer(delay, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _disarm(self) -> None:  # lock held
        self._armed = False
        if self._signals:
            signal.setitimer(signal.ITIMER_REAL, 0)
        elif self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_alarm(self, signum: int, frame: Any) -> None:
        # A signal handler of the main thread: a second alarm during this one finds it under way.
        if self._in_handler:
            return
        self._in_handler = True
        try:
            self._fire()
        finally:
            self._in_handler = False

    def _fire(self) -> None:
        try:
            now = time.monotonic()
            due: list[Channel] = []
            with self._lock:
                self._armed = False
                self._timer = None
                left = TAKEOVER
                for channel in list(self._running):
                    wait = channel.take_over_due(now)
                    if wait is None or wait <= 0:
                        self._running.discard(channel)
                        if wait is not None:
                            due.append(channel)
                    else:
                        left = min(left, wait)
                if self._running:
                    self._arm(max(left, 0.0005))
            for channel in due:
                start_thread(channel.read_loop, "conn-reader")
        except Exception:  # noqa: BLE001 - a failed look must not end the main thread's watch
            log.exception("takeover of a long batch failed")
