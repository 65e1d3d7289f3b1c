"""Slot: the driver's side of one running daemon (its channels, heartbeat and loss).

A slot is lost only when its daemon's process has ended (as its launcher sees it), when
its heartbeat has been silent for ``host_timeout``, or when something else answers at its
address. A broken connection alone is not loss: the calls channel reconnects. The
heartbeat is a timer of the I/O loop that pings on the calls connection (the daemon
answers at once, even while calls run); a slot has no thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from . import handshake
from .errors import AuthenticationError, HostLostError
from .ioloop import Timer, get_loop
from .launchers.base import DaemonHandle
from .transport import CallsChannel, ConnectionBroken, ControlChannel, address_of, connect
from .workers import Workers

__all__ = ["Slot"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
EXIT_CHECKS = (0.01, 0.05, 0.2, 0.5)  # after a connection broke: has the process ended?

# Where a lost slot is handed to the grid (respawn, queues): out of the I/O loop's thread.
_LOSSES = Workers("isdgrid-loss", 1)


class Slot:
    """One daemon the grid uses: its address, channels, and whether it is lost."""

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
        self._address = address_of(handle.uri)
        self._connect_timeout = min(CONNECT_TIMEOUT, host_timeout)
        self.daemon_id: bytes | None = None
        self._control: ControlChannel | None = None
        self._control_lock = threading.Lock()
        self._stop = threading.Event()
        self._lost_lock = threading.Lock()
        self._loop = get_loop()
        self._timer: Timer | None = None
        self.calls = CallsChannel(self.label, self._open_calls, self._alive, self._refused, self._connection_broke)

    def __repr__(self) -> str:
        state = "lost" if self.lost.is_set() else "up"
        return f"<Slot {self.label} {self.uri} {state}>"

    def open(self) -> None:
        """Connect the channels (the first connection learns the daemon's id)."""
        sock, self.daemon_id = connect(
            self._address, self.secret, handshake.CHANNEL_CALLS, self._connect_timeout, self.daemon_id
        )
        self.calls.start(sock)  # the control connection is made on the first control call

    def _alive(self) -> bool:
        return not self.lost.is_set() and self.handle.exited() is None

    def _refused(self, reason: str) -> None:
        self.mark_lost(f"the daemon's address no longer answers as this daemon ({reason})")

    def _open_calls(self) -> Any:
        sock, _ = connect(self._address, self.secret, handshake.CHANNEL_CALLS, self._connect_timeout, self.daemon_id)
        return sock

    def _new_control(self, timeout: float | None = None) -> ControlChannel:
        if self.lost.is_set():
            raise self.lost_error("connecting")
        channel = ControlChannel(self._address, self.secret, timeout or self._connect_timeout, self.daemon_id)
        if self.daemon_id is None:
            self.daemon_id = channel.daemon_id
        return channel

    def lost_error(self, what: str) -> HostLostError:
        """The error for a call on this slot once it is lost."""
        return HostLostError(
            f"{self.label} is lost ({self.lost_reason}) while {what}", host=self.host.name, slot=self.index
        )

    def control(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Call an agent control method over the slot's shared control connection.

        Reconnects (while the daemon runs) when the connection broke; raises
        :class:`HostLostError` once the slot is lost, and a host-side error as its own type.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else self.host_timeout + 60.0)
        attempt = 0
        while True:
            if self.lost.is_set():
                raise self.lost_error(f"calling {method}")
            try:
                with self._control_lock:
                    if self._control is None:
                        self._control = self._new_control()
                    channel = self._control
                return channel.call(method, *args, timeout=timeout)
            except ConnectionBroken as exc:
                with self._control_lock:
                    if self._control is not None:
                        self._control.close()
                    self._control = None
                if not self._alive() or time.monotonic() > deadline:
                    if not self.lost.is_set() and self.handle.exited() is not None:
                        self.mark_lost(f"daemon process exited with code {self.handle.exited()}")
                    if self.lost.is_set():
                        raise self.lost_error(f"calling {method}") from exc
                    raise HostLostError(
                        f"cannot reach {self.label} while calling {method}: {exc}", host=self.host.name, slot=self.index
                    ) from exc
                self.lost.wait(min(0.05 * 2**attempt, 1.0))
                attempt += 1
            except AuthenticationError as exc:
                self._refused(str(exc))
                raise

    def start_monitor(self) -> None:
        """Start the heartbeat: a timer of the I/O loop, every ``heartbeat_interval``."""
        self._timer = self._loop.call_later(self.heartbeat_interval, self._beat)

    def _beat(self) -> None:
        """One heartbeat (in the I/O loop): has the process ended, has the daemon gone silent?"""
        if self._exit_check():
            return
        heard = max(self.calls.last_heard, self.calls.last_sent)
        silent = time.monotonic() - heard
        if silent >= self.host_timeout:
            self.mark_lost(f"no answer to heartbeat for {silent:.1f} s")
            return
        self.calls.ping()
        self._timer = self._loop.call_later(self.heartbeat_interval, self._beat)

    def _connection_broke(self) -> None:
        """The calls connection broke (in any thread): look at the process at once, and soon again.

        A daemon that died closes its connections as it exits: its loss is seen within
        milliseconds, not at the next heartbeat.
        """
        for delay in EXIT_CHECKS:
            self._loop.call_later(delay, self._exit_check)

    def _exit_check(self) -> bool:
        """True when the slot needs no more watching: closed, lost, or its process ended (now lost)."""
        if self._stop.is_set() or self.lost.is_set():
            return True
        code = self.handle.exited()
        if code is not None:
            self.mark_lost(f"daemon process exited with code {code}")
            return True
        return False

    def cut_connections(self) -> None:
        """Cut the slot's connections, as a network glitch would; they are made again."""
        self.calls.cut()
        with self._control_lock:
            if self._control is not None:
                self._control.cut()

    def mark_lost(self, reason: str) -> None:
        """Declare the daemon lost: fail every batch out and tell the grid (once)."""
        with self._lost_lock:
            if self.lost.is_set():
                return
            self.lost_reason = reason
            self.lost.set()
        log.warning("host %s lost: %s", self.label, reason)
        if self._timer is not None:
            self._timer.cancel()
        try:
            self.calls.fail(self.lost_error("a call was out"))  # raises what a done-callback raised
        finally:
            with self._control_lock:
                if self._control is not None:
                    self._control.cut()
            # The grid's part (respawn, queues) takes the grid's locks: never in the I/O loop,
            # whose thread settles the Results that a thread holding them may wait for.
            _LOSSES.submit(self._on_lost, self)

    def close(self, error: BaseException | None = None) -> None:
        """Stop the heartbeat and close the channels (the daemon is being stopped)."""
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        self.calls.close(error or HostLostError(f"{self.label} was closed", host=self.host.name, slot=self.index))
        with self._control_lock:
            if self._control is not None:
                self._control.close()
            self._control = None
