"""A long batch never holds up a slot's other services or its heartbeat (isdgrid.takeover).

The daemon's connection thread runs a batch itself; past ``TAKEOVER`` a kernel timer
(``SIGALRM``, taken only by the main thread) has a new reader started. Real daemons in
real processes: calls on one slot's two services, heartbeats during a long call, the
signal masks of a worker's threads, and many threads mixing long and short calls.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import psutil
from conftest import wait_until
from remote_objects import Recorder

from isdgrid import Grid, Host

T = 60.0
SIGALRM_BIT = 1 << (14 - 1)  # SigBlk in /proc/PID/task/TID/status: bit n-1 for signal n


def _worker_pid(grid: Grid) -> int:
    (slot,) = grid._slots
    assert slot.handle.process is not None and slot.handle.process.pid
    return int(slot.handle.process.pid)


def _blocked(pid: int, tid: int) -> bool:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) & SIGALRM_BIT)
    raise AssertionError(f"no SigBlk line for thread {tid} of {pid}")


def test_a_long_call_does_not_hold_up_another_service_of_the_slot() -> None:
    with Grid([Host("localhost", n_cpu=1)], status_file=False) as grid:
        a_id, b_id = grid.publish(Recorder("a")), grid.publish(Recorder("b"))
        a, b = grid.acquire_service(a_id, timeout=T), grid.acquire_service(b_id, timeout=T)
        long = a.sleep(6.0)
        time.sleep(0.3)  # the long batch runs
        started = time.monotonic()
        assert b.ident("b answers").get(timeout=T) == "b answers"
        assert time.monotonic() - started < 4.0, "b waited for a's long call"
        assert not long.done()
        assert long.get(timeout=T) == 6.0
        assert [b.ident(i).get(timeout=T) for i in range(3)] == [0, 1, 2]


def test_heartbeats_are_answered_during_a_long_call() -> None:
    with Grid([Host("localhost", n_cpu=1)], status_file=False, heartbeat_interval=0.2, host_timeout=1.5) as grid:
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid, timeout=T)
        assert proxy.sleep(5.0).get(timeout=T) == 5.0  # three host timeouts long: the slot stays
        (slot,) = grid._slots
        assert not slot.lost.is_set()
        assert proxy.ident("after").get(timeout=T) == "after"


def test_only_the_main_thread_of_a_worker_takes_sigalrm() -> None:
    with Grid([Host("localhost", n_cpu=1)], status_file=False) as grid:
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid, timeout=T)
        proxy.sleep(1.0)  # a takeover: a conn-reader thread joins
        assert proxy.ident("x").get(timeout=T) == "x"
        pid = _worker_pid(grid)
        tids = [t.id for t in psutil.Process(pid).threads()]
        assert len(tids) >= 3  # main, accept, the calls connection
        assert not _blocked(pid, pid), "the worker's main thread blocks SIGALRM: no takeover could happen"
        others = [tid for tid in tids if tid != pid]
        assert all(_blocked(pid, tid) for tid in others), "a thread other than main may take SIGALRM"


def test_many_threads_mixing_long_and_short_calls_on_two_services() -> None:
    with Grid([Host("localhost", n_cpu=2)], status_file=False) as grid:
        sids = [grid.publish(Recorder("a")), grid.publish(Recorder("b"))]
        errors: list[BaseException] = []

        def work(k: int) -> None:
            try:
                for i in range(25):
                    sid = sids[(k + i) % 2]
                    proxy = grid.acquire_service(sid, timeout=T)
                    try:
                        slow = proxy.sleep(0.012) if i % 3 == 0 else None  # over TAKEOVER (5 ms)
                        quick = [proxy.ident((k, i, j)) for j in range(4)]
                        assert [r.get(timeout=T) for r in quick] == [(k, i, j) for j in range(4)]
                        if slow is not None:
                            assert slow.get(timeout=T) == 0.012
                    finally:
                        grid.release_service(proxy)
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(work, range(8)))
        assert not errors, errors[:3]
        for slot in grid._slots:
            assert slot.handle.process is not None
            pid = int(slot.handle.process.pid)
            # the readers a takeover started end with their batch: no thread per call is left
            assert wait_until(lambda p=pid: psutil.Process(p).num_threads() <= 6, T), psutil.Process(pid).threads()
        assert threading.active_count() < 20
