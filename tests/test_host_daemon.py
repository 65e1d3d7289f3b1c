"""The host daemon's supervision of its slot workers, seen from outside, on real local grids.

One host daemon (isdgrid.hostd) per host forks a worker per slot: each worker in its own
process group, the host daemon single threaded. These tests kill, stop and end them and
look at the processes by pid: what a slot starts ends with the slot, a hung worker does not
hold up terminate, a lost worker is respawned by its own host daemon, a lost host daemon
takes its slots with it and is started again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest
import remote_children
from conftest import wait_until
from remote_children import Spawner

from isdgrid import Grid, Host, HostLostError, LaunchError
from isdgrid.grid import Slot

cloudpickle.register_pickle_by_value(remote_children)

ENDS_WITHIN = 30.0  # seconds a process that should end gets (generous: the machine is shared)


def _process(pid: int) -> psutil.Process:
    """A handle that knows the process's start time, so a reused pid never counts as it."""
    return psutil.Process(pid)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _all_gone(procs: list[psutil.Process], timeout: float = ENDS_WITHIN) -> list[int]:
    """Wait (bounded) until none of ``procs`` runs; the pids still running."""
    wait_until(lambda: not any(_running(p) for p in procs), timeout)
    return [p.pid for p in procs if _running(p)]


@contextlib.contextmanager
def _ended_by_pid(procs: list[psutil.Process]) -> Iterator[list[psutil.Process]]:
    """Whatever happens in the test, every process put on ``procs`` is ended at the end (SIGKILL by pid)."""
    try:
        yield procs
    finally:
        for proc in procs:
            if _running(proc):
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()


def _worker_pid(slot: Slot) -> int:
    assert slot.handle.process is not None and slot.handle.process.pid
    return int(slot.handle.process.pid)


def _host_pid(slot: Slot) -> int:
    assert slot.handle.host_daemon is not None
    return int(slot.handle.host_daemon.process.pid)


def _stopped(pid: int) -> bool:
    """True once every thread of ``pid`` is stopped (the SIGSTOP took effect)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/task/{tid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
                    return False
    except FileNotFoundError:
        return False
    return True


def _broadcast(grid: Grid, sid: str, method: str, *args: object) -> list[object]:
    values = grid.gather(grid.broadcast(sid, method, *args), timeout=60)
    grid.release_all(sid)
    return values


# -- what a slot starts ends with the slot ----------------------------------------------------


def test_a_child_of_a_published_object_ends_when_the_grid_terminates() -> None:
    with _ended_by_pid([]) as procs:
        grid = Grid([Host("localhost", n_cpu=2)], stop_timeout=2.0)
        try:
            sid = grid.publish(Spawner())
            children = [_process(pid) for pid in _broadcast(grid, sid, "start_child")]  # type: ignore[arg-type]
            procs += children
            procs += [_process(_worker_pid(slot)) for slot in grid.slots]
            assert all(_running(c) for c in children)
        finally:
            grid.terminate()
        assert _all_gone(procs) == [], "a child of a published object outlived terminate()"


def test_a_child_of_a_published_object_ends_when_its_slot_is_killed_and_respawned() -> None:
    with _ended_by_pid([]) as procs, Grid(
        [Host("localhost", n_cpu=2)], respawn=True, heartbeat_interval=0.5, host_timeout=5.0, stop_timeout=2.0,
    ) as grid:
        sid = grid.publish(Spawner())
        doomed, spared = grid.acquire_service(sid), grid.acquire_service(sid)
        victim = doomed._isdgrid_server.slot
        child = _process(doomed.start_child().get(timeout=60))
        other_child = _process(spared.start_child().get(timeout=60))
        grid.release_service(doomed)
        grid.release_service(spared)
        procs += [child, other_child]
        os.kill(_worker_pid(victim), signal.SIGKILL)
        assert _all_gone([child]) == [], "the killed slot's child lived on"
        grid.wait_for_respawn(sid, timeout=60)
        assert grid.respawn_count == 1
        assert _running(other_child), "the child of another slot was ended too"


def test_a_child_of_a_published_object_ends_when_its_hung_slot_is_retired() -> None:
    # A stopped worker misses its heartbeats: the grid takes the slot for lost and, to
    # respawn it, retires the old worker (stop SLOT: TERM and CONT to its group, KILL after
    # stop_timeout). What the old worker started goes with it.
    with _ended_by_pid([]) as procs, Grid(
        [Host("localhost", n_cpu=2)], respawn=True, heartbeat_interval=0.2, host_timeout=2.0, stop_timeout=1.0,
    ) as grid:
        sid = grid.publish(Spawner())
        proxy = grid.acquire_service(sid)
        victim = proxy._isdgrid_server.slot
        child = _process(proxy.start_child().get(timeout=60))
        grid.release_service(proxy)
        worker = _process(_worker_pid(victim))
        procs += [child, worker]
        host_pid = _host_pid(victim)
        worker.suspend()
        assert wait_until(lambda: _stopped(worker.pid), 10, step=0.01)
        assert wait_until(lambda: grid.respawn_count == 1, 60), "the hung slot was not respawned"
        assert _all_gone([worker, child]) == [], "the retired worker or its child lived on"
        grid.wait_for_respawn(sid, timeout=60)
        assert {_host_pid(s) for s in grid.slots} == {host_pid}
        assert sorted(_broadcast(grid, sid, "add", 1, 2)) == [3, 3]


# -- terminate does not wait for hung workers one by one ---------------------------------------


@pytest.mark.parametrize("how", ["SIGSTOP", "holding the GIL"])
@pytest.mark.parametrize("hung", [1, 3, 6])
def test_terminate_with_hung_workers_is_bounded_and_leaves_nothing(
    hung: int, how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    # SIGSTOPped workers are sent CONT with the TERM; a worker stuck in C code that holds the
    # GIL cannot act on TERM: its host daemon kills its process group after stop_timeout.
    stop_timeout = 1.0
    caplog.set_level(logging.INFO, logger="isdgrid.remote")
    with _ended_by_pid([]) as procs:
        grid = Grid([Host("localhost", n_cpu=6)], stop_timeout=stop_timeout, host_timeout=30.0)
        try:
            sid = grid.publish(Spawner())
            proxies = [grid.acquire_service(sid) for _ in range(6)]
            children = [_process(p.start_child().get(timeout=60)) for p in proxies]
            workers = [_process(_worker_pid(p._isdgrid_server.slot)) for p in proxies]
            host = _process(_host_pid(grid.slots[0]))
            folder = grid.slots[0].handle.spec.temp_path
            procs += [*children, *workers, host]
            assert os.path.isdir(folder)
            if how == "SIGSTOP":
                for worker in workers[:hung]:
                    worker.suspend()
                assert wait_until(lambda: all(_stopped(w.pid) for w in workers[:hung]), 10, step=0.01)
            else:
                marks = [str(tmp_path / f"hung-{i}") for i in range(hung)]
                held = [p.hang_in_c(mark, 300) for p, mark in zip(proxies, marks, strict=False)]
                assert wait_until(lambda: all(os.path.exists(m) for m in marks), 30), "the hanging calls did not start"
                assert not any(r.done() for r in held)
            started = time.monotonic()
        finally:
            grid.terminate()
        took = time.monotonic() - started
        assert took < stop_timeout + 10.0, f"terminate() took {took:.1f} s with {hung} hung workers"
        assert _all_gone(procs) == [], "a worker, its child or the host daemon outlived terminate()"
        assert not os.path.exists(folder), "terminate() left the host's folder"
    if how != "SIGSTOP":
        # the host daemon itself ended them, after the grid's stop_timeout (not its own default)
        killed = [r.getMessage() for r in caplog.records if "did not end within" in r.getMessage()]
        assert len(killed) == hung and all(f"within {stop_timeout:.1f} s" in m for m in killed), killed
    assert "Logging error" not in capsys.readouterr().err


def test_terminate_with_a_stopped_host_daemon_is_bounded_and_leaves_nothing() -> None:
    # A host daemon stopped (Ctrl-Z, a debugger) hears nothing until it runs again: the local
    # launcher sends it CONT with the end of its stdin; a remote one is killed at the deadline.
    stop_timeout = 1.0
    with _ended_by_pid([]) as procs:
        grid = Grid([Host("localhost", n_cpu=3)], stop_timeout=stop_timeout, host_timeout=30.0)
        try:
            sid = grid.publish(Spawner())
            proxies = [grid.acquire_service(sid) for _ in range(3)]
            children = [_process(p.start_child().get(timeout=60)) for p in proxies]
            workers = [_process(_worker_pid(p._isdgrid_server.slot)) for p in proxies]
            host = _process(_host_pid(grid.slots[0]))
            folder = grid.slots[0].handle.spec.temp_path
            procs += [*children, *workers, host]
            host.suspend()
            assert wait_until(lambda: _stopped(host.pid), 10, step=0.01)
            started = time.monotonic()
        finally:
            grid.terminate()
        took = time.monotonic() - started
        assert took < stop_timeout + 10.0, f"terminate() took {took:.1f} s with the host daemon stopped"
        assert _all_gone(procs) == [], "a worker, its child or the host daemon outlived terminate()"
        assert not os.path.exists(folder), "terminate() left the host's folder"


# -- a lost worker -----------------------------------------------------------------------------


def test_a_killed_worker_fails_its_results_and_comes_back_from_the_same_host_daemon() -> None:
    with _ended_by_pid([]) as procs, Grid(
        [Host("localhost", n_cpu=3)], respawn=True, heartbeat_interval=0.5, host_timeout=5.0,
    ) as grid:
        sid = grid.publish(Spawner())
        before = {w["ISDGRID_RANK"]: w for w in _broadcast(grid, sid, "where")}  # type: ignore[index]
        host = _process(_host_pid(grid.slots[0]))
        procs += [host, *(_process(_worker_pid(s)) for s in grid.slots)]
        doomed = grid.acquire_service(sid)
        healthy = grid.acquire_service(sid)
        victim = doomed._isdgrid_server.slot
        old_pid = _worker_pid(victim)
        # A long call first: the ones after it are still queued on the worker when it is killed.
        pending = [doomed.sleep(60), doomed.start_child(1), *(doomed.add(i, i) for i in range(20))]
        os.kill(old_pid, signal.SIGKILL)
        for result in pending:
            with pytest.raises(HostLostError):
                result.get(timeout=60)
        assert [healthy.add(i, 1).get(timeout=60) for i in range(3)] == [1, 2, 3]
        grid.release_service(doomed)
        grid.release_service(healthy)
        grid.wait_for_respawn(sid, timeout=60)
        assert grid.respawn_count == 1
        after = {w["ISDGRID_RANK"]: w for w in _broadcast(grid, sid, "where")}  # type: ignore[index]
        procs += [_process(w["pid"]) for w in after.values()]  # type: ignore[index]
        rank = str(victim.handle.spec.rank)
        assert after[rank]["pid"] != old_pid and after[rank]["pid"] != before[rank]["pid"]
        assert after[rank]["ppid"] == host.pid, "the respawned worker was not forked by the same host daemon"
        assert {_host_pid(s) for s in grid.slots} == {host.pid}
        assert _running(host)
        for key in ("ISDGRID_HOST", "ISDGRID_SLOT", "ISDGRID_RANK"):
            assert {r: w[key] for r, w in after.items()} == {r: w[key] for r, w in before.items()}  # type: ignore[index]
        # the other slots were not touched
        for other, seen in before.items():
            if other != rank:
                assert after[other]["pid"] == seen["pid"]  # type: ignore[index]


# -- a lost host daemon ------------------------------------------------------------------------


def test_a_killed_host_daemon_loses_its_slots_whose_workers_end_and_is_started_again() -> None:
    hosts = [Host("localhost", n_cpu=2), Host("127.0.0.1", n_cpu=1)]
    with _ended_by_pid([]) as procs, Grid(
        hosts, "local", respawn=True, heartbeat_interval=0.5, host_timeout=5.0,
    ) as grid:
        sid = grid.publish(Spawner())
        doomed = [s for s in grid.slots if s.handle.host.name == "localhost"]
        spared = [s for s in grid.slots if s.handle.host.name == "127.0.0.1"]
        host = _process(_host_pid(doomed[0]))
        assert {_host_pid(s) for s in doomed} == {host.pid} and _host_pid(spared[0]) != host.pid
        workers = [_process(_worker_pid(s)) for s in doomed]
        procs += [host, *workers, _process(_worker_pid(spared[0]))]
        proxies = [grid.acquire_service(sid) for _ in range(3)]
        by_host = {p._isdgrid_server.slot.handle.host.name: p for p in proxies}
        for result in [p.start_child() for p in proxies]:
            procs.append(_process(result.get(timeout=60)))
        held = [r for p in proxies if p._isdgrid_server.slot in doomed for r in (p.sleep(120), p.add(1, 1))]
        os.kill(host.pid, signal.SIGKILL)
        for result in held:
            with pytest.raises(HostLostError):
                result.get(timeout=60)
        assert _all_gone(workers) == [], "a worker outlived its host daemon"
        assert by_host["127.0.0.1"].add(2, 2).get(timeout=60) == 4
        for proxy in proxies:
            grid.release_service(proxy)
        assert wait_until(lambda: grid.respawn_count == 2, 90), "the lost host's slots were not respawned"
        grid.wait_for_respawn(sid, timeout=60)
        where = _broadcast(grid, sid, "where")
        procs += [_process(w["pid"]) for w in where]  # type: ignore[index]
        relaunched = {_host_pid(s) for s in grid.slots if s.handle.host.name == "localhost"}
        procs += [_process(pid) for pid in relaunched]
        assert host.pid not in relaunched
        assert len(relaunched) == 1, f"the host's slots came back under {len(relaunched)} host daemons"
        assert sorted(w["ISDGRID_SLOT"] for w in where if w["ISDGRID_HOST"] == "localhost") == ["0", "1"]  # type: ignore[index]
        assert {w["ppid"] for w in where if w["ISDGRID_HOST"] == "localhost"} == relaunched  # type: ignore[index]


# -- how the host daemon forks ------------------------------------------------------------------


def test_the_host_daemon_is_single_threaded_and_each_worker_leads_its_own_process_group() -> None:
    with Grid([Host("localhost", n_cpu=3)]) as grid:
        sid = grid.publish(Spawner())
        host_pid = _host_pid(grid.slots[0])
        with open(f"/proc/{host_pid}/status") as fh:
            threads = [line.split()[1] for line in fh if line.startswith("Threads:")]
        assert threads == ["1"]
        host_group = os.getpgid(host_pid)
        where = _broadcast(grid, sid, "where")
        assert sorted(w["pid"] for w in where) == sorted(_worker_pid(s) for s in grid.slots)  # type: ignore[index]
        for w in where:
            assert w["pgid"] == w["pid"] == os.getpgid(w["pid"])  # type: ignore[index]
            assert w["pgid"] != host_group  # type: ignore[index]
            assert w["ppid"] == host_pid  # type: ignore[index]


# -- preload -----------------------------------------------------------------------------------


def test_a_preloaded_module_is_imported_by_the_host_daemon_before_the_workers_fork(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"isdgrid_preload_probe_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("import os\nloaded_in = os.getpid()\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    with Grid([Host("localhost", n_cpu=2)], launcher_options={"preload": [name, "json"]}) as grid:
        host_pid = _host_pid(grid.slots[0])
        sid = grid.publish(Spawner())
        # imported once, in the host daemon, and inherited by each worker at the fork
        assert _broadcast(grid, sid, "module_attribute", name, "loaded_in") == [host_pid, host_pid]
        assert _broadcast(grid, sid, "module_attribute", "json", "__name__") == ["json", "json"]
    assert name not in sys.modules


def test_a_preload_that_cannot_be_imported_is_a_launch_error_naming_it() -> None:
    name = "isdgrid_no_such_module_to_preload"
    with pytest.raises(LaunchError) as info:
        Grid([Host("localhost", n_cpu=2)], launcher_options={"preload": [name]}, start_timeout=60.0)
    assert name in str(info.value)


LOW_LIMIT_DRIVER = """
import resource, sys
from isdgrid import Grid, Host
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

class Echo:
    def rank(self):
        import os
        return int(os.environ["ISDGRID_RANK"])

with Grid([Host("localhost", n_cpu=40)], status_file=False) as grid:
    sid = grid.publish(Echo())
    print("RANKS", sorted(grid.gather(grid.broadcast(sid, "rank"), timeout=120)) == list(range(40)))
    print("SOFT", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_a_grid_larger_than_the_soft_open_files_limit_raises_it_and_starts(tmp_path: Path) -> None:
    # 40 slots need about 100 descriptors in the driver and 160 in the host daemon: far past
    # a soft limit of 64 (many systems start processes at 1,024, a grid of 400 slots passes it).
    import resource
    import subprocess

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1024:
        pytest.fail("this test needs a hard limit of open files of at least 1024 (ulimit -Hn)")
    script = tmp_path / "driver.py"
    script.write_text(LOW_LIMIT_DRIVER)
    repo = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": repo}, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANKS True" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    soft = int(proc.stdout.split("SOFT", 1)[1].split()[0])
    assert soft >= 3 * 40, proc.stdout


def test_a_grid_past_the_hard_open_files_limit_fails_at_once_saying_so(tmp_path: Path) -> None:
    # The hard limit cannot be raised: the start (or the publish) fails with the reason, it does not hang.
    import subprocess

    script = tmp_path / "driver.py"
    script.write_text(LOW_LIMIT_DRIVER.replace("(64, resource.getrlimit(resource.RLIMIT_NOFILE)[1])", "(64, 64)"))
    repo = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": repo}, cwd=str(tmp_path))
    assert proc.returncode != 0
    assert "Too many open files" in proc.stderr or "out of file descriptors" in proc.stderr, proc.stderr[-3000:]


def test_the_warm_up_session_leaves_no_thread_and_no_descriptor(tmp_path: Path) -> None:
    """What the host daemon serves itself before its first fork (isdgrid.warmup) ends whole, every time."""
    import threading

    from isdgrid import warmup

    # (the driver's pool threads of earlier tests may end meanwhile: only new ones count)
    for _ in range(3):
        threads, fds = set(threading.enumerate()), set(os.listdir("/proc/self/fd"))
        warmup.serve_once(str(tmp_path))
        assert set(threading.enumerate()) - threads == set()
        assert set(os.listdir("/proc/self/fd")) - fds == set()
