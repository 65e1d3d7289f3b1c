"""Service: a published object, the servers that hold its copies, and their queue.

A service also knows the names its published object answers (recorded at publish), so a
proxy can refuse a misspelt name at once instead of sending it:

- ``methods``: the callables of the class, and callable instance attributes;
- ``attributes``: what a proxy may read as a value: the class's other names (properties,
  class attributes) and the instance attributes the object had when it was published
  (plus those set later through a proxy).

A class that defines ``__getattr__`` or ``__getattribute__`` answers names dynamically:
its names are not checked (``dynamic``), nor those of a service published with
``check_names=False``.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .server import ServerState
from .servicequeue import ServerQueue

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Service", "instance_names", "public_methods"]

_LISTED = 40  # names an error message lists at most, of each kind
_LISTED_SERVERS = 20  # servers a wait's message lists at most, per holder


def public_methods(cls: type) -> frozenset[str]:
    """Names of the callables of ``cls`` a proxy calls as methods (not dunders)."""
    return frozenset(
        name for name in dir(cls) if not name.startswith("__") and callable(getattr(cls, name, None))
    )


def instance_names(instance: Any) -> tuple[frozenset[str], frozenset[str], bool]:
    """``(methods, attributes, dynamic)`` of ``instance``, as the module docstring defines them."""
    cls = type(instance)
    methods = set(public_methods(cls))
    attributes = {name for name in dir(cls) if not name.startswith("__") and name not in methods}
    for name, value in _instance_attributes(instance):
        if not name.startswith("__"):
            attributes.add(name)
            if callable(value):  # a function kept on the instance: proxy.name(...) calls it remotely
                methods.add(name)
    dynamic = any(
        "__getattr__" in vars(k) or "__getattribute__" in vars(k) for k in cls.__mro__ if k is not object
    )
    return frozenset(methods), frozenset(attributes), dynamic


def _instance_attributes(instance: Any) -> Iterable[tuple[str, Any]]:
    """The instance's own attributes: its ``__dict__`` and the ``__slots__`` it has filled."""
    yield from getattr(instance, "__dict__", {}).items()
    for klass in type(instance).__mro__:
        slots = vars(klass).get("__slots__", ())
        for name in [slots] if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__"):
                try:
                    yield name, getattr(instance, name)
                except AttributeError:  # an empty slot
                    continue


@dataclass
class Service:
    """One published object: its id, names, pickled copy and servers.

    ``attribute_timeout`` bounds how long reading ``proxy.attr`` waits (None: no bound).
    """

    id: str
    class_name: str
    methods: frozenset[str]
    payload: bytes
    attributes: set[str] = field(default_factory=set)
    dynamic: bool = True  # names are not checked
    attribute_timeout: float | None = 60.0
    servers: list[Server] = field(default_factory=list)
    queue: ServerQueue = field(init=False)
    respawning: int = 0
    terminated: threading.Event = field(default_factory=threading.Event)
    hold_lock: threading.Lock = field(default_factory=threading.Lock)  # one broadcast takes the servers at a time

    def __post_init__(self) -> None:
        self.queue = ServerQueue(self.id, self.usable, self.holders)

    @classmethod
    def of(
        cls,
        service_id: str,
        instance: Any,
        payload: bytes,
        *,
        check_names: bool = True,
        attribute_timeout: float | None = 60.0,
    ) -> Service:
        """The service of a published ``instance``, its names recorded now."""
        methods, attributes, dynamic = instance_names(instance)
        return cls(
            service_id,
            type(instance).__qualname__,
            methods,
            payload,
            attributes=set(attributes),
            dynamic=dynamic or not check_names,
            attribute_timeout=attribute_timeout,
        )

    def usable(self) -> bool:
        """True while some server is up or being respawned."""
        return self.respawning > 0 or any(not s.lost for s in self.servers)

    def holders(self) -> str:
        """Who holds which servers now, for a wait's TimeoutError or warning.

        E.g. ``held by thread 'worker-1': 0 (localhost/0); lost: 1 (localhost/1, respawning)``.
        """
        groups: dict[str, list[str]] = {}
        for server in list(self.servers):
            label = f"{server.index} ({server.slot.label}"
            if server.lost:
                key = "lost"
                label += ", respawning)" if self.respawning else ")"
            elif server.state is ServerState.FREE:
                continue
            elif server.state is ServerState.RELEASING:
                key = "released, waiting for their pending calls"
                label += f", {server.pending} pending)"
            else:
                key = f"held by {server.holder or 'an unnamed holder'}"
                label += ")"
            groups.setdefault(key, []).append(label)
        if not groups:
            return "no server is held now (other threads waited first)"
        return "; ".join(f"{key}: {_listing_servers(labels)}" for key, labels in groups.items())

    def check_name(self, name: str) -> None:
        """Raise :class:`AttributeError` (naming it, listing the methods) for a name the object lacks."""
        if self.dynamic or name in self.methods or name in self.attributes:
            return
        raise AttributeError(self.unknown_name(name), name=name)

    def close_name(self, name: str) -> str | None:
        """The known name closest to ``name`` (a likely misspelling of it), if any."""
        close = difflib.get_close_matches(name, sorted(self.methods | self.attributes), n=1)
        return close[0] if close else None

    def unknown_name(self, name: str) -> str:
        """The message for a name the published object does not have."""
        close = self.close_name(name)
        text = f"{self.class_name!r} object (service {self.id}) has no attribute {name!r}"
        if close:
            text += f"; did you mean {close!r}?"
        text += f"\n  methods: {_listing(self.methods)}"
        text += f"\n  attributes: {_listing(self.attributes)}"
        text += (
            "\n  (the proxy knows the attributes the object had when it was published; for one that a "
            "method sets later, give it a value in __init__, or publish(instance, check_names=False))"
        )
        return text


def _listing_servers(labels: list[str]) -> str:
    more = len(labels) - _LISTED_SERVERS
    return ", ".join(labels[:_LISTED_SERVERS]) + (f", ... ({more} more)" if more > 0 else "")


def _listing(names: Iterable[str]) -> str:
    public = sorted(n for n in names if not n.startswith("_"))
    if not public:
        return "none"
    more = len(public) - _LISTED
    return ", ".join(public[:_LISTED]) + (f", ... ({more} more)" if more > 0 else "")
