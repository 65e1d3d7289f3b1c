"""Faults: lost hosts, respawn, transient drops, orphans, hostile input."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import selectors
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
import remote_defects
from conftest import Gate, wait_until
from remote_defects import InterruptOnLoad
from remote_objects import FailsToLoad, Recorder

from isdgrid import Grid, Host, HostLostError, RemoteError, ServiceUnavailableError
from isdgrid.announce import parse_announcement

cloudpickle.register_pickle_by_value(remote_defects)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _daemon_pid(grid: Grid, index: int) -> int:
    process = grid.slots[index].handle.process
    assert process is not None
    return process.pid


def _host_daemon_pid(grid: Grid, index: int) -> int:
    """The pid of the host daemon that forked slot ``index`` (killing it loses the whole host)."""
    return int(grid.slots[index].handle.host_daemon.process.pid)


def test_kill_during_calls_fails_every_pending_result_and_others_keep_serving() -> None:
    with Grid([Host("localhost", n_cpu=2)], heartbeat_interval=0.5, host_timeout=5.0) as grid:
        sid = grid.publish(Recorder())
        doomed = grid.acquire_service(sid)
        healthy = grid.acquire_service(sid)
        doomed_slot = doomed._isdgrid_server.slot
        in_flight = doomed.sleep(30)
        queued = [doomed.add(i) for i in range(50)]
        time.sleep(0.3)
        os.kill(doomed_slot.handle.process.pid, signal.SIGKILL)
        t0 = time.monotonic()
        outcomes = {"value": 0, "lost": 0}
        for r in [in_flight, *queued]:
            with pytest.raises(HostLostError) as info:
                r.get(timeout=30)
            outcomes["lost"] += 1
            assert info.value.host == "localhost" and info.value.slot == doomed_slot.index
        assert time.monotonic() - t0 < 30
        assert outcomes["lost"] == 51  # every call accounted for
        # a call after the loss fails at once; the other server serves on
        with pytest.raises(HostLostError):
            doomed.add("late").get(timeout=10)
        assert [healthy.add(i).get(timeout=30) for i in range(5)] == [1, 2, 3, 4, 5]
        grid.release_service(doomed)
        grid.release_service(healthy)
        # the lost server is never handed out again
        for _ in range(5):
            p = grid.acquire_service(sid, timeout=10)
            assert p._isdgrid_server.slot is not doomed_slot
            grid.release_service(p)
        lost_rows = [row for row in grid.status() if row.lost]
        assert len(lost_rows) == 1 and lost_rows[0].slot == doomed_slot.index
        # broadcast over a lost server fails fast
        t0 = time.monotonic()
        with pytest.raises(HostLostError):
            grid.gather(grid.broadcast(sid, "sleep", 20), timeout=60)
        assert time.monotonic() - t0 < 15
        grid.release_all()
        # all servers lost: acquire raises instead of waiting forever
        os.kill(_daemon_pid(grid, 1 - doomed_slot.index), signal.SIGKILL)
        with pytest.raises(ServiceUnavailableError):
            grid.acquire_service(sid, timeout=60)


def test_transient_drop_is_retried_once_and_never_runs_a_call_twice() -> None:
    with Grid([Host("localhost", n_cpu=1)], heartbeat_interval=0.5, host_timeout=10.0) as grid:
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid)
        server = proxy._isdgrid_server
        slow = proxy.slow_add(1.0, "slow")
        time.sleep(0.4)  # the batch is running remotely now
        grid.slots[0].cut_connections()  # break the connection; the daemon lives on
        assert slow.get(timeout=30) == 1
        for i in range(3):  # cut between calls too
            grid.slots[0].cut_connections()
            assert proxy.add(i).get(timeout=30) == i + 2
        assert proxy.history().get(timeout=30) == ["slow", 0, 1, 2]
        assert not server.lost
        grid.release_service(proxy)


def test_respawn_brings_a_killed_slot_back() -> None:
    with Grid([Host("localhost", n_cpu=2)], heartbeat_interval=0.5, host_timeout=5.0, respawn=True) as grid:
        sid = grid.publish(Recorder("orig"))
        old_pid = _daemon_pid(grid, 0)
        os.kill(old_pid, signal.SIGKILL)
        assert wait_until(lambda: grid.respawn_count == 1, 60)
        pids = grid.gather(grid.broadcast(sid, "pid"), timeout=60)
        assert old_pid not in pids and len(set(pids)) == 2
        assert grid.gather(grid.broadcast(sid, "tag"), timeout=30) == ["orig", "orig"]
        grid.release_all()
        assert sum(row.respawns for row in grid.status()) == 1
        assert grid.queues[sid].qsize() == 2
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow  # a long stress test: the main pytest stage only
def test_soak_calls_while_slots_are_killed_with_respawn() -> None:
    duration, kill_every = 60.0, 10.0
    with Grid([Host("localhost", n_cpu=4)], heartbeat_interval=0.5, host_timeout=5.0, respawn=True) as grid:
        sid = grid.publish(Recorder())
        stop = threading.Event()
        counts = {"calls": 0, "ok": 0, "lost": 0}
        lock = threading.Lock()
        problems: list[str] = []

        def caller(tid: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    proxy = grid.acquire_service(sid, timeout=30)
                except TimeoutError:
                    problems.append(f"thread {tid}: no server within 30 s")
                    return
                tags = [(tid, i + k) for k in range(5)]
                results = [proxy.ident(tag) for tag in tags]
                grid.release_service(proxy)
                for tag, r in zip(tags, results, strict=True):
                    with lock:
                        counts["calls"] += 1
                    try:
                        value = r.get(timeout=60)
                    except HostLostError:
                        with lock:
                            counts["lost"] += 1
                        continue
                    if value != tag:
                        problems.append(f"{tag} answered {value}")
                    with lock:
                        counts["ok"] += 1
                i += 5

        kills = 0
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(caller, t) for t in range(8)]
            t0 = time.monotonic()
            while time.monotonic() - t0 < duration:
                time.sleep(kill_every)
                victim = grid.slots[kills % 4]
                if victim.handle.process is not None and victim.handle.process.poll() is None:
                    os.kill(victim.handle.process.pid, signal.SIGKILL)
                    kills += 1
            stop.set()
            for f in futures:
                f.result(timeout=120)
        print(f"soak: {counts['calls']} calls, {counts['ok']} values, {counts['lost']} HostLostError, {kills} kills")
        assert not problems, problems[:5]
        assert counts["calls"] == counts["ok"] + counts["lost"]
        assert counts["ok"] > 1000
        assert kills >= 5
        assert wait_until(lambda: grid.respawn_count == kills, 60)
        assert wait_until(lambda: grid.queues[sid].qsize() == 4, 30)
        assert len(set(grid.gather(grid.broadcast(sid, "pid"), timeout=60))) == 4
        grid.release_all()


KILLED_DRIVER = textwrap.dedent(
    """
    import sys, time
    from isdgrid import Grid, Host
    class Worker:
        def spin(self, seconds):
            time.sleep(seconds)
    grid = Grid([Host("localhost", n_cpu=3)])
    sid = grid.publish(Worker())
    p = grid.acquire_service(sid)
    p.spin(600)                      # a daemon busy in a call when the driver dies
    print("PIDS", " ".join(str(s.handle.process.pid) for s in grid.slots), flush=True)
    time.sleep(600)
    """
)


def test_daemons_exit_after_kill_minus_nine_of_the_driver() -> None:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    driver = subprocess.Popen(
        [sys.executable, "-c", KILLED_DRIVER], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert driver.stdout is not None
        line = driver.stdout.readline()
        assert line.startswith("PIDS"), line
        pids = [int(p) for p in line.split()[1:]]
        assert all(psutil.pid_exists(p) for p in pids)
    finally:
        driver.kill()
        driver.wait(timeout=30)
        if driver.stdout is not None:
            driver.stdout.close()
    assert wait_until(lambda: not any(_alive(p) for p in pids), 15.0), "daemons outlived their driver"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


STOPPED_DRIVER = textwrap.dedent(
    """
    import time
    from isdgrid import Grid, Host
    grid = Grid([Host("localhost", n_cpu=2)], daemon_timeout=3.0)
    print("PIDS", " ".join(str(s.handle.process.pid) for s in grid.slots), flush=True)
    time.sleep(600)
    """
)


def test_daemons_exit_when_heartbeats_stop_although_stdin_stays_open() -> None:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    driver = subprocess.Popen([sys.executable, "-c", STOPPED_DRIVER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert driver.stdout is not None
        line = driver.stdout.readline()
        assert line.startswith("PIDS"), line
        pids = [int(p) for p in line.split()[1:]]
        os.kill(driver.pid, signal.SIGSTOP)  # alive, pipes open, but silent
        assert wait_until(lambda: not any(_alive(p) for p in pids), 20.0), "daemons did not notice the silence"
    finally:
        driver.kill()
        driver.wait(timeout=30)
        if driver.stdout is not None:
            driver.stdout.close()


def _failing_python(tmp_path: Path) -> tuple[str, Path]:
    """An interpreter wrapper that fails to start while its flag file exists (a host that is down)."""
    flag = tmp_path / "host-is-down"
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(
        f'#!/bin/sh\n[ -e "{flag}" ] && {{ echo "host is down" >&2; exit 1; }}\nexec "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper), flag


def test_a_respawn_is_tried_again_until_the_host_is_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The host daemon is killed: both its slots are lost, and starting it again fails until the flag goes.
    python, flag = _failing_python(tmp_path)
    with Grid([Host("localhost", n_cpu=2, python=python)], respawn=True, heartbeat_interval=0.2, host_timeout=5.0,
              start_timeout=10.0) as grid:  # fmt: skip
        sid = grid.publish(Recorder())
        flag.touch()
        os.kill(_host_daemon_pid(grid, 0), signal.SIGKILL)
        assert wait_until(lambda: "attempt 3;" in caplog.text, 30), caplog.text  # three starts failed ...
        flag.unlink()  # ... then the host comes back
        grid.wait_for_respawn(sid, timeout=60)
        assert grid.gather(grid.broadcast(sid, "add", "x"), timeout=30) == [1, 1]
        assert grid.respawn_count == 2
        grid.release_all(sid)


def test_a_respawn_gives_up_after_respawn_timeout(tmp_path: Path) -> None:
    python, flag = _failing_python(tmp_path)
    with Grid([Host("localhost", n_cpu=1, python=python), Host("127.0.0.1", n_cpu=1)], respawn=True,
              respawn_timeout=2.0, heartbeat_interval=0.2, host_timeout=5.0, start_timeout=10.0) as grid:  # fmt: skip
        sid = grid.publish(Recorder())
        flag.touch()
        victim = grid.slots[0]  # a respawn (a fork) may replace it in grid.slots at once
        os.kill(_host_daemon_pid(grid, 0), signal.SIGKILL)
        assert wait_until(lambda: victim.lost.is_set(), 30)
        started = time.monotonic()
        with pytest.raises(HostLostError, match="will not come back"):
            grid.wait_for_respawn(sid, timeout=60)
        assert time.monotonic() - started < 30  # three attempts (1 s and 2 s apart), then no more
        assert grid.gather([grid.acquire_service(sid, timeout=10).add("y")], timeout=30) == [1]  # the other serves


def _attempts_to(port: int) -> set[int]:
    """Local ports of this process's TCP connections to ``port`` on loopback."""
    me = psutil.Process()
    get = getattr(me, "net_connections", None) or me.connections
    return {c.laddr.port for c in get(kind="tcp") if c.raddr and c.raddr.port == port}


def test_reconnects_that_fail_are_retried_and_every_call_completes_once(tmp_path: Path) -> None:
    # The daemon is stopped (SIGSTOP) when its connection is cut: the reconnects reach its
    # listening socket but get no answer, and fail; once it runs again the next one succeeds
    # and the calls out are resent: each completes, exactly once.
    with Grid([Host("localhost", n_cpu=1)], heartbeat_interval=1.0, host_timeout=60.0) as grid:
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid)
        pid = _daemon_pid(grid, 0)
        port = int(grid.slots[0].handle.uri.rsplit(":", 1)[1])
        gate = Gate(tmp_path)
        held = proxy.hold(*gate.args)
        after = proxy.add("after")
        gate.wait_started()
        before = _attempts_to(port)
        os.kill(pid, signal.SIGSTOP)
        try:
            grid.slots[0].cut_connections()
            tried: set[int] = set()

            def one_failed() -> bool:  # a reconnect came and went (gave up) while the daemon was stopped
                now = _attempts_to(port) - before
                tried.update(now)
                return bool(tried - now)

            assert wait_until(one_failed, 60.0, step=0.1), f"reconnect attempts seen: {sorted(tried)}"
            gate.open()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert held.get(timeout=60) == "released"
        assert after.get(timeout=60) == 1
        assert proxy.history().get(timeout=30) == ["after"]  # ran once, though sent again
        assert not proxy._isdgrid_server.lost
        grid.release_service(proxy)


# -- faults of the I/O loop's transport (issue 20, item 22) -----------------------------------
SECRET = "faults-test-secret-0123456789"


def _hand_daemon(tmp: Path, name: str, secret: str, port: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    """A daemon started by hand (``--secret-stdin``) in a private folder of its own; its URI."""
    folder = tmp / name
    folder.mkdir(mode=0o700)
    with open(tmp / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "isdgrid.daemon", "--secret-stdin", "--port", str(port), "--temp-path", str(folder)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=folder,
            env={**os.environ, "PYTHONPATH": REPO_ROOT},
        )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(secret.encode() + b"\n")
        proc.stdin.close()
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            while sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline().decode()
                if not line:
                    break
                uri = parse_announcement(line)
                if uri is not None:
                    return proc, uri
        log_text = (tmp / f"{name}.log").read_text()
        raise AssertionError(f"daemon {name} (pid {proc.pid}) printed no URI within 30 s: {log_text}")
    except BaseException:
        _end_hand_daemon(proc)
        raise


def _end_hand_daemon(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.mark.parametrize("newcomer", ["another secret", "same secret"])
def test_a_reconnect_that_meets_another_daemon_at_the_address_loses_the_slot(tmp_path: Path, newcomer: str) -> None:
    # The slot's daemon dies and another one listens on its host:port before the calls
    # connection is made again: one of another grid (another secret), or one of this grid
    # that is not the slot's daemon (another daemon id: a replacement, or a relay). Neither
    # may take the calls out: the slot is lost, naming why, and no call hangs.
    old, uri = _hand_daemon(tmp_path, "old", SECRET)
    new: subprocess.Popen[bytes] | None = None
    port = int(uri.rsplit(":", 1)[1])
    try:
        with Grid.attach([uri], secret=SECRET, heartbeat_interval=0.5, host_timeout=60.0) as grid:
            sid = grid.publish(Recorder())
            proxy = grid.acquire_service(sid)
            gate = Gate(tmp_path)
            held = proxy.hold(*gate.args)
            out = proxy.add("out")  # sent, waiting behind the held call
            queued = [proxy.add(i) for i in range(3)]  # in the driver's inbox
            gate.wait_started()
            old.kill()
            old.wait(timeout=30)
            new, new_uri = _hand_daemon(tmp_path, "new", SECRET if newcomer == "same secret" else "another-secret-42",
                                        port)  # fmt: skip
            assert new_uri == uri
            for result in [held, out, *queued]:
                with pytest.raises(HostLostError, match="no longer answers as this daemon") as info:
                    result.get(timeout=60)
                assert info.value.host == "127.0.0.1" and info.value.slot == 0
            with pytest.raises(HostLostError):
                proxy.add("late").get(timeout=30)
            rows = [row for row in grid.status() if row.lost]
            assert len(rows) == 1
            grid.release_service(proxy)
        if newcomer == "same secret":  # the newcomer was given nothing of the grid's
            with Grid.attach([uri], secret=SECRET) as other:
                assert other.slots[0].control("info")["services"] == []
    finally:
        _end_hand_daemon(old)
        _end_hand_daemon(new)


def _raise(exc: BaseException) -> Callable[[Any], None]:
    def callback(_: Any) -> None:
        raise exc

    return callback


def test_a_batch_with_unreadable_replies_and_raising_callbacks_settles_all_and_the_loop_serves_on(
    tmp_path: Path,
) -> None:
    # One batch (the calls queued behind a held one travel together) with a value that
    # cannot be pickled on the host, one that cannot be unpickled in the driver (ImportError,
    # KeyboardInterrupt), and Results whose done-callbacks raise (KeyboardInterrupt and
    # SystemExit included): every Result of the batch is settled, and the I/O loop that
    # ran those callbacks goes on serving this slot and the other.
    with Grid([Host("localhost", n_cpu=2)], host_timeout=30.0) as grid:
        sid = grid.publish(Recorder())
        a, b = grid.acquire_service(sid), grid.acquire_service(sid)
        assert a._isdgrid_server.slot is not b._isdgrid_server.slot
        ran: list[str] = []
        for rep in range(3):
            gate = Gate(tmp_path)
            held = a.hold(*gate.args)
            behind = a.ident(("behind", rep))  # the second batch out: the rest wait in the inbox
            gate.wait_started()
            ran.clear()
            batch = {
                "first": a.ident((rep, 0)),
                "host cannot pickle": a.unpicklable_result(),
                "KeyboardInterrupt callback": a.ident((rep, 2)),
                "driver cannot unpickle": a.apply(FailsToLoad),
                "SystemExit callback": a.ident((rep, 4)),
                "interrupt when unpickled": a.apply(InterruptOnLoad),
                "ValueError callback": a.ident((rep, 6)),
                "last": a.ident((rep, 7)),
            }
            batch["KeyboardInterrupt callback"].add_done_callback(_raise(KeyboardInterrupt()))
            batch["SystemExit callback"].add_done_callback(_raise(SystemExit(3)))
            batch["ValueError callback"].add_done_callback(_raise(ValueError("callback")))
            for name, result in batch.items():
                result.add_done_callback(lambda _, name=name, ran=ran: ran.append(name))
            gate.open()
            assert held.get(timeout=30) == "released"
            assert behind.get(timeout=30) == ("behind", rep)
            done, not_done = concurrent.futures.wait(batch.values(), timeout=30)
            assert not not_done, [name for name, r in batch.items() if r in not_done]
            for name, k in (("first", 0), ("KeyboardInterrupt callback", 2), ("SystemExit callback", 4),
                            ("ValueError callback", 6), ("last", 7)):  # fmt: skip
                assert batch[name].get(timeout=0) == (rep, k), name
            for name in ("host cannot pickle", "driver cannot unpickle", "interrupt when unpickled"):
                assert isinstance(batch[name].exception(timeout=0), RemoteError), name
            # a callback raising an Exception does not keep the next callbacks from running
            assert wait_until(lambda ran=ran: {"first", "ValueError callback", "last"} <= set(ran), 10), ran
            # the loop serves on: this slot, the other, in order
            assert a.add(("after", rep)).get(timeout=30) == rep + 1
            assert b.add(("other", rep)).get(timeout=30) == rep + 1
        assert a.history().get(timeout=30) == [("after", rep) for rep in range(3)]
        grid.release_service(a)
        grid.release_service(b)


def test_callbacks_raising_keyboardinterrupt_while_a_lost_slot_fails_its_calls_fail_them_all(
    tmp_path: Path,
) -> None:
    # A daemon dies with two batches out and calls in the driver's inbox; a done-callback
    # of the first batch to fail, and one of a queued call, raise KeyboardInterrupt (in
    # the thread that declares the loss). Every other call still
    # fails with HostLostError, the grid still handles the loss (it respawns the slot),
    # and nothing hangs.
    with Grid([Host("localhost", n_cpu=2)], heartbeat_interval=0.5, host_timeout=30.0, respawn=True) as grid:
        sid = grid.publish(Recorder())
        doomed, healthy = grid.acquire_service(sid), grid.acquire_service(sid)
        slot = doomed._isdgrid_server.slot
        gate = Gate(tmp_path)
        first = doomed.hold(*gate.args)
        first.add_done_callback(_raise(KeyboardInterrupt()))
        second = doomed.add("second")  # the second batch out
        queued = [doomed.add(i) for i in range(4)]  # in the inbox
        queued[1].add_done_callback(_raise(KeyboardInterrupt()))
        gate.wait_started()
        os.kill(slot.handle.process.pid, signal.SIGKILL)
        for result in [first, second, *queued]:
            with pytest.raises(HostLostError):
                result.get(timeout=30)
        assert healthy.add("x").get(timeout=30) == 1
        grid.release_service(doomed)
        grid.release_service(healthy)
        grid.wait_for_respawn(sid, timeout=60)
        assert grid.respawn_count == 1
        assert sorted(grid.gather(grid.broadcast(sid, "add", "y"), timeout=30)) == [1, 2]
        grid.release_all(sid)


def _stopped(pid: int) -> bool:
    """True once the process and every one of its threads is stopped (SIGSTOP took effect)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/task/{tid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
                    return False
    except FileNotFoundError:
        return False
    return True


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    assert wait_until(lambda: _stopped(pid), 10, step=0.001), f"process {pid} did not stop"


def _unsent_to(port: int) -> list[int]:
    """Bytes not yet taken by the peer, of each established loopback TCP connection to ``port``."""
    queued = []
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                queued.append(int(fields[4].split(":")[0], 16))
    return queued


def _step_until(pid: int, done: Callable[[], bool], timeout: float) -> bool:
    """Let the stopped process ``pid`` run in slices of a few ms until ``done()`` (asked while it is stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.002)
        _stop(pid)
        if done():
            return True
    return False


BIG = 48 * 1024 * 1024  # more than the kernel buffers of a loopback connection hold
STUCK = 1024 * 1024  # unsent bytes that say a send waits for the daemon


def test_a_resend_cut_while_it_is_under_way_is_made_again_and_every_call_runs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A large batch is under way when the connection is cut (the daemon is stopped, so the
    # send waits); the reconnect authenticates and starts to resend it, and the connection
    # is cut again in the middle of that resend: the channel connects once more and sends
    # it all again, and every call runs once and answers once.
    caplog.set_level(logging.INFO, logger="isdgrid.transport")
    with Grid([Host("localhost", n_cpu=1)], heartbeat_interval=0.5, host_timeout=60.0) as grid:
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid)
        assert proxy.add("warm").get(timeout=30) == 1
        pid = _daemon_pid(grid, 0)
        port = int(grid.slots[0].handle.uri.rsplit(":", 1)[1])
        results: dict[str, Any] = {}

        def calls() -> None:  # the large send waits for the stopped daemon in this thread
            results["small"] = proxy.add("small")
            results["big"] = proxy.add_size(bytearray(BIG))
            results["after"] = proxy.add("after")

        _stop(pid)
        try:
            caller = threading.Thread(target=calls)
            caller.start()
            assert wait_until(lambda: any(n > STUCK for n in _unsent_to(port)), 30), "the large send never waited"
            grid.slots[0].cut_connections()  # the send fails; the reconnect waits for the handshake
            caller.join(30)
            assert not caller.is_alive() and set(results) == {"small", "big", "after"}
            # the daemon authenticates the reconnect and starts to take the resend, then stops
            assert _step_until(pid, lambda: any(n > STUCK for n in _unsent_to(port)), 30), "no resend waited"
            grid.slots[0].cut_connections()  # ... and the resend is cut
            assert wait_until(lambda: "resend failed" in caplog.text, 30), caplog.text
        finally:
            os.kill(pid, signal.SIGCONT)
        assert results["small"].get(timeout=60) == 2
        assert results["big"].get(timeout=60) == 3
        assert results["after"].get(timeout=60) == 4
        assert proxy.history().get(timeout=30) == ["warm", "small", ("size", BIG), "after"]
        assert not grid.slots[0].lost.is_set()
        grid.release_service(proxy)


def test_a_done_callback_may_gather_the_results_of_a_broadcast(tmp_path: Path) -> None:
    # As get() above, gather() in a callback (the I/O loop's thread) serves the loop while it
    # waits: the broadcast's replies land, and so does a lost host's error.
    with Grid([Host("localhost", n_cpu=2)], host_timeout=30.0) as grid:
        sid = grid.publish(Recorder())
        other = grid.publish(Recorder())
        gate = Gate(tmp_path)
        held = grid.broadcast(sid, "hold", *gate.args)
        box: queue.Queue[Any] = queue.Queue()

        def callback(f: concurrent.futures.Future[Any]) -> None:
            try:
                box.put(grid.gather(held, timeout=60))
            except BaseException as exc:  # noqa: BLE001 - reported in the test's thread
                box.put(exc)

        first = grid.acquire_service(other)
        first.ident("go").add_done_callback(callback)
        assert first.add("meanwhile").get(timeout=30) == 1  # the loop serves while the callback waits
        gate.open()
        try:
            outcome = box.get(timeout=60)
        except queue.Empty:
            pytest.fail("gather in a done-callback never finished")
        assert outcome == ["released", "released"], outcome
        grid.release_service(first)
        grid.release_all()


def test_a_done_callback_may_block_on_a_result_of_another_slot(tmp_path: Path) -> None:
    # r1's callback runs in the I/O loop and waits for r2 of another slot: the loop serves
    # meanwhile (r2's reply, and every other call's), so neither the callback nor anyone
    # else hangs.
    with Grid([Host("localhost", n_cpu=2)], host_timeout=30.0) as grid:
        sid = grid.publish(Recorder())
        a, b = grid.acquire_service(sid), grid.acquire_service(sid)
        assert a._isdgrid_server.slot is not b._isdgrid_server.slot
        for rep in range(3):
            gate_b, gate_a = Gate(tmp_path), Gate(tmp_path)
            r2 = b.hold(*gate_b.args)
            gate_b.wait_started()
            waiting = threading.Event()
            box: queue.Queue[Any] = queue.Queue()
            where: list[threading.Thread] = []

            def callback(f: concurrent.futures.Future[Any], r2: Any = r2, waiting: threading.Event = waiting,
                         box: queue.Queue[Any] = box, where: list[threading.Thread] = where) -> None:  # fmt: skip
                where.append(threading.current_thread())
                waiting.set()
                try:
                    box.put((f.result(), r2.get(timeout=30)))
                except BaseException as exc:  # noqa: BLE001 - reported in the test's thread
                    box.put(exc)

            a.hold(*gate_a.args)  # r1 cannot land before its callback is there
            r1 = a.ident(("r1", rep))
            r1.add_done_callback(callback)
            gate_a.wait_started()
            gate_a.open()
            assert waiting.wait(30), "the callback did not run"
            assert where[0] is not threading.current_thread()  # it runs where replies land
            # while the callback waits, replies of both slots still land
            assert a.add(("meanwhile", rep)).get(timeout=30) == rep + 1
            assert [a.ident(k).get(timeout=30) for k in range(3)] == [0, 1, 2]
            assert not r2.done()
            gate_b.open()
            try:
                outcome = box.get(timeout=60)
            except queue.Empty:
                pytest.fail("the callback never finished")
            assert outcome == (("r1", rep), "released"), outcome
        grid.release_service(a)
        grid.release_service(b)


def test_the_io_loop_survives_calls_from_eight_threads_while_connections_are_cut() -> None:
    # 8 threads call 4 servers (two threads a server, through the same proxy) while another
    # thread cuts a slot's connections every ~50 ms for 2 s: every call's value arrives,
    # and each call ran exactly once (the remote objects' own records say so).
    n_threads, n_calls, cut_for, cut_every = 8, 200, 2.0, 0.05
    with Grid([Host("localhost", n_cpu=4)], heartbeat_interval=0.5, host_timeout=30.0) as grid:
        sid = grid.publish(Recorder())
        proxies = [grid.acquire_service(sid) for _ in range(4)]
        assert len({p._isdgrid_server.slot for p in proxies}) == 4
        cutting = threading.Event()
        stop = threading.Event()
        cuts = 0

        def cutter() -> None:
            nonlocal cuts
            cutting.set()
            t0 = time.monotonic()
            while time.monotonic() - t0 < cut_for:
                grid.slots[cuts % 4].cut_connections()
                cuts += 1
                time.sleep(cut_every)

        def caller(t: int) -> list[tuple[Any, Any]]:
            proxy = proxies[t % 4]
            cutting.wait(30)
            got = []
            i = 0
            while i < n_calls or not stop.is_set():  # at least n_calls, and as long as the cuts go on
                tags = [(t, k) for k in range(i, i + 5)]
                results = [proxy.add(tag) for tag in tags]
                got += [(tag, r.get(timeout=60)) for tag, r in zip(tags, results, strict=True)]
                i += 5
            return got

        with concurrent.futures.ThreadPoolExecutor(n_threads + 1) as pool:
            cut = pool.submit(cutter)
            calls = [pool.submit(caller, t) for t in range(n_threads)]
            try:
                cut.result(timeout=60)
            finally:
                stop.set()
            values = [f.result(timeout=120) for f in calls]
        assert cuts >= 20
        assert all(len(got) >= n_calls for got in values)
        for proxy in proxies:
            history = proxy.history().get(timeout=30)
            # each tag once, and each call's value is its place in its server's record
            sent = sum(len(values[t]) for t in range(n_threads) if proxies[t % 4] is proxy)
            assert len(history) == len(set(history)) == sent
            place = {tag: i + 1 for i, tag in enumerate(history)}
            for t in range(n_threads):
                if proxies[t % 4] is proxy:
                    assert all(place[tag] == value for tag, value in values[t])
        assert not any(row.lost for row in grid.status())
        for proxy in proxies:
            grid.release_service(proxy)
