"""Hold: the servers a broadcast or scatter took, kept for the calls that follow until release_all."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import codec
from .errors import ServiceReleasedError
from .result import Result

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Hold"]


class Hold:
    """Every server of one service, in server order, from the first broadcast or scatter
    until ``release_all``: what a proxy per server would be, at the cost of one."""

    __slots__ = ("servers", "_lock", "_released")

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers
        self._lock = threading.Lock()  # submissions against the release
        self._released = False

    def submit(self, kind: str, name: str, payloads: Iterable[tuple[bytes, codec.Buffers]]) -> list[Result]:
        """Queue one pickled operation on each server (``payloads`` in server order); a Result each.

        Raises :class:`ServiceReleasedError` once released (``release_all`` in another thread).
        """
        results = []
        with self._lock:
            if self._released:
                service = self.servers[0].service if self.servers else None
                raise ServiceReleasedError(
                    f"the servers of {service.id if service else 'the service'!r} taken by broadcast/scatter "
                    "were released (release_all) meanwhile"
                )
            for server, (data, buffers) in zip(self.servers, payloads, strict=True):
                result = Result(server, kind, name)
                server.submit(data, buffers, result)
                results.append(result)
        return results

    def release(self) -> None:
        """Return every server to its queue once its calls so far have finished (once)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        for server in self.servers:
            server.submit_release()

    def drop(self) -> None:
        """Refuse further calls, releasing nothing (the service is terminated)."""
        with self._lock:
            self._released = True
