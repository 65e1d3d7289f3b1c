"""Result: the future a remote call returns at once."""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from .errors import GridError
from .ioloop import get_loop
from .timeouts import check_timeout

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Result"]

_generation = 0  # bumped in a forked child: the Results made before the fork are the parent's
_parent = 0


def _forked() -> None:
    global _generation, _parent
    _generation += 1
    _parent = os.getppid()


os.register_at_fork(after_in_child=_forked)


class Result(concurrent.futures.Future):  # type: ignore[type-arg]
    """The outcome of one remote call: a genuine :class:`concurrent.futures.Future`.

    Made by ``Future.__init__`` and settled only through ``set_running_or_notify_cancel``,
    ``set_result`` and ``set_exception``, so :func:`concurrent.futures.wait`,
    :func:`~concurrent.futures.as_completed`, callbacks, ``cancel()`` (while the call is
    still queued in the driver) and :func:`asyncio.wrap_future` work on any mix of
    Results, from any threads. ``get(timeout)`` is the original grid's way to read it: the
    value, or the remote exception re-raised with the remote traceback as its cause.

    The driver's I/O loop settles it the moment its reply lands, so every way of waiting
    sees it at once; a done-callback runs in that loop's thread (keep it short: one that
    waits for another Result is served, but holds up every other reply meanwhile).

    In a coroutine, ``await result`` gives the value (``asyncio.gather`` takes Results too).
    """

    def __init__(self, server: Server | None = None, kind: str = "", name: str = "") -> None:
        super().__init__()
        self._generation = _generation
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

    def _before_wait(self, timeout: float | None) -> float | None:
        """Before a wait: refuse a parent's Result in a forked child; in the I/O loop's own
        thread (a done-callback that waits), serve the loop meanwhile. The time left."""
        if concurrent.futures.Future.done(self):
            return timeout
        if self._generation != _generation:
            raise GridError(
                f"{self.description} belongs to process {_parent}; in a forked child nothing settles it "
                "(wait for it in the parent, or make a new Grid in the child)"
            )
        loop = get_loop()
        if not loop.in_loop():
            return timeout
        started = time.monotonic()
        loop.run_until(lambda: concurrent.futures.Future.done(self), None if timeout is None else started + timeout)
        return None if timeout is None else max(0.0, timeout - (time.monotonic() - started))

    def result(self, timeout: float | None = None) -> Any:
        """As :meth:`concurrent.futures.Future.result`."""
        timeout = check_timeout(timeout, "Result.result")
        return super().result(self._before_wait(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As :meth:`concurrent.futures.Future.exception`."""
        timeout = check_timeout(timeout, "Result.exception")
        return super().exception(self._before_wait(timeout))

    def get(self, timeout: float | None = None) -> Any:
        """The value of the call; waits at most ``timeout`` seconds (None: no limit).

        Raises :class:`TimeoutError` if it is not ready in time, and the remote
        exception (or a :class:`~isdgrid.RemoteError`) if the call failed.
        """
        timeout = check_timeout(timeout, "Result.get")
        try:
            return concurrent.futures.Future.result(self, self._before_wait(timeout))  # checked once, above
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
