"""Payloads: exact round trips of numpy arrays and bytes, the bulk side channel and its
inline fallback, arguments captured at call time, resends of large calls, and the
plain-pickle fast path never standing in for cloudpickle where it must not."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from remote_objects import Recorder

from isdgrid import Grid, Host, codec
from isdgrid.bulk import AUTH_TIMEOUT, MAGIC

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = 3 * codec.OOB_MIN  # large enough to travel out of band


@pytest.fixture
def inline_grid(monkeypatch: pytest.MonkeyPatch) -> Iterator[Grid]:
    """A one-slot grid whose daemon has no bulk port (as behind an ssh tunnel)."""
    monkeypatch.setenv("ISDGRID_BULK", "0")
    g = Grid([Host("localhost", n_cpu=1)])
    try:
        yield g
    finally:
        g.terminate()


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    big = rng.random((BIG // 8 // 16, 16))
    return [
        np.array(3.5),  # 0-d
        np.arange(10, dtype=np.int8),
        np.arange(12, dtype=np.uint16).reshape(3, 4),
        rng.random((5, 7)).astype(np.float32),
        (rng.random(6) + 1j * rng.random(6)).astype(np.complex128),
        np.array([True, False, True]),
        np.zeros((0, 3)),
        np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "<i4"), ("b", "<f8")]),
        big,  # out of band
        big[:, ::3],  # non-contiguous: in band
        np.asfortranarray(big),  # Fortran order: out of band
        big.T,
        rng.integers(0, 1 << 30, size=BIG // 4, dtype=np.int32).astype(">i4"),  # big-endian, out of band
    ]


def _same(a: np.ndarray, b: Any) -> bool:
    """Equal dtype, shape and values; the memory order kept when ``a`` had one (as pickle does)."""
    layout_kept = not (a.flags.c_contiguous or a.flags.f_contiguous) or (
        a.flags.c_contiguous == b.flags.c_contiguous and a.flags.f_contiguous == b.flags.f_contiguous
    )
    same_values = isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return same_values and layout_kept


@pytest.mark.parametrize("path", ["bulk", "inline"])
def test_numpy_arrays_round_trip_exactly(path: str, grid1: Grid, inline_grid: Grid) -> None:
    grid = grid1 if path == "bulk" else inline_grid
    sid = grid.publish(Recorder())
    proxy = grid.acquire_service(sid)
    arrays = _arrays()
    for array in arrays:
        back = proxy.ident(array).get(timeout=60)
        assert _same(array, back), (array.dtype, array.shape)
        assert back.flags.writeable  # usable like any unpickled array
        back[...] = 0 if back.dtype.names is None else back
    together = proxy.ident(arrays).get(timeout=60)  # several large buffers in one call
    assert all(_same(a, b) for a, b in zip(arrays, together, strict=True))
    pipelined = [proxy.ident(a) for a in arrays]  # queued calls carry copies
    assert all(_same(a, r.get(timeout=60)) for a, r in zip(arrays, pipelined, strict=True))
    grid.release_service(proxy)
    expected_bulk = path == "bulk"
    assert (grid.slots[0].info.get("bulk_port") is not None) is expected_bulk


@pytest.mark.parametrize("path", ["bulk", "inline"])
def test_bytes_and_buffers_round_trip(path: str, grid1: Grid, inline_grid: Grid) -> None:
    grid = grid1 if path == "bulk" else inline_grid
    sid = grid.publish(Recorder())
    proxy = grid.acquire_service(sid)
    for size in (0, 10, BIG):
        data = os.urandom(size)
        assert proxy.ident(data).get(timeout=60) == data
        array = bytearray(data)
        back = proxy.ident(array).get(timeout=60)
        assert type(back) is bytearray and back == array
        view = memoryview(data)
        back = proxy.ident(pickle.PickleBuffer(view)).get(timeout=60)  # a raw buffer: its bytes come back
        assert bytes(back) == data
        writable = proxy.ident(pickle.PickleBuffer(bytearray(data))).get(timeout=60)
        assert bytes(writable) == data and not memoryview(writable).readonly
    grid.release_service(proxy)


def test_large_arguments_are_captured_when_the_call_is_made(grid1: Grid) -> None:
    sid = grid1.publish(Recorder())
    proxy = grid1.acquire_service(sid)
    proxy.ident(0).get(timeout=30)  # connected and idle: the next call is sent by this thread
    array = np.arange(BIG // 8, dtype=np.float64)
    sent_at_once = proxy.add(array)
    array[:] = -1
    queued_behind = [proxy.sleep(0.5), proxy.add(array.copy())]  # queued: carries a copy
    mutated_copy = array.copy()
    array[:] = -2
    assert sent_at_once.get(timeout=60) == 1
    assert queued_behind[1].get(timeout=60) == 2
    seen = proxy.history().get(timeout=60)
    assert np.array_equal(seen[0], np.arange(BIG // 8, dtype=np.float64))
    assert np.array_equal(seen[1], mutated_copy)
    # a call queued behind a running one holds a copy made at call time, too
    slow = proxy.sleep(0.5)
    later = np.full(BIG // 8, 7.0)
    queued = proxy.add(later)
    later[:] = 0
    slow.get(timeout=30)
    assert queued.get(timeout=60) == 3
    assert np.array_equal(proxy.history().get(timeout=60)[2], np.full(BIG // 8, 7.0))
    grid1.release_service(proxy)


@pytest.mark.parametrize("warm", [False, True])
def test_large_call_resent_across_a_cut_connection_runs_once(warm: bool) -> None:
    with Grid([Host("localhost", n_cpu=1)], heartbeat_interval=0.5, host_timeout=10.0) as grid:
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid)
        if warm:  # connected: the calling thread puts views of the array, the resend names the stored copy
            assert proxy.ident(1).get(timeout=30) == 1
        array = np.random.default_rng(3).random(BIG // 8)
        original = array.copy()
        slow = proxy.slow_add(1.0, array)
        array[:] = 0
        time.sleep(0.4)  # the batch runs remotely now
        grid.slots[0].cut_connections()  # every connection (Pyro5 and bulk) breaks; the daemon lives on
        assert slow.get(timeout=60) == 1
        grid.slots[0].cut_connections()
        echoed = proxy.ident(original).get(timeout=60)  # and a large reply after a cut
        assert np.array_equal(echoed, original)
        seen = proxy.history().get(timeout=30)
        assert len(seen) == 1 and np.array_equal(seen[0], original)
        assert not grid.slots[0].lost.is_set()
        grid.release_service(proxy)


def test_large_results_of_broadcast_come_back_over_the_bulk_channel(grid: Grid) -> None:
    sid = grid.publish(Recorder())
    array = np.random.default_rng(5).random(BIG // 8)
    results = grid.gather(grid.broadcast(sid, "ident", array), timeout=60)
    assert all(np.array_equal(r, array) for r in results)
    scattered = [array * i for i in range(4)]
    results = grid.gather(grid.scatter(sid, "ident", [(a,) for a in scattered]), timeout=60)
    assert all(np.array_equal(r, a) for r, a in zip(results, scattered, strict=True))
    grid.release_all(sid)


def test_bulk_port_refuses_clients_without_the_secret(grid1: Grid) -> None:
    sid = grid1.publish(Recorder())
    proxy = grid1.acquire_service(sid)
    assert np.array_equal(proxy.ident(np.ones(BIG // 8)).get(timeout=60), np.ones(BIG // 8))
    port = grid1.slots[0].info["bulk_port"]
    assert isinstance(port, int)

    def answer(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.settimeout(AUTH_TIMEOUT + 10)
            if data:
                sock.sendall(data)
            got = b""
            try:
                while chunk := sock.recv(1024):
                    got += chunk
            except ConnectionResetError:  # closed with our bytes unread
                pass
            return got

    wrong = b"not the secret"
    assert answer(MAGIC + len(wrong).to_bytes(2, "big") + wrong) == b""
    assert answer(b"PUT q/x/1/0 please\r\n") == b""
    # a GET straight away, without a hello, gets nothing either
    assert answer(b"G" + (7).to_bytes(2, "big") + (0).to_bytes(4, "big") + b"r/x/1/0") == b""
    t0 = time.monotonic()
    assert answer(b"") == b""  # silent clients are dropped after the hello timeout
    assert time.monotonic() - t0 < AUTH_TIMEOUT + 5
    assert proxy.ident(3).get(timeout=30) == 3
    grid1.release_service(proxy)


def test_plain_values_are_recognised_and_everything_else_goes_through_cloudpickle() -> None:
    class Local:
        pass

    plain = [1, 2.0, "s", b"b", None, True, 1j, bytearray(b"x"), (1, [2, {3: "4"}]), {"a": {1, 2}},
             frozenset({1}), np.arange(3), np.float32(1), np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")])]
    for value in plain:
        assert codec.is_plain(value), value
    not_plain = [Local(), [Local()], {"k": Local}, lambda: 1, np.array([object()]), type("D", (dict,), {})(),
                 range(3), {Local(): 1}]
    for value in not_plain:
        assert not codec.is_plain(value), value
    nested: Any = 1
    for _ in range(100):
        nested = [nested]
    assert not codec.is_plain(nested)  # too deep to check cheaply: cloudpickle handles it
    data, _ = codec.encode_op("call", "f", (nested,), None)
    assert pickle.loads(data)[2][0] == nested


def test_driver_main_classes_and_functions_travel_by_value(tmp_path: Any) -> None:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        from isdgrid import Grid, Host

        class Point:
            def __init__(self, x):
                self.x = x

        class Holder:
            def keep(self, value):
                self.value = value
                return value

            def kind(self):
                return type(self.value).__name__

        def square(v):
            return v * v

        with Grid([Host("localhost", n_cpu=1)], status_file=False) as grid:
            proxy = grid.acquire_service(grid.publish(Holder()))
            back = proxy.keep(Point(3)).get(timeout=60)
            assert type(back) is Point and back.x == 3, back
            assert proxy.kind().get(timeout=60) == "Point"
            assert proxy.keep([Point(1), {"p": Point(2)}]).get(timeout=60)[1]["p"].x == 2
            assert proxy.keep(square).get(timeout=60)(4) == 16
            arrays = proxy.keep([np.arange(100000.0), Point(5)]).get(timeout=60)
            assert arrays[0][-1] == 99999.0 and arrays[1].x == 5
            print("DRIVER-OK")
    """))
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DRIVER-OK" in done.stdout


def test_pipelined_batches_cut_mid_stream_run_once_in_order() -> None:
    """Two batches out at once, connections cut under them: every call runs once, in order."""
    with Grid([Host("localhost", n_cpu=1)], heartbeat_interval=0.5, host_timeout=10.0) as grid:
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid)
        n = 3000
        results = []
        for i in range(n):
            results.append(proxy.add(i))
            if i % 500 == 250:
                grid.slots[0].cut_connections()  # breaks whatever is out: resent under the same numbers
        assert [r.get(timeout=60) for r in results] == list(range(1, n + 1))
        assert proxy.history().get(timeout=60) == list(range(n))
        assert not grid.slots[0].lost.is_set()
        grid.release_service(proxy)
