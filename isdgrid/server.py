"""Server: one published copy on one slot, and the worker thread that feeds it.

Calls made on a proxy are pickled in the caller's thread and put in the server's inbox.
The server's own thread (which owns its Pyro5 connection, as Pyro5 requires) takes
everything waiting in the inbox and sends it as one batch, so calls queued while an
earlier one runs travel together; the agent runs them in order. A release marker in the
inbox returns the server to its queue once every call before it has finished.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import Pyro5.errors

from . import codec
from .errors import GridError, GridTerminatedError, HostLostError, RemoteError
from .result import Result
from .slot import Slot, pyro_errors

if TYPE_CHECKING:
    from .service import Service

__all__ = ["Server", "ServerState"]

log = logging.getLogger(__name__)

MAX_BATCH = 256
RECONNECT_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)


class ServerState(enum.Enum):
    """Where a server is in its acquire/release cycle."""

    FREE = "free"
    ACQUIRED = "acquired"
    RELEASING = "releasing"


class _Marker(enum.Enum):
    RELEASE = "release"
    STOP = "stop"


class Server:
    """One copy of a published object on one slot, with its call inbox and worker."""

    def __init__(self, service: Service, slot: Slot, index: int) -> None:
        self.service = service
        self.slot = slot
        self.index = index
        self.state = ServerState.FREE
        self.calls = 0
        self.errors = 0
        self.total_time = 0.0
        self.in_flight = 0
        self.respawns = 0
        self._inbox: queue.SimpleQueue[tuple[bytes, Result] | _Marker] = queue.SimpleQueue()
        self._queued = 0
        self._stats_lock = threading.Lock()
        self._seq = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._work, name=f"isdgrid-{service.id}-{slot.label}", daemon=True)
        self._thread.start()

    # -- facts -------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self.slot.host.name

    @property
    def slot_index(self) -> int:
        return self.slot.index

    @property
    def lost(self) -> bool:
        return self.slot.lost.is_set()

    @property
    def busy(self) -> bool:
        """True while acquired by a proxy or a broadcast (or releasing)."""
        return self.state is not ServerState.FREE

    @property
    def pending(self) -> int:
        """Calls submitted and not yet answered."""
        return self._queued

    @property
    def mean_call_time(self) -> float:
        """Mean remote execution time of the calls made so far, in seconds."""
        return self.total_time / self.calls if self.calls else 0.0

    def __repr__(self) -> str:
        lost = " lost" if self.lost else ""
        return f"<Server {self.service.id}#{self.index} on {self.slot.label} {self.state.value}{lost}>"

    # -- called by proxies and the grid ------------------------------------------------
    def submit(self, op: bytes, result: Result) -> None:
        """Queue a pickled operation; its outcome goes to ``result``."""
        with self._stats_lock:  # the same lock as close(): nothing lands behind the STOP marker
            if self._closed.is_set():
                raise GridTerminatedError(f"service {self.service.id!r} was terminated")
            self._queued += 1
            self._inbox.put((op, result))

    def submit_release(self) -> None:
        """Return to the queue once every call submitted before this has finished."""
        with self._stats_lock:
            self.state = ServerState.RELEASING
            idle = self._queued == 0
        if idle:
            self._released()
        else:
            self._inbox.put(_Marker.RELEASE)

    def close(self) -> None:
        """Stop the worker; calls not yet answered fail with GridTerminatedError."""
        with self._stats_lock:
            if not self._closed.is_set():
                self._closed.set()
                self._inbox.put(_Marker.STOP)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def attach(self, slot: Slot) -> None:
        """Continue on a respawned slot; back in the queue if it was released meanwhile."""
        with self._stats_lock:  # with _released(): exactly one of the two puts it back
            self.slot = slot
            self.respawns += 1
            free = self.state is ServerState.FREE and not self._closed.is_set()
        if free:
            self.service.queue.put(self)

    # -- worker ------------------------------------------------------------------------
    def _work(self) -> None:
        proxy: Any = None
        proxy_slot: Slot | None = None
        carry: tuple[bytes, Result] | _Marker | None = None
        while True:
            item = carry if carry is not None else self._inbox.get()
            carry = None
            if item is _Marker.STOP:
                break
            if item is _Marker.RELEASE:
                self._released()
                continue
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(nxt, _Marker):
                    carry = nxt
                    break
                batch.append(nxt)
            if proxy_slot is not self.slot:
                proxy, proxy_slot = None, self.slot
            proxy = self._run_batch(batch, proxy)
        self._drain(GridTerminatedError(f"service {self.service.id!r} was terminated"))
        if proxy is not None:
            try:
                proxy._pyroRelease()
            except Exception:  # noqa: BLE001 - the connection may already be cut
                pass

    def _drain(self, exc: GridError) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not isinstance(item, _Marker):
                self._settle(item[1], exc=exc)

    def _released(self) -> None:
        with self._stats_lock:
            self.state = ServerState.FREE
            back = not self.lost and not self._closed.is_set()
        if back:
            self.service.queue.put(self)

    def _run_batch(self, batch: list[tuple[bytes, Result]], proxy: Any) -> Any:
        live = [(op, result) for op, result in batch if result.set_running_or_notify_cancel()]
        with self._stats_lock:
            self._queued -= len(batch) - len(live)
        if not live:
            return proxy
        slot = self.slot
        try:
            if self._closed.is_set():
                raise GridTerminatedError(f"service {self.service.id!r} was terminated")
            self._seq += 1
            self.in_flight = len(live)
            replies, proxy = self._send(slot, proxy, self._seq, [op for op, _ in live])
        except GridError as exc:
            if self._closed.is_set():
                exc = GridTerminatedError(f"service {self.service.id!r} was terminated")
            for _, result in live:
                self._settle(result, exc=exc)
            return None
        finally:
            self.in_flight = 0
        for (_, result), item in zip(live, replies):
            try:
                ok, value, seconds = codec.decode_reply(item)
            except Exception as exc:  # noqa: BLE001 - a reply the driver cannot unpickle
                ok, value, seconds = False, RemoteError(type(exc).__name__, f"cannot unpickle the reply: {exc}"), 0.0
            with self._stats_lock:
                self.calls += 1
                self.total_time += seconds
                if not ok:
                    self.errors += 1
            if ok:
                self._settle(result, value=value)
            else:
                self._settle(result, exc=value)
        return proxy

    def _settle(self, result: Result, *, value: Any = None, exc: BaseException | None = None) -> None:
        with self._stats_lock:
            self._queued -= 1
        if result.done():
            return
        if exc is None:
            result.set_result(value)
        else:
            result.set_exception(exc)

    def _send(self, slot: Slot, proxy: Any, seq: int, ops: list[bytes]) -> tuple[list[Any], Any]:
        """Run one batch, reconnecting while the daemon lives; the agent drops duplicates."""
        first_failure: float | None = None
        attempt = 0
        while True:
            if slot.lost.is_set():
                raise HostLostError(
                    f"{slot.label} is lost ({slot.lost_reason}); call on service {self.service.id!r} failed",
                    host=slot.host.name, slot=slot.index,
                )
            if self._closed.is_set():
                raise GridTerminatedError(f"service {self.service.id!r} was terminated")
            try:
                if proxy is None:
                    proxy = slot.connect()
                with pyro_errors(slot, f"running a call on {self.service.id!r}"):
                    replies = proxy.run(self.service.id, seq, ops)
                return replies, proxy
            except HostLostError as exc:
                proxy = None
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                if slot.lost.is_set() or self._closed.is_set():
                    continue  # raises the right error at the top of the loop
                if now - first_failure > slot.host_timeout or attempt >= len(RECONNECT_DELAYS):
                    slot.mark_lost(f"cannot reach the daemon: {exc}")
                    continue
                log.info("%s: connection broke (%s); reconnecting", slot.label, exc)
                slot.lost.wait(RECONNECT_DELAYS[attempt])
                attempt += 1
            except Pyro5.errors.PyroError as exc:  # pragma: no cover - protocol misuse
                raise RemoteError(type(exc).__name__, str(exc)) from exc
