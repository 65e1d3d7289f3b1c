"""How calls, replies and published objects are turned into bytes and back.

Everything that crosses the wire as user data is pickled with protocol 5. Values made
only of builtins (numbers, strings, bytes, tuples, lists, dicts, sets) and numpy arrays
and scalars of non-object dtype are pickled with the standard ``pickle`` module, which is
an order of magnitude faster for small values; anything else goes through cloudpickle, so
classes and functions defined in a driver's ``__main__`` (or shipped by value to a daemon)
travel by value and come back as the same class. Both write the same format, so the
receiver always uses ``pickle.loads``.

Large contiguous buffers (numpy arrays, ``PickleBuffer``) can be taken out of band
(pickle protocol 5 ``buffer_callback``): the pickle then holds only their layout, and the
buffers travel raw after the frame's header (:mod:`isdgrid.wire`), never copied into it.

Each call and each reply item is pickled on its own: one unpicklable argument or result
fails that call alone, never its batch. The frames of the calls connection carry the
resulting bytes in a ``marshal`` header, which passes ``bytes`` through as they are.

Wire formats (all marshal-able; see :mod:`isdgrid.wire` for the frames around them):

- an operation: ``bytes``, the pickled ``(kind, name, args, kwargs)`` tuple, plus its
  out-of-band buffers in the frame;
- a reply item: ``(True, bytes, seconds)`` plus its out-of-band buffers, or
  ``(False, exception_bytes_or_empty, type_name, message, traceback_text, seconds)``.
"""

from __future__ import annotations

import itertools
import pickle
import sys
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import cloudpickle

from .errors import RemoteError, RemoteTraceback

__all__ = [
    "CALL",
    "Buffers",
    "GETATTR",
    "MAX_FLIGHTS",
    "NO_BUFFERS",
    "OOB_MIN",
    "SETATTR",
    "decode_reply",
    "describe",
    "dumps",
    "encode_error",
    "encode_op",
    "encode_value",
    "is_plain",
    "loads",
    "pack",
    "receive_buffer",
]

PROTOCOL = 5
OOB_MIN = 128 * 1024  # contiguous buffers this large travel out of band, raw (see isdgrid.wire)
MAX_FLIGHTS = 2  # batches of one server out at once; the agent keeps this many replies for resends

CALL = "call"
GETATTR = "getattr"
SETATTR = "setattr"
SNAPSHOT = "snapshot"  # pickle the published object (between calls) and return the bytes
RESTORE = "restore"  # replace the published object with one unpickled from the argument (kept until done/undo)
RESTORE_UNDO = "restore-undo"  # put back the object a restore replaced (all-or-nothing restores)
RESTORE_DONE = "restore-done"  # forget the object a restore replaced

# A reply item on the wire (see the module docstring).
ReplyItem = tuple

_ATOMS = frozenset({int, float, str, bytes, bool, type(None), complex, bytearray})
_CONTAINERS = frozenset({tuple, list, set, frozenset})
_MAX_DEPTH = 32


def is_plain(obj: Any) -> bool:
    """True when ``obj`` holds only builtins and numpy data, so ``pickle`` gives what cloudpickle would.

    Everything else (instances of user classes, functions, classes, subclasses of the
    builtins) may refer to a module the other side lacks, such as the driver's
    ``__main__``, and must go through cloudpickle.
    """
    return _scan(obj, 0) > 0


def _scan(obj: Any, depth: int) -> int:
    """0: not plain; 1: plain builtins only; 2: plain, with numpy arrays (buffers to take out of band)."""
    t = type(obj)
    if t in _ATOMS:
        return 1
    if depth >= _MAX_DEPTH:
        return 0
    if t in _CONTAINERS:
        return _scan_all(obj, depth + 1)
    if t is dict:
        return _scan_all(itertools.chain.from_iterable(obj.items()), depth + 1)
    np = sys.modules.get("numpy")
    if np is not None:
        if t is np.ndarray:
            return 0 if obj.dtype.hasobject else 2
        if isinstance(obj, np.generic) and t.__module__ == "numpy":
            return 0 if obj.dtype.hasobject else 1
    return 0


def _scan_all(items: Iterable[Any], depth: int) -> int:
    """The :func:`_scan` verdict for a collection: its worst item, or 2 if any holds arrays."""
    found = 1
    for x in items:
        if type(x) not in _ATOMS:
            sub = _scan(x, depth)
            if not sub:
                return 0
            if sub > found:
                found = sub
    return found


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` with cloudpickle (protocol 5), everything in band."""
    return cloudpickle.dumps(obj, protocol=PROTOCOL)


def loads(data: bytes, buffers: Sequence[Any] | None = None) -> Any:
    """Unpickle bytes made by :func:`dumps` or :func:`pack` (with their out-of-band buffers)."""
    return pickle.loads(data, buffers=buffers)


class Buffers(list):  # type: ignore[type-arg]
    """The out-of-band buffers of one pickle, in order, with their ``kinds``.

    ``kinds`` has one byte per buffer: ``n`` when a numpy array exported it (the receiver
    may then receive it into uninitialised numpy memory), ``b`` otherwise (a ``bytearray``).
    """

    __slots__ = ("kinds",)

    def __init__(self, buffers: Sequence[Any] = (), kinds: bytes = b"") -> None:
        super().__init__(buffers)
        self.kinds = kinds

    def captured(self) -> Buffers:
        """Copies of the buffers, so later changes to the originals do not reach them."""
        return Buffers([bytearray(buf) for buf in self], self.kinds)


NO_BUFFERS = Buffers()  # shared and empty: never change it


def pack(obj: Any, oob_min: int | None = None) -> tuple[bytes, Buffers]:
    """Pickle ``obj``; contiguous buffers of ``oob_min`` bytes or more are left out of band.

    Returns the pickle and the out-of-band buffers (byte views of ``obj``'s memory, not
    copies); ``oob_min=None`` keeps everything in band.
    """
    plain = 1 if type(obj) in _ATOMS else _scan(obj, 0)
    if plain == 1:  # builtins only: no buffers to take out of band
        return pickle.dumps(obj, protocol=PROTOCOL), NO_BUFFERS
    buffers: list[pickle.PickleBuffer] = []
    callback = None
    if oob_min is not None:

        def callback(buf: pickle.PickleBuffer) -> bool:
            try:
                if buf.raw().nbytes >= oob_min:
                    buffers.append(buf)
                    return False  # out of band
            except BufferError:  # not contiguous: stays in band
                pass
            return True

    if plain:
        data = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=callback)
    else:
        data = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=callback)
    if not buffers:
        return data, NO_BUFFERS
    np = sys.modules.get("numpy")
    kinds = bytes(
        ord("n") if np is not None and isinstance(memoryview(buf).obj, np.ndarray) else ord("b") for buf in buffers
    )
    return data, Buffers([buf.raw() for buf in buffers], kinds)


def encode_op(
    kind: str, name: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, oob_min: int | None = None
) -> tuple[bytes, Buffers]:
    """Pickle one operation; its out-of-band buffers are views of the arguments (see ``Buffers.captured``)."""
    if not kwargs and _ATOMS.issuperset(map(type, args)):  # plain arguments (most calls): no scan needed
        return pickle.dumps((kind, name, args, None), protocol=PROTOCOL), NO_BUFFERS
    return pack((kind, name, args, kwargs or None), oob_min)


def receive_buffer(size: int, kind: int) -> Any:
    """A writable buffer of ``size`` bytes to receive an out-of-band buffer of ``kind`` into.

    Numpy's buffers get uninitialised numpy memory (no zero-filling of megabytes);
    others a ``bytearray``, as in-band unpickling would give.
    """
    if kind == ord("n"):
        try:
            import numpy
        except ImportError:  # pragma: no cover - a numpy buffer without numpy
            return bytearray(size)
        return numpy.empty(size, dtype=numpy.uint8)
    return bytearray(size)


def describe(kind: str, name: str) -> str:
    """How an operation is named in messages."""
    if kind == CALL:
        return f"{name}()"
    if kind == SETATTR:
        return f"setting attribute {name!r}"
    if kind == SNAPSHOT:
        return "snapshot"
    if kind == RESTORE:
        return "restore from a snapshot"
    if kind in (RESTORE_UNDO, RESTORE_DONE):
        return "undo of a restore" if kind == RESTORE_UNDO else "end of a restore"
    return f"attribute {name!r}"


def encode_value(
    value: Any, seconds: float, what: str | tuple[str, str], oob_min: int | None = None
) -> tuple[ReplyItem, Buffers]:
    """Reply item for a successful operation, and its out-of-band buffers.

    An unpicklable value becomes an error item. The buffers are views of ``value``'s
    memory (not copies): the caller keeps them until they are sent. ``what`` names the
    operation, or is its ``(kind, name)``.
    """
    try:
        data, buffers = pack(value, oob_min)
    except Exception as exc:  # noqa: BLE001 - any pickling failure must reach the caller
        tb = traceback.format_exc()
        if isinstance(what, tuple):
            what = describe(*what)
        err = RemoteError(type(exc).__name__, f"the result of {what} cannot be pickled back to the driver: {exc}", tb)
        return encode_error(err, seconds, tb), NO_BUFFERS
    return (True, data, seconds), buffers


def encode_error(exc: BaseException, seconds: float, tb: str | None = None) -> ReplyItem:
    """Reply item for an operation that raised ``exc``.

    An exception of a class from outside the builtins (without a ``__reduce__`` of its
    own) is pickled by its state (see :class:`_ByState`), so it comes back as itself
    whatever its ``__init__`` expects.
    """
    if tb is None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        exc = _without_traceback(exc)
        exc_bytes = dumps(_ByState(exc) if _rebuild_by_state(type(exc)) else exc)
    except Exception:  # noqa: BLE001 - the exception's own type may not be picklable
        exc_bytes = b""
    return (False, exc_bytes, type_name, _safe_str(exc), tb, seconds)


def _rebuild_by_state(cls: type) -> bool:
    """True for an exception class of a user's module that pickles in the default way.

    The default (``BaseException.__reduce__``) re-creates an exception by calling its class
    with ``args``, which fails for a class whose ``__init__`` takes other arguments than it
    passes on (``KwErr(code, detail)`` calling ``super().__init__(f"code={code}")``).
    A class with a ``__reduce__`` of its own knows how to travel and keeps it.
    """
    if cls.__module__ == "builtins":
        return False
    return cls.__reduce_ex__ is BaseException.__reduce_ex__ and cls.__reduce__ is BaseException.__reduce__


class _ByState:
    """Pickles an exception as its class, ``args`` and ``__dict__``, never calling ``__init__``."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        exc = self.exc
        return _rebuild_exception, (type(exc), exc.args, dict(getattr(exc, "__dict__", {})))


def _rebuild_exception(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """The exception ``_ByState`` pickled: made by ``__new__``, then given its args and attributes."""
    try:
        exc = cls.__new__(cls, *args)
    except TypeError:  # a __new__ of its own that wants other arguments: the builtin one
        base = next(k for k in cls.__mro__ if k.__module__ == "builtins")
        exc = base.__new__(cls)  # type: ignore[call-overload]
    exc.args = args
    exc.__dict__.update(state)
    return exc


def decode_reply(item: ReplyItem, buffers: Sequence[Any] | None = None) -> tuple[bool, Any, float]:
    """``(ok, value_or_exception, seconds)`` from a reply item (and its out-of-band buffers).

    A remote exception is re-created as itself with a :class:`RemoteTraceback` as its
    cause; when its type cannot be unpickled here it becomes a :class:`RemoteError`, and
    so does a remote ``BaseException`` that is not an ``Exception`` (``SystemExit``,
    ``KeyboardInterrupt``): raised in the driver, it would end it.
    """
    if item[0]:
        return True, pickle.loads(item[1], buffers=buffers), float(item[2])
    _, exc_bytes, type_name, message, tb, seconds = item
    exc: BaseException | None = None
    if exc_bytes:
        try:
            exc = loads(exc_bytes)
        except Exception:  # noqa: BLE001 - the type may not exist in the driver
            exc = None
    if not isinstance(exc, Exception):
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
