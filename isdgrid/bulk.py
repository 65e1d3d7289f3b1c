"""The bulk side channel: large out-of-band buffers of calls and replies, raw over TCP.

Pyro5 carries every call, but a numpy array of megabytes would be copied several times on
the way through its message framing. Each daemon therefore also serves a small raw-TCP
"bulk" port on the same interface (its number is in ``agent.info()["bulk_port"]``). The
driver puts a call's large buffers there under a key before it sends the call; the call
names the key, and the agent unpickles with those buffers, received straight into
``bytearray`` objects (no further copy). Large buffers of a reply wait in the daemon's
:class:`BulkStore` under a key named in the reply, until the driver fetches them.

The port is as guarded as the Pyro5 port: a client must first send the grid's secret
(compared with :func:`hmac.compare_digest`), within ``AUTH_TIMEOUT`` seconds and in a
message of bounded size, or it is dropped before anything else is read; at most
``MAX_UNAUTHENTICATED`` connections may wait to authenticate at once.

Protocol (all integers big-endian):

- client hello: ``b"ISDB"``, u16 secret length, the secret; server: ``b"OK"`` or close;
- ``PUT``: ``b"P"``, u16 key length, u32 buffer count, key, one u64 size per buffer, one
  kind byte per buffer (see :class:`isdgrid.codec.Buffers`), the buffers; server: ``b"K"``;
- ``GET``: ``b"G"``, u16 key length, u32 0, key; server: ``b"K"``, u32 count, the sizes
  (u64 each), the kinds, the buffers; or ``b"N"`` when the key is unknown.

Buffers are received into uninitialised memory of their kind (no zero-filling).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

from .codec import Buffers, receive_buffer

__all__ = ["BulkClient", "BulkError", "BulkServer", "BulkStore"]

log = logging.getLogger(__name__)

MAGIC = b"ISDB"
AUTH_TIMEOUT = 5.0
MAX_SECRET = 1024
MAX_KEY = 512
MAX_COUNT = 1 << 16
MAX_UNAUTHENTICATED = 32
OK = b"K"
MISSING = b"N"

_HELLO = struct.Struct("!4sH")
_HEADER = struct.Struct("!cHI")
_COUNT = struct.Struct("!I")


class BulkError(OSError):
    """The bulk channel failed or the peer broke the protocol."""


# -- shared framing ----------------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, buf)
    return bytes(buf)


def _recv_into(sock: socket.socket, buf: Any) -> None:
    view = memoryview(buf).cast("B")
    got = 0
    size = view.nbytes
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise BulkError("bulk connection closed by the peer")
        got += n


def _send_buffers(sock: socket.socket, head: bytes, buffers: Sequence[Any]) -> None:
    sock.sendall(head)
    for buf in buffers:
        sock.sendall(buf)


def _layout(buffers: Buffers) -> bytes:
    kinds = buffers.kinds
    if len(kinds) != len(buffers):
        raise ValueError("one kind byte per buffer is needed")
    return struct.pack(f"!{len(buffers)}Q", *(memoryview(b).nbytes for b in buffers)) + kinds


def _recv_buffers(sock: socket.socket, count: int) -> Buffers:
    if count > MAX_COUNT:
        raise BulkError(f"too many buffers ({count})")
    if not count:
        return Buffers()
    sizes = struct.unpack(f"!{count}Q", _recv_exact(sock, 8 * count))
    kinds = _recv_exact(sock, count)
    buffers = Buffers([], kinds)
    for size, kind in zip(sizes, kinds, strict=True):
        buf = receive_buffer(size, kind)
        _recv_into(sock, buf)
        buffers.append(buf)
    return buffers


# -- the daemon's side -------------------------------------------------------------------
class BulkStore:
    """Buffers waiting under string keys: calls' buffers put by the driver, replies' staged."""

    def __init__(self) -> None:
        self._items: dict[str, Buffers] = {}
        self._cond = threading.Condition()

    def put(self, key: str, buffers: Buffers) -> None:
        with self._cond:
            self._items[key] = buffers
            self._cond.notify_all()

    def get(self, key: str) -> Buffers | None:
        """The buffers under ``key`` (kept), or None."""
        with self._cond:
            return self._items.get(key)

    def take(self, key: str, timeout: float) -> Buffers | None:
        """Remove and return the buffers under ``key``, waiting at most ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._items, timeout):
                return None
            return self._items.pop(key)

    def drop(self, keys: Sequence[str]) -> None:
        with self._cond:
            for key in keys:
                self._items.pop(key, None)

    @property
    def has_requests(self) -> bool:
        """True while a call's buffers (keys ``q/...``) wait here (a hint, read without lock)."""
        return any(k.startswith("q/") for k in list(self._items))

    def drop_where(self, prefix: str, keep: Any) -> None:
        """Drop keys starting with ``prefix`` unless ``keep(rest_of_key)`` is true."""
        with self._cond:
            for key in [k for k in self._items if k.startswith(prefix) and not keep(k[len(prefix):])]:
                del self._items[key]

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class BulkServer:
    """The daemon's bulk port: authenticated PUT/GET of raw buffers into a :class:`BulkStore`."""

    def __init__(self, secret: str, store: BulkStore, host: str = "127.0.0.1", port: int = 0) -> None:
        if not secret:
            raise ValueError("a bulk server needs a non-empty secret")
        self._secret = secret.encode()
        self.store = store
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._pending = threading.BoundedSemaphore(MAX_UNAUTHENTICATED)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="isdgrid-bulk-accept", daemon=True)

    def start(self) -> BulkServer:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and cut every connection."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                continue
            if not self._pending.acquire(blocking=False):
                log.warning("bulk: refused a client from %s: too many unauthenticated connections", peer)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, peer), name="isdgrid-bulk", daemon=True).start()

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        with self._lock:
            self._conns.add(conn)
        try:
            try:
                authenticated = self._authenticate(conn, peer)
            finally:
                self._pending.release()
            if authenticated:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while self._handle(conn):
                    pass
        except (OSError, struct.error, ValueError) as exc:
            log.debug("bulk: connection from %s ended: %s", peer, exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _authenticate(self, conn: socket.socket, peer: Any) -> bool:
        conn.settimeout(AUTH_TIMEOUT)
        try:
            magic, length = _HELLO.unpack(_recv_exact(conn, _HELLO.size))
            if magic != MAGIC or length > MAX_SECRET:
                log.warning("bulk: refused a client from %s: not a bulk hello", peer)
                return False
            offered = _recv_exact(conn, length)
        except (OSError, struct.error) as exc:
            log.debug("bulk: dropped a client from %s during the hello: %s", peer, exc)
            return False
        if not hmac.compare_digest(offered, self._secret):
            log.warning("bulk: refused a client from %s: wrong or missing grid secret", peer)
            return False
        conn.settimeout(None)
        conn.sendall(b"OK")
        return True

    def _handle(self, conn: socket.socket) -> bool:
        """Serve one request; False when the client closed the connection."""
        first = conn.recv(1)
        if not first:
            return False
        op, keylen, count = _HEADER.unpack(first + _recv_exact(conn, _HEADER.size - 1))
        if keylen > MAX_KEY or count > MAX_COUNT:
            raise ValueError(f"bulk request too large (key {keylen}, {count} buffers)")
        key = _recv_exact(conn, keylen).decode()
        if op == b"P":
            self.store.put(key, _recv_buffers(conn, count))
            conn.sendall(OK)
        elif op == b"G":
            buffers = self.store.get(key)
            if buffers is None:
                conn.sendall(MISSING)
            else:
                _send_buffers(conn, OK + _COUNT.pack(len(buffers)) + _layout(buffers), buffers)
        else:
            raise ValueError(f"unknown bulk request {op!r}")
        return True


# -- the driver's side -------------------------------------------------------------------
class BulkClient:
    """One authenticated connection to a daemon's bulk port (used by one thread at a time)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, address: tuple[str, int], secret: str, timeout: float) -> BulkClient:
        """Connect and authenticate; raises ``OSError`` (``BulkError`` when refused)."""
        sock = socket.create_connection(address, timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            secret_bytes = secret.encode()
            sock.sendall(_HELLO.pack(MAGIC, len(secret_bytes)) + secret_bytes)
            if _recv_exact(sock, 2) != b"OK":
                raise BulkError("the bulk port refused the grid's secret")
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def settimeout(self, timeout: float | None) -> None:
        if self.sock.gettimeout() != timeout:
            self.sock.settimeout(timeout)

    def put_many(self, items: Sequence[tuple[str, Buffers]]) -> None:
        """Store each ``(key, buffers)`` on the daemon; returns once all are stored."""
        for key, buffers in items:
            k = key.encode()
            _send_buffers(self.sock, _HEADER.pack(b"P", len(k), len(buffers)) + k + _layout(buffers), buffers)
        for key, _ in items:
            if _recv_exact(self.sock, 1) != OK:
                raise BulkError(f"bulk PUT of {key} failed")

    def get_many(self, keys: Sequence[str]) -> list[Buffers]:
        """The buffers under each key, received into new memory (see :func:`codec.receive_buffer`)."""
        for key in keys:
            k = key.encode()
            self.sock.sendall(_HEADER.pack(b"G", len(k), 0) + k)
        out = []
        for key in keys:
            status = _recv_exact(self.sock, 1)
            if status != OK:
                raise BulkError(f"the daemon has no bulk data under {key}")
            (count,) = _COUNT.unpack(_recv_exact(self.sock, 4))
            out.append(_recv_buffers(self.sock, count))
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
