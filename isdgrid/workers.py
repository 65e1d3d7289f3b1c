"""Workers: a few threads for the driver's blocking jobs, however many slots there are.

Connecting and authenticating (a start, a reconnect), a control call waiting for its
slot's reconnect, respawns and launcher starts block; the I/O loop must not. They run here: at most ``size``
threads, started when work comes and ended after ``idle`` seconds without any, so an idle
driver keeps none. A job's outcome is a :class:`concurrent.futures.Future`; a job that
raises anything (``BaseException`` included) fails its Future and the thread goes on.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Workers"]


class Workers:
    """At most ``size`` threads named ``name-N`` for blocking jobs, in the order submitted."""

    def __init__(self, name: str, size: int, idle: float = 2.0) -> None:
        self.name = name
        self.size = size
        self.idle = idle
        self._reset()
        _all.append(self)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._jobs: deque[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]] = deque()
        self._threads = 0
        self._waiting = 0
        self._count = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args)`` in a worker thread; its Future.

        Where no thread can be started (at interpreter exit, Python 3.12 refuses new threads)
        and none is there to take it, the job runs at once in the calling thread.
        """
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        job = (future, fn, args)
        with self._cond:
            self._jobs.append(job)
            if self._waiting > len(self._jobs) - 1:
                self._cond.notify()
                return future
            if self._threads >= self.size:
                return future
            self._threads += 1
            self._count += 1
            name = f"{self.name}-{self._count}"
            try:
                threading.Thread(target=self._work, name=name, daemon=True).start()
                return future
            except RuntimeError:  # "can't create new thread at interpreter shutdown"
                self._threads -= 1
                if self._threads > 0:
                    return future  # a running worker takes it
                self._jobs.remove(job)
        self._run(job)
        return future

    @staticmethod
    def _run(job: tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]) -> None:
        future, fn, args = job
        if not future.set_running_or_notify_cancel():
            return
        try:
            value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - the job's error is its Future's
            future.set_exception(exc)
        else:
            future.set_result(value)

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    self._waiting += 1
                    self._cond.wait(self.idle)
                    self._waiting -= 1
                if not self._jobs:
                    self._threads -= 1
                    return
                job = self._jobs.popleft()
            self._run(job)


_all: list[Workers] = []


def _reset_in_child() -> None:
    # A forked child has none of the parent's threads; its jobs were the parent's.
    for workers in _all:
        workers._reset()


os.register_at_fork(after_in_child=_reset_in_child)
