"""ServiceProxy: the driver's handle on one acquired server."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import warnings
from typing import TYPE_CHECKING, Any

from . import codec
from .errors import ServiceReleasedError
from .result import Result

if TYPE_CHECKING:
    from .grid import Grid
    from .server import Server

__all__ = ["RemoteMethod", "ServiceProxy", "cannot_send", "read_attribute"]

log = logging.getLogger(__name__)


class ServiceProxy:
    """A handle on one server of a service, from ``acquire_service`` until release.

    ``proxy.method(*args, **kw)`` queues a call and returns a :class:`Result` at once;
    calls run remotely in the order they were made. Reading ``proxy.attr`` of a plain
    (non-callable) attribute returns its **value**, as the original grid's proxy did: it
    waits for the proxy's earlier calls, at most the grid's ``attribute_timeout`` seconds
    (then :class:`TimeoutError`); :func:`read_attribute` reads it without waiting, as a
    :class:`Result`. ``proxy.attr = v`` sets it remotely (a name the object lacks but close to
    one it has, a likely misspelling, gives a :class:`UserWarning`). All keep call order. A name the
    published object does not have is an :class:`AttributeError` at once (see
    :meth:`isdgrid.service.Service.check_name`). Arguments are pickled when the call is
    made, so later changes to them in the driver do not reach the call. In a forked child
    of the driver every use raises :class:`GridError` before anything is sent (the
    connections are the parent's).
    """

    __slots__ = (
        "_isdgrid_server", "_isdgrid_grid", "_isdgrid_released", "_isdgrid_lock", "_isdgrid_methods", "__weakref__"
    )

    def __init__(self, server: Server, grid: Grid) -> None:
        object.__setattr__(self, "_isdgrid_server", server)
        object.__setattr__(self, "_isdgrid_grid", grid)
        object.__setattr__(self, "_isdgrid_released", False)
        object.__setattr__(self, "_isdgrid_lock", threading.Lock())
        object.__setattr__(self, "_isdgrid_methods", {})

    def __getattr__(self, name: str) -> Any:
        method = self._isdgrid_methods.get(name)
        if method is not None:
            return method
        if name.startswith("__") or name.startswith("_isdgrid_"):
            raise AttributeError(name)
        service = self._isdgrid_server.service
        if name in service.methods:
            method = self._isdgrid_methods[name] = RemoteMethod(self, name)
            return method
        service.check_name(name)
        return self._isdgrid_read(name, service.attribute_timeout)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("__") or name.startswith("_isdgrid_"):
            raise AttributeError(f"cannot set {name!r} on a service proxy")
        service = self._isdgrid_server.service
        if not service.dynamic and name not in service.attributes and name not in service.methods:
            close = service.close_name(name)
            if close is not None:  # a new name next to a known one: most likely a misspelling
                warnings.warn(
                    f"setting {name!r} on {service.class_name} (service {service.id}), which has no attribute "
                    f"{name!r}: did you mean {close!r}? (the new attribute is set as asked)",
                    UserWarning,
                    stacklevel=2,
                )
        result = self._isdgrid_submit(codec.SETATTR, name, (value,), None)
        result.add_done_callback(_log_failed_setattr)
        self._isdgrid_server.service.attributes.add(name)  # readable from now on

    def _isdgrid_read(self, name: str, timeout: float | None) -> Any:
        """The value of the remote attribute ``name``, after the proxy's earlier calls."""
        result = self._isdgrid_submit(codec.GETATTR, name, (), None)
        try:
            return result.result(timeout)
        except concurrent.futures.TimeoutError:
            if concurrent.futures.Future.done(result):
                raise  # the remote attribute itself raised TimeoutError
            raise TimeoutError(
                f"reading {result.description} took more than {timeout} s: it waits for the proxy's earlier "
                f"calls (Grid(attribute_timeout=...) sets the limit; isdgrid.read_attribute(proxy, {name!r}) "
                "returns a Result at once)"
            ) from None

    def __repr__(self) -> str:
        server = self._isdgrid_server
        state = "released" if self._isdgrid_released else "acquired"
        return f"<ServiceProxy {server.service.id} on {server.slot.label} {state}>"

    def _isdgrid_call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Result:
        return self._isdgrid_submit(codec.CALL, name, args, kwargs)

    def _isdgrid_submit(self, kind: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Result:
        self._isdgrid_grid._check_process()  # before anything goes on a connection a forked child inherited
        server: Server = self._isdgrid_server
        try:
            data, buffers = codec.encode_op(kind, name, args, kwargs, codec.OOB_MIN)
        except Exception as exc:
            raise cannot_send(f"{server.service.class_name}.{codec.describe(kind, name)} on {server.slot.label}",
                              exc) from exc
        result = Result(server, kind, name)
        with self._isdgrid_lock:
            if self._isdgrid_released:
                raise ServiceReleasedError(f"proxy of {server.service.id!r} on {server.slot.label} was released")
            server.submit(data, buffers, result)
        return result

    def _isdgrid_release(self) -> None:
        self._isdgrid_grid._check_process()
        with self._isdgrid_lock:
            if self._isdgrid_released:
                server = self._isdgrid_server
                raise ServiceReleasedError(
                    f"proxy of {server.service.id!r} on {server.slot.label} was already released"
                )
            object.__setattr__(self, "_isdgrid_released", True)
            self._isdgrid_server.submit_release()


def cannot_send(description: str, exc: Exception) -> TypeError:
    """The error for a call (``description``: what, on which slot) whose arguments cannot be pickled."""
    return TypeError(f"cannot send {description}: its arguments cannot be pickled: {exc}")


class RemoteMethod:
    """A bound remote method; calling it queues the call and returns a :class:`Result`."""

    __slots__ = ("_proxy", "_name")

    def __init__(self, proxy: ServiceProxy, name: str) -> None:
        self._proxy = proxy
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Result:
        return self._proxy._isdgrid_submit(codec.CALL, self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<RemoteMethod {self._name} of {self._proxy!r}>"


def read_attribute(proxy: ServiceProxy, name: str) -> Result:
    """Read the remote attribute ``name`` without waiting: a :class:`Result` of its value.

    The read keeps call order (it runs after the proxy's earlier calls), as ``proxy.name``
    does; ``proxy.name`` waits for the value, this returns at once. Raises
    :class:`AttributeError` at once for a name the published object does not have, and
    :class:`TypeError` for a method of its class (call it instead).
    """
    if not isinstance(proxy, ServiceProxy):
        raise TypeError(f"read_attribute needs a proxy from acquire_service, got {type(proxy).__name__}")
    service = proxy._isdgrid_server.service
    if name in service.methods and name not in service.attributes:
        raise TypeError(f"{name!r} is a method of {service.class_name}: call it (proxy.{name}(...)) for a Result")
    service.check_name(name)
    return proxy._isdgrid_submit(codec.GETATTR, name, (), None)


def _log_failed_setattr(result: concurrent.futures.Future[Any]) -> None:
    if not result.cancelled() and result.exception() is not None:
        log.warning("%s failed: %s", getattr(result, "description", "setting an attribute"), result.exception())
