"""Result: the future a remote call returns at once."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any

__all__ = ["Result"]


class _Waiters(list):  # type: ignore[type-arg]
    """A future's waiter list that tells the server when someone starts to wait.

    ``concurrent.futures.wait`` and ``as_completed`` register themselves here.
    """

    __slots__ = ("_server",)

    def __init__(self, server: Any) -> None:
        super().__init__()
        self._server = server  # not the result: no reference cycle, so results are freed at once

    def append(self, waiter: Any) -> None:
        super().append(waiter)
        if self._server is not None:
            self._server.kick()


_PENDING = concurrent.futures._base.PENDING
_RUNNING = concurrent.futures._base.RUNNING
_FINISHED = concurrent.futures._base.FINISHED
_CANCELLED = (concurrent.futures._base.CANCELLED, concurrent.futures._base.CANCELLED_AND_NOTIFIED)
_NO_CALLBACKS: tuple[Any, ...] = ()


class Result(concurrent.futures.Future):  # type: ignore[type-arg]
    """The outcome of one remote call, a :class:`concurrent.futures.Future`.

    ``get(timeout)`` is the original grid's way to read it: the value, or the remote
    exception re-raised with the remote traceback attached as its cause. A thread that
    waits for a result reads its reply itself when it can, which saves thread switches.

    Results of one server share one condition (a future's own lock and waiter list are
    made only when needed), so a call costs no lock allocations.
    """

    def __init__(self, server: Any = None, kind: str = "", name: str = "") -> None:
        # What concurrent.futures.Future.__init__ sets up, made cheaper (see the class doc).
        self._condition = server._results_cond if server is not None else threading.Condition()
        self._state = _PENDING
        self._result = None
        self._exception = None
        self._done_callbacks: Any = _NO_CALLBACKS
        self._waiter_list: _Waiters | None = None
        self._server = server
        self._kind = kind
        self._name = name

    @property
    def _waiters(self) -> Any:  # type: ignore[override]
        """The waiter list ``concurrent.futures.wait`` registers in (made on first use)."""
        waiters = self._waiter_list
        if waiters is None:
            if self._state == _FINISHED:
                return _NO_CALLBACKS  # read while settling: nobody registered
            waiters = self._waiter_list = _Waiters(self._server)
        return waiters

    @staticmethod
    def start_all(results: list[Result]) -> list[bool]:
        """``set_running_or_notify_cancel`` for results sharing one condition, under one lock."""
        if not results:
            return []
        flags = []
        with results[0]._condition:
            for result in results:
                if result._state == _PENDING:
                    result._state = _RUNNING
                    flags.append(True)
                elif result._state == _CANCELLED[0]:
                    result._state = _CANCELLED[1]
                    for waiter in result._waiters:
                        waiter.add_cancelled(result)
                    flags.append(False)
                else:
                    raise concurrent.futures.InvalidStateError(f"{result!r} cannot start")
        return flags

    @staticmethod
    def settle_all(outcomes: list[tuple[Result, bool, Any]]) -> None:
        """Set the value (``ok``) or exception of results sharing one condition: one lock, one wake-up."""
        if not outcomes:
            return
        callbacks = []
        cond = outcomes[0][0]._condition
        with cond:
            for result, ok, value in outcomes:
                if result._state == _FINISHED or result._state in _CANCELLED:
                    continue
                if ok:
                    result._result = value
                else:
                    result._exception = value
                result._state = _FINISHED
                waiters = result._waiter_list
                if waiters:
                    for waiter in waiters:
                        if ok:
                            waiter.add_result(result)
                        else:
                            waiter.add_exception(result)
                if result._done_callbacks:
                    callbacks.append(result)
            cond.notify_all()
        for result in callbacks:
            result._invoke_callbacks()  # type: ignore[attr-defined]

    @property
    def description(self) -> str:
        """What was called, on which slot (for messages)."""
        from .codec import describe

        server = self._server
        what = describe(self._kind, self._name) if self._name else "remote call"
        if server is None:
            return what
        return f"{server.service.class_name}.{what} on {server.slot.label}"

    def _kick(self) -> None:
        server = self._server
        if server is not None and self._state != _FINISHED:
            server.kick()

    def _serve(self, timeout: float | None) -> float | None:
        """Read this call's reply in the calling thread if nobody else is; the time left."""
        server = self._server
        if server is None or self._state == _FINISHED:
            return timeout
        started = time.monotonic() if timeout is not None else 0.0
        server.run_for(self, timeout)
        if self._state != _FINISHED:
            server.kick()
        if timeout is None:
            return None
        return max(0.0, timeout - (time.monotonic() - started))

    def _wait_settled(self, timeout: float | None) -> None:
        """Wait (condition held) until settled; the condition is shared, so wake-ups may be for others."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._state != _FINISHED and self._state not in _CANCELLED:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise concurrent.futures.TimeoutError()
            self._condition.wait(left)

    def result(self, timeout: float | None = None) -> Any:
        """As :meth:`concurrent.futures.Future.result` (``concurrent.futures.TimeoutError``)."""
        timeout = self._serve(timeout)
        with self._condition:
            self._wait_settled(timeout)
            if self._state in _CANCELLED:
                raise concurrent.futures.CancelledError()
            if self._exception is not None:
                try:
                    raise self._exception
                finally:
                    self = None  # type: ignore[assignment]  # no reference cycle through the traceback
            return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As :meth:`concurrent.futures.Future.exception`."""
        timeout = self._serve(timeout)
        with self._condition:
            self._wait_settled(timeout)
            if self._state in _CANCELLED:
                raise concurrent.futures.CancelledError()
            return self._exception

    def done(self) -> bool:
        done = self._state == _FINISHED or self._state in _CANCELLED
        if not done:
            self._kick()
        return done

    def add_done_callback(self, fn: Any) -> None:
        with self._condition:
            if self._state not in _CANCELLED and self._state != _FINISHED:
                if self._done_callbacks is _NO_CALLBACKS:
                    self._done_callbacks = []
                self._done_callbacks.append(fn)
                self._kick()
                return
        try:
            fn(self)
        except Exception:  # noqa: BLE001 - as concurrent.futures does
            concurrent.futures._base.LOGGER.exception("exception calling callback for %r", self)

    def get(self, timeout: float | None = None) -> Any:
        """The value of the call; waits at most ``timeout`` seconds (None: no limit).

        Raises :class:`TimeoutError` if it is not ready in time, and the remote
        exception (or a :class:`~isdgrid.RemoteError`) if the call failed.
        """
        try:
            return self.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self.description} not finished within {timeout} s") from None

    def __repr__(self) -> str:
        return f"<Result {self.description} {self._state.lower()}>"
