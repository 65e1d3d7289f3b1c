"""Server: one published copy on one slot: its call order, batching and state.

Calls made on a proxy are pickled in the caller's thread and queued in the server's inbox.
Whoever may send (the calling thread when the server is idle, or the thread that just
landed a reply) takes everything waiting and sends it as one batch over the slot's calls
channel, at most ``MAX_FLIGHTS`` batches out at once, so calls made while earlier ones run
travel together and the daemon always has the next batch at hand. The agent runs the
calls of a service in order. A release returns the server to its queue once every call
made before it has finished. No socket is touched here: :mod:`isdgrid.transport` does that.
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import codec
from .errors import GridTerminatedError, PayloadTooLargeError, RemoteError
from .result import Result

if TYPE_CHECKING:
    from .service import Service
    from .slot import Slot

__all__ = ["Server", "ServerState"]

log = logging.getLogger(__name__)

MAX_BATCH = 256


class ServerState(enum.Enum):
    """Where a server is in its acquire/release cycle."""

    FREE = "free"
    ACQUIRED = "acquired"
    RELEASING = "releasing"


class _Call:
    __slots__ = ("data", "buffers", "result", "size", "counted")

    def __init__(self, data: bytes, buffers: codec.Buffers, result: Result, counted: bool = True) -> None:
        self.data = data
        self.buffers = buffers
        self.result = result
        self.counted = counted  # in the server's statistics (the grid's own snapshots are not)
        self.size = len(data) + (sum(memoryview(b).nbytes for b in buffers) if buffers else 0)


class _Batch:
    """A batch on the wire (the transport's ``Flight``)."""

    __slots__ = ("server", "key", "meta", "buffers", "nbytes", "sent_at", "conn", "calls", "gen", "landed")

    def __init__(self, server: Server, seq: int, calls: list[_Call], max_reply: int) -> None:
        self.server = server
        self.gen = server._gen
        self.calls = calls
        self.key = (server.service.id, seq)
        if len(calls) == 1:
            call = calls[0]
            self.meta = (server.service.id, seq, [(call.data, len(call.buffers))], max_reply)
            self.buffers = call.buffers  # (never changed: read by the transport only)
            self.nbytes = call.size
        else:
            self.meta = (server.service.id, seq, [(c.data, len(c.buffers)) for c in calls], max_reply)
            self.nbytes = sum(c.size for c in calls)
            buffers = codec.Buffers([], b"".join(c.buffers.kinds for c in calls if c.buffers))
            for call in calls:
                buffers.extend(call.buffers)
            self.buffers = buffers
        self.sent_at = 0.0
        self.conn = 0  # the calls connection it was last sent on
        self.landed = False  # a batch lands once (a reply, or the error that ends it)

    def land(self, outcome: BaseException) -> None:
        self.server._land(self, outcome)

    def reply(self, items: list[Any], buffers: codec.Buffers) -> None:
        if len(items) == 1 == len(self.calls) and not items[0][1]:  # one call, no buffers: most batches
            self.server._land_one(self, items[0][0])
        else:
            self.server._land(self, (items, buffers))


class Server:
    """One copy of a published object on one slot, with its call inbox."""

    def __init__(self, service: Service, slot: Slot, index: int, *, max_message_size: int) -> None:
        self.service = service
        self.slot = slot
        self.index = index
        self.max_message_size = max_message_size
        self.state = ServerState.FREE
        self.holder: str | None = None  # who acquired it, for messages ("thread 'worker-1'"; None: free)
        self.calls = 0
        self.errors = 0
        self.total_time = 0.0
        self.respawns = 0
        self.snapshot: bytes | None = None  # latest state taken or restored (isdgrid.snapshot): a respawn's
        self.snapshot_time: float | None = None  # when it was the server's state (time.time())
        self._snapshot_order = -1  # the place in the call stream of the operation that gave it
        self._lock = threading.Lock()  # the inbox, counters, state
        self._send_lock = threading.Lock()  # the right to take calls from the inbox and send them
        self._inbox: deque[_Call] = deque()
        # The Results of calls submitted and not yet settled. A set, not a count: adding or
        # removing one twice, or not at all when a KeyboardInterrupt cuts a call short in
        # the main thread, can never leave the server waiting for a call that is gone.
        self._open: set[Result] = set()
        self._flights = 0
        self._seq = 0
        self._gen = 0  # the slot's generation: batches of a replaced slot no longer count
        self._releasing = False
        self._closed: BaseException | None = None

    # -- facts ---------------------------------------------------------------------------
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
        return len(self._open)

    @property
    def mean_call_time(self) -> float:
        """Mean remote execution time of the calls made so far, in seconds."""
        return self.total_time / self.calls if self.calls else 0.0

    def __repr__(self) -> str:
        lost = " lost" if self.lost else ""
        return f"<Server {self.service.id}#{self.index} on {self.slot.label} {self.state.value}{lost}>"

    @property
    def snapshot_age(self) -> float | None:
        """Seconds since the latest snapshot was taken (None: never)."""
        return None if self.snapshot_time is None else max(0.0, time.time() - self.snapshot_time)

    def keep_snapshot(self, state: bytes, taken_at: float, order: int) -> None:
        """Keep ``state`` as this server's latest, unless one kept already came later in its call stream.

        ``order`` places the snapshot or restore operation that gave ``state`` in the call
        stream (numbers grow as they are queued): a restore of an old snapshot is the
        latest state, a snapshot that answers after a later restore is not.
        """
        with self._lock:
            if order >= self._snapshot_order:
                self.snapshot, self.snapshot_time, self._snapshot_order = state, taken_at, order

    # -- called by proxies, results and the grid ----------------------------------------
    def submit(self, data: bytes, buffers: codec.Buffers, result: Result, *, counted: bool = True) -> None:
        """Queue one encoded call; it is sent at once when the server may send.

        ``counted=False`` leaves it out of the call statistics (the grid's own operations).
        """
        call = _Call(data, buffers, result, counted)
        if call.size > self.max_message_size:
            raise PayloadTooLargeError(
                f"{result.description} is {call.size} bytes, more than the grid's max_message_size "
                f"of {self.max_message_size} bytes; pass large data as files (copy_files) or in parts",
                size=call.size, limit=self.max_message_size,
            )
        with self._lock:
            if self._closed is not None:
                self._check_open()
            if self._inbox or self._flights >= codec.MAX_FLIGHTS:
                # Calls are waiting or the pipe is full: whoever lands the next reply (or
                # the sender of the calls ahead) sends this one; it must not change meanwhile.
                if buffers:
                    call.buffers = buffers.captured()
                self._inbox.append(call)
                self._open.add(result)
                return
            # Nothing waits and the pipe has room: this call is the next batch, sent now by
            # this thread (it holds the right to send until the batch is on the channel, so
            # batches reach the channel in their order). ``result`` is not the caller's yet:
            # nothing can have cancelled it.
            idle = self._send_lock.acquire(blocking=False)
            if idle:
                self._open.add(result)
                self._seq += 1
                self._flights += 1
                batch = _Batch(self, self._seq, [call], self.max_message_size)
        if idle:
            try:
                result.set_running_or_notify_cancel()
                self.slot.calls.send(batch)
            finally:
                self._send_lock.release()
            if self._inbox:
                self._pump()  # calls queued meanwhile by other threads
            return
        if self._send_lock.acquire(blocking=False):
            try:
                with self._lock:
                    self._check_open()
                    self._inbox.append(call)
                    self._open.add(result)
                self._pump_held()
                if buffers and call in self._inbox:
                    call.buffers = buffers.captured()  # it waits: the caller may change the originals
            finally:
                self._send_lock.release()
            self._pump()  # whatever came in while we held the right to send
            return
        if buffers:
            call.buffers = buffers.captured()
        with self._lock:
            self._check_open()
            self._inbox.append(call)
            self._open.add(result)
        self._pump()

    def submit_release(self) -> None:
        """Return the server to its queue once every call made so far has finished."""
        with self._lock:
            self.state = ServerState.RELEASING
            self.holder = None
            self._releasing = True
            back = self._freed()
        if back:
            self.service.queue.put(self)

    def attach(self, slot: Slot) -> None:
        """Serve from a new slot (after a respawn); the server is free again."""
        with self._lock:
            self.slot = slot
            self._seq = 0
            self._flights = 0
            self._gen += 1
            self.respawns += 1
            free = self.state is ServerState.FREE and self._closed is None
        if free:
            self.service.queue.put(self)
        else:
            self._release_if_done()

    def close(self, error: BaseException | None = None) -> None:
        """Fail every call not yet answered; the server takes no more."""
        error = error or GridTerminatedError(f"service {self.service.id!r} was terminated")
        with self._lock:
            if self._closed is None:
                self._closed = error
            queued = list(self._inbox)
            self._inbox.clear()
            self._open.difference_update(c.result for c in queued)
        _settle([(c.result, False, error) for c in queued])

    def fail_queued(self, error: BaseException) -> None:
        """Fail the calls still in the inbox (their slot is lost); the server stays usable."""
        with self._lock:
            queued = list(self._inbox)
            self._inbox.clear()
            self._open.difference_update(c.result for c in queued)
            self._flights = 0
        _settle([(c.result, False, error) for c in queued])
        self._release_if_done()

    def join(self, timeout: float) -> None:
        """Wait (bounded) until no call of this server is pending."""
        deadline = time.monotonic() + timeout
        while self._open and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- internals -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed is not None:
            raise GridTerminatedError(f"service {self.service.id!r} was terminated") from self._closed

    def _release_if_done(self) -> None:
        """Back to the queue, if a release waits and no call made before it is open."""
        with self._lock:
            back = self._freed()
        if back:
            self.service.queue.put(self)

    def _freed(self) -> bool:
        """Free the server if a release waits and no call made before it is open (lock held);
        True when it must go back to its queue (not lost, not closed)."""
        if not self._releasing or self._open:
            return False
        self._releasing = False
        self.state = ServerState.FREE
        return not self.slot.lost.is_set() and self._closed is None

    def _pump(self) -> None:
        """Send what may be sent, unless another thread is sending (it will look again)."""
        while self._inbox and self._flights < codec.MAX_FLIGHTS:
            if not self._send_lock.acquire(blocking=False):
                return
            try:
                self._pump_held()
            finally:
                self._send_lock.release()

    def _pump_held(self) -> None:
        """Send batches from the inbox while fewer than MAX_FLIGHTS are out (send right held)."""
        while True:
            with self._lock:
                if not self._inbox or self._flights >= codec.MAX_FLIGHTS or self._closed is not None:
                    return
                calls: list[_Call] = []
                size = 0
                while self._inbox and len(calls) < MAX_BATCH:
                    nxt = self._inbox[0]
                    if calls and size + nxt.size > self.max_message_size:
                        break
                    calls.append(self._inbox.popleft())
                    size += nxt.size
            live = [c for c in calls if c.result.set_running_or_notify_cancel()]
            if len(live) < len(calls):
                with self._lock:
                    self._open.difference_update(c.result for c in calls if c.result.cancelled())
                self._release_if_done()
            if not live:
                continue
            with self._lock:
                self._seq += 1
                self._flights += 1
                batch = _Batch(self, self._seq, live, self.max_message_size)
            self.slot.calls.send(batch)

    def _land(self, batch: _Batch, outcome: tuple[list[Any], codec.Buffers] | BaseException) -> None:
        """Settle the calls of a batch from its reply (or error), once.

        Raises only what interrupts it (KeyboardInterrupt), after every call has its outcome.
        """
        owner = False  # this thread lands the batch (set with no call in between: no interrupt can split it)
        outcomes: list[tuple[Result, bool, Any]] = []
        stats = (0, 0.0, 0)
        try:
            with self._lock:
                if batch.landed:
                    return
                batch.landed = owner = True
            if isinstance(outcome, BaseException):
                outcomes = [(c.result, False, outcome) for c in batch.calls]
            else:
                outcomes, stats = _decode(batch.calls, *outcome)
        except BaseException as exc:  # noqa: BLE001 - every call of the batch gets an outcome
            error = RemoteError(type(exc).__name__, f"reading the reply failed: {exc!r}")
            done = {id(r) for r, _, _ in outcomes}
            outcomes += [(c.result, False, error) for c in batch.calls if id(c.result) not in done]
            if not isinstance(exc, Exception):
                raise  # (after the finally) a Ctrl-C is the user's, once every call has its outcome
        finally:
            if owner:
                self._finish(batch, outcomes, stats)

    def _land_one(self, batch: _Batch, item: Any) -> None:
        """:meth:`_land` of a one-call batch from its reply item, decided and counted in one hold
        of the lock (the I/O loop's thread, where no interrupt arrives)."""
        call = batch.calls[0]
        ok, value, seconds = _reply_outcome(item, None)
        with self._lock:
            if batch.landed:
                return
            batch.landed = True
            back = self._count_out(batch, (1, seconds, int(not ok)) if call.counted else (0, 0.0, 0))
        try:
            self._after_landing(back)
        finally:
            _settle([(call.result, ok, value)])

    def _finish(self, batch: _Batch, outcomes: list[tuple[Result, bool, Any]], stats: tuple[int, float, int]) -> None:
        """Count a landed batch out, release or pump, settle its results."""
        try:
            with self._lock:
                back = self._count_out(batch, stats)
            self._after_landing(back)
        finally:
            _settle(outcomes or [(c.result, False, RemoteError("Error", "no reply")) for c in batch.calls])

    def _count_out(self, batch: _Batch, stats: tuple[int, float, int]) -> bool:
        """Count a landed batch out (lock held): the statistics of its calls (counted, seconds,
        errors), its flight, its open calls; True when the server goes back to its queue now."""
        counted, seconds, errors = stats
        self.calls += counted
        self.total_time += seconds
        self.errors += errors
        if batch.gen == self._gen:
            self._flights = max(0, self._flights - 1)
        if len(batch.calls) == 1:
            self._open.discard(batch.calls[0].result)
        else:
            self._open.difference_update(c.result for c in batch.calls)
        return self._freed()

    def _after_landing(self, back: bool) -> None:
        """Back to the queue (a release waited for the batch), and send what waits."""
        if back:
            self.service.queue.put(self)
        if self._inbox:
            self._pump()


def _decode(
    calls: list[_Call], items: list[Any], buffers: codec.Buffers
) -> tuple[list[tuple[Result, bool, Any]], tuple[int, float, int]]:
    """The outcome of each call from its reply item, and (calls counted, their seconds, their errors)."""
    outcomes = []
    errors = 0
    total = 0.0
    counted = 0
    at = 0
    for call, (item, count) in zip(calls, items, strict=True):
        own = buffers[at: at + count] if count else None
        at += count
        ok, value, seconds = _reply_outcome(item, own)
        if call.counted:
            total += seconds
            errors += not ok
            counted += 1
        outcomes.append((call.result, ok, value))
    return outcomes, (counted, total, errors)


def _reply_outcome(item: Any, buffers: Sequence[Any] | None) -> tuple[bool, Any, float]:
    """``codec.decode_reply``, with a reply that cannot be unpickled as the call's error."""
    try:
        return codec.decode_reply(item, buffers)
    except BaseException as exc:  # noqa: BLE001 - even SystemExit from a reply's pickle
        return False, RemoteError(type(exc).__name__, f"cannot unpickle the reply: {exc!r}"), 0.0


def _settle(outcomes: list[tuple[Result, bool, Any]]) -> None:
    """Settle results with the stdlib's own methods, no lock of ours held.

    Callbacks run here; whatever one raises (KeyboardInterrupt included), the rest are
    still settled before it propagates.
    """
    for i, (result, ok, value) in enumerate(outcomes):
        try:
            if ok:
                result.set_result(value)
            else:
                result.set_exception(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled, or failed already (a lost slot)
        except BaseException:
            _settle(outcomes[i + 1:])
            raise
