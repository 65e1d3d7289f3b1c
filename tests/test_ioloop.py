"""The driver's I/O loop: one thread, readers, timers, calls from any thread; it survives anything.

These use the loop on its own (no grid): it is the one piece every reply goes through.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isdgrid import GridError, Result
from isdgrid.ioloop import IOLoop, get_loop
from isdgrid.workers import Workers

T = 30.0  # generous bound for anything that should take milliseconds


@pytest.fixture
def loop() -> Iterator[IOLoop]:
    own = IOLoop("test-io")
    try:
        yield own
    finally:
        own.close()
        assert not own._thread.is_alive()


def test_calls_from_many_threads_all_run_in_the_loop_thread_in_order_per_thread(loop: IOLoop) -> None:
    seen: list[tuple[int, int, int]] = []
    done = threading.Event()
    n_threads, n_calls = 8, 500

    def record(thread: int, i: int) -> None:
        seen.append((thread, i, threading.get_ident()))
        if len(seen) == n_threads * n_calls:
            done.set()

    def caller(thread: int) -> None:
        for i in range(n_calls):
            loop.call_soon(record, thread, i)

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert done.wait(T)
    assert {ident for _, _, ident in seen} == {loop._thread.ident}
    for thread in range(n_threads):
        assert [i for t, i, _ in seen if t == thread] == list(range(n_calls))


def test_timers_run_in_time_order_and_a_cancelled_one_never_runs(loop: IOLoop) -> None:
    order: list[str] = []
    done = threading.Event()
    loop.call_later(0.3, lambda: (order.append("late"), done.set()))
    loop.call_later(0.1, order.append, "early")
    cancelled = loop.call_later(0.2, order.append, "cancelled")
    cancelled.cancel()
    assert done.wait(T)
    assert order == ["early", "late"]


def test_the_loop_survives_any_exception_a_callback_raises(loop: IOLoop) -> None:
    after = threading.Event()

    def boom(exc: BaseException) -> None:
        raise exc

    for exc in (ValueError("x"), KeyboardInterrupt(), SystemExit(3), GeneratorExit()):
        loop.call_soon(boom, exc)
    loop.call_later(0.01, boom, MemoryError())
    loop.call_soon(after.set)
    assert after.wait(T)
    assert loop._thread.is_alive()


def test_a_reader_is_called_when_data_comes_and_not_after_it_is_removed(loop: IOLoop) -> None:
    a, b = socket.socketpair()
    got: list[bytes] = []
    arrived = threading.Event()

    def readable() -> None:
        got.append(a.recv(100))
        arrived.set()

    try:
        loop.add_reader(a, readable)
        b.sendall(b"ping")
        assert arrived.wait(T)
        assert got == [b"ping"]
        loop.remove_reader(a)
        removed = threading.Event()
        loop.call_soon(removed.set)  # runs after the removal (calls run in order)
        assert removed.wait(T)
        arrived.clear()
        b.sendall(b"more")
        assert not arrived.wait(0.3)
    finally:
        a.close()
        b.close()


def test_run_until_serves_the_loop_from_inside_a_callback(loop: IOLoop) -> None:
    flag = threading.Event()
    outcome: list[bool] = []
    finished = threading.Event()

    def waiting_callback() -> None:
        loop.call_later(0.05, flag.set)  # only this loop can run it
        loop.run_until(flag.is_set, time.monotonic() + T)
        outcome.append(flag.is_set())
        finished.set()

    loop.call_soon(waiting_callback)
    assert finished.wait(T)
    assert outcome == [True]


def test_a_result_of_the_parent_waited_on_in_a_forked_child_is_refused_at_once() -> None:
    result = Result()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once, whatever happens
        code = 1
        try:
            result.result(timeout=T)
        except GridError as exc:
            code = 0 if "forked child" in str(exc) else 2
        except BaseException:  # noqa: BLE001
            code = 3
        os.write(write, bytes([code]))
        os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"\0"
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def test_workers_run_every_job_with_at_most_size_threads_and_end_when_idle() -> None:
    workers = Workers("test-workers", 3, idle=0.2)
    lock = threading.Lock()
    running = [0]
    most = [0]

    def job(i: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.005)
        with lock:
            running[0] -= 1
        if i % 7 == 0:
            raise KeyboardInterrupt(i)  # a job's BaseException is its Future's, the thread goes on
        return i

    futures = [workers.submit(job, i) for i in range(200)]
    values = []
    for i, future in enumerate(futures):
        exc = future.exception(T)
        if i % 7 == 0:
            assert isinstance(exc, KeyboardInterrupt)
        else:
            values.append(future.result(T))
    assert values == [i for i in range(200) if i % 7]
    assert most[0] <= 3

    def gone() -> bool:
        return not any(t.name.startswith("test-workers") for t in threading.enumerate())

    deadline = time.monotonic() + T
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone()


def test_the_process_loop_is_one_and_the_same() -> None:
    assert get_loop() is get_loop()


def test_workers_run_a_job_submitted_at_interpreter_exit(tmp_path: Path) -> None:
    """At exit (Python 3.12 refuses new threads then) a job still runs: a grid's terminate at exit needs it."""
    script = tmp_path / "at_exit.py"
    script.write_text(
        "import atexit\n"
        "from isdgrid.workers import Workers\n"
        "workers = Workers('exit-workers', 2)\n"
        "atexit.register(lambda: print('ran', workers.submit(lambda: 42).result(30), flush=True))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ran 42", proc.stdout + proc.stderr
