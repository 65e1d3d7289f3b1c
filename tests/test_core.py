"""The core contract on real local daemons: publish, ordered async calls, release."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Gate
from remote_objects import CustomError, Recorder

from isdgrid import (
    Grid,
    GridTerminatedError,
    RemoteError,
    Result,
    ServiceReleasedError,
    UnknownServiceError,
    read_attribute,
)


def test_publish_returns_id_with_class_name_and_one_server_per_slot(grid: Grid) -> None:
    sid = grid.publish(Recorder())
    assert "Recorder" in sid
    assert len(grid.servers[sid]) == 4
    assert grid.queues[sid].qsize() == 4
    pids = grid.gather(grid.broadcast(sid, "pid"), timeout=30)
    assert len(set(pids)) == 4  # one daemon process per slot
    assert grid.publish(Recorder()) != sid


def test_thousand_pipelined_calls_run_in_call_order(grid: Grid) -> None:
    sid = grid.publish(Recorder())
    proxy = grid.acquire_service(sid)
    results = [proxy.add(i) for i in range(1000)]
    assert all(isinstance(r, Result) for r in results)
    assert [r.get(timeout=60) for r in results] == list(range(1, 1001))
    assert proxy.history().get(timeout=30) == list(range(1000))
    grid.release_service(proxy)


def test_calls_return_before_the_remote_work_is_done(grid1: Grid, tmp_path: Path) -> None:
    sid = grid1.publish(Recorder())
    proxy = grid1.acquire_service(sid)
    gate = Gate(tmp_path)
    t0 = time.monotonic()
    slow = proxy.hold(*gate.args)  # runs until the gate opens
    after = proxy.add("after")
    queued_in = time.monotonic() - t0
    assert not slow.done() and not after.done()
    assert queued_in < 5.0  # generous: only queueing, the calls cannot have ended
    gate.open()
    assert after.get(timeout=30) == 1
    assert slow.done()  # the later call finished after the earlier one
    grid1.release_service(proxy)


def test_release_returns_server_only_after_last_pending_call(grid1: Grid, tmp_path: Path) -> None:
    sid = grid1.publish(Recorder())
    proxy = grid1.acquire_service(sid)
    gate = Gate(tmp_path)
    slow = proxy.hold(*gate.args)
    grid1.release_service(proxy)
    assert grid1.queues[sid].qsize() == 0
    with pytest.raises(TimeoutError):
        grid1.acquire_service(sid, timeout=0.2)
    gate.open()
    again = grid1.acquire_service(sid, timeout=30)
    assert slow.done(), "the server came back before its last call finished"
    grid1.release_service(again)


def test_release_without_any_call_does_not_leak_the_server(grid1: Grid) -> None:
    sid = grid1.publish(Recorder())
    for _ in range(100):
        proxy = grid1.acquire_service(sid, timeout=10)
        grid1.release_service(proxy)
    assert grid1.acquire_service(sid, timeout=10) is not None


def test_released_proxy_refuses_calls_and_second_release(grid: Grid) -> None:
    sid = grid.publish(Recorder())
    proxy = grid.acquire_service(sid)
    grid.release_service(proxy)
    with pytest.raises(ServiceReleasedError):
        proxy.add(1)
    with pytest.raises(ServiceReleasedError):
        grid.release_service(proxy)


def test_sixteen_threads_hammer_four_servers(grid: Grid) -> None:
    sid = grid.publish(Recorder())
    errors: list[BaseException] = []

    def worker(tid: int) -> int:
        done = 0
        for i in range(100):
            proxy = grid.acquire_service(sid, timeout=60)
            tag = (tid, i)
            results = [proxy.ident(tag), proxy.echo(tid, i=i)]
            grid.release_service(proxy)
            assert results[0].get(timeout=60) == tag
            assert results[1].get(timeout=60) == ((tid,), {"i": i})
            done += 1
        return done

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(worker, t) for t in range(16)]
        for f in concurrent.futures.as_completed(futures, timeout=300):
            try:
                assert f.result() == 100
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
    assert not errors, errors[:3]
    deadline = time.monotonic() + 30
    while grid.queues[sid].qsize() < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert grid.queues[sid].qsize() == 4
    assert sum(s.calls for s in grid.status()) == 16 * 100 * 2


def test_remote_exceptions_keep_their_type_and_traceback(grid1: Grid) -> None:
    sid = grid1.publish(Recorder())
    proxy = grid1.acquire_service(sid)
    with pytest.raises(ValueError, match="bad value") as info:
        proxy.fail("value", "bad value").get(timeout=30)
    assert "remote traceback" in str(info.value.__cause__)
    assert "in fail" in info.value.remote_traceback  # type: ignore[attr-defined]
    with pytest.raises(KeyError):
        proxy.fail("key").get(timeout=30)
    with pytest.raises(CustomError) as custom:
        proxy.fail("custom", "mine").get(timeout=30)
    assert custom.value.code == 42
    with pytest.raises(RemoteError) as remote:
        proxy.fail("unpicklable", "locked").get(timeout=30)
    assert "UnpicklableError" in remote.value.type_name and "locked" in str(remote.value)
    with pytest.raises(RemoteError, match="cannot be pickled back"):
        proxy.unpicklable_result().get(timeout=30)
    with pytest.raises(AttributeError):
        proxy.no_such_attribute  # noqa: B018 - refused at once, in the driver
    # the proxy still works after every one of those failures, in order
    assert proxy.add("still alive").get(timeout=30) == 1
    grid1.release_service(proxy)


def test_attributes_read_and_write_in_call_order(grid1: Grid) -> None:
    sid = grid1.publish(Recorder())
    proxy = grid1.acquire_service(sid)
    before = read_attribute(proxy, "value")
    proxy.value = 21
    doubled = read_attribute(proxy, "doubled")
    assert before.get(timeout=30) == 0
    assert doubled.get(timeout=30) == 42
    assert proxy.value == 21
    grid1.release_service(proxy)


def test_arguments_are_captured_when_the_call_is_made(grid1: Grid) -> None:
    sid = grid1.publish(Recorder())
    proxy = grid1.acquire_service(sid)
    data = [1, 2]
    slow = proxy.sleep(0.3)
    r = proxy.ident(data)
    data.append(3)
    slow.get(timeout=30)
    assert r.get(timeout=30) == [1, 2]
    grid1.release_service(proxy)


def test_numpy_arrays_round_trip_exactly(grid1: Grid) -> None:
    sid = grid1.publish(Recorder())
    proxy = grid1.acquire_service(sid)
    arrays = [np.arange(10), np.random.default_rng(1).normal(size=(300, 3)), np.zeros((1 << 20,), np.float32)]
    for a in arrays:
        back = proxy.ident(a).get(timeout=60)
        assert back.dtype == a.dtype and back.shape == a.shape
        np.testing.assert_array_equal(back, a)
    grid1.release_service(proxy)


def test_broadcast_scatter_gather_keep_server_order(grid: Grid) -> None:
    sid = grid.publish(Recorder())
    pids = grid.gather(grid.broadcast(sid, "pid"), timeout=30)
    for _ in range(3):
        assert grid.gather(grid.broadcast(sid, "pid"), timeout=30) == pids
    assert grid.queues[sid].qsize() == 0  # held until release_all
    items = [(1, 2), [3], {"k": "v"}, 7]
    echoed = grid.gather(grid.scatter(sid, "echo", items, [{"i": 0}, {}, {"i": 2}, {}]), timeout=30)
    assert echoed == [((1, 2), {"i": 0}), ((3,), {}), (({"k": "v"},), {"i": 2}), ((7,), {})]
    assert grid.gather(grid.broadcast(sid, "echo", 5, key="word"), timeout=30) == [((5,), {"key": "word"})] * 4
    with pytest.raises(ValueError, match="3 argument items for 4 servers"):
        grid.scatter(sid, "echo", [1, 2, 3])
    grid.release_all()
    assert grid.queues[sid].qsize() == 4
    assert len({p for p in grid.gather(grid.broadcast(sid, "pid"), timeout=30)}) == 4
    grid.release_all()


def test_a_collective_call_that_cannot_be_pickled_sends_nothing(grid: Grid) -> None:
    """broadcast pickles its call once, scatter every call before any is sent: an argument
    that cannot be pickled is a TypeError that names the call, and no server got anything."""
    sid = grid.publish(Recorder())
    unpicklable = threading.Lock()
    with pytest.raises(TypeError, match=rf"Recorder\.add\(\) \(broadcast to service '{sid}'\).*cannot be pickled"):
        grid.broadcast(sid, "add", unpicklable)
    with pytest.raises(TypeError, match=r"Recorder\.add\(\) on .*/2: its arguments cannot be pickled"):
        grid.scatter(sid, "add", [0, 1, unpicklable, 3])
    assert grid.gather(grid.broadcast(sid, "history"), timeout=30) == [[]] * 4  # (the servers are still held)
    assert grid.gather(grid.scatter(sid, "add", [0, 1, 2, 3]), timeout=30) == [1] * 4
    grid.release_all()
    assert grid.queues[sid].qsize() == 4


def test_gather_raises_the_first_error_and_times_out(grid: Grid, tmp_path: Path) -> None:
    sid = grid.publish(Recorder())
    with pytest.raises(ValueError, match="server 1"):
        grid.gather(grid.scatter(sid, "fail_if", [(False, "0"), (True, "server 1"), (True, "server 2"), (False, "3")]))
    grid.release_all()
    gate = Gate(tmp_path)
    held = grid.broadcast(sid, "hold", *gate.args)
    with pytest.raises(TimeoutError):
        grid.gather(held, timeout=0.2)
    gate.open()
    assert grid.gather(held, timeout=30) == ["released"] * len(held)
    grid.release_all()


def test_unknown_service_and_acquire_timeout(grid1: Grid) -> None:
    t0 = time.monotonic()
    with pytest.raises(UnknownServiceError):
        grid1.acquire_service("Nothing-123")
    assert time.monotonic() - t0 < 1.0
    sid = grid1.publish(Recorder())
    proxy = grid1.acquire_service(sid)
    # this thread holds the only server: another thread could release it, so the wait is
    # not refused; it ends at the timeout, naming the thread that holds the server
    with pytest.raises(TimeoutError, match="held by thread 'MainThread'"):
        grid1.acquire_service(sid, timeout=0.3)
    outcome: list[BaseException] = []
    other = threading.Thread(target=lambda: _acquire_into(grid1, sid, 0.3, outcome))
    other.start()
    other.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError)
    grid1.release_service(proxy)


def _acquire_into(grid: Grid, sid: str, timeout: float, outcome: list[BaseException]) -> None:
    try:
        grid.acquire_service(sid, timeout=timeout)
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        outcome.append(exc)


def test_result_is_a_future_with_get_timeout(grid1: Grid, tmp_path: Path) -> None:
    sid = grid1.publish(Recorder())
    proxy = grid1.acquire_service(sid)
    gate = Gate(tmp_path)
    r = proxy.hold(*gate.args)
    assert isinstance(r, concurrent.futures.Future)
    with pytest.raises(TimeoutError):
        r.get(timeout=0.05)
    gate.open()
    assert r.get(timeout=30) == "released"
    grid1.release_service(proxy)


def test_terminate_fails_pending_calls_and_blocks_further_use() -> None:
    g = Grid([__import__("isdgrid").Host("localhost", n_cpu=2)])
    sid = g.publish(Recorder())
    proxy = g.acquire_service(sid)
    pending = proxy.sleep(30)
    waiter_error: list[BaseException] = []
    blocked = g.acquire_service(sid)  # the second server

    def wait_for_server() -> None:
        try:
            g.acquire_service(sid, timeout=60)
        except BaseException as exc:  # noqa: BLE001
            waiter_error.append(exc)

    t = threading.Thread(target=wait_for_server)
    t.start()
    time.sleep(0.2)
    g.terminate()
    t.join(timeout=30)
    assert not t.is_alive()
    assert waiter_error and isinstance(waiter_error[0], GridTerminatedError)
    with pytest.raises(GridTerminatedError):
        pending.get(timeout=30)
    assert g.ishalted()
    with pytest.raises(GridTerminatedError):
        g.publish(Recorder())
    with pytest.raises(GridTerminatedError):
        g.acquire_service(sid)
    with pytest.raises((GridTerminatedError, ServiceReleasedError)):
        blocked.add(1).get(timeout=10)
    g.terminate()  # idempotent


def test_terminate_one_service_keeps_the_others(grid: Grid) -> None:
    a = grid.publish(Recorder("a"))
    b = grid.publish(Recorder("b"))
    grid.terminate(a)
    with pytest.raises(UnknownServiceError):
        grid.acquire_service(a)
    proxy = grid.acquire_service(b)
    assert proxy.tag == "b"
    grid.release_service(proxy)
    assert not grid.ishalted()
