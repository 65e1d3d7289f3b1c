"""Ticker: a thread that looks at a set of members every few milliseconds, only while busy.

The daemon's takeover watchdog (a batch that runs long in a connection's thread) needs to
notice, within milliseconds, a state that no public hook announces. Waking a thread for
every call would cost a thread switch per call, so instead the ticker wakes every
``period`` seconds while its members are busy and for ``linger`` seconds after, then
sleeps until the next :meth:`Ticker.watch`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Ticker"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Ticker(Generic[T]):
    """Calls ``tick(member, now) -> busy`` for every member each ``period`` while any is busy."""

    def __init__(self, name: str, period: float, tick: Callable[[T, float], bool], linger: float = 1.0) -> None:
        self.name = name
        self.period = period
        self.linger = linger
        self._tick = tick
        # A plain set (members leave it with forget): a WeakSet's removal callback could run,
        # and swallow a KeyboardInterrupt, at any point of a driver's main thread.
        self._members: set[T] = set()
        self._cond = threading.Condition()
        self._active = False
        self._watched = False  # something happened since the last tick
        self._thread: threading.Thread | None = None

    def watch(self, member: T) -> None:
        """Note activity of ``member``: tick from now on (until ``linger`` of quiet)."""
        with self._cond:
            self._watched = True
            self._members.add(member)
            if not self._active:
                self._active = True
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                    self._thread.start()
                self._cond.notify()

    def forget(self, member: T) -> None:
        """Stop looking at ``member``."""
        with self._cond:
            self._members.discard(member)

    def _run(self) -> None:
        quiet_since = time.monotonic()
        while True:
            try:
                with self._cond:
                    while not self._active:
                        self._cond.wait()
                    members = list(self._members)
                time.sleep(self.period)
                now = time.monotonic()
                busy = False
                for member in members:
                    busy = self._tick(member, now) or busy
                with self._cond:
                    if busy or self._watched:
                        quiet_since = now
                    elif now - quiet_since > self.linger:
                        self._active = False
                    self._watched = False
            except BaseException:  # noqa: BLE001 - the ticker outlives any error
                log.exception("%s: tick failed", self.name)
                time.sleep(self.period)
