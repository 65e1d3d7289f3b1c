"""Grid.map: a load-balanced map over the servers of a service, on real local grids."""

from __future__ import annotations

import gc
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest
import remote_map
from conftest import wait_until
from remote_map import Mapper

from isdgrid import Grid, Host, ServiceProxy, UnknownServiceError

cloudpickle.register_pickle_by_value(remote_map)

WAIT = 60.0  # bound of every wait (generous: the machine may be loaded)


def take_all(grid: Grid, sid: str) -> None:
    """Acquire every server of ``sid`` (bounded), then release them: none leaked."""
    proxies: list[ServiceProxy] = []
    try:
        for _ in grid.servers[sid]:
            proxies.append(grid.acquire_service(sid, timeout=WAIT))
    finally:
        for proxy in proxies:
            grid.release_service(proxy)


@pytest.fixture
def mapped(grid: Grid) -> tuple[Grid, str]:
    return grid, grid.publish(Mapper())


def gate_paths(folder: Path) -> tuple[str, str]:
    name = uuid.uuid4().hex[:8]
    return str(folder / f"{name}.started"), str(folder / f"{name}.release")


def test_ordered_map_keeps_item_order_with_uneven_items(mapped: tuple[Grid, str]) -> None:
    grid, sid = mapped
    seconds = [0.6, 0.0, 0.3, 0.0, 0.0, 0.2] + [0.0] * 14  # early items finish last
    values = list(grid.map(sid, "nap", range(len(seconds)), seconds, timeout=WAIT))
    assert values == list(range(len(seconds)))


def test_unordered_map_gives_values_as_they_finish(mapped: tuple[Grid, str], tmp_path: Path) -> None:
    grid, sid = mapped
    started, release = gate_paths(tmp_path)
    n = 12
    # Item 0 runs until the test opens its gate, which it does only once every other
    # value has come: so item 0 can only come last.
    it = grid.map(
        sid, "gated", range(n), [started] + [None] * (n - 1), [release] + [None] * (n - 1),
        ordered=False, timeout=WAIT,
    )
    first = [next(it) for _ in range(n - 1)]
    assert sorted(first) == list(range(1, n))
    assert os.path.exists(started)
    Path(release).touch()
    assert list(it) == [0]


def test_several_iterables_are_zipped_and_the_shortest_ends_the_map(mapped: tuple[Grid, str]) -> None:
    grid, sid = mapped
    assert list(grid.map(sid, "nap", "abc", [0.0] * 10)) == ["a", "b", "c"]
    assert list(grid.map(sid, "square", [])) == []


def test_items_are_taken_only_as_servers_free_up(mapped: tuple[Grid, str]) -> None:
    grid, sid = mapped
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        while True:
            pulled += 1
            yield pulled - 1

    it = grid.map(sid, "square", endless(), ordered=False, timeout=WAIT)
    values = [next(it) for _ in range(30)]
    it.close()
    assert len(set(values)) == 30 and all(v in {i * i for i in range(pulled)} for v in values)
    # 30 values read; besides them at most twice as many calls running and values unread
    # as servers (then the map waits for the reader), and one item waiting for a server
    assert pulled <= 30 + 2 * len(grid.servers[sid]) + 1
    take_all(grid, sid)


def test_a_remote_exception_ends_the_map_and_the_servers_come_back(mapped: tuple[Grid, str]) -> None:
    grid, sid = mapped
    it = grid.map(sid, "fail_at", range(40), [7] * 40, timeout=WAIT)
    assert [next(it) for _ in range(7)] == list(range(7))
    with pytest.raises(ValueError, match="item 7 is bad"):
        next(it)
    assert list(it) == []  # ended
    take_all(grid, sid)
    assert all(s.pending == 0 for s in grid.servers[sid])


def test_an_item_whose_server_is_lost_runs_again_on_another(tmp_path: Path) -> None:
    with Grid([Host("localhost", n_cpu=3)], respawn=False, heartbeat_interval=0.5, host_timeout=5.0) as grid:
        sid = grid.publish(Mapper())
        marker = str(tmp_path / "slow.pid")
        n = 15
        it = grid.map(sid, "slow_first_time", range(n), [marker] + [None] * (n - 1), ordered=False, timeout=WAIT)
        assert wait_until(lambda: os.path.exists(marker), WAIT), "item 0 never started"
        pid = int(Path(marker).read_text())
        assert pid in [slot.handle.process.pid for slot in grid.slots if slot.handle.process is not None]
        os.kill(pid, signal.SIGKILL)
        outcomes = list(it)
        assert sorted(x for x, _ in outcomes) == list(range(n))
        assert dict(outcomes)[0] != pid  # item 0 ran again, elsewhere
        assert sum(s.lost for s in grid.servers[sid]) == 1
        assert wait_until(lambda: grid.queues[sid].qsize() == 2, WAIT)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_map_shares_its_service_with_a_thread_that_acquires(mapped: tuple[Grid, str]) -> None:
    grid, sid = mapped
    calls = 20
    served = threading.Event()  # the other thread got a server while the map was running
    errors: list[BaseException] = []
    done = 0

    def other() -> None:
        nonlocal done
        try:
            for i in range(calls):
                proxy = grid.acquire_service(sid, timeout=WAIT)
                served.set()
                try:
                    assert proxy.square(i).get(timeout=WAIT) == i * i
                finally:
                    grid.release_service(proxy)
                done += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    n = 120
    it = grid.map(sid, "nap", range(n), [0.03] * n, timeout=WAIT)
    values = [next(it)]
    thread = threading.Thread(target=other)
    thread.start()
    try:
        served_before_the_end = False
        for value in it:
            values.append(value)
            served_before_the_end = served_before_the_end or served.is_set()
    finally:
        thread.join(WAIT)
    assert not thread.is_alive() and not errors and done == calls
    assert values == list(range(n))
    assert served_before_the_end, "the other thread got no server while the map ran"
    take_all(grid, sid)


def test_an_abandoned_map_gives_every_server_back(mapped: tuple[Grid, str]) -> None:
    grid, sid = mapped
    it = grid.map(sid, "nap", range(40), [0.1] * 40)
    assert [next(it), next(it)] == [0, 1]
    del it
    gc.collect()
    take_all(grid, sid)

    closed = grid.map(sid, "nap", range(40), [0.1] * 40, ordered=False)
    next(closed)
    closed.close()
    take_all(grid, sid)


def test_an_interrupted_map_gives_every_server_back(mapped: tuple[Grid, str]) -> None:
    grid, sid = mapped

    def interrupted() -> Iterator[float]:
        yield from [0.2] * 8
        raise KeyboardInterrupt  # as a Ctrl-C while next() takes the next item

    it = grid.map(sid, "nap", range(100), interrupted(), timeout=WAIT)
    with pytest.raises(KeyboardInterrupt):
        list(it)
    assert list(it) == []
    take_all(grid, sid)


def test_the_timeout_bounds_the_whole_map(mapped: tuple[Grid, str]) -> None:
    grid, sid = mapped
    it = grid.map(sid, "nap", range(8), [3.0] * 8, timeout=0.5)
    with pytest.raises(TimeoutError, match="map of Mapper.nap"):
        list(it)
    take_all(grid, sid)


@pytest.mark.parametrize("bad", [-1, float("nan"), "5", True])
def test_a_bad_timeout_is_refused_at_once(mapped: tuple[Grid, str], bad: object) -> None:
    grid, sid = mapped
    with pytest.raises((TypeError, ValueError), match="map: timeout"):
        grid.map(sid, "square", [1], timeout=bad)  # type: ignore[arg-type]


def test_bad_arguments_are_refused_at_once(mapped: tuple[Grid, str]) -> None:
    grid, sid = mapped
    with pytest.raises(AttributeError, match="sqare"):
        grid.map(sid, "sqare", [1])
    with pytest.raises(TypeError, match="at least one iterable"):
        grid.map(sid, "square")
    with pytest.raises(UnknownServiceError):
        grid.map("Nope-1234", "square", [1])
    assert grid.queues[sid].qsize() == len(grid.servers[sid])


def test_progress_works_without_a_terminal(mapped: tuple[Grid, str], capfd: pytest.CaptureFixture[str]) -> None:
    grid, sid = mapped
    assert list(grid.map(sid, "square", range(10), progress=True, timeout=WAIT)) == [i * i for i in range(10)]
    err = capfd.readouterr().err
    assert "Mapper.square" in err and "10/10" in err
