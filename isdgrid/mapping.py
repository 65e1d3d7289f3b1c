"""MapIterator: ``Grid.map``, a load-balanced map over the servers of one service.

No thread of its own: the thread that iterates is the one that takes items and sends
them. Each item goes to a server as soon as one is free, as one call, and the server is
released at once (it goes back to the service's queue when that call ends), so the map
holds no server between calls and shares the service fairly with other threads: it
takes free servers from the same first-come-first-served queue, standing in line (a
ticket of :meth:`ServerQueue.line_up`) only while it has an item ready and is inside
``next()``. The Results' done-callbacks (in the I/O loop's thread) only note the Result
and set one event that the iterating thread waits on.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import GridTerminatedError, HostLostError, ServiceUnavailableError
from .proxy import ServiceProxy
from .server import Server, ServerState

if TYPE_CHECKING:
    from .grid import Grid
    from .service import Service

__all__ = ["MAX_TRIES", "MapIterator"]

log = logging.getLogger(__name__)

HEALTH_EVERY = 1.0  # while waiting, re-check the service (all lost? terminated?) at least this often
MAX_TRIES = 3  # runs of one item, each ended by the loss of its server, before the map gives up on it


class _Landed:
    """The done-callback of a map's Results: notes the Result and wakes the iterating thread.

    It runs in the I/O loop's thread: a deque append and an event set, nothing that waits.
    """

    __slots__ = ("event", "results")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.results: deque[concurrent.futures.Future[Any]] = deque()

    def __call__(self, result: concurrent.futures.Future[Any]) -> None:
        self.results.append(result)
        self.event.set()


class _Item:
    __slots__ = ("index", "args", "tries")

    def __init__(self, index: int, args: tuple[Any, ...]) -> None:
        self.index = index
        self.args = args
        self.tries = 0  # runs sent so far


class MapIterator(Iterator[Any]):
    """The iterator :meth:`Grid.map` returns: the values of ``method(*item)``, one per item.

    Items are taken from the iterables (zipped, the shortest ends it) only as servers
    become free, while the iterator is being read (and not while the calls running and
    the values ready to be read are twice as many as the service's servers); the servers
    free when it is made start at once.
    With ``ordered`` the values come in item order, else as the calls finish.
    A remote exception ends the map: it is raised in place of that item's value (calls
    already sent finish on their own, their servers go back to the queue) and no new item
    is sent. An item whose server is lost while it runs (:class:`HostLostError`) is sent
    again to another server, up to ``MAX_TRIES`` runs in all. ``close()`` (also when the
    iterator is garbage collected, or after any exception in ``next()``, Ctrl-C included)
    ends the map: nothing more is sent, and every server goes back to the queue once its
    call ends. Read it from one thread at a time.
    """

    def __init__(
        self,
        grid: Grid,
        service: Service,
        method: str,
        iterables: tuple[Iterable[Any], ...],
        *,
        ordered: bool,
        timeout: float | None,
        progress: bool,
    ) -> None:
        self._done = True  # until set up: close() and __del__ have nothing to do
        self._grid = grid
        self._service = service
        self._method = method
        self._items: Iterator[tuple[Any, ...]] = zip(*iterables, strict=False)  # the shortest ends it, as in map()
        self._count = itertools.count()
        self._ordered = ordered
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._landed = _Landed()
        self._ticket: object | None = None  # our place in the service's queue, while we wait for a server
        self._next: _Item | None = None  # taken from the iterables, not sent yet
        self._retry: deque[_Item] = deque()  # items whose server was lost, to send again first
        self._running: dict[concurrent.futures.Future[Any], _Item] = {}
        self._ready: dict[int, tuple[bool, Any]] = {}  # ordered: outcomes by item index
        self._finished: deque[tuple[bool, Any]] = deque()  # unordered: outcomes as they came
        self._yield_index = 0  # ordered: the item whose value comes next
        self._exhausted = False  # the iterables are
        self._failed_at: int | None = None  # index of the item whose remote exception ends the map
        self._holder = f"a map of thread {threading.current_thread().name!r}"
        self._busy = threading.Lock()
        self._bar: Any = None
        self._done = False
        try:
            if progress:
                self._bar = _progress_bar(_known_length(iterables), f"{service.class_name}.{method}")
            self._send()  # the servers free now start at once
            self._leave_line()
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> MapIterator:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this map is being read by another thread")
        try:
            return self._next_value()
        except StopIteration:
            self.close()
            raise
        except BaseException:  # a remote error, a timeout, Ctrl-C: the map ends
            self.close()
            raise
        finally:
            self._busy.release()

    def _next_value(self) -> Any:
        while True:
            self._landed.event.clear()  # before looking: a Result that lands after it sets it again
            self._harvest()
            outcome = self._pop_outcome()
            if outcome is not None:
                ok, value = outcome
                if not ok:
                    raise value
                self._send()  # keep the free servers busy while the caller works on this value
                self._leave_line()
                return value
            self._send()
            if not self._running and self._peek() is None:
                raise StopIteration
            self._check_service()
            wait = HEALTH_EVERY
            if self._deadline is not None:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(self._timeout_message())
                wait = min(wait, left)
            self._landed.event.wait(wait)

    def close(self) -> None:
        """End the map: nothing more is sent; servers go back to the queue as their calls end."""
        if self._done:
            return
        self._done = True
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            server = self._service.queue.leave_line(ticket)
            if server is not None:  # handed to us just now: pass it on
                self._service.queue.put(server)
        self._running.clear()
        self._retry.clear()
        self._ready.clear()
        self._finished.clear()
        self._next = None
        if self._bar is not None:
            self._bar.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit the queue may be gone already
            pass

    # -- sending -------------------------------------------------------------------------
    def _peek(self) -> _Item | None:
        """The item to send next (not taken off yet), or None when there is none to send."""
        if self._retry:
            return self._retry[0]
        if self._next is None and not self._exhausted and self._failed_at is None:
            try:
                args = next(self._items)
            except StopIteration:
                self._exhausted = True
                return None
            self._next = _Item(next(self._count), args)
        return self._next

    def _send(self) -> None:
        """Send items while there are items and free servers (never waits).

        Not while the reader is behind: with twice as many calls running and values ready
        to be read as the service has servers, nothing more is sent until it reads (an
        endless iterable read slowly does not pile up values). Values that wait for an
        earlier item (``ordered``) do not count: the servers keep going meanwhile.
        """
        while not self._reader_behind() and (item := self._peek()) is not None:
            server = self._free_server()
            if server is None:
                return
            self._submit(server, item)

    def _reader_behind(self) -> bool:
        """True with twice as many calls running (or landed, unread) and values ready as servers."""
        limit = 2 * max(1, len(self._service.servers))
        ahead = len(self._running)  # a Result leaves it when the reader takes its outcome
        if not self._ordered:
            return ahead + len(self._finished) >= limit
        index = self._yield_index
        while ahead < limit and index in self._ready:
            ahead += 1
            index += 1
        return ahead >= limit

    def _free_server(self) -> Server | None:
        """The server handed to our ticket, or one free now; else None (our ticket is in line)."""
        queue = self._service.queue
        if self._ticket is not None:
            server = queue.handed(self._ticket)
            if server is not None:
                self._ticket = None
            return server
        got = queue.line_up(self._landed.event)
        if isinstance(got, Server):
            return got
        self._ticket = got
        return None

    def _submit(self, server: Server, item: _Item) -> None:
        """Call ``method(*item.args)`` on ``server`` and release it at once (it returns when the call ends)."""
        server.state = ServerState.ACQUIRED
        server.holder = self._holder
        proxy = ServiceProxy(server, self._grid)
        try:
            result = proxy._isdgrid_call(self._method, item.args, {})
        finally:
            proxy._isdgrid_release()
        if self._retry and self._retry[0] is item:
            self._retry.popleft()
        else:
            self._next = None
        item.tries += 1
        self._running[result] = item
        result.add_done_callback(self._landed)

    def _leave_line(self) -> None:
        """Leave the queue's line before returning to the caller (a server handed meanwhile gets an item)."""
        if self._ticket is None:
            return
        server = self._service.queue.leave_line(self._ticket)
        self._ticket = None
        if server is None:
            return
        item = None if self._reader_behind() else self._peek()
        if item is None:
            self._service.queue.put(server)
        else:
            self._submit(server, item)

    # -- receiving -----------------------------------------------------------------------
    def _harvest(self) -> None:
        """Take the outcomes of the Results that landed."""
        while self._landed.results:
            result = self._landed.results.popleft()
            item = self._running.pop(result, None)
            if item is None:
                continue
            error = concurrent.futures.CancelledError() if result.cancelled() else result.exception()
            if error is None:
                self._keep(item, True, result.result())
                if self._bar is not None:
                    self._bar.update(1)
            elif _lost(error) and item.tries < MAX_TRIES:
                if self._failed_at is None or item.index < self._failed_at:
                    log.warning("map on %s: the server of item %d was lost (%s); running it again",
                                self._service.id, item.index, error)
                    self._retry.append(item)
            else:
                self._keep(item, False, error)

    def _keep(self, item: _Item, ok: bool, value: Any) -> None:
        if not ok and (self._failed_at is None or item.index < self._failed_at):
            self._failed_at = item.index
            self._next = None  # taken from the iterables, never sent: the map ends before it
            self._retry = deque(i for i in self._retry if i.index < item.index)
        if self._ordered:
            self._ready[item.index] = (ok, value)
        else:
            self._finished.append((ok, value))

    def _pop_outcome(self) -> tuple[bool, Any] | None:
        if not self._ordered:
            return self._finished.popleft() if self._finished else None
        outcome = self._ready.pop(self._yield_index, None)
        if outcome is not None:
            self._yield_index += 1
        return outcome

    def _check_service(self) -> None:
        self._grid._check_running()
        if self._service.terminated.is_set():
            raise GridTerminatedError(f"service {self._service.id!r} was terminated during a map")
        if not self._running and not self._service.usable():
            raise ServiceUnavailableError(self._service.id)

    def _timeout_message(self) -> str:
        waiting = (
            f"item {self._yield_index}" if self._ordered else "the next value"
        ) + f" ({len(self._running)} calls running, {len(self._retry)} to run again)"
        return (
            f"map of {self._service.class_name}.{self._method} on {self._service.id!r} not finished within "
            f"{self._timeout} s: waiting for {waiting}; {self._service.holders()}"
        )


def _lost(error: BaseException) -> bool:
    """True for the loss of the call's server (the item may run again), not of the whole service."""
    return isinstance(error, HostLostError) and not isinstance(error, ServiceUnavailableError)


def _known_length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """The number of items, when every iterable has a length (for the progress bar's total)."""
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


def _progress_bar(total: int | None, description: str) -> Any:
    """A bar on a terminal, a widget in a notebook: tqdm's ``auto`` picks (imported only when asked for)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="item")
