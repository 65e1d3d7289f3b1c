"""Slot: the driver's side of one running daemon (connections, heartbeat, loss).

Pyro5 errors become isdgrid errors here, in :func:`pyro_errors`, and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import Pyro5.client
import Pyro5.core
import Pyro5.errors

from .bulk import BulkClient
from .errors import AuthenticationError, GridError, HostLostError, RemoteError
from .launchers.base import DaemonHandle

__all__ = ["Slot", "convert_error", "pyro_errors"]

log = logging.getLogger(__name__)

SERIALIZER = "marshal"
BULK_RETRY = 30.0  # after a failed bulk connection, large payloads go inline this long


@contextlib.contextmanager
def pyro_errors(slot: Slot, what: str) -> Iterator[None]:
    """Convert Pyro5 errors raised while talking to ``slot`` into isdgrid errors."""
    try:
        yield
    except GridError:
        raise
    except (Pyro5.errors.PyroError, OSError) as exc:
        raise convert_error(slot, what, exc) from exc


def convert_error(slot: Slot, what: str, exc: BaseException) -> GridError:
    """The isdgrid error for a Pyro5 error or ``OSError`` raised while talking to ``slot``."""
    if isinstance(exc, Pyro5.errors.SecurityError):
        return AuthenticationError(f"{slot.label} refused the grid's secret while {what}: {exc}")
    if isinstance(exc, Pyro5.errors.CommunicationError):
        text = str(exc)
        if "rejected" in text and "secret" in text:
            return AuthenticationError(f"{slot.label} refused the grid's secret while {what}: {text}")
        return HostLostError(
            f"lost contact with {slot.label} while {what}: {exc}", host=slot.host.name, slot=slot.index
        )
    if isinstance(exc, OSError):
        return HostLostError(
            f"lost contact with {slot.label} while {what}: {exc}", host=slot.host.name, slot=slot.index
        )
    return RemoteError(type(exc).__name__, f"{slot.label} while {what}: {exc}")


def make_proxy(uri: str, secret: str, timeout: float | None = None) -> Pyro5.client.Proxy:
    """A Pyro5 proxy to a grid agent that presents ``secret`` (not yet connected)."""
    proxy = Pyro5.client.Proxy(uri)
    proxy._pyroHandshake = secret
    proxy._pyroSerializer = SERIALIZER
    proxy._pyroMaxRetries = 0
    if timeout:
        proxy._pyroTimeout = timeout
    return proxy


class Slot:
    """One daemon the grid uses: its address, its connections, and whether it is lost.

    Every connection made through :meth:`connect` is cut when the slot is declared lost,
    so no thread stays blocked on a dead host.
    """

    def __init__(
        self,
        handle: DaemonHandle,
        secret: str,
        *,
        heartbeat_interval: float,
        host_timeout: float,
        on_lost: Callable[[Slot], None],
    ) -> None:
        self.handle = handle
        self.host = handle.host
        self.index = handle.slot
        self.label = handle.label
        self.uri = handle.uri
        self.secret = secret
        self.heartbeat_interval = heartbeat_interval
        self.host_timeout = host_timeout
        self.lost = threading.Event()
        self.lost_reason = ""
        self.info: dict[str, Any] = {}
        self._on_lost = on_lost
        # Keyed by id(): Pyro5 proxies hash and compare by URI, so a set would merge them.
        self._proxies: weakref.WeakValueDictionary[int, Pyro5.client.Proxy] = weakref.WeakValueDictionary()
        self._proxies_lock = threading.Lock()
        self._sockets: weakref.WeakValueDictionary[int, socket.socket] = weakref.WeakValueDictionary()
        self._bulk_address: tuple[str, int] | None | bool = False  # False: not asked yet
        self._bulk_lock = threading.Lock()
        self._bulk_retry_at = 0.0
        self._control: Pyro5.client.Proxy | None = None
        self._control_lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "lost" if self.lost.is_set() else "up"
        return f"<Slot {self.label} {self.uri} {state}>"

    def connect(self, timeout: float | None = None) -> Pyro5.client.Proxy:
        """A new connected proxy to this daemon's agent, owned by the calling thread."""
        if self.lost.is_set():
            raise HostLostError(f"{self.label} is lost: {self.lost_reason}", host=self.host.name, slot=self.index)
        proxy = make_proxy(self.uri, self.secret, timeout)
        with pyro_errors(self, "connecting"):
            proxy._pyroBind()
        with self._proxies_lock:
            self._proxies[id(proxy)] = proxy
        if self.lost.is_set():  # lost while connecting: do not hand out a live socket
            _cut(proxy)
        return proxy

    def connect_bulk(self) -> BulkClient | None:
        """A new authenticated connection to the daemon's bulk port, owned by the caller.

        None when the daemon has no bulk port (a Unix socket daemon, as with the ssh
        tunnel) or it cannot be reached from here: large payloads then travel inline.
        The connection is cut with the others when the slot is lost.
        """
        with self._bulk_lock:
            if self._bulk_address is False:
                self.info = dict(self.control("info"))
                self._bulk_address = _bulk_address(self.uri, self.info.get("bulk_port"))
            address = self._bulk_address
            if time.monotonic() < self._bulk_retry_at:
                return None
        if not address or self.lost.is_set():
            return None
        assert isinstance(address, tuple)
        try:
            client = BulkClient.connect(address, self.secret, timeout=min(self.host_timeout, 5.0))
        except OSError as exc:
            log.warning("%s: bulk port %s:%s not reachable (%s); large payloads go inline for %g s",
                        self.label, *address, exc, BULK_RETRY)
            with self._bulk_lock:
                self._bulk_retry_at = time.monotonic() + BULK_RETRY
            return None
        with self._proxies_lock:
            self._sockets[id(client.sock)] = client.sock
        if self.lost.is_set():
            client.close()
        return client

    def control(self, method: str, *args: Any) -> Any:
        """Call an agent method over the slot's shared control connection."""
        with self._control_lock:
            if self._control is None:
                self._control = self.connect()
            else:
                self._control._pyroClaimOwnership()
            try:
                with pyro_errors(self, f"calling {method}"):
                    return getattr(self._control, method)(*args)
            except HostLostError:
                self._control = None
                raise

    def start_monitor(self) -> None:
        """Start the heartbeat thread."""
        self._monitor = threading.Thread(target=self._watch, name=f"isdgrid-heartbeat-{self.label}", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        pinger: Pyro5.client.Proxy | None = None
        last_ok = time.monotonic()
        while not self._stop.wait(self.heartbeat_interval):
            code = self.handle.exited()
            if code is not None:
                self.mark_lost(f"daemon process exited with code {code}")
                return
            # A ping may take until the slot's deadline, no longer: a silent daemon is
            # declared lost host_timeout after its last answer, not a ping timeout later.
            left = max(0.2, last_ok + self.host_timeout - time.monotonic())
            try:
                if pinger is None:
                    pinger = self.connect(left)
                else:
                    pinger._pyroTimeout = left
                pinger.ping()
                last_ok = time.monotonic()
            except (GridError, Pyro5.errors.PyroError, OSError) as exc:
                if pinger is not None:
                    _cut(pinger)
                pinger = None
                silent = time.monotonic() - last_ok
                log.debug("%s: heartbeat failed after %.1f s silent: %s", self.label, silent, exc)
                if isinstance(exc, AuthenticationError) or silent >= self.host_timeout:
                    if not self._stop.is_set():
                        self.mark_lost(f"no answer to heartbeat for {silent:.1f} s ({exc})")
                    return
        if pinger is not None:
            _cut(pinger)

    def mark_lost(self, reason: str) -> None:
        """Declare the daemon lost: cut every connection and tell the grid (once)."""
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        log.warning("host %s lost: %s", self.label, reason)
        self._cut_all()
        self._on_lost(self)

    def _cut_all(self) -> None:
        with self._proxies_lock:
            proxies = list(self._proxies.values())
            sockets = list(self._sockets.values())
        for proxy in proxies:
            _cut(proxy)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop the heartbeat and cut the connections (the daemon is being stopped)."""
        self._stop.set()
        self._cut_all()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=self.heartbeat_interval + 6.0)


def _bulk_address(uri: str, port: Any) -> tuple[str, int] | None:
    """Where the bulk port of the daemon at ``uri`` is: its Pyro5 host and ``port``."""
    if not isinstance(port, int) or port <= 0:
        return None
    location = Pyro5.core.URI(uri)
    if location.sockname or not location.host:
        return None
    return (location.host, port)


def _cut(proxy: Pyro5.client.Proxy) -> None:
    """Shut a proxy's socket down from any thread, waking a thread blocked on it."""
    conn = getattr(proxy, "_pyroConnection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
