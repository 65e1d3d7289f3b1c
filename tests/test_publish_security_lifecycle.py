"""Publishing failures, the secret handshake, and a clean end of every process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import psutil
import Pyro5.client
import Pyro5.errors
import pytest
from conftest import child_pids
from remote_objects import FailsToLoad, Recorder

from isdgrid import Grid, Host, PublishError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unpicklable_instance_is_a_publish_error(grid1: Grid) -> None:
    class Holder:
        def __init__(self) -> None:
            self.lock = threading.Lock()

    with pytest.raises(PublishError, match="cannot pickle") as info:
        grid1.publish(Holder())
    assert info.value.host is None
    assert not grid1.servers


def test_instance_failing_to_load_names_the_host_and_carries_the_traceback(grid: Grid) -> None:
    with pytest.raises(PublishError) as info:
        grid.publish(FailsToLoad())
    err = info.value
    assert err.host == "localhost"
    assert "ImportError" in err.remote_traceback and "no such module on the host" in err.remote_traceback
    assert "localhost" in str(err)
    assert not grid.servers  # nothing left half-published
    infos = [slot.control("info") for slot in grid.slots]
    assert all(i["services"] == [] for i in infos)


def _raw_proxy(uri: str, handshake: object = None) -> Pyro5.client.Proxy:
    proxy = Pyro5.client.Proxy(uri)
    proxy._pyroSerializer = "marshal"
    proxy._pyroMaxRetries = 0
    proxy._pyroTimeout = 10
    if handshake is not None:
        proxy._pyroHandshake = handshake
    return proxy


@pytest.mark.parametrize("handshake", [None, "wrong-secret", b"\x00" * 64, 12345])
def test_clients_without_the_secret_are_refused_before_any_object(grid1: Grid, handshake: object) -> None:
    sid = grid1.publish(Recorder())
    uri = grid1.slots[0].uri
    intruder = _raw_proxy(uri, handshake)  # a plain Pyro5 client: it cannot answer the challenge
    with pytest.raises(Pyro5.errors.CommunicationError):
        intruder.call("info")
    intruder = _raw_proxy(uri, handshake)
    with pytest.raises(Pyro5.errors.CommunicationError):
        intruder.publish("Evil-1", b"\x80\x05N.")
    # no side effect: nothing new published, the real service untouched and serving
    assert grid1.slots[0].control("info")["services"] == [sid]
    proxy = grid1.acquire_service(sid)
    assert proxy.history().get(timeout=30) == []
    grid1.release_service(proxy)


def test_secret_is_not_on_any_command_line() -> None:
    g = Grid([Host("localhost", n_cpu=2)], secret="s3cr3t-token-for-this-test")
    try:
        for pid in child_pids():
            cmdline = " ".join(psutil.Process(pid).cmdline())
            assert "s3cr3t-token-for-this-test" not in cmdline
    finally:
        g.terminate()


def test_terminate_leaves_no_child_process_and_removes_temp_dirs() -> None:
    before = child_pids()
    g = Grid([Host("localhost", n_cpu=3)])
    sid = g.publish(Recorder())
    proxy = g.acquire_service(sid)
    proxy.sleep(30)  # still running at terminate
    daemons = child_pids() - before
    assert len(daemons) == 4  # the host daemon and the 3 slot workers it forked
    assert {s.handle.process.pid for s in g.slots} | {g.slots[0].handle.host_daemon.process.pid} == daemons
    temp_dirs = {slot.handle.spec.temp_path for slot in g.slots}
    assert all(os.path.isdir(d) for d in temp_dirs)
    g.terminate()
    assert not (child_pids() & daemons)
    for pid in daemons:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not any(os.path.exists(d) for d in temp_dirs)


def test_context_manager_terminates(tmp_path: os.PathLike[str]) -> None:
    before = child_pids()
    with Grid([Host("localhost", n_cpu=2)]) as g:
        assert len(child_pids() - before) == 3  # the host daemon and its 2 slot workers
    assert g.ishalted()
    assert not (child_pids() - before)


DRIVER = textwrap.dedent(
    """
    import os, sys
    from isdgrid import Grid, Host

    class Replica:                      # lives in this driver's __main__
        def __init__(self, temperature):
            self.temperature = temperature
        def energy(self, x):
            return self.temperature * x

    grid = Grid([Host("localhost", n_cpu=2)])   # no context manager: atexit ends it
    sid = grid.publish(Replica(2.0))
    print("ENERGIES", grid.gather(grid.broadcast(sid, "energy", 21), timeout=30))
    print("DAEMONS", " ".join(str(s.handle.process.pid) for s in grid.slots))
    """
)


def test_class_from_drivers_main_and_atexit_cleanup() -> None:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    out = subprocess.run(
        [sys.executable, "-c", DRIVER], capture_output=True, text=True, timeout=120, check=True, env=env
    ).stdout
    assert "ENERGIES [42.0, 42.0]" in out
    pids = [int(p) for p in out.split("DAEMONS", 1)[1].split()]
    assert pids and not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
