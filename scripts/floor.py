"""The floor of a fan-out: one driver thread, N echo processes over loopback TCP.

What a broadcast + gather of a no-op needs at the least, in Python, with nothing clever:
each message is ``pickle((method name, args))`` behind a 4-byte length, sent by the calling
thread; the replies are read with ``selectors`` by that same thread and each is unpickled into
a ``concurrent.futures.Future`` (``set_result``). ``scripts/bench.py`` reports every fan-out
figure of the grid as a ratio to this (issue 19).

The echo processes are forked from a small launcher (a fresh ``python -c``, single-threaded,
that imports only ``socket``, ``pickle`` and ``struct``): it makes a listening socket per
process, forks the process (which accepts one connection and serves it until it closes),
prints each port and pid, and waits for its stdin to close. :meth:`Floor.close` ends every
process by pid (``psutil.Process``, which checks that the pid is still the same process).
"""

from __future__ import annotations

import collections
import concurrent.futures
import pickle
import selectors
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import psutil

HEADER = struct.Struct("!I")

LAUNCHER = r"""
import os, pickle, signal, socket, struct, sys
header = struct.Struct("!I")
class Bench:
    def noop(self):
        return None
def serve(listener):
    listener.settimeout(120)  # a driver that never connects (it died) does not leave us behind
    try:
        conn, _ = listener.accept()
    except OSError:
        os._exit(1)
    listener.close()
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    obj = Bench()
    buf = b""
    while True:
        data = conn.recv(65536)
        if not data:
            os._exit(0)
        buf += data
        while len(buf) >= 4:
            (n,) = header.unpack_from(buf)
            if len(buf) < 4 + n:
                break
            name, args = pickle.loads(buf[4:4 + n])
            buf = buf[4 + n:]
            out = pickle.dumps(getattr(obj, name)(*args), 5)
            conn.sendall(header.pack(len(out)) + out)
children = []
for _ in range(int(sys.argv[1])):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    pid = os.fork()
    if pid == 0:
        serve(listener)
    listener_port = listener.getsockname()[1]
    listener.close()
    children.append(pid)
    print(listener_port, pid)
sys.stdout.flush()
sys.stdin.read()  # until the driver closes our stdin
for pid in children:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
for pid in children:
    os.waitpid(pid, 0)
"""


class Floor:
    """N fork-started echo processes and one connection to each, driven from one thread."""

    def __init__(self, n: int, timeout: float = 120.0) -> None:
        t0 = time.perf_counter()
        self.launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.processes: list[psutil.Process] = []
        self.conns: list[socket.socket] = []
        self.selector = selectors.DefaultSelector()
        try:
            assert self.launcher.stdout is not None
            ports = []
            for _ in range(n):
                line = self.launcher.stdout.readline()
                if not line:
                    raise RuntimeError(f"the floor's launcher ended after {len(ports)} of {n} processes")
                port, pid = (int(x) for x in line.split())
                ports.append(port)
                self.processes.append(psutil.Process(pid))
            for i, port in enumerate(ports):
                conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.conns.append(conn)
                # per connection: its index, the bytes read so far, the Futures awaiting a reply
                self.selector.register(conn, selectors.EVENT_READ, [i, bytearray(), collections.deque()])
        except BaseException:
            self.close()
            raise
        self.start_time = time.perf_counter() - t0

    @property
    def n(self) -> int:
        return len(self.conns)

    def call(self, i: int, name: str, *args: Any) -> concurrent.futures.Future[Any]:
        """Send ``name(*args)`` to process ``i``; its Future (settled by :meth:`run_until`)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        payload = pickle.dumps((name, args), 5)
        self.selector.get_key(self.conns[i]).data[2].append(future)
        self.conns[i].sendall(HEADER.pack(len(payload)) + payload)
        return future

    def run_until(self, futures: list[concurrent.futures.Future[Any]]) -> None:
        """Read replies as they land, settling each Future, until all of ``futures`` are done."""
        wanted = {id(f) for f in futures if not f.done()}
        pending = len(wanted)
        while pending:
            for key, _ in self.selector.select():
                _, buf, waiting = key.data
                data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                if not data:
                    raise ConnectionError("an echo process of the floor closed its connection")
                buf += data
                while len(buf) >= 4:
                    (size,) = HEADER.unpack_from(buf)
                    if len(buf) < 4 + size:
                        break
                    value = pickle.loads(buf[4 : 4 + size])
                    del buf[: 4 + size]
                    future = waiting.popleft()
                    future.set_result(value)
                    if id(future) in wanted:
                        pending -= 1

    def broadcast_gather(self, name: str = "noop") -> list[Any]:
        """``name()`` on every process, every request sent before any reply is read; the values."""
        futures = [self.call(i, name) for i in range(self.n)]
        self.run_until(futures)
        return [f.result() for f in futures]

    def pss(self) -> float:
        """Pss bytes summed over the launcher and every echo process."""
        total = 0
        for proc in [psutil.Process(self.launcher.pid), *self.processes]:
            total += proc.memory_full_info().pss
        return total

    def close(self) -> None:
        """End every process by pid (the echo processes, then the launcher) and close the sockets."""
        try:
            for conn in self.conns:
                conn.close()
            self.selector.close()
            if self.launcher.stdin is not None:
                self.launcher.stdin.close()
            self.launcher.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            for proc in self.processes:
                try:
                    proc.kill()  # psutil checks the pid is still this process (no reused pid is hit)
                except psutil.NoSuchProcess:
                    pass
            if self.launcher.poll() is None:
                self.launcher.kill()
                self.launcher.wait(timeout=10)
            if self.launcher.stdout is not None:
                self.launcher.stdout.close()

    def __enter__(self) -> Floor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
