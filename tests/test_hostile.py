"""Hostile input on a daemon's one port before authentication, and a host cut off by the network.

Byte-level conformance of the handshake, port squatting and floods of only slow or idle
clients are in test_attacks.py. Here a mixed crowd of hostile clients, a couple of hundred
connections open at once, runs against a grid that keeps serving small and large calls.
"""

from __future__ import annotations

import errno
import marshal
import os
import pickle
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require
from netns import NamespaceLauncher, NsHost, namespaces, netns_usable
from Pyro5 import protocol
from remote_objects import Recorder

from isdgrid import Grid, Host, HostLostError, codec
from isdgrid.handshake import HANDSHAKE_TIMEOUT

SLACK = 5.0  # scheduling, a loaded CI machine
CLOSE_BOUND = HANDSHAKE_TIMEOUT + SLACK  # every hostile connection is closed by the daemon within this
HELLO = b"ISDG\x01"  # then 32 bytes of nonce


@dataclass
class Client:
    """One hostile connection: ``first`` on connect, ``after_reply`` once the daemon's
    handshake message is in, then ``dribble`` one byte per tick."""

    kind: str
    first: bytes = b""
    after_reply: bytes | None = None
    dribble: bytes = b""
    outbox: bytes = b""
    got: bytes = b""
    opened: float | None = None
    closed: float | None = None
    refused: str = ""
    sock: socket.socket | None = field(default=None, repr=False)

    def reply_size(self) -> int | None:
        """Length of the daemon's handshake message, once its length byte is in."""
        return 33 + self.got[32] + 32 if len(self.got) > 32 else None

    def problem(self) -> str | None:
        """What went wrong with this connection, if anything."""
        if self.refused or self.opened is None:
            return f"{self.kind}: no connection ({self.refused or 'never established'})"
        if self.closed is None:
            return f"{self.kind}: never closed by the daemon"
        if self.closed - self.opened > CLOSE_BOUND:
            return f"{self.kind}: closed only after {self.closed - self.opened:.1f} s"
        size = self.reply_size() if self.first.startswith(HELLO) and len(self.first) == 37 else 0
        if size is not None and len(self.got) > size:
            return f"{self.kind}: the daemon sent {self.got[size:][:40]!r} to a client without the secret"
        return None


class _MkdirOnLoad:
    """Unpickling this makes a folder: a witness that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (self.path,)


def _batch_frame(service_id: str, marker: Path) -> bytes:
    """A calls frame (isdgrid.wire spelled out): ``add("intruder")``, then a pickle that makes ``marker``."""
    add, _ = codec.encode_op(codec.CALL, "add", ("intruder",))
    meta = marshal.dumps((service_id, 1, [(add, 0), (pickle.dumps(_MkdirOnLoad(marker)), 0)], 1 << 20))
    return struct.pack("!cIQ", b"B", 0, len(meta)) + meta


def _pyro(msgtype: int, payload: Any) -> bytes:
    return protocol.SendingMessage(msgtype, 0, 1, 2, marshal.dumps(payload)).data


def _clients(rng: random.Random, n: int, sid: str, marker: Path) -> list[Client]:
    """``n`` hostile clients of every kind, shuffled."""
    frame = _batch_frame(sid, marker)
    evil = pickle.dumps(_MkdirOnLoad(marker))
    publish = _pyro(protocol.MSG_INVOKE, ("isdgrid.agent", "call", ["publish", "evil", evil], {}))
    connect = _pyro(protocol.MSG_CONNECT, {"handshake": "not the secret", "object": "isdgrid.agent"})
    huge_pyro = bytearray(connect[: protocol._header_size])
    struct.pack_into("!I", huge_pyro, 12, 0xFFFF_FFF0)  # its data size field

    def hello() -> bytes:
        return HELLO + rng.randbytes(32)

    makers = [
        lambda: Client("random bytes", rng.randbytes(rng.randint(1, 4096))),
        lambda: Client("http", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        lambda: Client("truncated hello", hello()[: rng.randint(1, 36)]),
        lambda: Client("hello, then garbage", hello(), rng.randbytes(rng.randint(1, 4096))),
        lambda: Client("hello, wrong proof, a batch", hello(), rng.randbytes(32) + b"C" + frame),
        lambda: Client("hello, wrong proof, Pyro5 publish", hello(), rng.randbytes(32) + b"P" + publish),
        lambda: Client("hello, 64 KiB proof", hello(), rng.randbytes(65536)),
        lambda: Client("a batch, no handshake", frame),
        lambda: Client("frame of 2**62 bytes", struct.pack("!cIQ", b"B", 1 << 20, 1 << 62) + rng.randbytes(64)),
        lambda: Client("old Pyro5 connect", connect),
        lambda: Client("old Pyro5 publish", publish),
        lambda: Client("Pyro5 header of 4 GiB", bytes(huge_pyro) + rng.randbytes(256)),
        lambda: Client("slow hello", dribble=hello()),
        lambda: Client("hello, slow proof", hello(), b"", dribble=rng.randbytes(33)),
        lambda: Client("hello, then silence", hello(), b""),
        lambda: Client("idle"),
    ]
    return [makers[i % len(makers)]() for i in rng.sample(range(n), n)]


class Crowd:
    """Runs ``clients`` against ``port`` from one selector thread, at most ``width`` open at once."""

    TICK = 0.5

    def __init__(self, port: int, clients: list[Client], width: int, max_seconds: float) -> None:
        self.port, self.clients, self.width, self.max_seconds = port, clients, width, max_seconds
        self.sel = selectors.DefaultSelector()
        self.live: set[int] = set()
        self.thread = threading.Thread(target=self._run, name="hostile-crowd", daemon=True)

    def start(self) -> Crowd:
        self.thread.start()
        return self

    def join(self) -> list[str]:
        """Wait for the crowd (bounded); the problems found."""
        self.thread.join(timeout=self.max_seconds + 10)
        assert not self.thread.is_alive(), "the crowd thread did not end"
        return [p for p in (c.problem() for c in self.clients) if p]

    def _run(self) -> None:
        todo = list(range(len(self.clients) - 1, -1, -1))
        end = time.monotonic() + self.max_seconds
        next_tick = time.monotonic() + self.TICK
        try:
            while (todo or self.live) and time.monotonic() < end:
                while todo and len(self.live) < self.width:
                    self._open(todo.pop())
                for key, _ in self.sel.select(timeout=max(0.0, min(next_tick, end) - time.monotonic())):
                    self._on_ready(key.data)
                if time.monotonic() >= next_tick:
                    next_tick += self.TICK
                    for i in list(self.live):
                        self._drip(i)
        finally:
            for i in list(self.live):
                self._close(i, by_daemon=False)
            self.sel.close()

    def _open(self, i: int) -> None:
        client = self.clients[i]
        sock = client.sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", self.port))
        if code not in (0, errno.EINPROGRESS):
            client.refused = os.strerror(code)
            sock.close()
            return
        self.live.add(i)
        self.sel.register(sock, selectors.EVENT_WRITE, i)

    def _on_ready(self, i: int) -> None:
        client = self.clients[i]
        assert client.sock is not None
        if client.opened is None:  # the connect finished
            code = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                client.refused = os.strerror(code)
                self._close(i, by_daemon=False)
                return
            client.opened = time.monotonic()
            client.outbox = client.first
        else:
            try:
                data = client.sock.recv(65536)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._close(i, by_daemon=True)
                return
            client.got += data or b""
            size = client.reply_size()
            if client.after_reply is not None and size is not None and len(client.got) >= size:
                client.outbox += client.after_reply
                client.after_reply = None
        self._flush(i)

    def _drip(self, i: int) -> None:
        client = self.clients[i]
        if client.opened is not None and client.dribble:
            client.outbox += client.dribble[:1]
            client.dribble = client.dribble[1:]
            self._flush(i)

    def _flush(self, i: int) -> None:
        client = self.clients[i]
        assert client.sock is not None
        if client.outbox:
            try:
                sent = client.sock.send(client.outbox)
            except BlockingIOError:
                sent = 0
            except OSError:  # the daemon closed the connection with our bytes unread
                self._close(i, by_daemon=True)
                return
            client.outbox = client.outbox[sent:]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outbox else 0)
        self.sel.modify(client.sock, events, i)

    def _close(self, i: int, by_daemon: bool) -> None:
        client = self.clients[i]
        assert client.sock is not None
        self.live.discard(i)
        self.sel.unregister(client.sock)
        client.sock.close()
        if by_daemon:
            client.closed = time.monotonic()


def test_a_hostile_crowd_on_the_port_does_not_stop_or_stall_the_grid(tmp_path: Path) -> None:
    with Grid([Host("localhost", n_cpu=1)], heartbeat_interval=0.5, host_timeout=10.0) as grid:
        slot = grid.slots[0]
        sid = grid.publish(Recorder())
        services = slot.control("info")["services"]
        pid_before = slot.handle.process.pid  # type: ignore[union-attr]
        marker = tmp_path / "unpickled"
        crowd = Crowd(slot.control("info")["port"], _clients(random.Random(5), 960, sid, marker),
                      width=200, max_seconds=60.0)
        big = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: out of band
        stop = threading.Event()
        served: list[int] = []
        failures: list[BaseException] = []

        def legit_calls() -> None:
            proxy = grid.acquire_service(sid, timeout=30)
            try:
                i = 0
                while not stop.is_set():
                    try:
                        assert proxy.ident(i).get(timeout=30) == i
                        assert np.array_equal(proxy.ident(big + i).get(timeout=30), big + i)
                    except BaseException as exc:  # noqa: BLE001 - judged below
                        failures.append(exc)
                        return
                    served.append(i)
                    if i % 150 == 20:  # the driver reconnects through the crowd, and resends
                        slot.cut_connections()
                    i += 1
            finally:
                grid.release_service(proxy)

        caller = threading.Thread(target=legit_calls)
        t0 = time.monotonic()
        crowd.start()
        caller.start()
        try:
            problems = crowd.join()
        finally:
            stop.set()
            caller.join(timeout=60)
        took = time.monotonic() - t0
        assert not caller.is_alive()
        assert not failures, f"a call failed during the attack: {failures[0]!r}"
        assert len(served) > 50, f"only {len(served)} call pairs served in {took:.1f} s"
        assert not problems, f"{len(problems)} of {len(crowd.clients)} hostile clients:\n" + "\n".join(problems[:20])
        assert slot.handle.process.poll() is None  # type: ignore[union-attr]
        assert slot.handle.process.pid == pid_before  # type: ignore[union-attr]
        assert not slot.lost.is_set() and not any(row.lost for row in grid.status())
        # nothing the intruders sent was unpickled, published or run
        assert slot.control("info")["services"] == services
        assert not marker.exists()
        proxy = grid.acquire_service(sid, timeout=10)
        assert proxy.history().get(timeout=10) == []
        assert np.array_equal(proxy.ident(big).get(timeout=30), big)
        grid.release_service(proxy)
        print(f"{len(crowd.clients)} hostile clients in {took:.1f} s; {len(served)} call pairs served")


# -- a host cut off by the network: a daemon in a network namespace of its own -----------------

@pytest.fixture
def netns() -> Iterator[NsHost]:
    require(netns_usable(), "network namespaces are not permitted here (needs root and iproute2)")
    with namespaces(1) as hosts:
        yield hosts[0]


def test_host_cut_off_by_the_network_fails_calls_instead_of_hanging(netns: NsHost, tmp_path: Path) -> None:
    address = netns.address
    launcher = NamespaceLauncher([netns], str(tmp_path))
    with Grid([Host(netns.alias, n_cpu=1)], launcher=launcher, heartbeat_interval=0.5, host_timeout=3.0) as grid:
        assert grid.slots[0].uri.endswith(f"@{address}:{grid.slots[0].uri.rsplit(':', 1)[1]}")
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid)
        assert proxy.add(1).get(timeout=30) == 1
        pending = proxy.sleep(2.0)
        netns.cut()
        t0 = time.monotonic()
        with pytest.raises(HostLostError):
            pending.get(timeout=60)
        assert time.monotonic() - t0 < 30
        with pytest.raises(HostLostError):
            proxy.add(2).get(timeout=30)
        grid.release_service(proxy)
    # terminate closed the daemon's stdin: it is gone although the network was down
    assert grid.slots[0].handle.process.poll() is not None  # type: ignore[union-attr]

