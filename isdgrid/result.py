"""Result: the future a remote call returns at once."""

from __future__ import annotations

import concurrent.futures
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


class Result(concurrent.futures.Future):  # type: ignore[type-arg]
    """The outcome of one remote call, a :class:`concurrent.futures.Future`.

    ``get(timeout)`` is the original grid's way to read it: the value, or the remote
    exception re-raised with the remote traceback attached as its cause. A thread that
    waits for a result reads its reply itself when it can, which saves thread switches.
    """

    def __init__(self, server: Any = None, kind: str = "", name: str = "") -> None:
        super().__init__()
        self._server = server
        self._kind = kind
        self._name = name
        self._waiters = _Waiters(server)

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
        if server is not None and self._state != concurrent.futures._base.FINISHED:
            server.kick()

    def _serve(self, timeout: float | None) -> float | None:
        """Read this call's reply in the calling thread if nobody else is; the time left."""
        server = self._server
        if server is None or self._state == concurrent.futures._base.FINISHED:
            return timeout
        started = time.monotonic() if timeout is not None else 0.0
        server.run_for(self, timeout)
        if self._state != concurrent.futures._base.FINISHED:
            server.kick()
        if timeout is None:
            return None
        return max(0.0, timeout - (time.monotonic() - started))

    def result(self, timeout: float | None = None) -> Any:
        """As :meth:`concurrent.futures.Future.result` (``concurrent.futures.TimeoutError``)."""
        return super().result(self._serve(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return super().exception(self._serve(timeout))

    def done(self) -> bool:
        done = super().done()
        if not done:
            self._kick()
        return done

    def add_done_callback(self, fn: Any) -> None:
        super().add_done_callback(fn)
        self._kick()

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
