"""Server: one published copy on one slot, and the worker thread that feeds it.

Calls made on a proxy are pickled in the caller's thread and put in the server's inbox.
Whoever holds the server's send lock takes everything waiting at the front of the inbox
and sends it as one batch, so calls queued while an earlier one runs travel together; the
agent runs them in order. A release marker in the inbox returns the server to its queue
once every call before it has finished.

Who sends, and who reads the reply, is chosen to avoid thread switches, which cost more
than the wire on a loaded machine:

- a call made while the server is idle is sent at once by the calling thread (the request
  only: the remote work starts right away), and its reply is left on the connection as
  the server's *flight*;
- the thread that then waits for that call (``Result.get``/``result``) reads the reply
  itself, so a synchronous call involves no other thread at all;
- the server's worker thread is woken only when there is more: calls queued behind a
  flight (pipelining), a release, or a ``Result`` that is waited on in some other way
  (``concurrent.futures.wait``, callbacks, ``done()``), which *kicks* the server. The
  worker then finishes the flight and sends the queue in batches.

A batch whose reader gave up (``get`` timeout) or whose connection broke is resent under
the same number; the agent answers a resend from its record, so each call runs once.
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
import marshal
import select
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import Pyro5.errors
from Pyro5 import protocol, serializers

from . import codec
from .bulk import BulkClient
from .errors import GridError, GridTerminatedError, HostLostError, RemoteError
from .result import Result
from .slot import Slot, convert_error

if TYPE_CHECKING:
    from .service import Service

__all__ = ["Server", "ServerState", "serve_results"]

log = logging.getLogger(__name__)

MAX_BATCH = 256
FAST_SEND_MAX = 32 * 1024  # calls up to this size may be sent by the calling thread at once
RECONNECT_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)
IDLE_WAKE = 5.0  # the worker re-checks its state at least this often while idle

_MARSHAL = serializers.serializers["marshal"]


class ServerState(enum.Enum):
    """Where a server is in its acquire/release cycle."""

    FREE = "free"
    ACQUIRED = "acquired"
    RELEASING = "releasing"


class _Marker(enum.Enum):
    RELEASE = "release"
    STOP = "stop"


# A call: its pickle, its out-of-band buffers, its Result. The buffers are views of the
# caller's arguments only while the calling thread sends it; queued, they are copies.
_Call = tuple[bytes, codec.Buffers, Result]


@dataclass
class _Unanswered:
    """A batch whose sender gave up waiting (``get`` timeout): resent under the same number."""

    seq: int
    calls: list[_Call]


@dataclass(slots=True)
class _Flight:
    """A batch sent whose reply is still on the connection, unread."""

    seq: int
    calls: list[_Call]
    pyro_seq: int
    bulk: BulkClient | None
    gen: int  # the connection it was sent on


_Item = _Call | _Marker | _Unanswered


class _Stored(codec.Buffers):
    """In place of a call's buffers once they are in the daemon's bulk store: their sizes.

    A call sent by its calling thread puts views of the caller's arrays, which may change
    as soon as the call returns; a resend of that batch names the stored copy instead.
    """

    __slots__ = ()


class _Abandoned(Exception):  # noqa: N818 - a control-flow signal, never seen by users
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
        self.respawns = 0
        self._inbox: deque[_Item] = deque()
        self._lock = threading.RLock()  # guards the inbox, the counters and the state
        self._cond = threading.Condition(self._lock)  # (``with self._lock`` where nobody waits: cheaper)
        self._results_cond = threading.Condition()  # shared by the Results of this server
        self._queued = 0
        self._kicked = False
        self._closed = False
        # The right to send and to read replies; guards _seq, _flights and the connections.
        # Not owned by a thread: a calling thread that leaves a flight behind releases it.
        self._send_lock = threading.Lock()
        self._seq = 0
        self._flights: deque[_Flight] = deque()  # sent, replies unread; oldest first
        self._gen = 0  # connection generation: a flight sent on an older connection is resent
        self._proxy: Any = None
        self._proxy_slot: Slot | None = None
        self._timeout: float | None = None  # the connection's socket timeout
        self._bulk: BulkClient | None = None
        self._bulk_slot: Slot | None = None
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
    def submit(self, op: bytes, buffers: codec.Buffers, result: Result) -> None:
        """Queue a pickled operation and its out-of-band buffers; its outcome goes to ``result``.

        ``buffers`` may be views of the caller's arguments: they are sent before this
        returns, or copied. When the server is idle (connected, nothing queued or in
        flight), the calling thread sends the call at once.
        """
        with self._lock:
            if self._closed:
                raise GridTerminatedError(f"service {self.service.id!r} was terminated")
            self._queued += 1
            fast = (
                not self._inbox
                and self._proxy is not None
                and (
                    (not buffers and len(op) <= FAST_SEND_MAX)
                    or (self._bulk is not None and self._bulk_slot is self.slot)
                )
                and self._send_lock.acquire(blocking=False)
            )
            if fast and self._flights:
                self._send_lock.release()
                fast = False
            if not fast:
                self._inbox.append((op, buffers.captured() if buffers else buffers, result))
                self._cond.notify()
                return
        call = (op, buffers, result)
        try:
            self._send_now(call)
        finally:
            self._release_send()

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

    def kick(self) -> None:
        """Someone waits for a result: make sure a batch in flight gets read."""
        if self._flights or self._inbox:
            with self._cond:
                self._kicked = True
                self._cond.notify()

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
        """Send and read from the calling thread until ``result`` is settled, if nobody else is.

        Gives up (leaving the rest to the worker) when ``timeout`` passes; the batch then
        out is resent by the worker under the same number, so it still runs only once.
        """
        if not self._send_lock.acquire(blocking=False):
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self._flights and not concurrent.futures.Future.done(result):
                self._land(deadline)
            while self._inbox and not concurrent.futures.Future.done(result):
                if not self._process_front(deadline):
                    break
        except _Abandoned:
            pass
        finally:
            self._release_send()

    def _release_send(self) -> None:
        """Release the send lock; wake the worker if work is left that nobody will do."""
        self._send_lock.release()
        if self._inbox or (self._kicked and self._flights):
            with self._cond:
                self._cond.notify()

    # -- the worker ----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                # While another thread sends (run_for, submit), leave the work to it: it
                # notifies again when it stops with work left.
                while not (self._inbox or self._kicked) or self._send_lock.locked():
                    self._cond.wait(IDLE_WAKE)
                self._kicked = False
            with self._send_lock:
                # Keep up to MAX_FLIGHTS batches out, so the daemon runs one while the
                # driver sends or unpacks another; land them all, oldest first (nobody
                # else may be reading); markers come after.
                while True:
                    while len(self._flights) < codec.MAX_FLIGHTS and self._launch_front():
                        pass
                    if not self._flights:
                        break
                    self._land(None)
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
                return False  # the worker stops; a sender just leaves
            if first is _Marker.RELEASE:
                batch: list[_Call] = []
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
                self._settle(item[2], exc=exc)
            elif isinstance(item, _Unanswered):
                for call in item.calls:
                    self._settle(call[2], exc=exc)

    def _released(self) -> None:
        with self._cond:
            self.state = ServerState.FREE
            back = not self.lost and not self._closed
        if back:
            self.service.queue.put(self)

    # -- sending (send lock held) ---------------------------------------------------------
    def _send_now(self, call: _Call) -> None:
        """Send one call from the calling thread and leave its reply as the flight."""
        call[2]._state = concurrent.futures._base.RUNNING  # new and not yet visible to anyone else
        self._seq += 1
        seq = self._seq
        try:
            if self.slot is not self._proxy_slot or self._closed or self.slot.lost.is_set():
                raise OSError("connection not current")
            flight = self._launch(seq, [call], None)
            if call[1]:
                flight.calls = [(call[0], _Stored([memoryview(b).nbytes for b in call[1]]), call[2])]
            self._flights.append(flight)
        except (Pyro5.errors.PyroError, OSError, GridError):
            self._drop_connection()  # the worker resends it (same number) and reports errors
            if call[1]:
                call = (call[0], call[1].captured(), call[2])  # the caller may change them once we return
            with self._cond:
                self._inbox.appendleft(_Unanswered(seq, [call]))
                self._cond.notify()

    def _launch_front(self) -> bool:
        """Send the calls at the front of the inbox as a new flight; False when there are none."""
        with self._cond:
            if not self._inbox or not isinstance(self._inbox[0], tuple) or self._closed:
                return False
            batch: list[_Call] = []
            while self._inbox and len(batch) < MAX_BATCH and isinstance(self._inbox[0], tuple):
                batch.append(self._inbox.popleft())  # type: ignore[arg-type]
        live = [call for call, ok in zip(batch, Result.start_all([c[2] for c in batch]), strict=True) if ok]
        if len(live) < len(batch):
            with self._lock:
                self._queued -= len(batch) - len(live)
        if not live:
            return True
        self._seq += 1
        try:
            self._flights.append(self._launch(self._seq, live, None))
        except (Pyro5.errors.PyroError, OSError, GridError):
            self._drop_connection()  # landing resends the flights, then this batch (same number)
            with self._cond:
                self._inbox.appendleft(_Unanswered(self._seq, live))
            return False
        return True

    def _land(self, deadline: float | None) -> None:
        """Read the reply of the oldest batch in flight and settle its calls."""
        flight = self._flights.popleft()
        self._run_batch(flight.calls, flight.seq, deadline, flight)

    def _run_batch(
        self, batch: list[_Call], seq: int | None, deadline: float | None, flight: _Flight | None = None
    ) -> None:
        if seq is None:
            live = [call for call, ok in zip(batch, Result.start_all([c[2] for c in batch]), strict=True) if ok]
            if len(live) < len(batch):
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
            replies = self._send(seq, live, deadline, flight)
        except _Abandoned:
            with self._cond:  # resent later, in order: this batch, then the later flights
                while self._flights:
                    later = self._flights.pop()
                    self._inbox.appendleft(_Unanswered(later.seq, later.calls))
                self._inbox.appendleft(_Unanswered(seq, live))
            raise
        except GridError as exc:
            error = GridTerminatedError(f"service {self.service.id!r} was terminated") if self._closed else exc
            for call in live:
                self._settle(call[2], exc=error)
            return
        except Exception as exc:  # noqa: BLE001 - a bug must fail the calls, never the worker
            log.exception("%s: sending a batch of %s failed", self.slot.label, self.service.id)
            self._drop_connection()
            error = RemoteError(type(exc).__name__, f"sending the call failed: {exc}")
            for call in live:
                self._settle(call[2], exc=error)
            return
        outcomes = []
        errors = 0
        total = 0.0
        for call, (item, buffers) in zip(live, replies, strict=True):
            try:
                ok, value, seconds = codec.decode_reply(item, buffers)
            except Exception as exc:  # noqa: BLE001 - a reply the driver cannot unpickle
                ok, value, seconds = False, RemoteError(type(exc).__name__, f"cannot unpickle the reply: {exc}"), 0.0
            total += seconds
            errors += not ok
            outcomes.append((call[2], ok, value))
        with self._lock:
            self.calls += len(outcomes)
            self.total_time += total
            self.errors += errors
            self._queued -= len(outcomes)
        Result.settle_all(outcomes)

    def _settle(self, result: Result, *, value: Any = None, exc: BaseException | None = None) -> None:
        with self._cond:
            self._queued -= 1
        if concurrent.futures.Future.done(result):
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
            self._timeout = None
            self._gen += 1
        return self._proxy

    def _drop_connection(self) -> None:
        if self._proxy is not None:
            try:
                self._proxy._pyroClaimOwnership()
                self._proxy._pyroRelease()
            except Exception:  # noqa: BLE001 - the connection may already be cut
                pass
        self._proxy = self._proxy_slot = None
        self._drop_bulk()

    def _bulk_connection(self) -> BulkClient | None:
        """The bulk channel to the slot's daemon; None when it has none or it cannot be reached."""
        slot = self.slot
        if self._bulk is None or self._bulk_slot is not slot:
            self._drop_bulk()
            self._bulk = slot.connect_bulk()  # quick when the slot has none or it failed lately
            self._bulk_slot = slot
        return self._bulk

    def _drop_bulk(self) -> None:
        if self._bulk is not None:
            self._bulk.close()
        self._bulk = self._bulk_slot = None

    def _wire(self, seq: int, calls: list[_Call], bulk: BulkClient | None) -> list[Any]:
        """The batch as sent to the agent; large buffers go ahead on the bulk channel."""
        items: list[Any] = []
        puts: list[tuple[str, codec.Buffers]] = []
        for i, (data, buffers, _) in enumerate(calls):
            if not buffers:
                items.append(data)
            elif isinstance(buffers, _Stored):
                items.append((data, f"q/{self.service.id}/{seq}/{i}", list(buffers)))
            elif bulk is not None:
                key = f"q/{self.service.id}/{seq}/{i}"
                puts.append((key, buffers))
                items.append((data, key, [memoryview(b).nbytes for b in buffers]))
            else:
                items.append((data, "", list(buffers), buffers.kinds))
        if puts:
            assert bulk is not None
            bulk.put_many(puts)
        return items

    def _launch(self, seq: int, calls: list[_Call], timeout: float | None) -> _Flight:
        """Send a batch (its bulk buffers first) without reading the reply."""
        proxy = self._connection()
        if timeout is not None or self._timeout is not None:
            proxy._pyroTimeout = self._timeout = timeout  # a syscall: only when it changes
        bulk = self._bulk_connection()
        if bulk is not None:
            bulk.settimeout(timeout)
        items = self._wire(seq, calls, bulk)
        conn = proxy._pyroConnection
        proxy._pyroSeq = pyro_seq = (proxy._pyroSeq + 1) & 0xFFFF
        data = marshal.dumps((conn.objectId, "run", (self.service.id, seq, items, bulk is not None), {}))
        conn.send(protocol.SendingMessage(protocol.MSG_INVOKE, 0, pyro_seq, _MARSHAL.serializer_id, data).data)
        return _Flight(seq, calls, pyro_seq, bulk, self._gen)

    def _receive(self, flight: _Flight, timeout: float | None) -> list[tuple[Any, Any]]:
        """Read a flight's reply: ``(reply item, out-of-band buffers or None)`` per call."""
        proxy = self._proxy
        if timeout is not None or self._timeout is not None:
            proxy._pyroTimeout = self._timeout = timeout
        msg = protocol.recv_stub(proxy._pyroConnection, [protocol.MSG_RESULT])
        if msg.seq != flight.pyro_seq:
            raise Pyro5.errors.ProtocolError(f"reply {msg.seq} does not answer request {flight.pyro_seq}")
        if msg.flags & protocol.FLAGS_EXCEPTION:  # the agent itself failed: a bug, or another isdgrid version
            exc = _MARSHAL.loads(msg.data)
            raise RemoteError(
                type(exc).__name__,
                f"the daemon on {self.slot.label} could not run the batch: {exc} "
                "(is it running the same isdgrid version as the driver?)",
            )
        replies = marshal.loads(msg.data)
        keys = [item[3] for item in replies if item[0] and len(item) == 5]
        if not keys:
            return [(item, None) for item in replies]
        if flight.bulk is None:
            raise Pyro5.errors.ProtocolError("the daemon staged bulk data though the driver has no bulk channel")
        if timeout is not None:
            flight.bulk.settimeout(timeout)
        fetched = iter(flight.bulk.get_many(keys))
        return [(item, next(fetched) if item[0] and len(item) == 5 else None) for item in replies]

    def _send(
        self, seq: int, calls: list[_Call], deadline: float | None, flight: _Flight | None = None
    ) -> list[tuple[Any, Any]]:
        """Run one batch (or read the reply of ``flight``), reconnecting while the daemon lives.

        The agent answers a resend from its record, so a call never runs twice.
        """
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
                if flight is not None:
                    self._drop_connection()  # its reply is still coming: never read it here
                raise _Abandoned()
            try:
                try:
                    if flight is None or flight.gen != self._gen or self._proxy is None:
                        flight = self._launch(seq, calls, left)  # (again, on this connection)
                    return self._receive(flight, left)
                except (Pyro5.errors.PyroError, OSError) as exc:
                    self._drop_connection()  # a reply may still be coming: never read it
                    if deadline is not None and isinstance(exc, (Pyro5.errors.TimeoutError, TimeoutError)):
                        raise _Abandoned() from exc
                    raise convert_error(slot, f"running a call on {self.service.id!r}", exc) from exc
            except HostLostError as exc:
                flight = None
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


def serve_results(results: list[Result], deadline: float | None) -> None:
    """Read the replies of ``results`` that are in flight from the calling thread, as they come.

    Used by ``Grid.gather`` after a broadcast: each reply is read the moment it arrives
    (``select`` on the servers' connections), by the gathering thread itself, so a
    fan-out costs no thread switches. Returns when nothing is left in flight for this
    thread to read (the rest, if any, is the workers' to finish) or at ``deadline``.
    """
    while True:
        waiting: dict[Any, tuple[Server, Result]] = {}
        for result in results:
            if result._state == concurrent.futures._base.FINISHED:
                if result._exception is not None:
                    return  # the gatherer raises it now, without waiting for the others
                continue
            server = result._server
            flights = () if server is None else tuple(server._flights)
            proxy = None if server is None else server._proxy
            sock = getattr(getattr(proxy, "_pyroConnection", None), "sock", None)
            if sock is None or not any(f.calls[-1][2] is result for f in flights):
                return  # not ours to read (queued, or with the worker): wait the usual way
            waiting[sock] = (server, result)
        if not waiting:
            return
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        try:
            ready, _, _ = select.select(list(waiting), [], [], left)
        except (OSError, ValueError):  # a socket was closed meanwhile: let the workers finish
            return
        if not ready:
            return
        for sock in ready:
            server, result = waiting[sock]
            server.run_for(result, None if deadline is None else max(0.0, deadline - time.monotonic()))
