"""The driver's connections to one daemon: authentication, framing, reading, reconnecting.

Every connection first runs the mutual handshake of :mod:`isdgrid.handshake` (the daemon
proves itself before the driver sends anything but a nonce). Then:

- :class:`ControlChannel`: a Pyro5 proxy on the authenticated socket
  (``Proxy(connected_socket=...)``) for the agent's control methods;
- :class:`CallsChannel`: the framed calls connection (:mod:`isdgrid.wire`) that carries
  the batches of every service on the slot, with its out-of-band buffers.

Errors are classified here, once, by type: a connection that breaks is
:class:`ConnectionBroken` (the slot reconnects; only its heartbeat and its process decide
that it is lost), a failed proof is :class:`~isdgrid.AuthenticationError`, and an error
raised on the host by a control method comes back as its own type.

Who reads replies: a thread waiting for a result (:meth:`CallsChannel.wait_for`) takes the
channel's *read role* and reads frames itself, so a synchronous call involves no other
thread. Replies nobody waits for that way are read by the channel's background thread,
woken by a kick (``done()``, callbacks, a release) or, for waits that no public hook
reveals (``concurrent.futures.wait``), by the sweeper within :data:`GRACE` seconds.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import Pyro5.client
import Pyro5.core
import Pyro5.errors
from Pyro5 import config as pyro_config

from . import codec, handshake, wire
from .errors import AuthenticationError, GridError, PayloadTooLargeError, RemoteError
from .ticker import Ticker

__all__ = [
    "GRACE",
    "CallsChannel",
    "ConnectionBroken",
    "ControlChannel",
    "Flight",
    "address_of",
    "connect",
]

log = logging.getLogger(__name__)

GRACE = 0.002  # a reply nobody waits for is read by the background thread about this late
LINGER = 1.0  # the sweeper keeps ticking this long after the last flight, then sleeps
RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)
SERIALIZER = "marshal"
CONTROL_HEADROOM = 64 * 1024  # room for Pyro5's header and the other arguments of a control call


class ConnectionBroken(OSError):  # noqa: N818 - a state, not a user-facing error
    """A connection to a daemon failed; the daemon itself may well be alive."""


Address = str | tuple[str, int]


def address_of(uri: str) -> Address:
    """Where the daemon of a ``PYRO:isdgrid.agent@...`` URI listens: (host, port) or a Unix path."""
    location = Pyro5.core.URI(uri)
    if location.sockname:
        return str(location.sockname)
    return (str(location.host), int(location.port))


def connect(address: Address, secret: str, channel: bytes, timeout: float, expected_id: bytes | None) -> tuple[
    socket.socket, bytes
]:
    """An authenticated socket to the daemon at ``address``, and the daemon's id.

    Raises :class:`ConnectionBroken` when it cannot be reached and
    :class:`~isdgrid.AuthenticationError` when the peer fails the handshake.
    """
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(address)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection(address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        raise ConnectionBroken(f"cannot connect: {exc}") from exc
    try:
        daemon_id = handshake.prove(sock, secret, channel, timeout, expected_id)
    except AuthenticationError:
        wire.close_quietly(sock)
        raise
    except OSError as exc:
        wire.close_quietly(sock)
        raise ConnectionBroken(f"handshake failed: {exc}") from exc
    return sock, daemon_id


# -- Pyro5 proxy settings --------------------------------------------------------------------
# The only underscored Pyro5 names isdgrid uses, all here. They are Pyro5's per-proxy API
# (underscored so as not to clash with remote method names; Pyro5 has no other way to set
# these on one proxy rather than for the whole process through Pyro5.config), and each
# is pinned by a test of tests/test_transport.py:
# - _pyroSerializer: marshal passes bytes (pickles, tar archives) as they are; serpent would
#   turn them into base64 dicts (test_control_channel_carries_bytes_as_bytes_marshal);
# - _pyroTimeout: a bound on one call (test_control_call_timeout_is_honoured);
# - _pyroClaimOwnership: a Pyro5 proxy refuses calls from a thread other than its owner;
#   a slot's one control connection serves several threads (the grid's fan-out pool,
#   the caller), one call at a time under our lock, so each call claims it first
#   (test_control_channel_is_shared_between_threads).


def use_marshal(proxy: Pyro5.client.Proxy) -> None:
    """Have ``proxy`` send its calls with the marshal serializer."""
    proxy._pyroSerializer = SERIALIZER


def set_call_timeout(proxy: Pyro5.client.Proxy, timeout: float | None) -> None:
    """Bound each call of ``proxy`` to ``timeout`` seconds (None: no bound)."""
    proxy._pyroTimeout = timeout


def claim(proxy: Pyro5.client.Proxy) -> None:
    """Make the calling thread the owner of ``proxy`` (the caller serialises its use)."""
    proxy._pyroClaimOwnership()


class ControlChannel:
    """One control connection: Pyro5 calls to the agent's control methods, one at a time."""

    def __init__(self, address: Address, secret: str, timeout: float, expected_id: bytes | None) -> None:
        self.sock, self.daemon_id = connect(address, secret, handshake.CHANNEL_CONTROL, timeout, expected_id)
        try:
            self.sock.settimeout(timeout)  # Pyro5 asks the daemon for metadata right away
            self._proxy = Pyro5.client.Proxy("isdgrid.agent", connected_socket=self.sock)
            use_marshal(self._proxy)
        except (Pyro5.errors.PyroError, OSError) as exc:
            wire.close_quietly(self.sock)
            raise ConnectionBroken(f"control connection failed: {exc}") from exc
        except BaseException:
            wire.close_quietly(self.sock)
            raise
        self._lock = threading.Lock()

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Run a control method; a host-side error is re-raised as its own type.

        A message over Pyro5's size limit is refused before anything is sent
        (:class:`~isdgrid.PayloadTooLargeError`): the connection stays good.
        """
        size = sum(len(a) for a in args if isinstance(a, (bytes, bytearray)))
        limit = pyro_config.MAX_MESSAGE_SIZE - CONTROL_HEADROOM
        if size > limit:
            raise PayloadTooLargeError(
                f"{method}: {size} bytes is more than a control message may carry ({limit} bytes, "
                "Pyro5's MAX_MESSAGE_SIZE); copy fewer files at once, or make the object smaller",
                size=size, limit=limit,
            )
        with self._lock:
            claim(self._proxy)  # the channel is shared between threads, one call at a time
            set_call_timeout(self._proxy, timeout)
            try:
                ok, value = self._proxy.call(method, *args)
            except (Pyro5.errors.CommunicationError, OSError) as exc:
                raise ConnectionBroken(f"control call {method} failed: {exc}") from exc
            except Pyro5.errors.PyroError as exc:  # e.g. an object Pyro5 cannot serialise
                raise RemoteError(type(exc).__name__, f"control call {method} failed: {exc}") from exc
        if ok:
            return value
        _, error, _ = codec.decode_reply(value)
        raise error

    def cut(self) -> None:
        """Shut the socket down from any thread (wakes a thread blocked on it)."""
        wire.shutdown_quietly(self.sock)

    def close(self) -> None:
        self.cut()
        wire.close_quietly(self.sock)


class Flight(Protocol):
    """A batch on the calls channel, as the server made it."""

    key: tuple[str, int]
    meta: Any
    buffers: codec.Buffers
    sent_at: float

    def land(self, outcome: tuple[list[Any], codec.Buffers] | BaseException) -> None:
        """Take the reply (items and buffers) or the error that ends this batch; never raises."""


class CallsChannel:
    """The calls connection of one slot, shared by every service on it.

    ``send`` puts a batch on the wire (or keeps it for after a reconnect); replies are
    matched to their batch by ``(service id, number)``. A broken connection is made again
    by the background thread while ``alive()`` says the daemon runs; every batch not yet
    answered is then resent under its number (the agent answers a resend from its record).
    """

    def __init__(
        self,
        label: str,
        open_socket: Callable[[], socket.socket],
        alive: Callable[[], bool],
        on_refused: Callable[[str], None],
    ) -> None:
        self.label = label
        self._open = open_socket
        self._alive = alive
        self._on_refused = on_refused
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # threads waiting for results
        self._bg = threading.Condition(self._lock)  # the background thread
        self._sock: socket.socket | None = None
        self._frames: wire.FrameReader | None = None
        self._flights: dict[tuple[str, int], Flight] = {}
        self._reader: int | None = None  # thread holding the read role
        self._send_lock = threading.Lock()
        self._broken = True
        self._kicked = False
        self._closed = False
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._background, name=f"isdgrid-reader-{label}", daemon=True)

    def start(self, sock: socket.socket) -> None:
        """Start serving on an authenticated socket."""
        with self._cond:
            self._sock = sock
            self._frames = wire.FrameReader(sock)
            self._broken = False
        self._thread.start()

    # -- sending ---------------------------------------------------------------------------
    def send(self, flight: Flight) -> None:
        """Send a batch now, or keep it for the reconnect; fails it if the channel is closed."""
        with self._cond:
            failed = self._failed
            if failed is None:
                self._flights[flight.key] = flight
                sock = None if self._broken else self._sock
                if self._kicked:  # the background thread is reading: it must see this one too
                    self._bg.notify()
        if failed is not None:
            flight.land(failed)
            return
        flight.sent_at = time.monotonic()
        _sweeper.watch(self)
        if sock is None:
            self.kick()
            return
        try:
            with self._send_lock:
                wire.send_frame(sock, wire.BATCH, flight.meta, flight.buffers)
        except OSError as exc:
            self._break(sock, f"sending failed: {exc}")

    # -- reading ---------------------------------------------------------------------------
    def wait_for(self, done: Callable[[], bool], deadline: float | None) -> None:
        """Read replies in the calling thread until ``done()`` or ``deadline``.

        Takes the read role when it is free; otherwise waits for whoever holds it. Returns
        at the deadline without touching the connection (a reply that is not there yet
        stays on the wire for the next reader).
        """
        while not done():
            with self._cond:
                if done():
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                if self._reader is not None or self._broken or not self._flights or self._sock is None:
                    if self._failed is not None:
                        return
                    self._cond.wait(left if left is not None and left < 1.0 else 1.0)
                    continue
                self._reader = threading.get_ident()
                sock, frames = self._sock, self._frames
            # In slices: a reply that another thread lands meanwhile is noticed within one.
            self._read_one(sock, frames, 1.0 if left is None else min(left, 1.0))

    def _read_one(self, sock: socket.socket, frames: Any, timeout: float | None) -> None:
        """Read one frame (read role held) and land its batch; gives the role back.

        The batch leaves the list under the same lock that gives the role back: a thread
        that takes the role next never waits on the wire for a reply already read.
        """
        frame = None
        flight: Flight | None = None
        try:
            if not frames.buffered:
                try:
                    ready, _, _ = select.select([sock], [], [], timeout)
                except (OSError, ValueError) as exc:  # closed under us
                    self._break(sock, f"connection closed: {exc}")
                    return
                if not ready:
                    return
            try:
                frame = frames.read()
            except BaseException as exc:
                # Part of a frame may be read: the stream is unusable. Reconnect and resend;
                # the agent answers resends from its record.
                self._break(sock, f"reading a reply failed: {exc!r}")
                if not isinstance(exc, (OSError, ValueError, EOFError)):
                    raise
                return
        finally:
            try:
                with self._cond:
                    if frame is not None:  # listed batches are exactly those awaiting a reply
                        flight = self._flights.pop((frame[1][0], frame[1][1]), None)
                    self._reader = None
                    self._cond.notify_all()
                    if self._kicked and self._flights:
                        self._bg.notify()
            except BaseException:
                if frame is not None:  # interrupted with a reply in hand: have it resent
                    if flight is not None:
                        with self._cond:
                            self._flights.setdefault(flight.key, flight)
                    self._break(sock, "interrupted while taking a reply")
                raise
        if frame is None:
            return
        if flight is None:
            log.debug("%s: reply to unknown batch %s ignored", self.label, frame[1][:2])
            return
        try:
            self._dispatch(frame, flight)
        except BaseException:
            # Interrupted (KeyboardInterrupt) before its batch landed: it was listed again,
            # so the reconnect resends it and the agent answers from its record.
            self._break(sock, "interrupted while taking a reply")
            raise

    def _dispatch(self, frame: wire.Frame, flight: Flight) -> None:
        kind, meta, buffers = frame
        key = flight.key
        try:
            if kind == wire.ERROR:
                flight.land(RemoteError(meta[2], f"the daemon on {self.label} could not run the batch: {meta[3]}"))
            else:
                flight.land((meta[2], buffers))
        except BaseException:
            # Interrupted before it landed: list it again, so that the reconnect resends it
            # (a batch lands once: a second reply to a landed batch is ignored).
            with self._cond:
                self._flights.setdefault(key, flight)
            raise
        finally:
            with self._cond:  # threads waiting for a result of this batch look again
                if not self._flights:  # (landing may have sent the next batch: then read on)
                    self._kicked = False
                self._cond.notify_all()

    def kick(self) -> None:
        """Have the background thread read the replies in flight now."""
        with self._cond:
            if not self._kicked:
                self._kicked = True
                self._bg.notify()

    def due(self, now: float) -> bool:
        """True when a reply has waited longer than GRACE with nobody reading (sweeper)."""
        if self._kicked or self._reader is not None or not self._flights:
            return False
        try:
            oldest = next(iter(self._flights.values())).sent_at
        except (StopIteration, RuntimeError):  # changed meanwhile: look next time
            return False
        return now - oldest >= GRACE / 2

    @property
    def idle(self) -> bool:
        """No batch out."""
        return not self._flights

    def _background(self) -> None:
        while True:
            try:
                if not self._background_step():
                    return
            except BaseException:  # noqa: BLE001 - this thread outlives any error
                log.exception("%s: reader thread error", self.label)
                time.sleep(0.05)

    def _background_step(self) -> bool:
        with self._cond:
            while True:
                if self._closed:
                    return False
                if self._broken and self._failed is None:
                    break
                if self._kicked and self._flights and self._reader is None and not self._broken:
                    self._reader = threading.get_ident()
                    sock, frames = self._sock, self._frames
                    break
                self._bg.wait(None if not self._flights else 1.0)
        if self._broken:
            self._reconnect()
            return True
        assert sock is not None
        self._read_one(sock, frames, 1.0)
        return True

    # -- breaking and reconnecting ------------------------------------------------------------
    def _break(self, sock: socket.socket, why: str) -> None:
        with self._cond:
            if self._sock is not sock or self._broken:
                return
            self._broken = True
            self._cond.notify_all()
            self._bg.notify()
        if not self._closed:
            log.info("%s: calls connection broke (%s); reconnecting", self.label, why)
        wire.shutdown_quietly(sock)
        wire.close_quietly(sock)

    def _reconnect(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                if self._closed or self._failed is not None:
                    return
            if not self._alive():
                with self._cond:  # the heartbeat monitor declares the loss; wait for it
                    self._bg.wait(0.2)
                continue
            try:
                sock = self._open()
            except AuthenticationError as exc:
                self._on_refused(str(exc))
                return
            except (ConnectionBroken, GridError) as exc:
                log.info("%s: reconnect failed (%s)", self.label, exc)
                with self._cond:
                    self._bg.wait(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
                attempt += 1
                continue
            with self._cond:
                if self._closed or self._failed is not None:
                    wire.close_quietly(sock)
                    return
                flights = list(self._flights.values())
                self._sock = sock
                self._frames = wire.FrameReader(sock)
            try:
                with self._send_lock:
                    for flight in flights:  # in the order they were first sent
                        wire.send_frame(sock, wire.BATCH, flight.meta, flight.buffers)
            except OSError as exc:
                log.info("%s: resend failed (%s)", self.label, exc)
                wire.close_quietly(sock)
                continue
            with self._cond:
                self._broken = False
                self._kicked = bool(self._flights)
                self._cond.notify_all()
            log.info("%s: reconnected; %d batches resent", self.label, len(flights))
            return

    def cut(self) -> None:
        """Shut the connection down (from any thread); the channel reconnects and resends."""
        with self._cond:
            sock = self._sock
        if sock is not None:
            wire.shutdown_quietly(sock)
        self.kick()

    def fail(self, error: BaseException) -> None:
        """End the channel: every batch out, and every later one, fails with ``error``."""
        with self._cond:
            if self._failed is None:
                self._failed = error
            flights = list(self._flights.values())
            self._flights.clear()
            sock = self._sock
            self._broken = True
            self._cond.notify_all()
            self._bg.notify()
        if sock is not None:
            wire.shutdown_quietly(sock)
        for flight in flights:
            flight.land(error)

    def close(self, error: BaseException) -> None:
        """Fail what is out with ``error`` and stop the background thread."""
        _sweeper.forget(self)
        with self._cond:
            self._closed = True
        self.fail(error)
        with self._cond:
            sock = self._sock
            self._cond.notify_all()
            self._bg.notify()
        if sock is not None:
            wire.close_quietly(sock)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)


def _sweep(channel: CallsChannel, now: float) -> bool:
    """The sweeper's look at one channel: kick its reader when a reply waits unread."""
    if channel.due(now):
        channel.kick()
    return not channel.idle


# One thread for every calls channel: kicks the readers of replies nobody waits for.
_sweeper: Ticker[CallsChannel] = Ticker("isdgrid-sweeper", GRACE, _sweep, linger=LINGER)


