"""Defects of the old core (issue 10), one test each, on real local daemons.

Every wait is bounded: a test that would hang on a defective core fails instead, and
unblocks what it started so the grid can still be terminated.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
import remote_defects
from conftest import wait_until
from remote_defects import UsesHelper, Worker
from remote_objects import Recorder

import isdgrid
from isdgrid import Grid, GridError, Host, HostLostError, RemoteError

cloudpickle.register_pickle_by_value(remote_defects)

MB = 1 << 20


# -- helpers ------------------------------------------------------------------------------
def _daemon_pid(grid: Grid, index: int) -> int:
    process = grid.slots[index].handle.process
    assert process is not None
    return process.pid


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stopped(pid: int) -> bool:
    """True once the process and every one of its threads is stopped (SIGSTOP took effect)."""
    try:
        if psutil.Process(pid).status() != psutil.STATUS_STOPPED:
            return False
    except psutil.NoSuchProcess:
        return False
    task_dir = f"/proc/{pid}/task"
    if not os.path.isdir(task_dir):  # not Linux: the process status is all there is
        return True
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        if state not in ("T", "t"):
            return False
    return True


def _resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def _end_by_pid(pids: set[int], timeout: float) -> list[int]:
    """Wait (bounded) for ``pids`` to end; SIGKILL the ones left and return them."""
    wait_until(lambda: not any(_alive(p) for p in pids), timeout)
    left = [p for p in pids if _alive(p)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
    return left


def _outcome(future: concurrent.futures.Future[Any], within: float, what: str) -> tuple[BaseException | None, float]:
    """The exception ``future`` settles with (None for a value) and the seconds it took; fails past ``within``."""
    t0 = time.monotonic()
    done, _ = concurrent.futures.wait([future], timeout=within)
    elapsed = time.monotonic() - t0
    if not done:
        pytest.fail(f"{what}: still blocked after {within:g} s")
    return future.exception(), elapsed


def _on_every_server(grid: Grid, sid: str, method: str, n: int) -> list[Any]:
    """Call ``method`` once on each of the ``n`` servers of ``sid`` (acquired one by one, bounded)."""
    proxies = []
    try:
        for _ in range(n):
            proxies.append(grid.acquire_service(sid, timeout=30))
        results = [getattr(proxy, method)() for proxy in proxies]
        return [r.get(timeout=60) for r in results]
    finally:
        for proxy in proxies:
            grid.release_service(proxy)


def _error_of(result: isdgrid.Result, timeout: float, what: str) -> Exception:
    """The error ``result.get`` raises; fails if it returns, or if it ends the driver's thread."""
    try:
        value = result.get(timeout=timeout)
    except (SystemExit, KeyboardInterrupt) as exc:
        pytest.fail(f"{what}: get() raised {type(exc).__name__} in the driver: {exc!r}")
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    pytest.fail(f"{what}: get() returned {value!r} instead of raising")


# -- defect 11: the queue of free servers is fair -------------------------------------------
def test_eight_threads_on_four_servers_each_get_a_fair_share() -> None:
    n_threads, duration = 8, 5.0
    with Grid([Host("localhost", n_cpu=4)], host_timeout=10.0) as grid:
        sid = grid.publish(Recorder())
        counts = [0] * n_threads
        problems: list[str] = []
        stop = threading.Event()

        def loop(tid: int) -> None:
            i = 0
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    proxy = grid.acquire_service(sid, timeout=30)
                except TimeoutError:
                    problems.append(f"thread {tid}: no server within 30 s (after {counts[tid]} acquisitions)")
                    return
                try:
                    value = proxy.ident((tid, i)).get(timeout=30)
                finally:
                    grid.release_service(proxy)
                if value != (tid, i):
                    problems.append(f"thread {tid}: {(tid, i)} answered {value!r}")
                    return
                if time.monotonic() - t0 > 30:
                    problems.append(f"thread {tid}: one acquire and call took {time.monotonic() - t0:.1f} s")
                counts[tid] += 1
                i += 1

        pool = concurrent.futures.ThreadPoolExecutor(n_threads, thread_name_prefix="fair")
        try:
            futures = [pool.submit(loop, t) for t in range(n_threads)]
            time.sleep(duration)  # the threads compete this long
            stop.set()
            done, not_done = concurrent.futures.wait(futures, timeout=60)
            assert not not_done, f"{len(not_done)} threads did not finish within 60 s of the stop"
            for f in done:
                f.result()
        finally:
            stop.set()
            pool.shutdown(wait=False)
        assert not problems, problems[:5]
        assert min(counts) >= 20, f"a thread starved: acquisitions per thread {counts}"
        assert min(counts) * 4 >= max(counts), f"unfair queue: acquisitions per thread {counts}"
        assert wait_until(lambda: grid.queues[sid].qsize() == 4, 10)


def test_broadcasts_scatters_release_all_and_proxies_hammered_from_many_threads() -> None:
    """Rounds of broadcast/scatter + gather + release_all on two services from four threads,
    a fifth thread calling release_all of everything at random moments, and two threads
    acquiring the same servers through proxies: every Result settles with its own value or
    ServiceReleasedError at submission, nothing hangs, and every server is free at the end."""
    n_threads, rounds = 4, 60
    problems: list[str] = []
    stop = threading.Event()
    with Grid([Host("localhost", n_cpu=3)], host_timeout=30.0) as grid:
        sids = [grid.publish(Recorder()), grid.publish(Recorder())]

        def collective(tid: int) -> int:
            sid = sids[tid % 2]
            done = 0
            for i in range(rounds):
                try:
                    if i % 2:
                        results = grid.scatter(sid, "ident", [((tid, i, k),) for k in range(3)], timeout=60)
                        want: list[Any] = [(tid, i, k) for k in range(3)]
                    else:
                        results = grid.broadcast(sid, "ident", (tid, i), timeout=60)
                        want = [(tid, i)] * 3
                except isdgrid.ServiceReleasedError:
                    continue  # release_all from another thread came between the hold and the calls
                got = grid.gather(results, timeout=60)
                if got != want:
                    problems.append(f"thread {tid} round {i}: {got!r} != {want!r}")
                if tid % 2:
                    grid.release_all(sid)
                done += 1
            return done

        def releaser() -> None:
            while not stop.wait(0.003):
                grid.release_all()

        def proxies(tid: int) -> int:
            calls = 0
            while not stop.is_set():
                proxy = grid.acquire_service(sids[tid % 2], timeout=60)
                try:
                    if proxy.ident((tid, calls)).get(timeout=60) != (tid, calls):
                        problems.append(f"proxy thread {tid}: wrong answer")
                finally:
                    grid.release_service(proxy)
                calls += 1
            return calls

        pool = concurrent.futures.ThreadPoolExecutor(n_threads + 3, thread_name_prefix="hammer")
        try:
            side = [pool.submit(releaser), pool.submit(proxies, 0), pool.submit(proxies, 1)]
            rounds_done = [f.result(timeout=240) for f in [pool.submit(collective, t) for t in range(n_threads)]]
            stop.set()
            proxy_calls = [f.result(timeout=120) for f in side[1:]]
            side[0].result(timeout=30)
        finally:
            stop.set()
            pool.shutdown(wait=False)
        assert not problems, problems[:5]
        assert sum(rounds_done) >= n_threads * rounds // 2, rounds_done  # most rounds ran whole
        assert min(proxy_calls) >= 1, proxy_calls
        grid.release_all()
        for sid in sids:
            assert wait_until(lambda sid=sid: grid.queues[sid].qsize() == 3, 30), grid.queues[sid].qsize()


# -- defect 12: collective calls and acquire by a thread that holds servers -------------------
def test_waits_on_servers_the_caller_holds_end_at_the_timeout_and_timeouts_are_bounded() -> None:
    holder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="holder")
    other = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="other")
    held: list[isdgrid.ServiceProxy] = []
    started: list[concurrent.futures.Future[Any]] = []

    def on(pool: concurrent.futures.ThreadPoolExecutor, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        future = pool.submit(fn, *args, **kwargs)
        started.append(future)
        return future

    with Grid([Host("localhost", n_cpu=2)], host_timeout=10.0) as grid:
        try:
            sid = grid.publish(Recorder())
            other_sid = grid.publish(Recorder())
            p1 = on(holder, grid.acquire_service, sid, 10).result(timeout=15)
            held.append(p1)

            # broadcast / scatter by the thread that holds a server of the service: never refused
            # (another thread could release it), bounded by the timeout, naming the holder
            for what, call in (
                ("broadcast", lambda: grid.broadcast(sid, "pid", timeout=0.5)),
                ("scatter", lambda: grid.scatter(sid, "ident", [1, 2], timeout=0.5)),
            ):
                exc, elapsed = _outcome(on(holder, call), 30.0, f"{what} by a thread holding a server of the service")
                assert isinstance(exc, TimeoutError), f"{what} gave {exc!r}"
                assert "held by thread 'holder_0'" in str(exc), str(exc)
                assert elapsed >= 0.45, f"{what} gave up after {elapsed:.2f} s instead of waiting 0.5 s"
            assert wait_until(lambda: grid.queues[sid].qsize() == 1, 10), "a timed-out collective call kept servers"

            # meanwhile the grid serves other threads: another service, and the free server
            def use_grid() -> tuple[int, int]:
                q = grid.acquire_service(other_sid, timeout=5)
                a = q.ident(7).get(timeout=30)
                grid.release_service(q)
                r = grid.acquire_service(sid, timeout=5)  # the server p1 does not hold
                b = r.ident(8).get(timeout=30)
                grid.release_service(r)
                return a, b

            assert on(other, use_grid).result(timeout=15) == (7, 8)

            # acquire by a thread that holds every server of the service
            p2 = on(holder, grid.acquire_service, sid, 10).result(timeout=15)
            held.append(p2)
            exc, elapsed = _outcome(
                on(holder, grid.acquire_service, sid, 0.5), 30.0, "acquire_service by a thread holding every server"
            )
            assert isinstance(exc, TimeoutError), f"acquire_service gave {exc!r}"
            assert "held by thread 'holder_0'" in str(exc), str(exc)
            for proxy in (p1, p2):
                on(holder, grid.release_service, proxy).result(timeout=10)
            assert wait_until(lambda: grid.queues[sid].qsize() == 2, 10)

            # broadcast(timeout=1) while ANOTHER thread holds a server: TimeoutError, other calls go on
            p_other = on(other, grid.acquire_service, sid, 10).result(timeout=15)
            held.append(p_other)
            t0 = time.monotonic()
            waiting = on(holder, grid.broadcast, sid, "pid", timeout=1)
            time.sleep(0.1)  # the broadcast is waiting now

            def bystander() -> float:
                begun = time.monotonic()
                grid.release_service(grid.acquire_service(other_sid, timeout=5))
                return time.monotonic() - begun

            took = on(other, bystander).result(timeout=10)
            assert took < 0.5, f"acquire/release of another service took {took:.2f} s while a broadcast waited"
            assert not waiting.done(), "the broadcast did not wait for the held server"
            exc, _ = _outcome(waiting, 10.0, "broadcast(timeout=1) while another thread holds a server")
            elapsed = time.monotonic() - t0
            assert isinstance(exc, TimeoutError), f"broadcast(timeout=1) gave {exc!r}"
            assert 0.8 <= elapsed < 5.0, f"broadcast(timeout=1) gave up after {elapsed:.2f} s"
            on(other, grid.release_service, p_other).result(timeout=10)
            assert wait_until(lambda: grid.queues[sid].qsize() == 2, 10), "the timed-out broadcast kept servers"

            # and the service works as before
            pids = on(holder, lambda: grid.gather(grid.broadcast(sid, "pid", timeout=10), timeout=30)).result(40)
            assert len(set(pids)) == 2
            grid.release_all()
            assert wait_until(lambda: grid.queues[sid].qsize() == 2, 10)
        finally:
            # Unblock a defective core (a thread waiting on what the holder holds), so terminate can run.
            for proxy in held:
                with contextlib.suppress(GridError):
                    grid.release_service(proxy)
            concurrent.futures.wait(started, timeout=15)
            with contextlib.suppress(GridError):
                grid.release_all()
            holder.shutdown(wait=False)
            other.shutdown(wait=False)


# -- defect 14: logging configuration belongs to the application ------------------------------
def _handlers() -> dict[str, list[logging.Handler]]:
    loggers: dict[str, list[logging.Handler]] = {"": list(logging.getLogger().handlers)}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            loggers[name] = list(logger.handlers)
    return loggers


def test_grid_leaves_the_applications_logging_configuration_alone() -> None:
    library = logging.getLogger("isdgrid")
    saved = library.level
    library.setLevel(logging.WARNING)
    try:
        before = _handlers()
        runs: list[dict[str, Any]] = [{}, {"debug": False}]
        for options in runs:
            grid = Grid([Host("localhost", n_cpu=1)], **options)
            try:
                assert library.level == logging.WARNING, f"Grid(**{options}) set the isdgrid level to {library.level}"
                sid = grid.publish(Recorder())
                assert len(_on_every_server(grid, sid, "pid", 1)) == 1
            finally:
                grid.terminate()
            assert library.level == logging.WARNING, f"terminate() set the isdgrid level to {library.level}"
            after = _handlers()
            for name, handlers in before.items():
                assert after.get(name, []) == handlers, f"handlers of logger {name or 'root'!r} changed"
            for name in set(after) - set(before):
                if not name.startswith("isdgrid"):
                    added = [h for h in after[name] if not isinstance(h, logging.NullHandler)]
                    assert not added, f"handlers added to logger {name!r}: {added}"
    finally:
        library.setLevel(saved)


# -- defect 7: errors of one call are not the loss of the host -------------------------------
def test_remote_oserrors_and_copy_files_errors_are_not_host_loss(tmp_path: Path) -> None:
    with Grid([Host("localhost", n_cpu=1)], heartbeat_interval=0.5, host_timeout=5.0) as grid:
        sid = grid.publish(Worker())
        slot = grid.slots[0]
        proxy = grid.acquire_service(sid)
        missing = _error_of(proxy.read_missing(), 30, "open() of a missing file")
        assert isinstance(missing, FileNotFoundError), repr(missing)
        denied = _error_of(proxy.deny(), 30, "a method raising PermissionError")
        assert isinstance(denied, PermissionError), repr(denied)
        assert denied.errno == 13 and denied.filename == "/forbidden/file"
        assert proxy.add(1).get(timeout=30) == 1
        assert not slot.lost.is_set()

        # a folder on the host stands where copy_files must write a file
        folder = proxy.make_dir("in_the_way.txt").get(timeout=30)
        src = tmp_path / "src"
        src.mkdir()
        (src / "in_the_way.txt").write_text("a file\n")
        (src / "fine.txt").write_text("fine\n")
        with pytest.raises((OSError, RemoteError)):  # a HostLostError is none of these: it fails the test
            grid.copy_files(str(src), ["in_the_way.txt"])
        assert os.path.isdir(folder)
        assert grid.copy_files(str(src), ["fine.txt"]) == 1
        assert proxy.add(1).get(timeout=30) == 2
        assert not slot.lost.is_set()
        assert grid.slots[0] is slot
        assert not any(row.lost for row in grid.status())
        grid.release_service(proxy)
        assert wait_until(lambda: grid.queues[sid].qsize() == 1, 10)


def test_call_over_the_message_limit_fails_alone() -> None:
    limit = 1_000_000
    with Grid([Host("localhost", n_cpu=1)], heartbeat_interval=0.5, host_timeout=5.0, max_message_size=limit) as grid:
        sid = grid.publish(Worker())
        slot = grid.slots[0]
        daemon = psutil.Process(_daemon_pid(grid, 0))
        proxy = grid.acquire_service(sid)
        assert proxy.size(os.urandom(900_000)).get(timeout=30) == 900_000  # under the limit: fine
        rss_before = daemon.memory_info().rss
        blob = os.urandom(2_000_000)
        for i in range(5):
            try:
                result = proxy.size(blob)
            except isdgrid.PayloadTooLargeError:
                pass
            else:
                error = _error_of(result, 30, "a 2 MB call over a 1 MB limit")
                assert isinstance(error, isdgrid.PayloadTooLargeError), repr(error)
            assert proxy.add(1).get(timeout=30) == i + 1  # the next call on the same proxy works
        assert not slot.lost.is_set()
        assert grid.slots[0] is slot
        growth = daemon.memory_info().rss - rss_before
        assert growth < 20 * MB, f"daemon RSS grew by {growth / MB:.1f} MB over five refused 2 MB calls"
        grid.release_service(proxy)
        assert wait_until(lambda: grid.queues[sid].qsize() == 1, 10)


# -- defect 8: respawn while the old process is still alive ----------------------------------
HELPER = "isdgrid_defect_helper"


def test_respawn_with_the_old_daemon_still_alive_keeps_copied_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{HELPER}.py").write_text("VALUE = 42\n")
    pids: set[int] = set()
    old_pid = 0
    try:
        with Grid([Host("localhost", n_cpu=3)], respawn=True, heartbeat_interval=0.5, host_timeout=2.0) as grid:
            pids |= {_daemon_pid(grid, i) for i in range(3)}
            assert grid.copy_files(str(src), [f"{HELPER}.py"]) == 1
            sid = grid.publish(UsesHelper(HELPER))
            assert [v for v, _ in _on_every_server(grid, sid, "helper_value", 3)] == [42] * 3
            victim = grid.slots[0]
            old_pid = _daemon_pid(grid, 0)
            os.kill(old_pid, signal.SIGSTOP)
            try:
                assert wait_until(lambda: _stopped(old_pid), 10), "the daemon did not stop"
                assert victim.lost.wait(30), "a stopped daemon was not declared lost within 30 s"
                wait_until(lambda: grid.respawn_count >= 1, 2.0)  # respawned while the old one is stopped, maybe
            finally:
                _resume(old_pid)  # the old daemon lives on, now running again
            assert wait_until(lambda: grid.respawn_count == 1, 60), "the lost slot was not respawned"
            assert wait_until(lambda: not _alive(old_pid), 30), "the old daemon did not end"
            pids |= {s.handle.process.pid for s in grid.slots if s.handle.process is not None}
            for slot in grid.slots:
                temp = slot.control("info")["temp_path"]
                assert os.path.isfile(os.path.join(temp, f"{HELPER}.py")), f"copied file gone from {temp}"
            assert [v for v, _ in _on_every_server(grid, sid, "helper_value", 3)] == [42] * 3
            new_pids = _on_every_server(grid, sid, "pid", 3)
            assert old_pid not in new_pids and len(set(new_pids)) == 3
    finally:
        if old_pid:
            _resume(old_pid)
        left = _end_by_pid(pids | ({old_pid} if old_pid else set()), 15)
    assert not left, f"daemons left after terminate: {left}"


# -- defect 5: a reply whose unpickling raises BaseException ----------------------------------
def test_reply_raising_systemexit_or_keyboardinterrupt_when_unpickled_fails_that_call() -> None:
    with Grid([Host("localhost", n_cpu=1)], host_timeout=10.0) as grid:
        sid = grid.publish(Worker())
        proxy = grid.acquire_service(sid)
        calls = 0
        for method in ("exit_on_load", "interrupt_on_load"):
            error = _error_of(getattr(proxy, method)(), 30, f"{method}()")
            assert isinstance(error, RemoteError), repr(error)
            calls += 1
            assert proxy.add(1).get(timeout=30) == calls  # the same proxy serves on
        # replies nobody waits on: read in the background, or with a later call's reply
        unread = [proxy.exit_on_load(), proxy.interrupt_on_load()]
        assert proxy.add(1).get(timeout=30) == calls + 1
        for result in unread:
            done, _ = concurrent.futures.wait([result], timeout=30)
            assert done, f"{result!r} never settled"
            assert isinstance(result.exception(), RemoteError), repr(result.exception())
        grid.release_service(proxy)
        assert wait_until(lambda: grid.queues[sid].qsize() == 1, 10), "the server did not come back to its queue"
        again = grid.acquire_service(sid, timeout=10)
        assert again.add(1).get(timeout=30) == calls + 2
        grid.release_service(again)


# -- a stopped daemon is lost (deterministic version of test_faults' SIGSTOP test) ------------
def test_stopped_daemon_is_declared_lost_within_host_timeout() -> None:
    host_timeout = 3.0
    pid = 0
    try:
        with Grid([Host("localhost", n_cpu=1)], heartbeat_interval=0.5, host_timeout=host_timeout) as grid:
            sid = grid.publish(Recorder())
            proxy = grid.acquire_service(sid)
            assert proxy.add(1).get(timeout=30) == 1
            pid = _daemon_pid(grid, 0)
            os.kill(pid, signal.SIGSTOP)
            try:
                assert wait_until(lambda: _stopped(pid), 10), "the daemon did not stop within 10 s"
                result = proxy.add(2)  # sent to a daemon known to be stopped
                t0 = time.monotonic()
                with pytest.raises(HostLostError):
                    result.get(timeout=host_timeout + 30)
                elapsed = time.monotonic() - t0
                assert elapsed < host_timeout + 10, f"HostLostError after {elapsed:.1f} s"
                assert grid.slots[0].lost.is_set()
            finally:
                _resume(pid)
    finally:
        left = _end_by_pid({pid}, 15) if pid else []
    assert not left, f"daemon {left} outlived terminate"


# -- threads do not grow with services x slots ---------------------------------------------


def test_driver_threads_do_not_grow_with_services() -> None:
    """One service or ten on four slots: the driver runs the same threads (none per server)."""
    with Grid([Host("localhost", n_cpu=4)]) as grid:
        first = grid.publish(Recorder())
        assert grid.gather(grid.broadcast(first, "add", 1), timeout=30) == [1, 1, 1, 1]
        grid.release_all()
        before = threading.active_count()
        sids = [grid.publish(Recorder(f"s{i}")) for i in range(9)]
        for sid in sids:
            proxies = [grid.acquire_service(sid, timeout=30) for _ in range(4)]
            results = [p.add(i) for i in range(20) for p in proxies]
            assert [r.get(timeout=30) for r in results][-4:] == [20, 20, 20, 20]
            for p in proxies:
                grid.release_service(p)
        after = threading.active_count()
        assert len(grid.status()) == 40
        assert after - before <= 2, f"driver threads grew from {before} to {after} with 9 more services"


def test_control_message_over_the_limit_fails_at_once_and_the_slot_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy_files archive over a control call's limit is that call's error, not a lost host."""
    from isdgrid import transport

    (tmp_path / "big.bin").write_bytes(os.urandom(1_000_000))
    with Grid([Host("localhost", n_cpu=1)]) as grid:
        monkeypatch.setattr(transport, "CONTROL_MAX_BYTES", 256 * 1024)
        t0 = time.monotonic()
        with pytest.raises(isdgrid.PayloadTooLargeError):
            grid.copy_files(str(tmp_path), ["big.bin"])
        assert time.monotonic() - t0 < 10
        monkeypatch.undo()
        assert not grid.slots[0].lost.is_set()
        assert grid.copy_files(str(tmp_path), ["big.bin"]) == 1


def test_a_remote_timeout_error_is_not_mistaken_for_get_timing_out() -> None:
    """get(timeout) relabels only its own wait; the remote method's TimeoutError stays itself."""
    with Grid([Host("localhost", n_cpu=1)]) as grid:
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid)

        def raise_timeout() -> None:  # nested: shipped by value
            raise TimeoutError("remote deadline")

        raised = proxy.apply(raise_timeout)
        with pytest.raises(TimeoutError, match="remote deadline") as info:
            raised.get(timeout=30)
        assert "not finished within" not in str(info.value)
        assert getattr(info.value, "remote_traceback", "")
        grid.release_service(proxy)

