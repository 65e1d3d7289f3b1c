"""Slot: the driver's side of one running daemon (its channels, heartbeat and loss).

A slot is lost only when its daemon's process has ended (as its launcher sees it), when
its heartbeat has been silent for ``host_timeout``, or when something else answers at its
address. A broken connection alone is not loss: the calls channel reconnects. The
heartbeat is a timer of the I/O loop that pings on the calls connection (the daemon
answers at once, even while calls run); a slot has no thread of its own.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from . import handshake
from .errors import HostLostError
from .ioloop import Timer, get_loop
from .launchers.base import DaemonHandle
from .transport import CallsChannel, ConnectionBroken, address_of, connect, settle
from .workers import Workers

__all__ = ["CONTROL", "Slot"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
EXIT_CHECKS = (0.01, 0.05, 0.2, 0.5)  # after a connection broke: has the process ended?

# Where a lost slot is handed to the grid (respawn, queues): out of the I/O loop's thread.
_LOSSES = Workers("isdgrid-loss", 1)
# Blocking control work: connecting a started daemon (a handshake), a control call that
# must wait for a reconnect. A control call itself needs no thread (Slot.control_future).
CONTROL = Workers("isdgrid-control", 4)


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
        self.calls.start(sock)

    def _alive(self) -> bool:
        return not self.lost.is_set() and self.handle.exited() is None

    def _refused(self, reason: str) -> None:
        self.mark_lost(f"the daemon's address no longer answers as this daemon ({reason})")

    def _open_calls(self) -> Any:
        sock, _ = connect(self._address, self.secret, handshake.CHANNEL_CALLS, self._connect_timeout, self.daemon_id)
        return sock

    def lost_error(self, what: str) -> HostLostError:
        """The error for a call on this slot once it is lost."""
        return HostLostError(
            f"{self.label} is lost ({self.lost_reason}) while {what}", host=self.host.name, slot=self.index
        )

    def control(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Call an agent control method over the slot's connection, and wait for its answer.

        Tries again (while the daemon runs) when the connection broke; raises
        :class:`HostLostError` once the slot is lost or when no answer comes within
        ``timeout`` (default: ``host_timeout`` + 60 s), and a host-side error as its own type.
        """
        limit = timeout if timeout is not None else self.host_timeout + 60.0
        deadline = time.monotonic() + limit
        attempt = 0
        while True:
            if self.lost.is_set():
                raise self.lost_error(f"calling {method}")
            future = self.calls.control(method, args)
            if self._loop.in_loop():  # a done-callback that makes a control call: the loop lands its answer here
                self._loop.run_until(future.done, deadline)
            try:
                return future.result(timeout=max(0.0, deadline - time.monotonic()))
            except ConnectionBroken as exc:
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
            except (TimeoutError, concurrent.futures.TimeoutError):  # one class from Python 3.11 on
                if future.done():
                    raise  # the host's own TimeoutError
                raise HostLostError(
                    f"cannot reach {self.label} while calling {method}: no answer within {limit:g} s",
                    host=self.host.name, slot=self.index,
                ) from None

    def control_future(self, method: str, *args: Any) -> concurrent.futures.Future[Any]:
        """A control call whose answer settles a Future (no thread waits for it).

        Sent at once from the calling thread; should the connection be broken, the call
        goes on as :meth:`control` (waiting for the reconnect) in a worker thread.
        """
        outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            first = self.calls.control(method, args)
        except BaseException as exc:  # noqa: BLE001 - e.g. PayloadTooLargeError: this slot's outcome
            outcome.set_exception(exc)
            return outcome

        def landed(done: concurrent.futures.Future[Any]) -> None:
            error = done.exception()
            if isinstance(error, ConnectionBroken) and not self.lost.is_set():
                CONTROL.submit(self.control, method, *args).add_done_callback(lambda again: _copy(again, outcome))
            else:
                _copy(done, outcome)

        first.add_done_callback(landed)
        return outcome

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
            # The grid's part (respawn, queues) takes the grid's locks: never in the I/O loop,
            # whose thread settles the Results that a thread holding them may wait for.
            _LOSSES.submit(self._on_lost, self)

    def close(self, error: BaseException | None = None) -> None:
        """Stop the heartbeat and close the channels (the daemon is being stopped)."""
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        self.calls.close(error or HostLostError(f"{self.label} was closed", host=self.host.name, slot=self.index))


def _copy(source: concurrent.futures.Future[Any], target: concurrent.futures.Future[Any]) -> None:
    """Settle ``target`` as ``source`` ended."""
    error = source.exception()
    settle(target, value=None if error is not None else source.result(), error=error)
