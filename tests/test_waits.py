"""Waits that never guess (issue 20, items 7, 8, 21), on real local daemons.

A thread may wait for servers it holds itself (other threads may release them, a lost one
may be respawned): the wait lasts until a server is free or the caller's timeout, and the
TimeoutError (and the warning logged during a long wait) says who holds what. A timeout
that is not a number >= 0 is refused at once. A released server goes back to the queue
only once its last pending call has finished.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import remote_waits
from conftest import wait_until
from remote_objects import Recorder
from remote_waits import Gated

import isdgrid.servicequeue as servicequeue
from isdgrid import Grid, GridError, Host, ServiceProxy

cloudpickle.register_pickle_by_value(remote_waits)

T = 60.0  # a generous bound on each wait that must succeed


class _WaitWarnings(logging.Handler):
    """Collects the "still waiting" warnings of the server queues; ``seen`` is set by each."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "still waiting" in message:
            self.messages.append(message)
            self.seen.set()

    def clear(self) -> None:
        self.messages.clear()
        self.seen.clear()


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> Iterator[_WaitWarnings]:
    """The queues warn after 0.2 s of waiting (30 s in use): a test learns that a thread waits."""
    monkeypatch.setattr(servicequeue, "WARN_EVERY", 0.2, raising=False)
    handler = _WaitWarnings()
    logger = logging.getLogger("isdgrid.servicequeue")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def _thread(prefix: str) -> Iterator[Callable[..., concurrent.futures.Future[Any]]]:
    """Run functions on one named thread (``prefix_0``); every one of them is waited for (bounded)."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=prefix)
    started: list[concurrent.futures.Future[Any]] = []

    def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future = pool.submit(fn, *args, **kwargs)
        started.append(future)
        return future

    try:
        yield run
    finally:
        concurrent.futures.wait(started, timeout=T)
        pool.shutdown(wait=False)


def _timed_out(call: Callable[[], Any]) -> tuple[TimeoutError, float]:
    """The TimeoutError ``call`` raises and how long it waited for it."""
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        call()
    return info.value, time.monotonic() - t0


def _release_when(event: threading.Event, grid: Grid, proxies: list[ServiceProxy]) -> list[threading.Thread]:
    """Worker threads that each use one of ``proxies`` and release it once ``event`` is set."""

    def work(proxy: ServiceProxy) -> None:
        try:
            proxy.ident(1).get(timeout=T)
            event.wait(T)
        finally:
            grid.release_service(proxy)

    workers = [threading.Thread(target=work, args=(p,), name=f"worker-{i}") for i, p in enumerate(proxies)]
    for worker in workers:
        worker.start()
    return workers


# -- item 7: no DeadlockError guess; waits bounded by the caller's timeout, naming the holders --
def test_a_thread_holding_every_server_waits_for_the_workers_it_handed_them_to(waits: _WaitWarnings) -> None:
    with Grid([Host("localhost", n_cpu=2)], status_file=False) as grid, _thread("acquirer") as on_acquirer:
        sid = grid.publish(Recorder())
        held = [on_acquirer(grid.acquire_service, sid, T).result(T) for _ in range(2)]
        labels = [grid.slots[i].label for i in range(2)]

        # the timeout is honoured (not a refusal at once), and the error says who holds what
        exc, waited = on_acquirer(_timed_out, lambda: grid.acquire_service(sid, timeout=0.5)).result(T)
        assert waited >= 0.45, f"refused after {waited:.2f} s instead of waiting 0.5 s: {exc}"
        assert "'acquirer_0'" in str(exc) and all(label in str(exc) for label in labels), str(exc)

        # handed to worker threads that release them: the acquirer's wait ends with a server
        waits.clear()
        workers = _release_when(waits.seen, grid, held)
        proxy = on_acquirer(grid.acquire_service, sid).result(T)
        for worker in workers:
            worker.join(T)
        assert waits.messages, "the acquirer got a server without waiting for the workers"
        assert "'acquirer_0'" in waits.messages[0] and all(label in waits.messages[0] for label in labels)
        assert proxy.ident(7).get(timeout=T) == 7
        grid.release_service(proxy)
        assert wait_until(lambda: grid.queues[sid].qsize() == 2, T)


@pytest.mark.parametrize("collective", ["broadcast", "scatter"])
def test_a_collective_call_by_a_thread_holding_servers_waits_for_their_release(
    waits: _WaitWarnings, collective: str
) -> None:
    def call(timeout: float | None) -> list[Any]:
        if collective == "broadcast":
            return grid.broadcast(sid, "ident", 5, timeout=timeout)
        return grid.scatter(sid, "ident", [5, 5], timeout=timeout)

    with Grid([Host("localhost", n_cpu=2)], status_file=False) as grid, _thread("acquirer") as on_acquirer:
        sid = grid.publish(Recorder())
        held = [on_acquirer(grid.acquire_service, sid, T).result(T) for _ in range(2)]

        exc, waited = on_acquirer(_timed_out, lambda: call(0.5)).result(T)
        assert waited >= 0.45, f"{collective} refused after {waited:.2f} s instead of waiting 0.5 s: {exc}"
        assert "'acquirer_0'" in str(exc) and grid.slots[0].label in str(exc), str(exc)
        assert grid.queues[sid].qsize() == 0  # the timed-out call took nothing away from the holder

        waits.clear()
        workers = _release_when(waits.seen, grid, held)
        results = on_acquirer(call, None).result(T)
        for worker in workers:
            worker.join(T)
        assert waits.messages, f"{collective} got the servers without waiting for the workers"
        assert grid.gather(results, timeout=T) == [5, 5]
        grid.release_all()
        assert wait_until(lambda: grid.queues[sid].qsize() == 2, T)


def test_a_thread_holding_one_server_waits_for_the_other_to_respawn(waits: _WaitWarnings, tmp_path: Path) -> None:
    hold = tmp_path / "hold"  # while it exists, the respawned copy waits in its __setstate__
    options: dict[str, Any] = {"respawn": True, "heartbeat_interval": 0.2, "host_timeout": 5.0, "status_file": False}
    with Grid([Host("localhost", n_cpu=2)], **options) as grid, _thread("acquirer") as on_acquirer:
        try:
            sid = grid.publish(Gated(str(hold)))
            mine = on_acquirer(grid.acquire_service, sid, T).result(T)
            my_pid = mine.pid().get(timeout=T)
            others = [slot for slot in grid.slots if slot.handle.process and slot.handle.process.pid != my_pid]
            assert len(others) == 1, "cannot tell which daemon serves the held proxy"
            hold.touch()
            victim = others[0]  # replaced in grid.slots as soon as the respawn's fork serves
            os.kill(victim.handle.process.pid, signal.SIGKILL)
            assert wait_until(victim.lost.is_set, T), "the kill went unnoticed"

            exc, waited = on_acquirer(_timed_out, lambda: grid.acquire_service(sid, timeout=0.5)).result(T)
            assert waited >= 0.45, f"refused after {waited:.2f} s instead of waiting 0.5 s: {exc}"
            assert "'acquirer_0'" in str(exc) and "respawning" in str(exc), str(exc)

            waits.clear()
            waiting = on_acquirer(grid.acquire_service, sid)
            assert waits.seen.wait(T), "the acquirer did not wait for the respawn"
            hold.unlink()  # the respawn goes on
            other = waiting.result(T)
            assert other.pid().get(timeout=T) not in (my_pid, victim.handle.process.pid)
            grid.release_service(other)
            grid.release_service(mine)
        finally:
            hold.unlink(missing_ok=True)


# -- item 8: a timeout that is not a number >= 0 is refused at once, everywhere ---------------
@pytest.mark.parametrize("bad", [float("nan"), -0.5, "5", True], ids=["nan", "negative", "str", "bool"])
def test_a_timeout_that_is_not_a_number_at_least_zero_is_refused_at_once(bad: Any) -> None:
    with Grid([Host("localhost", n_cpu=2)], status_file=False) as grid:
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid, timeout=T)
        done = proxy.ident(3)
        assert done.get(timeout=T) == 3
        grid.release_service(proxy)
        snapshot = grid.checkpoint(sid, timeout=T)
        takes: dict[str, Callable[[], Any]] = {
            "acquire_service": lambda: grid.acquire_service(sid, timeout=bad),
            "broadcast": lambda: grid.broadcast(sid, "ident", 1, timeout=bad),
            "scatter": lambda: grid.scatter(sid, "ident", [1, 2], timeout=bad),
            "gather": lambda: grid.gather([done], timeout=bad),
            "checkpoint": lambda: grid.checkpoint(sid, timeout=bad),
            "restore": lambda: grid.restore(sid, snapshot, timeout=bad),
            "wait_for_respawn": lambda: grid.wait_for_respawn(sid, timeout=bad),
            "Result.get": lambda: done.get(timeout=bad),
            "Result.result": lambda: done.result(timeout=bad),
            "Result.exception": lambda: done.exception(timeout=bad),
            "queue.get": lambda: grid.queues[sid].get(bad),
        }
        for what, take in takes.items():
            with pytest.raises((TypeError, ValueError), match="timeout must be a number") as info:
                take()
            assert what.split(".")[-1] in str(info.value), f"{what}: {info.value}"
            assert grid.queues[sid].qsize() == 2, f"{what} with timeout={bad!r} took a server"


def test_an_infinite_timeout_means_no_limit(grid: Grid) -> None:
    sid = grid.publish(Recorder())
    proxy = grid.acquire_service(sid, timeout=math.inf)
    assert proxy.sleep(0.2).get(timeout=math.inf) == 0.2
    assert proxy.ident(4).result(timeout=math.inf) == 4
    assert proxy.ident(5).exception(timeout=math.inf) is None
    grid.release_service(proxy)
    assert grid.gather(grid.broadcast(sid, "ident", 6, timeout=math.inf), timeout=math.inf) == [6] * 4
    grid.release_all()
    grid.restore(sid, grid.checkpoint(sid, timeout=math.inf), timeout=math.inf)
    grid.wait_for_respawn(sid, timeout=math.inf)


# -- item 21: a released server comes back after its LAST pending call, from several threads --
def test_release_waits_for_every_call_pending_from_several_threads(grid1: Grid, tmp_path: Path) -> None:
    first, rest = str(tmp_path / "first"), str(tmp_path / "rest")
    sid = grid1.publish(Gated())
    proxy = grid1.acquire_service(sid, timeout=T)
    results: list[Any] = [None] * 3

    def call(i: int) -> None:
        results[i] = proxy.through(first if i == 0 else rest, i)

    # three threads queue calls on one proxy: the first alone (so it lands alone), then two at once
    for group in ([0], [1, 2]):
        threads = [threading.Thread(target=call, args=(i,), name=f"caller-{i}") for i in group]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(T)
    assert all(r is not None and not r.done() for r in results)
    grid1.release_service(proxy)

    rest_opened = threading.Event()
    acquired = threading.Event()
    seen: dict[str, Any] = {}

    def acquire() -> None:
        seen["proxy"] = grid1.acquire_service(sid, timeout=2 * T)
        seen["rest opened"] = rest_opened.is_set()
        acquired.set()

    acquirer = threading.Thread(target=acquire, name="re-acquirer")
    acquirer.start()
    try:
        row = next(r for r in grid1.status() if r.service_id == sid)
        assert (row.state, row.pending) == ("releasing", 3)

        Path(first).touch()
        assert results[0].result(timeout=T) == 0
        row = next(r for r in grid1.status() if r.service_id == sid)
        assert (row.state, row.pending) == ("releasing", 2), "the server went back after its first call"
        assert not results[1].done() and not results[2].done()
        assert not acquired.wait(2.0), "the server was handed out while two of its calls were pending"

        rest_opened.set()
        Path(rest).touch()
        assert [results[i].result(timeout=T) for i in (1, 2)] == [1, 2]
        assert acquired.wait(T), "the server did not come back after its last call"
        assert seen["rest opened"], "the server was handed out before its last calls could finish"
        assert all(r.done() for r in results)
    finally:
        Path(first).touch()
        Path(rest).touch()
        acquirer.join(T)
        with contextlib.suppress(GridError):
            if "proxy" in seen:
                grid1.release_service(seen["proxy"])
