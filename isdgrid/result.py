"""Result: the future a remote call returns at once."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

__all__ = ["Result"]


class Result(concurrent.futures.Future):  # type: ignore[type-arg]
    """The outcome of one remote call, a :class:`concurrent.futures.Future`.

    ``get(timeout)`` is the original grid's way to read it: the value, or the remote
    exception re-raised with the remote traceback attached as its cause.
    """

    def __init__(self, description: str = "") -> None:
        super().__init__()
        self.description = description
        self._server: Any = None  # set when queued; lets get() send from the waiting thread

    def get(self, timeout: float | None = None) -> Any:
        """The value of the call; waits at most ``timeout`` seconds (None: no limit).

        Raises :class:`TimeoutError` if it is not ready in time, and the remote
        exception (or a :class:`~isdgrid.RemoteError`) if the call failed.
        """
        server = self._server
        if server is not None and not self.done():
            started = time.monotonic()
            server.run_for(self, timeout)
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - started))
        try:
            return self.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self.description or 'remote call'} not finished within {timeout} s") from None

    def __repr__(self) -> str:
        return f"<Result {self.description} {self._state.lower()}>"
