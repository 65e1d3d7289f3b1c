"""The driver's cost does not grow with the slots: a few threads, whatever the grid's size.

One I/O thread reads every connection (isdgrid.ioloop), one thread reads every daemon's
output, and a few workers come and go for blocking jobs: at most 8 threads besides the
user's own, at 1 slot or 256, with one service or ten.
"""

from __future__ import annotations

import concurrent.futures
import threading

import pytest
from conftest import child_pids, wait_until
from remote_objects import Recorder

from isdgrid import Grid, Host

MAX_DRIVER_THREADS = 8


def _grid_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("isdgrid"))


def _exercise(slots: int, services: int) -> list[str]:
    with Grid([Host("localhost", n_cpu=slots)], start_timeout=300, status_file=True) as grid:
        sids = [grid.publish(Recorder(f"s{i}")) for i in range(services)]
        for sid in sids:
            results = grid.broadcast(sid, "add", 1)
            done, _ = concurrent.futures.wait(results, timeout=120)  # settled without anyone reading
            assert len(done) == slots
            assert grid.gather(results, timeout=60) == [1] * slots
            grid.release_all()
        return _grid_threads()


@pytest.mark.parametrize(("slots", "services"), [(1, 1), (1, 10), (16, 10)])
def test_driver_threads_are_few_whatever_the_slots_and_services(slots: int, services: int) -> None:
    names = _exercise(slots, services)
    assert len(names) <= MAX_DRIVER_THREADS, names


@pytest.mark.slow
def test_256_slots_serve_with_few_driver_threads_and_leave_nothing() -> None:
    before = child_pids()
    names = _exercise(256, 2)
    assert len(names) <= MAX_DRIVER_THREADS, names
    assert wait_until(lambda: not (child_pids() - before), 60), f"left running: {child_pids() - before}"
