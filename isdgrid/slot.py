"""Slot: the driver's side of one running daemon (its channels, heartbeat and loss).

A slot is lost only when its daemon's process has ended (as its launcher sees it), when
its heartbeat has been silent for ``host_timeout``, or when something else answers at its
address. A broken connection alone is not loss: the calls channel reconnects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from . import handshake
from .errors import AuthenticationError, GridError, HostLostError
from .launchers.base import DaemonHandle
from .transport import CallsChannel, ConnectionBroken, ControlChannel, address_of, connect

__all__ = ["Slot"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0


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
        self._monitor: threading.Thread | None = None
        self._lost_lock = threading.Lock()
        self.calls = CallsChannel(self.label, self._open_calls, self._alive, self._refused)

    def __repr__(self) -> str:
        state = "lost" if self.lost.is_set() else "up"
        return f"<Slot {self.label} {self.uri} {state}>"

    def open(self) -> None:
        """Connect the channels (the first connection learns the daemon's id)."""
        control = self._new_control()
        with self._control_lock:
            self._control = control
        self.calls.start(self._open_calls())

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
        """Start the heartbeat thread."""
        self._monitor = threading.Thread(target=self._watch, name=f"isdgrid-heartbeat-{self.label}", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        pinger: list[ControlChannel] = []
        try:
            self._heartbeat(pinger)
        finally:
            for channel in pinger:
                channel.close()

    def _heartbeat(self, pinger_box: list[ControlChannel]) -> None:
        pinger: ControlChannel | None = None
        last_ok = time.monotonic()
        while not self._stop.wait(self.heartbeat_interval):
            try:
                code = self.handle.exited()
                if code is not None:
                    self.mark_lost(f"daemon process exited with code {code}")
                    return
                # A ping may take until the slot's deadline, no longer: a silent daemon is
                # declared lost host_timeout after its last answer.
                left = max(0.2, last_ok + self.host_timeout - time.monotonic())
                try:
                    if pinger is None:
                        pinger = self._new_control(left)
                        pinger_box[:] = [pinger]
                    pinger.call("ping", timeout=left)
                    last_ok = time.monotonic()
                except (ConnectionBroken, GridError) as exc:
                    if pinger is not None:
                        pinger.close()
                    pinger = None
                    silent = time.monotonic() - last_ok
                    log.debug("%s: heartbeat failed after %.1f s silent: %s", self.label, silent, exc)
                    if isinstance(exc, AuthenticationError):
                        self._refused(str(exc))
                        return
                    if silent >= self.host_timeout and not self._stop.is_set():
                        self.mark_lost(f"no answer to heartbeat for {silent:.1f} s ({exc})")
                        return
            except BaseException:  # noqa: BLE001 - the monitor outlives any error
                log.exception("%s: heartbeat error", self.label)

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
        self.calls.fail(self.lost_error("a call was out"))
        with self._control_lock:
            if self._control is not None:
                self._control.cut()
        self._on_lost(self)

    def close(self, error: BaseException | None = None) -> None:
        """Stop the heartbeat and close the channels (the daemon is being stopped)."""
        self._stop.set()
        self.calls.close(error or HostLostError(f"{self.label} was closed", host=self.host.name, slot=self.index))
        with self._control_lock:
            if self._control is not None:
                self._control.close()
            self._control = None
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=self.heartbeat_interval + 6.0)
