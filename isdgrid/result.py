"""Result: the future a remote call returns at once."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from .timeouts import check_timeout

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Result"]


class Result(concurrent.futures.Future):  # type: ignore[type-arg]
    """The outcome of one remote call: a genuine :class:`concurrent.futures.Future`.

    Made by ``Future.__init__`` and settled only through ``set_running_or_notify_cancel``,
    ``set_result`` and ``set_exception``, so :func:`concurrent.futures.wait`,
    :func:`~concurrent.futures.as_completed`, callbacks, ``cancel()`` (while the call is
    still queued in the driver) and :func:`asyncio.wrap_future` work on any mix of
    Results, from any threads. ``get(timeout)`` is the original grid's way to read it: the
    value, or the remote exception re-raised with the remote traceback as its cause.

    A thread that waits through ``result``/``get``/``exception`` reads the reply from the
    connection itself when nobody else is reading (no thread switch for a synchronous
    call); the other ways of waiting have the slot's reader thread read it.

    In a coroutine, ``await result`` gives the value (``asyncio.gather`` takes Results too).
    """

    def __init__(self, server: Server | None = None, kind: str = "", name: str = "") -> None:
        super().__init__()
        self._server = server
        self._kind = kind
        self._name = name

    @property
    def description(self) -> str:
        """What was called, on which slot (for messages)."""
        from .codec import describe

        server = self._server
        what = describe(self._kind, self._name) if self._kind else "remote call"
        if server is None:
            return what
        return f"{server.service.class_name}.{what} on {server.slot.label}"

    def _help(self, timeout: float | None) -> float | None:
        """Read replies in this thread until this one is here (or ``timeout``); the time left."""
        server = self._server
        if server is None or concurrent.futures.Future.done(self):
            return timeout
        started = time.monotonic()
        server.wait_for(self, None if timeout is None else started + timeout)
        if timeout is None:
            return None
        return max(0.0, timeout - (time.monotonic() - started))

    def result(self, timeout: float | None = None) -> Any:
        """As :meth:`concurrent.futures.Future.result`."""
        timeout = check_timeout(timeout, "Result.result")
        return super().result(self._help(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As :meth:`concurrent.futures.Future.exception`."""
        timeout = check_timeout(timeout, "Result.exception")
        return super().exception(self._help(timeout))

    def done(self) -> bool:
        """As :meth:`concurrent.futures.Future.done`; a caller that polls gets its reply read."""
        if super().done():
            return True
        if self._server is not None:
            self._server.kick()
        return False

    def add_done_callback(self, fn: Any) -> None:
        """As :meth:`concurrent.futures.Future.add_done_callback` (the reply is read at once)."""
        super().add_done_callback(fn)
        if self._server is not None and not super().done():
            self._server.kick()

    def get(self, timeout: float | None = None) -> Any:
        """The value of the call; waits at most ``timeout`` seconds (None: no limit).

        Raises :class:`TimeoutError` if it is not ready in time, and the remote
        exception (or a :class:`~isdgrid.RemoteError`) if the call failed.
        """
        timeout = check_timeout(timeout, "Result.get")
        try:
            return self.result(timeout)
        except concurrent.futures.TimeoutError:
            if concurrent.futures.Future.done(self):
                raise  # the remote method's own TimeoutError, with its remote traceback
            raise TimeoutError(f"{self.description} not finished within {timeout} s") from None

    def __await__(self) -> Generator[Any, None, Any]:
        """``await result`` in a coroutine: the value, without blocking the event loop.

        As ``await asyncio.wrap_future(result)``, in the running loop: the remote exception
        is raised as :meth:`get` raises it; cancelling the awaiting task cancels the call
        while it is still queued in the driver.
        """
        import asyncio

        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        return f"<Result {self.description} {super().__repr__()}>"
