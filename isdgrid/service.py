"""Service: a published object, the servers that hold its copies, and their queue."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .servicequeue import ServerQueue

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Service", "public_methods"]


def public_methods(cls: type) -> frozenset[str]:
    """Names of the callables of ``cls`` a proxy calls as methods (not dunders)."""
    return frozenset(
        name for name in dir(cls) if not name.startswith("__") and callable(getattr(cls, name, None))
    )


@dataclass
class Service:
    """One published object: its id, methods, pickled copy and servers."""

    id: str
    class_name: str
    methods: frozenset[str]
    payload: bytes
    servers: list[Server] = field(default_factory=list)
    queue: ServerQueue = field(init=False)
    respawning: int = 0
    terminated: threading.Event = field(default_factory=threading.Event)
    hold_lock: threading.Lock = field(default_factory=threading.Lock)  # one broadcast takes the servers at a time

    def __post_init__(self) -> None:
        self.queue = ServerQueue(self.id, self.usable)

    def usable(self) -> bool:
        """True while some server is up or being respawned."""
        return self.respawning > 0 or any(not s.lost for s in self.servers)
