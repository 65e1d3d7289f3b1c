"""The Future contract of ``Result`` (issue 10), on real local daemons.

A ``Result`` is a genuine :class:`concurrent.futures.Future`: ``wait`` (every
``return_when``), ``as_completed``, done-callbacks, ``cancel``, ``asyncio.wrap_future``
and ``Grid.gather`` work on any mix of Results (finished, pending, failed, cancelled) and
plain stdlib futures, from any threads; a ``KeyboardInterrupt`` or an expired ``get``
timeout leaves the call, the proxy and the server intact.

Every wait here is bounded: a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import gc
import logging
import os
import queue
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Gate, require
from remote_objects import Recorder

import isdgrid
from isdgrid import Grid, Host, Result

T = 10.0  # bound on every single wait that should succeed quickly
HEARTBEAT = 1.0  # the module grid's heartbeat interval, seconds
SLOW = 0.3  # a "slow" remote call, seconds
ROUNDS = 1000  # rounds of each kind of wait over mixed futures
CHUNK = 100  # a slow call and queued cancellations once per CHUNK rounds


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fgrid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    """One grid of two local daemons for the whole module; each test publishes its own service."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ISDGRID_RUN_DIR", str(tmp_path_factory.mktemp("future-run")))
        g = Grid([Host("localhost", n_cpu=2)], host_timeout=10.0, heartbeat_interval=HEARTBEAT)
        try:
            yield g
        finally:
            g.terminate()


@dataclass
class Service:
    """A Recorder service of its own on the module's grid, with the proxies a test holds."""

    grid: Grid
    sid: str
    held: list[Any] = field(default_factory=list)

    def acquire(self) -> Any:
        proxy = self.grid.acquire_service(self.sid, timeout=T)
        self.held.append(proxy)
        return proxy

    def release(self, proxy: Any) -> None:
        self.held.remove(proxy)
        self.grid.release_service(proxy)

    @property
    def size(self) -> int:
        return len(self.grid.servers[self.sid])

    def pending(self) -> int:
        return sum(row.pending for row in self.grid.status() if row.service_id == self.sid)

    def wait_idle(self, timeout: float = T) -> None:
        """Every server back in the queue and no call pending, within ``timeout``."""
        wait_until(lambda: self.grid.queues[self.sid].qsize() == self.size, timeout, "servers back in the queue")
        wait_until(lambda: self.pending() == 0, timeout, "pending counts back to 0")


@pytest.fixture
def svc(fgrid: Grid) -> Iterator[Service]:
    service = Service(fgrid, fgrid.publish(Recorder()))
    try:
        yield service
    finally:
        for proxy in list(service.held):
            with contextlib.suppress(Exception):
                fgrid.release_service(proxy)
        with contextlib.suppress(Exception):
            fgrid.terminate(service.sid)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.01)


def run_threads(target: Callable[[int], None], n: int, timeout: float) -> None:
    """Run ``target(i)`` in ``n`` daemon threads; fail on any error or on a thread still alive."""
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True, name=f"future-test-{i}") for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        pytest.fail(f"threads still waiting after {timeout} s (deadlock?): {stuck}")
    if errors:
        raise errors[0]


def hold_back(proxy: Any, slow: Result) -> Result:
    """Make the next calls on ``proxy`` wait in the driver's queue behind ``slow``.

    ``slow`` is sent (running); so is one more call, as the pipeline may keep a batch out
    behind a running one (``codec.MAX_FLIGHTS`` = 2). Calls made after this are queued,
    not sent, until ``slow`` finishes: those are the ones ``cancel()`` can still stop.
    """
    wait_until(slow.running, T, "the slow call was sent (running)")
    filler = proxy.ident("filler")
    deadline = time.monotonic() + 0.5
    while not filler.running() and time.monotonic() < deadline:  # not pipelined: it just waits
        time.sleep(0.002)
    return filler


def check_value(f: Future[Any], expected: Any) -> None:
    assert f.result(timeout=T) == expected


def check_error(f: Future[Any], message: str) -> None:
    exc = f.exception(timeout=T)
    assert isinstance(exc, ValueError) and str(exc) == message, repr(exc)


def check_cancelled(f: Future[Any]) -> None:
    assert f.cancelled() and f.done() and not f.running()
    with pytest.raises(cf.CancelledError):
        f.result(timeout=0)
    with pytest.raises(cf.CancelledError):
        f.exception(timeout=0)


def _chain(target: Future[Any], source: Future[Any]) -> None:
    target.set_result(source.result() * 10)


# -- the class itself ------------------------------------------------------------------------


def test_result_is_a_stdlib_future_without_private_internals(svc: Service) -> None:
    proxy = svc.acquire()
    r = proxy.ident(5)
    assert isinstance(r, Result) and isinstance(r, cf.Future)
    assert cf.Future in type(r).__mro__
    for name in ("set_result", "set_exception", "set_running_or_notify_cancel", "_invoke_callbacks"):
        assert getattr(Result, name) is getattr(cf.Future, name), f"Result overrides Future.{name}"
    assert r.set_running_or_notify_cancel.__func__ is cf.Future.set_running_or_notify_cancel
    assert r.get(timeout=T) == 5 and r.result(timeout=0) == 5 and r.exception(timeout=0) is None
    package = os.path.dirname(isdgrid.__file__)
    private = re.compile(r"concurrent\.futures\._base|from\s+concurrent\.futures\s+import\s+[^\n]*\b_base\b")
    offenders = []
    for root, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as fh:
                    if private.search(fh.read()):
                        offenders.append(os.path.relpath(path, package))
    assert not offenders, f"isdgrid modules use concurrent.futures._base: {offenders}"


# -- wait / as_completed over mixes ----------------------------------------------------------


@dataclass
class Round:
    """The futures of one round; ``prev_*`` finished in earlier rounds."""

    i: int
    prev_ok: Result
    prev_bad: Result
    fast: Result
    bad: Result
    after: Result
    plain_done: Future[Any]
    plain_cancelled: Future[Any]
    chained: Future[Any] | None
    never: Future[Any]
    extra: list[Result]  # the chunk's slow call, its cancelled victims and their survivor

    @property
    def settled(self) -> list[Future[Any]]:
        """Futures that all settle soon (the slow ones too, within SLOW)."""
        fs: list[Future[Any]] = [self.prev_ok, self.prev_bad, self.fast, self.bad, self.after]
        fs += [self.plain_done, self.plain_cancelled, *self.extra]
        return fs + ([self.chained] if self.chained is not None else [])


def _round_all(rd: Round) -> None:
    fs = rd.settled
    done, not_done = cf.wait(fs, timeout=T, return_when=cf.ALL_COMPLETED)
    assert not not_done, f"round {rd.i}: {len(not_done)} of {len(set(fs))} not done within {T} s"
    assert done == set(fs)


def _round_first_completed(rd: Round) -> None:
    variant = rd.i % 3
    if variant == 0:  # some already done: returns at once with them
        fs = [rd.prev_ok, rd.fast, rd.never, rd.plain_cancelled, *rd.extra]
        done, not_done = cf.wait(fs, timeout=T, return_when=cf.FIRST_COMPLETED)
        assert {rd.prev_ok, rd.plain_cancelled} <= done
    elif variant == 1:  # only pending ones: returns when the fast call lands
        fs = [rd.fast, rd.never, *rd.extra]
        done, not_done = cf.wait(fs, timeout=T, return_when=cf.FIRST_COMPLETED)
        assert done, f"round {rd.i}: nothing completed within {T} s"
    else:  # a failure counts as completed
        fs = [rd.bad, rd.never]
        done, not_done = cf.wait(fs, timeout=T, return_when=cf.FIRST_COMPLETED)
        assert done == {rd.bad}
    assert rd.never in not_done
    assert done | not_done == set(fs) and not done & not_done
    assert all(f.done() for f in done)


def _round_first_exception(rd: Round) -> None:
    variant = rd.i % 3
    if variant == 0:  # returns when the remote failure lands, the rest still pending
        fs = [rd.fast, rd.bad, rd.after, rd.never, *rd.extra]
        done, not_done = cf.wait(fs, timeout=T, return_when=cf.FIRST_EXCEPTION)
        assert rd.bad in done, f"round {rd.i}: the failure not seen within {T} s"
        assert rd.never in not_done
    elif variant == 1:  # a failure already there: returns at once
        fs = [rd.prev_bad, rd.fast, rd.never]
        done, not_done = cf.wait(fs, timeout=T, return_when=cf.FIRST_EXCEPTION)
        assert rd.prev_bad in done and rd.never in not_done
    else:  # no failure at all (cancelled is not one): waits for everything
        fs = [rd.prev_ok, rd.fast, rd.after, rd.plain_done, rd.plain_cancelled, *rd.extra]
        fs += [rd.chained] if rd.chained is not None else []
        done, not_done = cf.wait(fs, timeout=T, return_when=cf.FIRST_EXCEPTION)
        assert not not_done and done == set(fs)
    assert done | not_done == set(fs) and not done & not_done
    assert all(f.done() for f in done)


def _round_as_completed(rd: Round) -> None:
    fs = rd.settled
    expected = set(fs)
    if rd.i % 2:
        fs = [*fs, rd.never]  # one stays pending: the others still come out
    seen: list[Future[Any]] = []
    gen = cf.as_completed(fs, timeout=T)
    try:
        for f in gen:
            assert f.done()
            seen.append(f)
            if len(seen) == len(expected):
                break
    finally:
        gen.close()
    assert len(seen) == len(set(seen)) and set(seen) == expected


ROUND_KINDS: dict[str, Callable[[Round], None]] = {
    "ALL_COMPLETED": _round_all,
    "FIRST_COMPLETED": _round_first_completed,
    "FIRST_EXCEPTION": _round_first_exception,
    "as_completed": _round_as_completed,
}


@pytest.mark.parametrize("kind", list(ROUND_KINDS))
def test_wait_and_as_completed_over_mixed_futures(svc: Service, kind: str) -> None:
    check = ROUND_KINDS[kind]
    fast_proxy, slow_proxy = svc.acquire(), svc.acquire()
    prev_ok = fast_proxy.ident(-1)
    prev_bad = fast_proxy.fail_if(True, "previous")
    check_value(prev_ok, -1)
    check_error(prev_bad, "previous")
    cancelled_results = 0
    for c in range(ROUNDS // CHUNK):
        slow = slow_proxy.sleep(SLOW)
        filler = hold_back(slow_proxy, slow)
        victims = [slow_proxy.ident(("victim", c, j)) for j in range(2)]
        survivor = slow_proxy.ident(("survivor", c))
        hit = [v.cancel() for v in victims]  # queued behind the slow call
        cancelled_results += sum(hit)
        for j in range(CHUNK):
            i = c * CHUNK + j
            fast = fast_proxy.ident(i)
            bad = fast_proxy.fail_if(True, f"round {i}")
            after = fast_proxy.ident(-i)
            plain_done: Future[Any] = Future()
            plain_done.set_result(("plain", i))
            plain_cancelled: Future[Any] = Future()
            assert plain_cancelled.cancel()
            # as an executor does: only a notified cancellation counts as done for wait()
            assert not plain_cancelled.set_running_or_notify_cancel()
            chained: Future[Any] | None = None
            if i % 2 == 0:
                chained = Future()
                fast.add_done_callback(partial(_chain, chained))
            rd = Round(
                i,
                prev_ok,
                prev_bad,
                fast,
                bad,
                after,
                plain_done,
                plain_cancelled,
                chained,
                Future(),
                [slow, *victims, survivor] if j == 0 else [],
            )
            check(rd)
            check_value(fast, i)
            check_value(after, -i)
            check_error(bad, f"round {i}")
            if chained is not None:
                check_value(chained, 10 * i)
            assert plain_done.result(timeout=0) == ("plain", i)
            assert not rd.never.done()
            prev_ok, prev_bad = fast, bad
        check_value(slow, SLOW)
        check_value(filler, "filler")
        check_value(survivor, ("survivor", c))
        for j, (victim, was_cancelled) in enumerate(zip(victims, hit, strict=True)):
            if was_cancelled:
                check_cancelled(victim)
            else:
                check_value(victim, ("victim", c, j))
    assert cancelled_results > 0, "no Result queued behind a slow call could be cancelled"
    svc.release(fast_proxy)
    svc.release(slow_proxy)
    svc.wait_idle()


def test_many_threads_wait_on_results_of_the_same_two_servers(svc: Service) -> None:
    a, b = svc.acquire(), svc.acquire()
    n_threads, rounds = 4, 250

    def worker(t: int) -> None:
        never: Future[Any] = Future()
        for i in range(rounds):
            if i % 50 == 0 and t == 0:
                b.sleep(0.05)  # now and then a slow call ahead of the others on b
            ra, rb = a.ident((t, i)), b.ident((t, i))
            bad = (a if i % 2 else b).fail_if(True, f"{t}/{i}")
            mode = i % 4
            if mode == 0:
                done, not_done = cf.wait([ra, rb, bad], timeout=T, return_when=cf.ALL_COMPLETED)
                assert not not_done, f"thread {t} round {i}: ALL_COMPLETED timed out"
            elif mode == 1:
                done, not_done = cf.wait([ra, rb, never], timeout=T, return_when=cf.FIRST_COMPLETED)
                assert done and never in not_done, f"thread {t} round {i}: FIRST_COMPLETED timed out"
            elif mode == 2:
                done, not_done = cf.wait([rb, ra, bad, never], timeout=T, return_when=cf.FIRST_EXCEPTION)
                assert bad in done and never in not_done, f"thread {t} round {i}: FIRST_EXCEPTION timed out"
            else:
                assert set(cf.as_completed([rb, bad, ra], timeout=T)) == {ra, rb, bad}
            check_value(ra, (t, i))
            check_value(rb, (t, i))
            check_error(bad, f"{t}/{i}")

    run_threads(worker, n_threads, timeout=60)
    svc.release(a)
    svc.release(b)
    svc.wait_idle()


# -- callbacks -------------------------------------------------------------------------------


def test_callback_may_get_other_results_of_the_same_server(svc: Service) -> None:
    a, b = svc.acquire(), svc.acquire()
    for rep in range(10):
        first = a.sleep(0.02)
        second = a.add(("second", rep))
        box: queue.Queue[Any] = queue.Queue()

        def callback(f: Future[Any], second: Result = second, rep: int = rep, box: queue.Queue[Any] = box) -> None:
            try:
                nested = a.add(("nested", rep))  # a new call on the same proxy, from the callback
                other = b.ident(("other", rep))  # and one on the other server
                box.put((f.result(), second.get(timeout=5), nested.get(timeout=5), other.get(timeout=5)))
            except BaseException as exc:  # noqa: BLE001 - reported in the test's thread
                box.put(exc)

        first.add_done_callback(callback)
        try:
            outcome = box.get(timeout=20)
        except queue.Empty:
            pytest.fail(f"rep {rep}: the callback never finished")
        assert outcome == (0.02, 2 * rep + 1, 2 * rep + 2, ("other", rep)), outcome
    assert a.history().get(timeout=T) == [x for rep in range(10) for x in (("second", rep), ("nested", rep))]
    svc.release(a)
    svc.release(b)
    svc.wait_idle()


def test_callbacks_run_exactly_once_added_before_or_after_completion(svc: Service) -> None:
    a, b = svc.acquire(), svc.acquire()
    lock = threading.Lock()
    counts: Counter[Any] = Counter()
    wrong: list[Any] = []

    def counter(tag: Any, expected: Future[Any]) -> Callable[[Future[Any]], None]:
        def callback(f: Future[Any]) -> None:
            if f is not expected:
                wrong.append(tag)
            with lock:
                counts[tag] += 1

        return callback

    n = 300
    results = []
    for i in range(n):
        proxy = a if i % 2 else b
        r = proxy.fail_if(True, f"bad {i}") if i % 10 == 0 else proxy.ident(i)
        r.add_done_callback(counter(("before", i), r))
        results.append(r)
    twice = a.sleep(0.05)
    cb_twice = counter("twice", twice)
    twice.add_done_callback(cb_twice)
    twice.add_done_callback(cb_twice)
    slow = b.sleep(SLOW)
    hold_back(b, slow)
    victim = b.ident("victim")
    victim.add_done_callback(counter("victim", victim))
    assert victim.cancel(), "a call queued behind a slow one could not be cancelled"
    assert counts["victim"] == 1  # stdlib: the cancelling thread runs the callbacks
    for i, r in enumerate(results):
        if i % 10 == 0:
            check_error(r, f"bad {i}")
        else:
            check_value(r, i)
        r.add_done_callback(counter(("after", i), r))
        assert counts[("after", i)] == 1, "a callback added after completion must run at once"
    check_value(twice, 0.05)
    check_value(slow, SLOW)
    victim.add_done_callback(counter("victim-after", victim))
    assert counts["victim-after"] == 1
    expected = {("before", i): 1 for i in range(n)} | {("after", i): 1 for i in range(n)}
    expected |= {"twice": 2, "victim": 1, "victim-after": 1}
    wait_until(lambda: dict(counts) == expected, T, "every callback ran")
    time.sleep(0.3)  # nothing runs a second time later
    assert dict(counts) == expected and not wrong
    svc.release(a)
    svc.release(b)
    svc.wait_idle()


class CallbackBoomError(Exception):
    pass


def test_a_raising_callback_breaks_nothing(svc: Service, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    a = svc.acquire()
    ran = threading.Event()

    def boom(f: Future[Any]) -> None:
        raise CallbackBoomError("callback failed")

    for rep in range(5):
        ran.clear()
        r = a.sleep(0.05)
        r.add_done_callback(boom)
        r.add_done_callback(lambda f: ran.set())  # runs although the one before raised
        queued = [a.ident((rep, k)) for k in range(5)]
        for q in queued:
            q.add_done_callback(boom)
        assert r.get(timeout=T) == 0.05
        assert ran.wait(T)
        assert [q.get(timeout=T) for q in queued] == [(rep, k) for k in range(5)]
        r.add_done_callback(boom)  # already done: runs at once; its error does not reach us
        assert a.add(rep).get(timeout=T) == rep + 1
    wait_until(
        lambda: (
            sum(1 for rec in caplog.records if rec.exc_info and isinstance(rec.exc_info[1], CallbackBoomError)) >= 35
        ),
        T,
        "every callback error logged",
    )
    svc.release(a)
    svc.wait_idle()


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_a_call_queued_behind_a_slow_one(svc: Service) -> None:
    a, b = svc.acquire(), svc.acquire()
    slow = a.slow_add(1.0, "slow")
    filler = hold_back(a, slow)
    assert not slow.cancel() and not slow.cancelled()  # already sent
    queued = [a.add(i) for i in range(6)]
    for k in (1, 3, 4):
        assert queued[k].cancel(), f"queued call {k} could not be cancelled"
        assert queued[k].cancel()  # cancelling again says True, as the stdlib does
        check_cancelled(queued[k])
        with pytest.raises(cf.CancelledError):
            queued[k].get(timeout=1)
    assert b.ident("b is not held up").get(timeout=T) == "b is not held up"
    later = a.add("later")
    history = a.history()
    svc.release(a)
    assert slow.get(timeout=T) == 1
    assert filler.get(timeout=T) == "filler"
    assert [queued[k].get(timeout=T) for k in (0, 2, 5)] == [2, 3, 4]
    assert later.get(timeout=T) == 5
    assert history.get(timeout=T) == ["slow", 0, 2, 5, "later"]
    assert not slow.cancel() and not queued[0].cancel()  # finished: cannot be cancelled
    for k in (1, 3, 4):
        check_cancelled(queued[k])
    svc.release(b)
    svc.wait_idle()

    # every call after the slow one cancelled, then released: the server still comes back
    a = svc.acquire()
    slow = a.sleep(0.5)
    hold_back(a, slow)
    rest = [a.ident(i) for i in range(4)]
    assert all(r.cancel() for r in rest)
    svc.release(a)
    assert slow.get(timeout=T) == 0.5
    svc.wait_idle()
    assert all(r.cancelled() for r in rest)


def test_a_sent_call_cannot_be_cancelled_and_still_delivers(svc: Service) -> None:
    a = svc.acquire()
    for rep in range(5):
        r = a.sleep(0.2)
        wait_until(r.running, T, "the call was sent (running)")
        assert not r.cancel()
        assert not r.cancelled() and not r.done()
        assert r.get(timeout=T) == 0.2
        assert not r.cancel() and not r.cancelled()
        assert a.add(rep).get(timeout=T) == rep + 1
    svc.release(a)
    svc.wait_idle()


# -- asyncio ---------------------------------------------------------------------------------


def test_asyncio_wrap_future_and_gather(svc: Service) -> None:
    a, b = svc.acquire(), svc.acquire()

    async def until_sent(r: Result) -> None:
        while not r.running():
            await asyncio.sleep(0.01)

    async def main() -> None:
        results = [(a if i % 2 else b).ident(i) for i in range(400)]
        values = await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(r) for r in results)), T)
        assert values == list(range(400))

        # the loop keeps running while a slow call is awaited
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        assert await asyncio.wait_for(asyncio.wrap_future(a.sleep(SLOW)), T) == SLOW
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert ticks >= 5

        # failures, and cancelled Results, in one gather
        bad = a.fail("value", "async boom")
        slow = b.sleep(SLOW)
        await asyncio.to_thread(hold_back, b, slow)
        victim = b.ident("victim")
        assert victim.cancel()
        outcome = await asyncio.wait_for(
            asyncio.gather(*(asyncio.wrap_future(r) for r in (bad, slow, victim)), return_exceptions=True), T
        )
        assert isinstance(outcome[0], ValueError) and str(outcome[0]) == "async boom"
        assert outcome[1] == SLOW
        assert isinstance(outcome[2], asyncio.CancelledError)

        # an asyncio timeout on a call already sent: the Result still delivers its value
        long = a.sleep(0.5)
        await asyncio.wait_for(until_sent(long), T)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(long), 0.05)
        assert await asyncio.wait_for(asyncio.to_thread(long.get, T), T) == 0.5

    asyncio.run(main())
    svc.release(a)
    svc.release(b)
    svc.wait_idle()


# -- KeyboardInterrupt during get -------------------------------------------------------------


class Interrupter:
    """Sends SIGINT to the main thread from a helper thread after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.sent = threading.Event()
        self.thread = threading.Thread(target=self._fire, args=(delay,), daemon=True, name="interrupter")

    def start(self) -> None:
        self.thread.start()

    def _fire(self, delay: float) -> None:
        time.sleep(delay)
        main = threading.main_thread().ident
        assert main is not None
        signal.pthread_kill(main, signal.SIGINT)
        self.sent.set()

    def settle(self) -> bool:
        """Wait until the signal was sent and handled; True if it arrived only now."""
        late = False
        while True:
            try:
                if not self.sent.wait(T):
                    pytest.fail("the interrupter thread never fired")
                self.thread.join(T)
                for _ in range(5):  # give the handler a few bytecode boundaries to run
                    time.sleep(0.002)
                return late
            except KeyboardInterrupt:
                late = True


@contextlib.contextmanager
def default_sigint() -> Iterator[None]:
    require(threading.current_thread() is threading.main_thread(), "needs the main thread")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:  # never let a stray one end the whole pytest session
        pytest.fail("a KeyboardInterrupt escaped the code under test's handling")
    finally:
        signal.signal(signal.SIGINT, previous)


def test_keyboard_interrupt_during_get_leaves_the_call_and_server_intact(svc: Service) -> None:
    # An interrupt that lands in a weakref callback of the garbage collector (threading keeps
    # its threads in a WeakSet) is swallowed by Python itself: keep every interrupter alive
    # and the collector off while interrupts fly, so each one reaches the code under test.
    keep: list[Interrupter] = []
    gc.collect()
    gc.disable()
    try:
        _interrupt_gets_and_streams(svc, keep)
    finally:
        gc.enable()


def test_keyboard_interrupt_during_gather_ends_its_wait_and_leaves_the_calls_intact(svc: Service) -> None:
    # gather waits in slices of a second at most; a Ctrl-C ends the wait it lands in, while
    # the calls still run, and they complete as if nothing happened.
    keep: list[Interrupter] = []
    gc.collect()
    gc.disable()  # as above: every interrupt reaches the code under test
    try:
        with default_sigint():
            caught = 0
            for _ in range(3):
                results = svc.grid.broadcast(svc.sid, "sleep", 1.5, timeout=T)
                interrupter = Interrupter(0.1)
                keep.append(interrupter)
                running = True
                try:
                    interrupter.start()
                    svc.grid.gather(results, timeout=T)
                except KeyboardInterrupt:
                    caught += 1
                    running = not all(r.done() for r in results)
                interrupter.settle()
                assert running, "the interrupt reached gather only after its calls had ended"
                assert svc.grid.gather(results, timeout=T) == [1.5] * svc.size
                svc.grid.release_all(svc.sid)
            assert caught >= 2, f"only {caught} of 3 interrupts landed inside gather()"
    finally:
        gc.enable()


def _interrupt_gets_and_streams(svc: Service, keep: list[Interrupter]) -> None:
    with default_sigint():
        a = svc.acquire()
        caught = 0
        for rep in range(20):
            r = a.sleep(0.4)
            interrupter = Interrupter(0.1)
            keep.append(interrupter)
            try:
                interrupter.start()
                r.get(timeout=T)
            except KeyboardInterrupt:
                caught += 1
            interrupter.settle()
            assert r.get(timeout=T) == 0.4, "the interrupted Result must still complete"
            assert a.ident(("after", rep)).get(timeout=T) == ("after", rep)
        assert caught >= 15, f"only {caught} of 20 interrupts landed inside get()"

        # interrupts at random moments of a stream of fast calls (inside a call or a get)
        rng = random.Random(10)
        for rep in range(20):
            interrupter = Interrupter(rng.uniform(0.0, 0.03))
            keep.append(interrupter)
            made: list[tuple[Any, Result]] = []
            current: Any = None
            interrupted_at: Any = None
            deadline = time.monotonic() + T
            try:
                interrupter.start()
                k = 0
                while time.monotonic() < deadline:
                    current = (rep, k)
                    r = a.add(current)
                    made.append((current, r))
                    if k % 5 == 0:
                        r.get(timeout=T)
                    k += 1
            except KeyboardInterrupt:
                interrupted_at = current
            if interrupter.settle():
                pytest.fail(f"rep {rep}: the stream of calls ran {T} s without being interrupted")
            assert interrupted_at is not None
            values = [r.get(timeout=T) for _, r in made]  # every Result we hold still completes
            assert all(y > x for x, y in zip(values, values[1:], strict=False)), "calls ran out of order"
            ours = [item for item, _ in made]
            history = [item for item in a.history().get(timeout=T) if isinstance(item, tuple) and item[0] == rep]
            # the call the interrupt landed in may or may not have been made; nothing else differs
            assert history in (ours, [*ours, interrupted_at]), (interrupted_at, history[-3:], ours[-3:])
        svc.release(a)
        svc.wait_idle()


# -- expired get(timeout) ----------------------------------------------------------------------


def _connections(proc: psutil.Process) -> set[tuple[Any, Any]]:
    """The daemon's TCP connections, each named by its two ends."""
    get = getattr(proc, "net_connections", None) or proc.connections
    return {(c.laddr, c.raddr) for c in get(kind="tcp") if c.status != psutil.CONN_LISTEN}


def _settled_connections(proc: psutil.Process, quiet: float, timeout: float) -> set[tuple[Any, Any]]:
    """The daemon's connections once none has come or gone for ``quiet`` seconds (bounded).

    The driver opens some connections lazily (the heartbeat's on its first beat): the
    baseline is taken after they are up, whenever that is.
    """
    deadline = time.monotonic() + timeout
    seen, since = _connections(proc), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            pytest.fail(f"the daemon's connections kept changing for {timeout} s")
        time.sleep(0.05)
        now = _connections(proc)
        if now != seen:
            seen, since = now, time.monotonic()
    return seen


def test_expired_get_timeouts_do_not_reconnect(svc: Service, tmp_path: Path) -> None:
    # Behaviour, not transport internals: while a call runs, gets that time out leave every
    # connection between driver and daemon as it was (none replaced by a reconnect, none
    # added), and no thread piles up in the daemon.
    a = svc.acquire()
    proc = psutil.Process(a.pid().get(timeout=T))
    gate = Gate(tmp_path)
    r = a.hold(*gate.args)  # runs until the test opens the gate: it outlives every get below
    try:
        gate.wait_started(T)
        base = _settled_connections(proc, quiet=3 * HEARTBEAT, timeout=60.0)
        base_threads = proc.num_threads()
        max_threads = base_threads
        for k in range(50):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                r.get(timeout=0.05)
            assert time.monotonic() - t0 < 5.0, "get(timeout=0.05) took far longer than its timeout"
            if k % 5 == 4:
                assert _connections(proc) == base, "an expired get changed the daemon's connections"
                max_threads = max(max_threads, proc.num_threads())
        assert not r.done()
    finally:
        gate.open()
    assert r.get(timeout=T) == "released"
    assert a.ident("still fine").get(timeout=T) == "still fine"
    assert base <= _connections(proc), "a connection the call was made on was replaced"
    assert max_threads <= base_threads + 1, f"the daemon's threads grew from {base_threads} to {max_threads}"
    svc.release(a)
    svc.wait_idle()


# -- gather ------------------------------------------------------------------------------------


def test_gather_over_results_some_already_finished(svc: Service, tmp_path: Path) -> None:
    grid = svc.grid
    a, b = svc.acquire(), svc.acquire()
    first = a.ident(1)
    assert first.get(timeout=T) == 1
    slow = b.sleep(SLOW)
    third = a.ident(3)
    assert grid.gather([first, slow, third], timeout=T) == [1, SLOW, 3]
    assert grid.gather([first, slow, third], timeout=T) == [1, SLOW, 3]  # all finished now
    assert grid.gather([first], timeout=T) == [1]
    assert grid.gather([], timeout=T) == []
    bad = a.fail_if(True, "gathered")
    check_error(bad, "gathered")
    with pytest.raises(ValueError, match="gathered"):
        grid.gather([first, bad, b.sleep(0.2)], timeout=T)
    gate = Gate(tmp_path)
    held = b.hold(*gate.args)
    with pytest.raises(TimeoutError):
        grid.gather([first, held], timeout=0.2)
    gate.open()
    assert grid.gather([first, held], timeout=T) == [1, "released"]
    svc.release(a)
    svc.release(b)
    svc.wait_idle()

    results = grid.broadcast(svc.sid, "ident", "b")
    results[0].get(timeout=T)
    assert grid.gather(results, timeout=T) == ["b", "b"]
    grid.release_all()
    svc.wait_idle()
