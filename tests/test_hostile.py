"""Hostile input on a daemon's port, and a host cut off by the network."""

from __future__ import annotations

import concurrent.futures
import marshal
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from conftest import require
from Pyro5 import protocol
from remote_objects import Recorder

from isdgrid import Grid, Host, HostLostError
from isdgrid.hosts import Host as HostType
from isdgrid.launchers import ProcessLauncher, SlotSpec
from isdgrid.launchers.local import daemon_args

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOSE_BOUND = 15.0  # every hostile connection must be closed by the daemon within this


def _pyro_message(msgtype: int, payload: object) -> bytes:
    return protocol.SendingMessage(msgtype, 0, 1, 2, marshal.dumps(payload)).data


def _inputs(rng: random.Random, quick: int, slow: int) -> list[tuple[str, bytes]]:
    connect_wrong = _pyro_message(protocol.MSG_CONNECT, {"handshake": "not the secret", "object": "isdgrid.agent"})
    invoke_first = _pyro_message(protocol.MSG_INVOKE, ("isdgrid.agent", "publish", ["Evil", b"x"], {}))
    http = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    cases: list[tuple[str, bytes]] = []
    for i in range(quick):
        kind = i % 5
        if kind == 0:
            cases.append(("random", rng.randbytes(rng.randint(1, 4096))))
        elif kind == 1:
            cases.append(("http", http))
        elif kind == 2:
            cases.append(("wrong-secret", connect_wrong))
        elif kind == 3:
            cases.append(("invoke-before-handshake", invoke_first))
        else:
            header = bytearray(connect_wrong[: protocol._header_size])
            header[0:4] = b"PYRO"
            cases.append(("pyro-garbage", bytes(header) + rng.randbytes(rng.randint(0, 512))))
    for i in range(slow):
        if i % 2:
            cases.append(("idle", b""))
        else:
            cases.append(("truncated", connect_wrong[: rng.randint(1, len(connect_wrong) - 1)]))
    rng.shuffle(cases)
    return cases


def _attack(host: str, port: int, data: bytes) -> float:
    """Send ``data`` and return how long the daemon took to close the connection."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.settimeout(CLOSE_BOUND)
        t0 = time.monotonic()
        try:
            if data:
                sock.sendall(data)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        return time.monotonic() - t0


def test_fuzzing_the_daemon_port_does_not_stop_or_stall_the_grid() -> None:
    with Grid([Host("localhost", n_cpu=1)], heartbeat_interval=0.5, host_timeout=10.0) as grid:
        sid = grid.publish(Recorder())
        uri = grid.slots[0].uri
        host, port = uri.split("@", 1)[1].rsplit(":", 1)
        pid_before = grid.slots[0].handle.process.pid  # type: ignore[union-attr]
        stop = threading.Event()
        served: list[int] = []
        failures: list[BaseException] = []

        def legit_calls() -> None:
            proxy = grid.acquire_service(sid, timeout=30)
            try:
                i = 0
                while not stop.is_set():
                    try:
                        assert proxy.ident(i).get(timeout=20) == i
                        served.append(i)
                    except BaseException as exc:  # noqa: BLE001
                        failures.append(exc)
                        return
                    i += 1
            finally:
                grid.release_service(proxy)

        caller = threading.Thread(target=legit_calls)
        caller.start()
        cases = _inputs(random.Random(5), quick=2900, slow=100)
        try:
            with concurrent.futures.ThreadPoolExecutor(64) as pool:
                closed_after = list(pool.map(lambda case: (case[0], _attack(host, int(port), case[1])), cases))
        finally:
            stop.set()
            caller.join(timeout=60)
        assert not failures, failures[:1]
        assert len(served) > 100
        slowest = max(t for _, t in closed_after)
        assert slowest < CLOSE_BOUND, f"a hostile connection stayed open {slowest:.1f} s"
        assert grid.slots[0].handle.process.poll() is None  # type: ignore[union-attr]
        assert grid.slots[0].handle.process.pid == pid_before  # type: ignore[union-attr]
        assert not grid.slots[0].lost.is_set()
        # nothing was published by the intruders, and the grid still answers
        assert grid.slots[0].control("info")["services"] == [sid]
        proxy = grid.acquire_service(sid, timeout=10)
        assert proxy.history().get(timeout=10) == []
        grid.release_service(proxy)


# -- a host cut off by the network: a daemon in a network namespace of its own -----------------

NS_SUBNET = "10.213.77"  # only inside the veth pair this test creates


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _netns_usable() -> bool:
    if shutil.which("ip") is None or os.geteuid() != 0:
        return False
    probe = f"isdgp{os.getpid() % 100000}"
    ok = _ip("netns", "add", probe).returncode == 0
    if ok:
        _ip("netns", "del", probe)
    return ok


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    require(_netns_usable(), "network namespaces are not permitted here (needs root and iproute2)")
    tag = str(os.getpid() % 100000)
    ns, outer, inner = f"isdg{tag}", f"isdgA{tag}", f"isdgB{tag}"
    steps = [
        ("netns", "add", ns),
        ("link", "add", outer, "type", "veth", "peer", "name", inner),
        ("link", "set", inner, "netns", ns),
        ("addr", "add", f"{NS_SUBNET}.1/30", "dev", outer),
        ("link", "set", outer, "up"),
        ("-n", ns, "addr", "add", f"{NS_SUBNET}.2/30", "dev", inner),
        ("-n", ns, "link", "set", inner, "up"),
        ("-n", ns, "link", "set", "lo", "up"),
    ]
    try:
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield ns, outer, f"{NS_SUBNET}.2"
    finally:
        _ip("link", "del", outer)
        _ip("netns", "del", ns)


class NetnsLauncher(ProcessLauncher):
    """Starts daemons inside a network namespace, bound to its veth address."""

    name = "netns"

    def __init__(self, ns: str, address: str, temp_path: str) -> None:
        super().__init__()
        self.ns, self.address, self.temp_path = ns, address, temp_path

    def slot_specs(self, hosts: Sequence[HostType]) -> list[SlotSpec]:
        return [SlotSpec(h, i, self.temp_path) for h in hosts for i in range(h.n_cpu)]

    def command(self, spec: SlotSpec) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *daemon_args(spec, sys.executable, bind=self.address)]

    def environment(self, spec: SlotSpec) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": REPO_ROOT}


def test_host_cut_off_by_the_network_fails_calls_instead_of_hanging(netns, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ns, outer, address = netns
    launcher = NetnsLauncher(ns, address, str(tmp_path))
    with Grid([Host("nshost", n_cpu=1)], launcher=launcher, heartbeat_interval=0.5, host_timeout=3.0) as grid:
        assert grid.slots[0].uri.endswith(f"@{address}:{grid.slots[0].uri.rsplit(':', 1)[1]}")
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid)
        assert proxy.add(1).get(timeout=30) == 1
        pending = proxy.sleep(2.0)
        assert _ip("link", "set", outer, "down").returncode == 0
        t0 = time.monotonic()
        with pytest.raises(HostLostError):
            pending.get(timeout=60)
        assert time.monotonic() - t0 < 30
        with pytest.raises(HostLostError):
            proxy.add(2).get(timeout=30)
        grid.release_service(proxy)
    # terminate closed the daemon's stdin: it is gone although the network was down
    assert grid.slots[0].handle.process.poll() is not None  # type: ignore[union-attr]


# -- the bulk side channel's port -----------------------------------------------------------


def _bulk_inputs(rng: random.Random, secret_len: int, quick: int, slow: int) -> list[tuple[str, bytes]]:
    from isdgrid.bulk import MAGIC

    wrong = rng.randbytes(secret_len).hex()[:secret_len].encode()
    cases: list[tuple[str, bytes]] = []
    for i in range(quick):
        kind = i % 6
        if kind == 0:
            cases.append(("random", rng.randbytes(rng.randint(1, 4096))))
        elif kind == 1:
            cases.append(("wrong-secret", MAGIC + len(wrong).to_bytes(2, "big") + wrong))
        elif kind == 2:
            cases.append(("huge-secret-length", MAGIC + (65535).to_bytes(2, "big") + rng.randbytes(100)))
        elif kind == 3:  # a PUT of a terabyte without a hello
            cases.append(("put-before-hello", b"P" + (3).to_bytes(2, "big") + (1).to_bytes(4, "big") + b"q/x"
                          + (1 << 40).to_bytes(8, "big") + b"n"))
        elif kind == 4:
            cases.append(("get-before-hello", b"G" + (7).to_bytes(2, "big") + bytes(4) + b"r/x/1/0"))
        else:
            cases.append(("pyro-on-bulk", _pyro_message(protocol.MSG_CONNECT, {"handshake": "x", "object": "y"})))
    for i in range(slow):
        if i % 2:
            cases.append(("idle", b""))
        else:
            cases.append(("truncated-hello", (MAGIC + (64).to_bytes(2, "big"))[: rng.randint(1, 5)]))
    rng.shuffle(cases)
    return cases


def test_fuzzing_the_bulk_port_does_not_stop_or_stall_large_calls() -> None:
    import numpy as np

    with Grid([Host("localhost", n_cpu=1)], heartbeat_interval=0.5, host_timeout=10.0) as grid:
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid)
        big = np.arange(100_000, dtype=np.float64)
        assert np.array_equal(proxy.ident(big).get(timeout=30), big)  # the bulk channel is up
        port = grid.slots[0].info["bulk_port"]
        assert isinstance(port, int)
        stop = threading.Event()
        served: list[int] = []
        failures: list[BaseException] = []

        def legit_calls() -> None:
            i = 0
            while not stop.is_set():
                try:
                    back = proxy.ident(big + i).get(timeout=30)
                    assert back[0] == i
                    served.append(i)
                except BaseException as exc:  # noqa: BLE001
                    failures.append(exc)
                    return
                i += 1

        caller = threading.Thread(target=legit_calls)
        caller.start()
        cases = _bulk_inputs(random.Random(11), len(grid._secret), quick=1400, slow=60)
        try:
            with concurrent.futures.ThreadPoolExecutor(48) as pool:
                closed_after = list(pool.map(lambda case: (case[0], _attack("127.0.0.1", port, case[1])), cases))
        finally:
            stop.set()
            caller.join(timeout=60)
        assert not failures, failures[:1]
        assert len(served) > 10
        slowest = max(t for _, t in closed_after)
        assert slowest < CLOSE_BOUND, f"a hostile bulk connection stayed open {slowest:.1f} s"
        assert grid.slots[0].handle.process.poll() is None  # type: ignore[union-attr]
        assert not grid.slots[0].lost.is_set()
        assert np.array_equal(proxy.ident(big).get(timeout=30), big)
        grid.release_service(proxy)
