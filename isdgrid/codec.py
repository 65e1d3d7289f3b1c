"""How calls, replies and published objects are turned into bytes and back.

Everything that crosses the wire as user data is pickled with cloudpickle (protocol 5),
so classes defined in a driver's ``__main__`` travel by value and come back as the same
class. Each call and each reply item is pickled on its own: one unpicklable argument or
result fails that call alone, never its batch. Pyro5 carries the resulting bytes with the
``marshal`` serializer, which passes ``bytes`` through without re-encoding them.
"""

from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass
from typing import Any

import cloudpickle

from .errors import RemoteError, RemoteTraceback

__all__ = ["CALL", "GETATTR", "SETATTR", "Op", "decode_reply", "dumps", "encode_error", "encode_value", "loads"]

PROTOCOL = 5

CALL = "call"
GETATTR = "getattr"
SETATTR = "setattr"


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` with cloudpickle (protocol 5)."""
    return cloudpickle.dumps(obj, protocol=PROTOCOL)


def loads(data: bytes) -> Any:
    """Unpickle bytes made by :func:`dumps`."""
    return pickle.loads(data)


@dataclass(frozen=True)
class Op:
    """One operation on a published object: a method call or an attribute access."""

    kind: str
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None

    def describe(self) -> str:
        if self.kind == CALL:
            return f"{self.name}()"
        if self.kind == SETATTR:
            return f"setting attribute {self.name!r}"
        return f"attribute {self.name!r}"


# A reply item on the wire: (True, value_bytes, seconds) or
# (False, exception_bytes_or_empty, type_name, message, traceback_text, seconds).
ReplyItem = tuple


def encode_value(value: Any, seconds: float, what: str) -> ReplyItem:
    """Reply item for a successful operation; an unpicklable value becomes an error item."""
    try:
        return (True, dumps(value), seconds)
    except Exception as exc:  # noqa: BLE001 - any pickling failure must reach the caller
        tb = traceback.format_exc()
        err = RemoteError(type(exc).__name__, f"the result of {what} cannot be pickled back to the driver: {exc}", tb)
        return encode_error(err, seconds, tb)


def encode_error(exc: BaseException, seconds: float, tb: str | None = None) -> ReplyItem:
    """Reply item for an operation that raised ``exc``."""
    if tb is None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        exc_bytes = dumps(_without_traceback(exc))
    except Exception:  # noqa: BLE001 - the exception's own type may not be picklable
        exc_bytes = b""
    return (False, exc_bytes, type_name, _safe_str(exc), tb, seconds)


def decode_reply(item: ReplyItem) -> tuple[bool, Any, float]:
    """``(ok, value_or_exception, seconds)`` from a reply item.

    A remote exception is re-created as itself with a :class:`RemoteTraceback` as its
    cause; when its type cannot be unpickled here it becomes a :class:`RemoteError`.
    """
    if item[0]:
        _, payload, seconds = item
        return True, loads(payload), float(seconds)
    _, exc_bytes, type_name, message, tb, seconds = item
    exc: BaseException | None = None
    if exc_bytes:
        try:
            exc = loads(exc_bytes)
        except Exception:  # noqa: BLE001 - the type may not exist in the driver
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message, tb)
    else:
        exc.__cause__ = RemoteTraceback(tb)
    exc.remote_traceback = tb  # type: ignore[attr-defined]
    return False, exc, float(seconds)


def _without_traceback(exc: BaseException) -> BaseException:
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001
        return f"<unprintable {type(exc).__name__}>"
