"""Server: one published copy on one slot, and the worker thread that feeds it.

Calls made on a proxy are pickled in the caller's thread and put in the server's inbox.
Whoever holds the server's send lock takes everything waiting at the front of the inbox
and sends it as one batch, so calls queued while an earlier one runs travel together; the
agent runs them in order. That is normally the server's own worker thread; a thread that
waits on a ``Result`` of this server (``Result.get``) takes the lock itself when it is free
and sends the batch from its own thread, which saves two thread switches per synchronous
call. A release marker in the inbox returns the server to its queue once every call
before it has finished.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

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
IDLE_WAKE = 5.0  # the worker re-checks its state at least this often while idle


class ServerState(enum.Enum):
    """Where a server is in its acquire/release cycle."""

    FREE = "free"
    ACQUIRED = "acquired"
    RELEASING = "releasing"


class _Marker(enum.Enum):
    RELEASE = "release"
    STOP = "stop"


@dataclass
class _Unanswered:
    """A batch whose sender gave up waiting (``get`` timeout): resent under the same number."""

    seq: int
    calls: list[tuple[bytes, Result]]


_Item = Union[tuple[bytes, Result], _Marker, _Unanswered]


class _Abandoned(Exception):
    """The sender's own deadline passed while the batch was out."""


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
        self._inbox: deque[_Item] = deque()
        self._cond = threading.Condition()  # guards the inbox, the counters and the state
        self._queued = 0
        self._closed = False
        self._send_lock = threading.Lock()  # the right to send; guards _seq and the connection
        self._seq = 0
        self._proxy: Any = None
        self._proxy_slot: Slot | None = None
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

    # -- called by proxies, results and the grid ----------------------------------------
    def submit(self, op: bytes, result: Result) -> None:
        """Queue a pickled operation; its outcome goes to ``result``."""
        result._server = self
        with self._cond:
            if self._closed:
                raise GridTerminatedError(f"service {self.service.id!r} was terminated")
            self._queued += 1
            self._inbox.append((op, result))
            self._cond.notify()

    def submit_release(self) -> None:
        """Return to the queue once every call submitted before this has finished."""
        with self._cond:
            self.state = ServerState.RELEASING
            idle = self._queued == 0
            if not idle:
                self._inbox.append(_Marker.RELEASE)
                self._cond.notify()
        if idle:
            self._released()

    def close(self) -> None:
        """Stop the worker; calls not yet answered fail with GridTerminatedError."""
        with self._cond:
            if not self._closed:
                self._closed = True
                self._inbox.append(_Marker.STOP)
                self._cond.notify()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def attach(self, slot: Slot) -> None:
        """Continue on a respawned slot; back in the queue if it was released meanwhile."""
        with self._cond:  # with _released(): exactly one of the two puts it back
            self.slot = slot
            self.respawns += 1
            free = self.state is ServerState.FREE and not self._closed
        if free:
            self.service.queue.put(self)

    def run_for(self, result: Result, timeout: float | None) -> None:
        """Send from the calling thread until ``result`` is settled, if nobody else is sending.

        Gives up (leaving the rest to the worker) when ``timeout`` passes; the batch then
        out is resent by the worker under the same number, so it still runs only once.
        """
        if not self._send_lock.acquire(blocking=False):
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not result.done():
                with self._cond:
                    if not self._inbox or self._inbox[0] is _Marker.STOP:
                        break
                if not self._process_front(deadline):
                    break
        finally:
            self._send_lock.release()
            with self._cond:
                if self._inbox:
                    self._cond.notify()

    # -- the worker ----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                # While a waiting caller is sending (run_for), leave the inbox to it: it
                # notifies again when it stops with work left.
                while not self._inbox or self._send_lock.locked():
                    self._cond.wait(IDLE_WAKE)
            with self._send_lock:
                if not self._process_front(None):
                    break
        self._drain(GridTerminatedError(f"service {self.service.id!r} was terminated"))
        with self._send_lock:
            self._drop_connection()

    def _process_front(self, deadline: float | None) -> bool:
        """Handle what is at the front of the inbox (send lock held); False at STOP or deadline."""
        with self._cond:
            if not self._inbox:
                return True
            first = self._inbox.popleft()
            if first is _Marker.STOP:
                self._inbox.appendleft(first)
                return deadline is not None  # the worker stops; a sender just leaves
            if first is _Marker.RELEASE:
                batch: list[tuple[bytes, Result]] = []
            elif isinstance(first, _Unanswered):
                batch = first.calls
            else:
                batch = [first]
                while self._inbox and len(batch) < MAX_BATCH and isinstance(self._inbox[0], tuple):
                    batch.append(self._inbox.popleft())  # type: ignore[arg-type]
        if first is _Marker.RELEASE:
            self._released()
            return True
        seq = first.seq if isinstance(first, _Unanswered) else None
        try:
            self._run_batch(batch, seq, deadline)
        except _Abandoned:
            return False
        return True

    def _drain(self, exc: GridError) -> None:
        with self._cond:
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            if isinstance(item, tuple):
                self._settle(item[1], exc=exc)
            elif isinstance(item, _Unanswered):
                for _, result in item.calls:
                    self._settle(result, exc=exc)

    def _released(self) -> None:
        with self._cond:
            self.state = ServerState.FREE
            back = not self.lost and not self._closed
        if back:
            self.service.queue.put(self)

    def _run_batch(self, batch: list[tuple[bytes, Result]], seq: int | None, deadline: float | None) -> None:
        if seq is None:
            live = [(op, result) for op, result in batch if result.set_running_or_notify_cancel()]
            with self._cond:
                self._queued -= len(batch) - len(live)
            if not live:
                return
            self._seq += 1
            seq = self._seq
        else:
            live = batch
        try:
            if self._closed:
                raise GridTerminatedError(f"service {self.service.id!r} was terminated")
            self.in_flight = len(live)
            replies = self._send(seq, [op for op, _ in live], deadline)
        except _Abandoned:
            with self._cond:
                self._inbox.appendleft(_Unanswered(seq, live))
            raise
        except GridError as exc:
            if self._closed:
                exc = GridTerminatedError(f"service {self.service.id!r} was terminated")
            for _, result in live:
                self._settle(result, exc=exc)
            return
        finally:
            self.in_flight = 0
        for (_, result), item in zip(live, replies):
            try:
                ok, value, seconds = codec.decode_reply(item)
            except Exception as exc:  # noqa: BLE001 - a reply the driver cannot unpickle
                ok, value, seconds = False, RemoteError(type(exc).__name__, f"cannot unpickle the reply: {exc}"), 0.0
            with self._cond:
                self.calls += 1
                self.total_time += seconds
                if not ok:
                    self.errors += 1
            if ok:
                self._settle(result, value=value)
            else:
                self._settle(result, exc=value)

    def _settle(self, result: Result, *, value: Any = None, exc: BaseException | None = None) -> None:
        with self._cond:
            self._queued -= 1
        if result.done():
            return
        if exc is None:
            result.set_result(value)
        else:
            result.set_exception(exc)

    def _connection(self) -> Any:
        slot = self.slot
        if self._proxy is None or self._proxy_slot is not slot:
            self._drop_connection()
            self._proxy, self._proxy_slot = slot.connect(), slot
        else:
            self._proxy._pyroClaimOwnership()  # the sender may be another thread than last time
        return self._proxy

    def _drop_connection(self) -> None:
        if self._proxy is not None:
            try:
                self._proxy._pyroClaimOwnership()
                self._proxy._pyroRelease()
            except Exception:  # noqa: BLE001 - the connection may already be cut
                pass
        self._proxy = self._proxy_slot = None

    def _send(self, seq: int, ops: list[bytes], deadline: float | None) -> list[Any]:
        """Run one batch, reconnecting while the daemon lives; the agent drops duplicates."""
        slot = self.slot
        first_failure: float | None = None
        attempt = 0
        while True:
            if slot.lost.is_set():
                raise HostLostError(
                    f"{slot.label} is lost ({slot.lost_reason}); call on service {self.service.id!r} failed",
                    host=slot.host.name, slot=slot.index,
                )
            if self._closed:
                raise GridTerminatedError(f"service {self.service.id!r} was terminated")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise _Abandoned()
            try:
                proxy = self._connection()
                if left is not None or proxy._pyroTimeout is not None:
                    proxy._pyroTimeout = left  # a syscall: only when it changes
                try:
                    with pyro_errors(slot, f"running a call on {self.service.id!r}"):
                        return proxy.run(self.service.id, seq, ops)  # type: ignore[no-any-return]
                except HostLostError as exc:
                    if deadline is not None and isinstance(exc.__cause__, Pyro5.errors.TimeoutError):
                        self._drop_connection()  # its reply is still coming: never read it here
                        raise _Abandoned() from exc
                    raise
            except HostLostError as exc:
                self._drop_connection()
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                if slot.lost.is_set() or self._closed:
                    continue  # raises the right error at the top of the loop
                if now - first_failure > slot.host_timeout or attempt >= len(RECONNECT_DELAYS):
                    slot.mark_lost(f"cannot reach the daemon: {exc}")
                    continue
                log.info("%s: connection broke (%s); reconnecting", slot.label, exc)
                slot.lost.wait(RECONNECT_DELAYS[attempt])
                attempt += 1
            except Pyro5.errors.PyroError as exc:  # pragma: no cover - protocol misuse
                raise RemoteError(type(exc).__name__, str(exc)) from exc
