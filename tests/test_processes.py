"""A grid across processes: a forked driver, hosts listed twice, proxies of another grid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from conftest import alive
from remote_objects import Recorder

from isdgrid import ConfigError, Grid, GridError, Host

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FORK_DRIVER = textwrap.dedent(
    """
    import os, signal, sys, time
    from isdgrid import Grid, GridError, Host

    class Echo:
        def echo(self, x):
            return x
        def nap(self, seconds, x):
            time.sleep(seconds)
            return x

    grid = Grid([Host("localhost", n_cpu=2)])
    print("DAEMONS", *[s.handle.process.pid for s in grid.slots], flush=True)
    sid = grid.publish(Echo())
    proxy = grid.acquire_service(sid)
    assert proxy.echo(-1).get(timeout=60) == -1
    # in flight while the child tries: a reply the child read would be lost to the parent
    pending = [proxy.nap(0.5, -2)] + [proxy.echo(i) for i in range(100)]
    pid = os.fork()
    if pid == 0:
        attempts = {
            "a parent's pending Result": lambda: pending[0].get(timeout=30),
            "proxy call": lambda: proxy.echo(10**6),
            "proxy attribute": lambda: setattr(proxy, "x", 1),
            "release_service": lambda: grid.release_service(proxy),
            "publish": lambda: grid.publish(Echo()),
            "acquire_service": lambda: grid.acquire_service(sid, timeout=1),
            "broadcast": lambda: grid.broadcast(sid, "echo", 1),
            "scatter": lambda: grid.scatter(sid, "echo", [1, 2]),
            "gather": lambda: grid.gather(pending, timeout=1),
            "checkpoint": lambda: grid.checkpoint(sid, timeout=1),
            "copy_files": lambda: grid.copy_files(".", ["*.none"]),
            "status": lambda: grid.status(),
            "terminate": lambda: grid.terminate(),
        }
        failed = []
        for what, attempt in attempts.items():
            try:
                attempt()
                failed.append(what + ": no error")
            except GridError as exc:
                if f"belongs to process {os.getppid()}" not in str(exc) or "forked child" not in str(exc):
                    failed.append(f"{what}: {exc}")
            except BaseException as exc:
                failed.append(f"{what}: {type(exc).__name__}: {exc}")
        print("CHILD", "; ".join(failed) or "all refused", flush=True)
        sys.exit(3 if not failed else 4)  # a normal exit: the atexit handler runs

    values = [r.get(timeout=60) for r in pending] + [proxy.echo(i).get(timeout=60) for i in range(100, 200)]
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print("CHILD EXIT", os.waitstatus_to_exitcode(status), flush=True)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            print("CHILD HUNG", flush=True)
            break
        time.sleep(0.05)
    after = [proxy.echo(200).get(timeout=60)]  # after the child's exit too
    grid.release_service(proxy)
    print("VALUES", values == [-2, *range(200)] and after == [200], flush=True)
    print("BROADCAST", grid.gather(grid.broadcast(sid, "echo", 5), timeout=60), flush=True)
    grid.terminate()
    """
)


def test_a_forked_child_cannot_use_the_parents_grid_and_exits_while_the_parent_goes_on(tmp_path: Path) -> None:
    driver = tmp_path / "fork_driver.py"
    driver.write_text(FORK_DRIVER)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    proc = subprocess.Popen(
        [sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    daemons = _daemon_pids(out)
    try:
        assert proc.returncode == 0, f"driver exit {proc.returncode}:\n{out}\n{err}"
        assert "CHILD all refused" in out, out + err
        assert "CHILD EXIT 3" in out, out + err  # it exited by itself, with the code saying all was refused
        assert "VALUES True" in out, out + err
        assert "BROADCAST [5, 5]" in out, out + err
    finally:
        for pid in daemons:  # a driver that failed may have left them
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
    assert daemons and not alive([psutil.Process(p) for p in daemons if psutil.pid_exists(p)])


def _daemon_pids(out: str) -> list[int]:
    for line in out.splitlines():
        if line.startswith("DAEMONS "):
            return [int(p) for p in line.split()[1:]]
    return []


def test_a_host_listed_twice_is_refused_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match=r"host 'localhost' is listed 2 times.*n_cpu=3"):
        Grid([Host("localhost", n_cpu=2), Host("localhost", n_cpu=1)])


def test_releasing_another_grids_proxy_is_refused_and_leaves_it_usable() -> None:
    with Grid([Host("localhost", n_cpu=1)]) as grid_a, Grid([Host("localhost", n_cpu=1)]) as grid_b:
        sid_a = grid_a.publish(Recorder("a"))
        sid_b = grid_b.publish(Recorder("b"))
        proxy_a = grid_a.acquire_service(sid_a)
        with pytest.raises(GridError, match="belongs to another grid"):
            grid_b.release_service(proxy_a)
        assert proxy_a.ident("a1").get(timeout=60) == "a1"  # still acquired, still serving
        proxy_b = grid_b.acquire_service(sid_b, timeout=60)  # grid B's own server was never taken
        grid_b.release_service(proxy_b)
        grid_a.release_service(proxy_a)
        assert grid_a.acquire_service(sid_a, timeout=60).history().get(timeout=60) == []
