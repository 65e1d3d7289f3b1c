#!/usr/bin/env python3
"""isdgrid benchmark: the grid against raw Pyro5, a raw socket and multiprocessing, side by side.

Everything runs in one process tree on this machine, at the same moment: a raw Pyro5
daemon and a raw socket echo server run as subprocesses next to the grid's daemons, and
the timings of the things compared are taken in interleaved blocks, so that load from
elsewhere hits both sides alike. Each figure is the median over ``--repeat`` runs (and
over blocks within a run). It prints a table and the target ratios, and writes a plot.

    PYTHONPATH=. python scripts/bench.py              # every section (today 10+ minutes: 256 slots)
    PYTHONPATH=. python scripts/bench.py --quick      # smaller counts
    PYTHONPATH=. python scripts/bench.py --only fanout --repeat 1 --plot ''   # one section, under ~2 min

Each ratio is isdgrid's figure over its peer's in the same run (1.00x: as cheap as the peer);
the targets tables say which bounds of the issues are met. The sections are listed below.

Before and after a change: run it on the old tree with ``--json before.json`` (it uses only
the grid's public API, so it runs on older versions too), then on the new one with
``--before before.json``, back to back so that the load is alike::

    PYTHONPATH=/path/to/old python scripts/bench.py --json /tmp/before.json --plot ''
    PYTHONPATH=. python scripts/bench.py --before /tmp/before.json --json /tmp/after.json

``--load /tmp/after.json --before /tmp/before.json`` prints the tables and draws the plot of
saved runs again without measuring anything.

Sections (``--only a,b``; default: all): ``calls`` (sync and pipelined no-op calls against raw
Pyro5), ``payloads`` (echo of 1 KB to 8 MB against a raw socket and raw Pyro5), ``bcast``
(broadcast over 1-8 slots against ``multiprocessing.Pool(4)``, start of 1-8 slots), ``pool``,
``idle`` (idle CPU, RSS and threads over many calls), and for the grid at scale (issues 18, 19):

- ``fanout``: an N-way broadcast + gather of a no-op (``gather(broadcast(sid, "noop"))`` then
  ``release_all(sid)``) against *the floor* at the same N (``scripts/floor.py``: one driver
  thread, N fork-started echo processes over loopback TCP, each message pickled, replies read
  with ``selectors`` and unpickled into a ``concurrent.futures.Future``), interleaved, at
  ``--sizes`` (default 16,64,256). Per N: the wall time of a round, the driver's CPU per call
  (the grid: ``time.process_time``, every driver thread; the floor: ``time.thread_time`` of its
  one thread), each with the ratio grid / floor, and the driver's threads. A grid that cannot
  start says so in its row ("could not start: ...") instead of ending the run.
- ``latency``: ``concurrent.futures.wait([r])`` and ``as_completed([r])`` against ``r.result()``
  for a sync no-op on one server.
- ``start``: start + publish of ``--start-sizes`` (default 8,64) local slots, and the Pss of an
  idle slot (summed over every process the grid started, over the slots), against forking as
  many floor processes and their Pss.
- ``scale``: the floor at ``--floor-scale`` (1,000) processes; with ``--scale N`` also a grid of
  N local slots (off by default: a minute or more): start, Pss per idle slot, broadcast +
  gather against the floor at N, ``terminate()``, then no process of the grid and no folder
  may be left. ``--start-sizes 8,64,1000`` also puts 1,000 slots in the ``start`` table.
- ``respawn``: a grid of ``--respawn-slots`` (8) slots with ``respawn=True``; ``--kills`` (5)
  times one worker is ``kill -9``ed (``slot.handle.process.pid``): the time until the grid logs
  the loss, and from there until the slot serves a call again (a broadcast + gather answered
  by the new worker).
- ``hung``: ``terminate()`` of a grid with k (``--hung``, 1,3,6) slot workers SIGSTOPped, or
  stuck in C code that holds the GIL (only SIGKILL ends them), and with its host daemon
  SIGSTOPped; ``--stop-timeout`` (5 s) is the grids' ``stop_timeout``, the bound is it + 1 s.

These run once per run (not ``--repeat`` times); each is a median over interleaved blocks. One
section takes under about two minutes::

    PYTHONPATH=. nice -n 10 python scripts/bench.py --only fanout --repeat 1 --plot ''
    PYTHONPATH=. nice -n 10 python scripts/bench.py --only latency,start,scale --repeat 1 --plot ''
    PYTHONPATH=. nice -n 10 python scripts/bench.py --only respawn,hung --repeat 1 --plot ''   # about a minute
    PYTHONPATH=. python scripts/bench.py --only scale --scale 1000 --repeat 1 --plot ''

Reading it: a ratio is isdgrid's figure over the peer's (the floor's) in the same run; 1.00x
is as cheap as the floor, and the targets table says which of the issues' bounds are met. The
load average at start and end is printed with the run: on a loaded machine both sides slow
down, their ratio less so.

Not a test: it asserts nothing; it reports. Needs numpy, psutil and (for the plot)
matplotlib: ``pip install 'isdgrid[bench]'``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import faulthandler
import gc
import json
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import Pyro5
import Pyro5.client
from floor import Floor  # scripts/ is on sys.path when a script in it runs

import isdgrid
from isdgrid import Grid, Host

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MB = 1 << 20
RSS_FLAT = 1.0  # MB: the most the driver's or a daemon's RSS may grow over the memory run to count as flat

# Both peers end when their stdin closes, so that they never outlive the benchmark.
RAW_PYRO = r"""
import os, sys, threading, Pyro5.server
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
class Bench:
    @Pyro5.server.expose
    def noop(self):
        return None
    @Pyro5.server.expose
    def echo(self, data):
        return data
daemon = Pyro5.server.Daemon(host="127.0.0.1")
print(daemon.register(Bench(), "bench"), flush=True)
daemon.requestLoop()
"""

RAW_ECHO = r"""
import os, socket, struct, sys, threading
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def receive(n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        if not k:
            sys.exit(0)
        got += k
    return buf
while True:
    (n,) = struct.unpack("!Q", receive(8))
    data = receive(n)
    conn.sendall(struct.pack("!Q", n))
    conn.sendall(data)
"""


class Bench:
    """The object the grid publishes (defined in the driver: it travels by value)."""

    def noop(self) -> None:
        return None

    def echo(self, data: Any) -> Any:
        return data

    def pid(self) -> int:
        return os.getpid()

    def nap(self, seconds: float) -> None:
        time.sleep(seconds)

    def stuck(self) -> None:
        """Hang in C code that holds the GIL (catastrophic regex backtracking): no signal
        handler, no other thread of the process runs again; only SIGKILL ends it."""
        import re

        re.match(r"(a+)+$", "a" * 64 + "b")


def _noop(*_: Any) -> None:
    return None


def _echo(data: Any) -> Any:
    return data


# -- measuring ---------------------------------------------------------------------------------
def _cpu(procs: Sequence[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` (every thread of each) so far."""
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


@dataclass
class Timed:
    """One thing to time: ``fn`` makes ``calls`` calls; ``remote`` are the processes serving them."""

    fn: Callable[[], Any]
    calls: int = 1
    remote: Sequence[psutil.Process] = ()


def interleaved(
    fns: dict[str, Timed], block: int, rounds: int, warmup: int = 20, cpu: dict[str, tuple[float, float]] | None = None
) -> dict[str, float]:
    """Seconds per call of each function: the median over ``rounds`` blocks, taken in turn.

    A block is about ``block`` calls of each (a function that makes ``calls`` calls itself
    runs ``block // calls`` times, at least once). With ``cpu``, the CPU seconds per call
    of the driver (every thread, ``time.process_time``) and of the remote processes
    (``psutil`` CPU times, user + system, every thread) over all blocks are put there.
    """
    for b in fns.values():
        for _ in range(max(1, warmup // b.calls)):
            b.fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    used = {name: [0.0, 0.0, 0] for name in fns}
    for _ in range(rounds):
        for name, b in fns.items():
            reps = max(1, block // b.calls)
            c0, r0 = time.process_time(), _cpu(b.remote)
            t0 = time.perf_counter()
            for _ in range(reps):
                b.fn()
            times[name].append((time.perf_counter() - t0) / (reps * b.calls))
            used[name][0] += time.process_time() - c0
            used[name][1] += _cpu(b.remote) - r0
            used[name][2] += reps * b.calls
    if cpu is not None:
        for name, (driver, remote, calls) in used.items():
            cpu[name] = (driver / calls, remote / calls)
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass
class Results:
    """Every figure of a run, keyed by name; several repeats give several values."""

    values: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # what could not be measured, and why

    def note(self, name: str, text: str) -> None:
        self.notes[name] = text

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def add_all(self, values: dict[str, float], cpu: dict[str, tuple[float, float]] | None = None) -> None:
        for name, value in values.items():
            self.add(name, value)
        for name, (driver, remote) in (cpu or {}).items():
            self.add(f"cpu_driver_{name}", driver)
            self.add(f"cpu_remote_{name}", remote)

    def get(self, name: str) -> float:
        return statistics.median(self.values[name]) if name in self.values else float("nan")


class RawPeers:
    """The raw Pyro5 daemon and the raw socket echo server, as subprocesses."""

    def __init__(self) -> None:
        self.pyro = subprocess.Popen(
            [sys.executable, "-c", RAW_PYRO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.echo = subprocess.Popen(
            [sys.executable, "-c", RAW_ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.pyro.stdout is not None and self.echo.stdout is not None
        uri = self.pyro.stdout.readline().strip()
        port = int(self.echo.stdout.readline())
        self.pyro_process = psutil.Process(self.pyro.pid)
        self.marshal = self._proxy(uri, "marshal")
        self.serpent = self._proxy(uri, "serpent")
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @staticmethod
    def _proxy(uri: str, serializer: str) -> Pyro5.client.Proxy:
        proxy = Pyro5.client.Proxy(uri)
        proxy._pyroSerializer = serializer
        proxy._pyroBind()
        return proxy

    def socket_echo(self, data: bytes) -> bytearray:
        self.sock.sendall(struct.pack("!Q", len(data)))
        self.sock.sendall(data)
        (n,) = struct.unpack("!Q", self._receive(8))
        return self._receive(n)

    def _receive(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise ConnectionError("echo server closed")
            got += k
        return buf

    def close(self) -> None:
        self.sock.close()
        for proxy in (self.marshal, self.serpent):
            proxy._pyroRelease()
        for proc in (self.pyro, self.echo):
            proc.kill()
            proc.wait(timeout=10)


def _daemon_of(grid: Grid, pid: int) -> psutil.Process:
    """The daemon process with this pid (checked against the grid's slots)."""
    pids = {s.handle.process.pid for s in grid.slots if s.handle.process is not None}
    if pid not in pids:
        raise RuntimeError(f"pid {pid} is not one of the grid's daemons {sorted(pids)}")
    return psutil.Process(pid)


# -- the sections ------------------------------------------------------------------------------
def bench_calls(res: Results, peers: RawPeers, grid: Grid, quick: bool) -> None:
    sid = grid.publish(Bench())
    proxy = grid.acquire_service(sid)
    daemon = [_daemon_of(grid, proxy.pid().get())]
    raw = [peers.pyro_process]
    block, rounds = (100, 8) if quick else (200, 15)
    pipe = 500 if quick else 1000

    def pipelined() -> None:
        for result in [proxy.noop() for _ in range(pipe)]:
            result.get()

    cpu: dict[str, tuple[float, float]] = {}
    times = interleaved(
        {
            "raw_serpent": Timed(peers.serpent.noop, remote=raw),
            "raw_marshal": Timed(peers.marshal.noop, remote=raw),
            "grid_sync": Timed(lambda: proxy.noop().get(), remote=daemon),
            "pipelined": Timed(pipelined, calls=pipe, remote=daemon),
        },
        block,
        rounds,
        cpu=cpu,
    )
    res.add_all(times, cpu)
    grid.release_service(proxy)
    grid.terminate(sid)

    # What the stdlib Future costs per call (a Result is one): made, run, settled, read.
    def future() -> None:
        f: concurrent.futures.Future[None] = concurrent.futures.Future()
        f.set_running_or_notify_cancel()
        f.set_result(None)
        f.result()

    n = 20_000
    res.add("future_cost", statistics.median(timeit.repeat(future, number=n, repeat=7)) / n)


def bench_payloads(res: Results, peers: RawPeers, grid: Grid, quick: bool) -> None:
    sid = grid.publish(Bench())
    proxy = grid.acquire_service(sid)
    for size in (1 << 10, MB, 8 * MB):
        array = np.random.default_rng(1).random(size // 8)
        data = array.tobytes()
        back = proxy.echo(array).get()
        assert np.array_equal(back, array)
        block = {1 << 10: 100, MB: 10, 8 * MB: 3}[size]
        rounds = 5 if quick else 9
        times = interleaved(
            {
                f"echo_grid_{size}": Timed(lambda: proxy.echo(array).get()),  # noqa: B023
                f"echo_socket_{size}": Timed(lambda: peers.socket_echo(data)),  # noqa: B023
                f"echo_pyro_marshal_{size}": Timed(lambda: peers.marshal.echo(data)),  # noqa: B023
            },
            block,
            rounds,
            warmup=2,
        )
        res.add_all(times)
    grid.release_service(proxy)
    grid.terminate(sid)


def bench_fanout_and_start(res: Results, quick: bool) -> None:
    me = psutil.Process()
    others = {p.pid for p in me.children()}
    # The peer of the 4-server broadcast: 4 worker processes, started once, one no-op each.
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_noop, range(4))
        workers = [p for p in me.children() if p.pid not in others]
        for n in (1, 2, 4, 8):
            t0 = time.perf_counter()
            grid = Grid([Host("localhost", n_cpu=n)], status_file=False)
            t1 = time.perf_counter()
            try:
                sid = grid.publish(Bench())
                t2 = time.perf_counter()
                res.add(f"start_{n}", t1 - t0)
                res.add(f"start_publish_{n}", t2 - t0)
                one = grid.publish(Bench())
                proxy = grid.acquire_service(one)
                daemons = [psutil.Process(s.handle.process.pid) for s in grid.slots if s.handle.process is not None]
                block, rounds = (30, 6) if quick else (50, 12)
                fns = {
                    f"bcast_{n}": Timed(lambda: grid.gather(grid.broadcast(sid, "noop")), remote=daemons),  # noqa: B023
                    f"bcast_ref_{n}": Timed(lambda: proxy.noop().get(), remote=daemons),  # noqa: B023
                }
                if n == 4:
                    fns["pool4_map"] = Timed(lambda: pool.map(_noop, range(4)), remote=workers)
                cpu: dict[str, tuple[float, float]] = {}
                res.add_all(interleaved(fns, block, rounds, cpu=cpu), cpu if n == 4 else None)
                grid.release_service(proxy)
                grid.release_all(sid)
            finally:
                grid.terminate()


def bench_pool(res: Results, quick: bool) -> None:
    array = np.random.default_rng(2).random((8 * MB) // 8)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        times = interleaved({"pool_noop": Timed(lambda: pool.apply(_noop))}, 100 if quick else 200, 5 if quick else 9)
        res.add("pool_noop", times["pool_noop"])
        times = interleaved({"pool_echo": Timed(lambda: pool.apply(_echo, (array,)))}, 3, 5 if quick else 9, warmup=2)
        res.add("pool_echo_8M", times["pool_echo"])


def bench_idle_and_memory(res: Results, quick: bool) -> None:
    with Grid([Host("localhost", n_cpu=2)], status_file=False) as grid:
        sid = grid.publish(Bench())
        proxy = grid.acquire_service(sid)
        me = psutil.Process()
        daemon = _daemon_of(grid, proxy.pid().get())
        daemons = [psutil.Process(s.handle.process.pid) for s in grid.slots if s.handle.process is not None]
        window = 2.0 if quick else 5.0
        time.sleep(2.0)  # past any linger after the last call (idle means idle)
        before_driver, before_daemons = _cpu([me]), _cpu(daemons)
        time.sleep(window)
        res.add("idle_cpu_driver", (_cpu([me]) - before_driver) / window)
        res.add("idle_cpu_daemons", (_cpu(daemons) - before_daemons) / window / len(daemons))
        calls = 20_000 if quick else 100_000
        chunk = 1000
        for _ in range(5):  # warm up: allocator pools, caches
            for r in [proxy.echo(i) for i in range(chunk)]:
                r.get()
        # ... and one call longer than the new daemon's takeover delay (5 ms): the first such
        # batch leaves the connection's first thread parked for the connection's life and a
        # new reader thread reads on. That happens once, not per call; the run measures growth.
        proxy.nap(0.05).get()
        gc.collect()
        rss = (me.memory_info().rss, daemon.memory_info().rss)
        threads = (me.num_threads(), daemon.num_threads())
        peak = list(threads)
        done = 0
        while done < calls:  # half pipelined, half synchronous
            for r in [proxy.echo(i) for i in range(chunk // 2)]:
                r.get()
            for i in range(chunk // 2):
                proxy.echo(i).get()
            done += chunk
            peak = [max(peak[0], me.num_threads()), max(peak[1], daemon.num_threads())]
        gc.collect()
        res.add("calls_for_memory", calls)
        res.add("rss_driver_growth", me.memory_info().rss - rss[0])
        res.add("rss_daemon_growth", daemon.memory_info().rss - rss[1])
        res.add("rss_driver", me.memory_info().rss)
        res.add("rss_daemon", daemon.memory_info().rss)
        res.add("threads_driver_growth", me.num_threads() - threads[0])
        res.add("threads_daemon_growth", daemon.num_threads() - threads[1])
        res.add("threads_driver_peak", peak[0] - threads[0])
        res.add("threads_daemon_peak", peak[1] - threads[1])
        res.add("threads_driver", me.num_threads())
        res.add("threads_daemon", daemon.num_threads())
        grid.release_service(proxy)


# -- issues 18 and 19: fan-out against the floor, wait latency, start and memory, scale ----------
def _descendants() -> dict[int, psutil.Process]:
    """This process's descendants, by pid."""
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def _alive(procs: Sequence[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (a zombie counts as gone: it holds nothing but its pid)."""
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _end(procs: Sequence[psutil.Process], grace: float = 5.0) -> list[str]:
    """End by pid those of ``procs`` still running ``grace`` seconds on; say which there were."""
    deadline = time.monotonic() + grace
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _alive(procs)
    said = []
    for proc in left:
        try:
            said.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
            proc.kill()  # psutil checks the pid is still this process
        except psutil.NoSuchProcess:
            pass
    return said


def _pss(procs: Sequence[psutil.Process]) -> float:
    """Pss bytes summed over ``procs``."""
    total = 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
        except psutil.NoSuchProcess:
            pass
    return total


def _why(exc: BaseException) -> str:
    return f"could not start: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]


def _start_grid(n: int, start_timeout: float) -> tuple[Grid, str, float, float]:
    """A grid of ``n`` local slots with a ``Bench`` published: (grid, service id, start, start + publish)."""
    t0 = time.perf_counter()
    grid = Grid([Host("localhost", n_cpu=n)], status_file=False, start_timeout=start_timeout)
    t1 = time.perf_counter()
    try:
        sid = grid.publish(Bench())
    except BaseException:
        grid.terminate()
        raise
    return grid, sid, t1 - t0, time.perf_counter() - t0


def rounds_interleaved(
    fns: dict[str, tuple[Callable[[], Any], Callable[[], float]]],
    reps: int = 0,
    blocks: int = 9,
    warmup: int = 2,
    budget: float = 60.0,
) -> dict[str, tuple[float, float]]:
    """Per function: (median seconds per round over its blocks, median CPU seconds per round by
    its clock over its blocks). The functions take their blocks in turn.

    A block is ``reps`` rounds; with ``reps=0`` each function gets as many as take about 0.2 s
    (from its last warm-up round), and there are fewer blocks when ``blocks`` of
    them would take longer than ``budget`` seconds (at least one). Medians, not means: on a
    shared machine a burst of other work inflates the blocks it falls on, wall and CPU alike.
    """
    took = dict.fromkeys(fns, 0.0)
    for name, (fn, _) in fns.items():
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            took[name] = time.perf_counter() - t0
    count = {name: reps or max(1, min(1000, round(0.2 / max(took[name], 1e-6)))) for name in fns}
    if not reps:
        blocks = max(1, min(blocks, int(budget / max(sum(count[k] * took[k] for k in fns), 1e-6))))
        said = ", ".join(f"{k} {took[k] * 1e3:,.1f} ms x {count[k]}" for k in fns)
        print(f"      a round: {said}; {blocks} blocks", file=sys.stderr, flush=True)
    walls: dict[str, list[float]] = {name: [] for name in fns}
    cpus: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(blocks):
        for name, (fn, clock) in fns.items():
            c0, t0 = clock(), time.perf_counter()
            for _ in range(count[name]):
                fn()
            walls[name].append((time.perf_counter() - t0) / count[name])
            cpus[name].append((clock() - c0) / count[name])
    return {name: (statistics.median(walls[name]), statistics.median(cpus[name])) for name in fns}


def bench_fanout(res: Results, sizes: Sequence[int], quick: bool, start_timeout: float, round_timeout: float) -> None:
    """N-way broadcast + gather of a no-op: the grid against the floor, interleaved, at each N.

    The grid's round is ``gather(broadcast(sid, "noop"))`` then ``release_all(sid)``; its CPU is
    ``time.process_time`` (every driver thread). The floor's CPU is ``time.thread_time`` of its
    one thread (the grid's idle threads run meanwhile and are not the floor's cost).
    """
    base = threading.active_count()  # the driver's own threads, before any grid of this section
    for n in sizes:
        floor: Floor | None = None
        grid: Grid | None = None
        before = _descendants()
        try:
            floor = Floor(n)
            fns: dict[str, tuple[Callable[[], Any], Callable[[], float]]] = {
                f"fan_floor_{n}": (floor.broadcast_gather, time.thread_time)
            }
            res.add(f"fan_threads_base_{n}", base)
            try:
                grid, sid, _, took = _start_grid(n, start_timeout)
            except Exception as exc:  # noqa: BLE001 -- any failure to start is a figure of the run
                res.note(f"fan_grid_{n}", _why(exc))
                print(f"    {n}: the grid {_why(exc)}", file=sys.stderr, flush=True)
            else:
                print(f"    {n}: the grid started and published in {took:.1f} s", file=sys.stderr, flush=True)

                def round_(g: Grid = grid, s: str = sid) -> None:
                    g.gather(g.broadcast(s, "noop"), timeout=round_timeout)
                    g.release_all(s)

                fns[f"fan_grid_{n}"] = (round_, time.process_time)
            print(f"    {n}: measuring {', '.join(fns)}", file=sys.stderr, flush=True)
            blocks, budget = (5, 20.0) if quick else (15, 60.0)
            try:
                figures = rounds_interleaved(fns, blocks=blocks, budget=budget)
            except TimeoutError as exc:
                res.note(f"fan_grid_{n}", f"a round took over {round_timeout:g} s ({exc})")
                print(f"    {n}: a round of the grid took over {round_timeout:g} s", file=sys.stderr, flush=True)
                del fns[f"fan_grid_{n}"]
                if grid is not None:  # its daemons' load would land on the floor alone
                    res.add(f"fan_threads_{n}", threading.active_count())
                    grid.terminate()
                figures = rounds_interleaved(fns, blocks=blocks, budget=budget)
            if f"fan_threads_{n}" not in res.values and grid is not None:
                res.add(f"fan_threads_{n}", threading.active_count())
            for name, (wall, cpu) in figures.items():
                res.add(name, wall)
                res.add(f"cpu_{name}", cpu / n)
        finally:
            if grid is not None:
                grid.terminate()
            if floor is not None:
                floor.close()
            left = _end([p for pid, p in _descendants().items() if pid not in before])
            if left:
                res.note(f"fan_left_{n}", f"left running after terminate (ended by the bench): {left}")


def bench_latency(res: Results, quick: bool) -> None:
    """How soon ``wait([r])`` and ``as_completed([r])`` see a sync no-op's result, against ``r.result()``."""
    with Grid([Host("localhost", n_cpu=1)], status_file=False) as grid:
        sid = grid.publish(Bench())
        proxy = grid.acquire_service(sid)

        def by_wait() -> None:
            r = proxy.noop()
            concurrent.futures.wait([r])
            r.result()

        def by_as_completed() -> None:
            r = proxy.noop()
            for f in concurrent.futures.as_completed([r]):
                f.result()

        cpu: dict[str, tuple[float, float]] = {}
        times = interleaved(
            {
                "lat_result": Timed(lambda: proxy.noop().result()),
                "lat_wait": Timed(by_wait),
                "lat_as_completed": Timed(by_as_completed),
            },
            100 if quick else 200,
            5 if quick else 9,
            cpu=cpu,
        )
        res.add_all(times, cpu)
        grid.release_service(proxy)


def bench_start(res: Results, sizes: Sequence[int], quick: bool, start_timeout: float) -> None:
    """Start + publish of N local slots and the Pss of an idle slot, against starting N floor processes.

    A slot's memory is the Pss summed over every process the grid started (whatever their
    shape: a daemon per slot, or a host daemon and its workers) over the number of slots,
    taken a second after publish; the floor's is that of its launcher and echo processes.
    """
    for n in sizes:
        for _ in range(1 if quick else 3):
            floor: Floor | None = None
            grid: Grid | None = None
            before = _descendants()
            try:
                floor = Floor(n)
                res.add(f"start_floor_{n}", floor.start_time)
                time.sleep(1.0)
                res.add(f"pss_floor_{n}", floor.pss() / n)
                floor.close()
                floor = None
                ours = set(_descendants())
                try:
                    grid, _, start, published = _start_grid(n, start_timeout)
                except Exception as exc:  # noqa: BLE001 -- any failure to start is a figure of the run
                    res.note(f"start_grid_{n}", _why(exc))
                    break
                res.add(f"start_grid_{n}", start)
                res.add(f"start_publish_grid_{n}", published)
                time.sleep(1.0)  # idle
                res.add(f"pss_grid_{n}", _pss([p for pid, p in _descendants().items() if pid not in ours]) / n)
            finally:
                if grid is not None:
                    grid.terminate()
                if floor is not None:
                    floor.close()
                left = _end([p for pid, p in _descendants().items() if pid not in before])
                if left:
                    res.note(f"start_left_{n}", f"left running after terminate (ended by the bench): {left}")


def bench_scale(res: Results, n_floor: int, n_grid: int, start_timeout: float) -> None:
    """The floor at ``n_floor`` processes (and at ``n_grid``); with ``n_grid``, a grid of that many
    local slots: start, three broadcast + gather rounds, terminate, then no process of it and no
    folder of it may be left.

    The grid's temporary folders are made in a folder of the bench's own (``TMPDIR`` and
    ``tempfile.tempdir`` point there while the grid lives), so whatever is left in it is the grid's.
    """
    for n in sorted({n_floor, n_grid} - {0}):
        before = _descendants()
        floor = Floor(n)
        try:
            res.add(f"scale_start_floor_{n}", floor.start_time)
            figures = rounds_interleaved({"floor": (floor.broadcast_gather, time.thread_time)}, reps=3, blocks=5)
            res.add(f"scale_floor_{n}", figures["floor"][0])
            res.add(f"cpu_scale_floor_{n}", figures["floor"][1] / n)
            res.add(f"scale_pss_floor_{n}", floor.pss() / n)
        finally:
            floor.close()
            res.add(f"scale_left_floor_{n}", len(_alive([p for pid, p in _descendants().items() if pid not in before])))
            _end([p for pid, p in _descendants().items() if pid not in before])
    if not n_grid:
        return
    n = n_grid
    tmp = tempfile.mkdtemp(prefix="isdgrid-bench-")
    saved = (tempfile.tempdir, os.environ.get("TMPDIR"))
    tempfile.tempdir = os.environ["TMPDIR"] = tmp
    grid: Grid | None = None
    procs: list[psutil.Process] = []
    ours = set(_descendants())
    try:
        try:
            grid, sid, start, published = _start_grid(n, start_timeout)
        except Exception as exc:  # noqa: BLE001 -- any failure to start is a figure of the run
            res.note(f"scale_grid_{n}", _why(exc))
            return
        procs = [p for pid, p in _descendants().items() if pid not in ours]
        res.add(f"scale_start_grid_{n}", start)
        res.add(f"scale_start_publish_grid_{n}", published)
        res.add(f"scale_threads_grid_{n}", threading.active_count())
        time.sleep(1.0)
        res.add(f"scale_pss_grid_{n}", _pss(procs) / n)

        def round_(g: Grid = grid, s: str = sid) -> None:
            g.gather(g.broadcast(s, "noop"))
            g.release_all(s)

        wall, cpu = rounds_interleaved({"grid": (round_, time.process_time)}, reps=1, blocks=3, warmup=0)["grid"]
        res.add(f"scale_grid_{n}", wall)
        res.add(f"cpu_scale_grid_{n}", cpu / n)
        # What waiting costs the driver: a gather of calls that take LONG_CALL seconds, against
        # the same time idle (heartbeats only), in driver CPU per second.
        res.add(f"scale_idle_cpu_grid_{n}", cpu_share(lambda: time.sleep(LONG_CALL)))
        res.add(f"scale_gather_long_cpu_grid_{n}", cpu_share(lambda: round_long(grid, sid)))
        t0 = time.perf_counter()
        grid.terminate()
        res.add(f"scale_terminate_grid_{n}", time.perf_counter() - t0)
        res.add(
            f"scale_left_grid_{n}", len(_alive([*procs, *(p for pid, p in _descendants().items() if pid not in ours)]))
        )
        res.add(f"scale_folders_grid_{n}", len(os.listdir(tmp)))
    finally:
        if grid is not None:
            grid.terminate()
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        left = _end([*procs, *(p for pid, p in _descendants().items() if pid not in ours)], grace=1.0)
        if left:
            res.note(f"scale_left_{n}", f"left running after terminate (ended by the bench): {left}")
        shutil.rmtree(tmp, ignore_errors=True)


LONG_CALL = 3.0  # seconds each call of the scale section's long gather takes


def cpu_share(fn: Callable[[], Any]) -> float:
    """The driver's CPU seconds per second of wall time while ``fn()`` runs (every thread)."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return (time.process_time() - c0) / (time.perf_counter() - t0)


def round_long(grid: Grid, sid: str) -> None:
    """A broadcast of ``nap(LONG_CALL)`` and its gather: the driver waits for most of it."""
    grid.gather(grid.broadcast(sid, "nap", LONG_CALL), timeout=LONG_CALL + 120)
    grid.release_all(sid)


class _Seen(logging.Handler):
    """Notes when the grid logs that a slot was lost, and that it was respawned (``time.perf_counter``)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.times: dict[str, float] = {}
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for key, head in (("lost", "host "), ("respawned", "respawned ")):
            if text.startswith(head):
                label = text[len(head) :].split(" ", 1)[0].rstrip(":")
                with self.changed:
                    self.times.setdefault(f"{key} {label}", time.perf_counter())
                    self.changed.notify_all()

    def wait(self, key: str, timeout: float) -> float | None:
        """When ``key`` ("lost LABEL" or "respawned LABEL") was logged; None if not within ``timeout`` s."""
        with self.changed:
            self.changed.wait_for(lambda: key in self.times, timeout)
            return self.times.get(key)


def bench_respawn(res: Results, n: int, kills: int, start_timeout: float) -> None:
    """``kill -9`` of one slot worker of a running grid (``respawn=True``): how soon the loss is
    seen, and how soon after that the slot serves a call again.

    The loss is seen when the grid logs it (the slot is marked lost: its calls fail with
    ``HostLostError``); the slot serves again when a broadcast + gather returns a reply from
    the new worker (its pid differs from the killed one). Taken ``kills`` times, on different
    slots, one at a time.
    """
    seen = _Seen()
    logging.getLogger("isdgrid").addHandler(seen)
    before = _descendants()
    grid: Grid | None = None
    try:
        grid = Grid([Host("localhost", n_cpu=n)], status_file=False, start_timeout=start_timeout, respawn=True)
        sid = grid.publish(Bench())
        grid.gather(grid.broadcast(sid, "pid"))
        grid.release_all(sid)
        for k in range(kills):
            slot = grid.slots[k % n]
            label, pid = slot.label, slot.handle.process.pid
            seen.times.pop(f"lost {label}", None)
            seen.times.pop(f"respawned {label}", None)
            t_kill = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            t_lost = seen.wait(f"lost {label}", 30.0)
            t_back = seen.wait(f"respawned {label}", 60.0)
            if t_lost is None or t_back is None:
                res.note("respawn", f"{label}: {'no loss' if t_lost is None else 'no respawn'} logged in time")
                return
            pids = grid.gather(grid.broadcast(sid, "pid"), timeout=60.0)
            t_served = time.perf_counter()
            grid.release_all(sid)
            if pid in pids or len(set(pids)) != n:
                res.note("respawn", f"{label}: the round after the respawn did not reach a new worker ({pids})")
                return
            res.add("respawn_seen", t_lost - t_kill)
            res.add("respawn_back", t_back - t_lost)
            res.add("respawn_serving", t_served - t_lost)
    except Exception as exc:  # noqa: BLE001 -- a failure is a figure of the run
        res.note("respawn", _why(exc))
    finally:
        logging.getLogger("isdgrid").removeHandler(seen)
        if grid is not None:
            grid.terminate()
        left = _end([p for pid, p in _descendants().items() if pid not in before])
        if left:
            res.note("respawn_left", f"left running after terminate (ended by the bench): {left}")


HUNG_KINDS = ("stopped", "stuck")


def bench_hung(res: Results, counts: Sequence[int], stop_timeout: float, start_timeout: float) -> None:
    """``terminate()`` of a grid with k hung slot workers, and with its host daemon SIGSTOPped.

    Per case: a grid of max(8, k + 2) local slots with a service published, k of its workers
    hung, then ``terminate()`` timed (``stop_timeout`` as given), and any process of the grid
    still there afterwards counted, then ended by the bench. Hung is either *stopped*
    (``SIGSTOP`` to ``slot.handle.process.pid``, as issue 18 measured) or *stuck* (a call that
    never returns and holds the GIL, so the worker runs no signal handler and reads no stdin:
    only SIGKILL ends it). Issue 18's bound: ``stop_timeout`` + 1 s however many are hung.
    The last case is the host daemon itself stopped (it then takes no command: the driver
    kills it and its workers at the deadline).
    """
    cases = [(kind, k) for kind in HUNG_KINDS for k in counts] + [("host", 0)]
    for kind, k in cases:
        key = f"hung_{kind}_{k}" if k else "hung_host"
        before = _descendants()
        grid: Grid | None = None
        try:
            n = max(8, k + 2)
            grid = Grid([Host("localhost", n_cpu=n)], status_file=False, start_timeout=start_timeout,
                        stop_timeout=stop_timeout)
            sid = grid.publish(Bench())
            ours = [p for pid, p in _descendants().items() if pid not in before]
            if kind == "stopped":
                for slot in grid.slots[:k]:
                    os.kill(slot.handle.process.pid, signal.SIGSTOP)
            elif kind == "stuck":
                proxies = [grid.acquire_service(sid) for _ in range(k)]
                for proxy in proxies:
                    proxy.stuck()
                time.sleep(0.5)  # each call has reached its worker
            else:
                host = grid.slots[0].handle.host_daemon
                os.kill(host.process.pid, signal.SIGSTOP)
            t0 = time.perf_counter()
            grid.terminate()
            res.add(key, time.perf_counter() - t0)
            # A worker killed by pid (not a child of the driver) may take a few ms to be gone.
            res.add(f"{key}_exiting", len(_alive(ours)))
            res.add(f"{key}_left", len(_end(ours, grace=1.0)))
        except Exception as exc:  # noqa: BLE001 -- a failure is a figure of the run
            res.note(key, _why(exc))
        finally:
            if grid is not None:
                grid.terminate()
            left = _end([p for pid, p in _descendants().items() if pid not in before], grace=0.0)
            if left:
                res.note(f"{key}_left", f"left running after terminate (ended by the bench): {left}")


# -- report ------------------------------------------------------------------------------------
def _us(x: float) -> str:
    return f"{x * 1e6:,.0f} us"


def _us1(x: float) -> str:
    return f"{x * 1e6:,.1f} us"


def _ms(x: float) -> str:
    return f"{x * 1e3:,.2f} ms"


Getter = Callable[[str], float]


def _targets(g: Getter) -> list[tuple[str, float, str, bool]]:
    """Issue 10's targets: (what, measured, shown, met)."""
    calls = g("calls_for_memory")
    sync = g("grid_sync") / g("raw_marshal")
    rate = g("raw_marshal") / g("pipelined")
    bcast = g("bcast_4") / g("pool4_map")
    echo = g(f"echo_grid_{8 * MB}") / g(f"echo_socket_{8 * MB}")
    threads = max(
        g("threads_driver_growth"), g("threads_daemon_growth"), g("threads_driver_peak"), g("threads_daemon_peak")
    )
    rss = max(g("rss_driver_growth"), g("rss_daemon_growth")) / 1e6
    return [
        ("sync no-op call <= 1.3x raw Pyro5 sync call (marshal)", sync, f"{sync:.2f}x", sync <= 1.3),
        ("pipelined calls on one proxy >= 10x the raw Pyro5 sync call rate", rate, f"{rate:.1f}x", rate >= 10),
        (
            "broadcast+gather over 4 servers <= 1.25x multiprocessing.Pool(4).map of 4 items",
            bcast,
            f"{bcast:.2f}x",
            bcast <= 1.25,
        ),
        ("8 MB numpy echo <= 1.5x raw socket echo", echo, f"{echo:.2f}x", echo <= 1.5),
        (
            f"threads flat over {calls:,.0f} calls (none added, driver and daemon)",
            threads,
            f"{g('threads_driver_growth'):+.0f} / {g('threads_daemon_growth'):+.0f}",
            threads <= 0,
        ),
        (
            f"RSS flat over {calls:,.0f} calls (growth <= {RSS_FLAT:g} MB, driver and daemon)",
            rss,
            f"{g('rss_driver_growth') / 1e6:+.1f} / {g('rss_daemon_growth') / 1e6:+.1f} MB",
            rss <= RSS_FLAT,
        ),
    ]


def run_facts(args: argparse.Namespace, load: tuple[float, float]) -> dict[str, Any]:
    """What a run's figures depend on besides the code: kept with them in the JSON."""
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pyro5": Pyro5.__version__,
        "numpy": np.__version__,
        "isdgrid": os.path.dirname(isdgrid.__file__),
        "isdgrid_version": isdgrid.__version__,
        "load": list(load),
        "repeat": args.repeat,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def report(res: Results, facts: dict[str, Any]) -> str:
    g = res.get
    bcast_cpu = g("cpu_driver_bcast_4") + g("cpu_remote_bcast_4")
    pool_cpu = g("cpu_driver_pool4_map") + g("cpu_remote_pool4_map")
    lines = [
        f"Machine: {facts['cores']} cores, Python {facts['python']}, Pyro5 {facts['pyro5']}, "
        f"numpy {facts['numpy']}; isdgrid {facts['isdgrid_version']} from {facts['isdgrid']}; "
        f"{facts['date']}, load average {facts['load'][0]:.2f} at start, {facts['load'][1]:.2f} at end; "
        f"median of {facts['repeat']} run(s){' (--quick)' if facts['quick'] else ''}.",
        "",
        "| measurement | isdgrid | peer | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| sync no-op call vs raw Pyro5 (marshal) | {_us(g('grid_sync'))} | {_us(g('raw_marshal'))} | "
        f"{g('grid_sync') / g('raw_marshal'):.2f}x |",
        f"| sync no-op call vs raw Pyro5 (serpent) | {_us(g('grid_sync'))} | {_us(g('raw_serpent'))} | "
        f"{g('grid_sync') / g('raw_serpent'):.2f}x |",
        f"| driver CPU per sync no-op call vs raw Pyro5 (marshal) | {_us(g('cpu_driver_grid_sync'))} | "
        f"{_us(g('cpu_driver_raw_marshal'))} | {g('cpu_driver_grid_sync') / g('cpu_driver_raw_marshal'):.2f}x |",
        f"| server CPU per sync no-op call: daemon vs raw Pyro5 daemon | {_us(g('cpu_remote_grid_sync'))} | "
        f"{_us(g('cpu_remote_raw_marshal'))} | {g('cpu_remote_grid_sync') / g('cpu_remote_raw_marshal'):.2f}x |",
        f"| pipelined calls on one proxy (per call) | {_us1(g('pipelined'))} ({1 / g('pipelined'):,.0f}/s) | "
        f"{_us(g('raw_marshal'))} ({1 / g('raw_marshal'):,.0f}/s raw sync) | "
        f"{g('raw_marshal') / g('pipelined'):.1f}x the rate |",
        f"| CPU per pipelined call, driver / daemon | {_us1(g('cpu_driver_pipelined'))} / "
        f"{_us1(g('cpu_remote_pipelined'))} | | |",
        f"| stdlib Future() + set_running_or_notify_cancel + set_result + result | {_us1(g('future_cost'))} | | |",
        f"| sync no-op call vs multiprocessing.Pool.apply | {_us(g('grid_sync'))} | {_us(g('pool_noop'))} | "
        f"{g('grid_sync') / g('pool_noop'):.2f}x |",
    ]
    for n in (1, 2, 4, 8):
        lines.append(
            f"| broadcast+gather over {n} servers vs one call (same grid) | {_us(g(f'bcast_{n}'))} | "
            f"{_us(g(f'bcast_ref_{n}'))} | {g(f'bcast_{n}') / g(f'bcast_ref_{n}'):.2f}x |"
        )
    lines += [
        f"| broadcast+gather over 4 servers vs multiprocessing.Pool(4).map of 4 no-ops | {_us(g('bcast_4'))} | "
        f"{_us(g('pool4_map'))} | {g('bcast_4') / g('pool4_map'):.2f}x |",
        f"| CPU per 4-server broadcast+gather vs Pool(4).map, driver + servers | "
        f"{_us(g('cpu_driver_bcast_4'))} + {_us(g('cpu_remote_bcast_4'))} | "
        f"{_us(g('cpu_driver_pool4_map'))} + {_us(g('cpu_remote_pool4_map'))} | "
        f"{bcast_cpu / pool_cpu:.2f}x |",
    ]
    for size, label in ((1 << 10, "1 KB"), (MB, "1 MB"), (8 * MB, "8 MB")):
        lines.append(
            f"| {label} numpy echo vs raw socket echo | {_ms(g(f'echo_grid_{size}'))} | "
            f"{_ms(g(f'echo_socket_{size}'))} | {g(f'echo_grid_{size}') / g(f'echo_socket_{size}'):.2f}x |"
        )
        lines.append(
            f"| {label} numpy echo vs raw Pyro5 (marshal) bytes echo | {_ms(g(f'echo_grid_{size}'))} | "
            f"{_ms(g(f'echo_pyro_marshal_{size}'))} | {g(f'echo_grid_{size}') / g(f'echo_pyro_marshal_{size}'):.2f}x |"
        )
    lines.append(
        f"| 8 MB numpy echo vs multiprocessing.Pool.apply | {_ms(g(f'echo_grid_{8 * MB}'))} | "
        f"{_ms(g('pool_echo_8M'))} | {g(f'echo_grid_{8 * MB}') / g('pool_echo_8M'):.2f}x |"
    )
    for n in (1, 2, 4, 8):
        lines.append(
            f"| start {n} local slot{'s' if n > 1 else ''} + publish | {_ms(g(f'start_publish_{n}'))} "
            f"(start {_ms(g(f'start_{n}'))}) | | |"
        )
    lines += [
        f"| idle CPU, driver / each daemon | {g('idle_cpu_driver') * 100:.2f} % / "
        f"{g('idle_cpu_daemons') * 100:.2f} % | | |",
        f"| RSS growth over {g('calls_for_memory'):,.0f} calls, driver / daemon | "
        f"{g('rss_driver_growth') / 1e6:+.1f} MB / {g('rss_daemon_growth') / 1e6:+.1f} MB "
        f"(of {g('rss_driver') / 1e6:.0f} / {g('rss_daemon') / 1e6:.0f} MB) | | |",
        f"| threads added over those calls, driver / daemon | {g('threads_driver_growth'):+.0f} / "
        f"{g('threads_daemon_growth'):+.0f} (of {g('threads_driver'):.0f} / {g('threads_daemon'):.0f}; "
        f"at most {g('threads_driver_peak'):+.0f} / {g('threads_daemon_peak'):+.0f} on the way) | | |",
        "",
        "| target (issue 10) | measured | met |",
        "| --- | ---: | :---: |",
    ]
    for text, value, shown, met in _targets(g):
        if value == value:  # not nan: the section ran
            lines.append(f"| {text} | {shown} | {'yes' if met else 'NO'} |")
    return "\n".join(_drop_empty_tables([line for line in lines if "nan" not in line]))  # sections not run


def _sizes(res: Results, prefix: str) -> list[int]:
    """The N of every figure or note named ``prefix`` + N."""
    found = {key[len(prefix) :] for key in [*res.values, *res.notes] if key.startswith(prefix)}
    return sorted(int(x) for x in found if x.isdigit())


def _x(num: float, den: float) -> str:
    return f"{num / den:.2f}x"


def report_scale(res: Results) -> str:
    """The tables of issues 18 and 19: every fan-out figure next to the floor's, and their targets."""
    g = res.get
    lines = (
        [
            "Fan-out against the floor (one driver thread, N fork-started echo processes, selectors; "
            "scripts/floor.py): a round is gather(broadcast(sid, 'noop')) + release_all(sid).",
            "",
        ]
        if _sizes(res, "fan_floor_")
        else []
    )
    lines += [
        "| N | round, isdgrid | round, floor | ratio | driver CPU per call, isdgrid | floor | ratio | "
        "driver threads with the grid (before it) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in _sizes(res, "fan_floor_"):
        floor, cpu_floor = g(f"fan_floor_{n}"), g(f"cpu_fan_floor_{n}")
        if f"fan_grid_{n}" in res.values:
            grid, cpu_grid = g(f"fan_grid_{n}"), g(f"cpu_fan_grid_{n}")
            lines.append(
                f"| {n} | {_ms(grid)} | {_ms(floor)} | {_x(grid, floor)} | {_us(cpu_grid)} | {_us(cpu_floor)} | "
                f"{_x(cpu_grid, cpu_floor)} | {g(f'fan_threads_{n}'):.0f} ({g(f'fan_threads_base_{n}'):.0f}) |"
            )
        else:
            why = res.notes.get(f"fan_grid_{n}", "not run")
            lines.append(f"| {n} | {why} | {_ms(floor)} | | | {_us(cpu_floor)} | | |")
    lines += [
        "",
        "| waiting for one sync no-op call (one server) | latency | driver CPU | ratio to r.result() |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label in (
        ("lat_result", "r.result()"),
        ("lat_wait", "concurrent.futures.wait([r])"),
        ("lat_as_completed", "concurrent.futures.as_completed([r])"),
    ):
        lines.append(f"| {label} | {_us(g(key))} | {_us(g(f'cpu_driver_{key}'))} | {_x(g(key), g('lat_result'))} |")
    lines += [
        "",
        "| N local slots | start + publish (start) | start of N floor processes | ratio | "
        "Pss per idle slot | Pss per floor process | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in _sizes(res, "start_floor_"):
        floor, pss_floor = g(f"start_floor_{n}"), g(f"pss_floor_{n}")
        if f"start_grid_{n}" in res.values:
            start, pss = g(f"start_publish_grid_{n}"), g(f"pss_grid_{n}")
            lines.append(
                f"| {n} | {_ms(start)} ({_ms(g(f'start_grid_{n}'))}) | {_ms(floor)} | {_x(start, floor)} | "
                f"{pss / MB:.1f} MB | {pss_floor / MB:.1f} MB | {_x(pss, pss_floor)} |"
            )
        else:
            why = res.notes.get(f"start_grid_{n}", "not run")
            lines.append(f"| {n} | {why} | {_ms(floor)} | | | {pss_floor / MB:.1f} MB | |")
    for n in _sizes(res, "scale_floor_"):
        grid_ran = f"scale_grid_{n}" in res.values

        def pair(key: str, fmt: Callable[[float], str], n: int = n) -> str:
            """The grid's cell, the floor's cell and the ratio (``-`` where the grid did not run)."""
            mine, floor = g(f"{key}_grid_{n}"), g(f"{key}_floor_{n}")
            cells = (fmt(mine), fmt(floor), _x(mine, floor)) if mine == mine else ("-", fmt(floor), "-")
            return " | ".join(cells)

        lines += [
            "",
            f"| at {n:,} | isdgrid | floor | ratio |",
            "| --- | ---: | ---: | ---: |",
            f"| start (floor: fork {n:,} echo processes and connect) | {pair('scale_start', _s)} |",
            f"| broadcast+gather (median of 3; floor: of 15) | {pair('scale', _ms)} |",
            f"| driver CPU per call | {pair('cpu_scale', _us)} |",
            f"| Pss per idle slot / process | {pair('scale_pss', lambda x: f'{x / MB:.1f} MB')} |",
        ]
        left_grid = f"{g(f'scale_left_grid_{n}'):.0f}" if grid_ran else "-"
        lines.append(f"| processes left after terminate / close | {left_grid} | {g(f'scale_left_floor_{n}'):.0f} | |")
        if grid_ran:
            lines += [
                f"| start + publish | {_s(g(f'scale_start_publish_grid_{n}'))} | | |",
                f"| driver threads | {g(f'scale_threads_grid_{n}'):.0f} | 1 | |",
                f"| driver CPU while it gathers calls of {LONG_CALL:.0f} s / while idle "
                f"| {g(f'scale_gather_long_cpu_grid_{n}') * 100:.1f}% / {g(f'scale_idle_cpu_grid_{n}') * 100:.1f}% "
                "of a core | | |",
                f"| terminate() | {_s(g(f'scale_terminate_grid_{n}'))} | | |",
                f"| folders left in the grid's TMPDIR | {g(f'scale_folders_grid_{n}'):.0f} | | |",
            ]
        if f"scale_grid_{n}" in res.notes:
            lines.append(f"| the grid at {n:,} slots | {res.notes[f'scale_grid_{n}']} | | |")
    if "respawn_serving" in res.values or "respawn" in res.notes:
        lines += [
            "",
            f"| kill -9 of one slot worker, respawn=True (median of {len(res.values.get('respawn_serving', []))}) "
            "| time |",
            "| --- | ---: |",
            f"| kill -> the grid sees the loss (slot lost, its calls fail) | {_ms(g('respawn_seen'))} |",
            f"| loss seen -> respawned (new worker forked, connected, service re-published) | "
            f"{_ms(g('respawn_back'))} |",
            f"| loss seen -> the slot serves a call again | {_ms(g('respawn_serving'))} |",
        ]
        if "respawn" in res.notes:
            lines.append(f"| {res.notes['respawn']} | |")
    hung = [
        (kind, k, f"hung_{kind}_{k}")
        for kind in HUNG_KINDS
        for k in _sizes(res, f"hung_{kind}_")
        if f"hung_{kind}_{k}" in res.values or f"hung_{kind}_{k}" in res.notes
    ]
    if hung or "hung_host" in res.values or "hung_host" in res.notes:
        lines += [
            "",
            f"| terminate() with hung processes (stop_timeout {g('hung_stop_timeout'):g} s) | terminate() | "
            "processes of the grid still exiting when it returned | left 1 s later |",
            "| --- | ---: | ---: | ---: |",
        ]
        for kind, k, key in [*hung, ("host", 0, "hung_host")]:
            what = _hung_what(kind, k)
            if key in res.values:
                exiting = g(f"{key}_exiting")
                shown = f"{exiting:.0f}" if exiting == exiting else "-"  # not in runs saved before it was counted
                lines.append(f"| {what} | {_s(g(key))} | {shown} | {g(f'{key}_left'):.0f} |")
            elif key in res.notes:
                lines.append(f"| {what} | {res.notes[key]} | | |")
    lines += ["", "| target (issues 18 and 19) | measured | met |", "| --- | ---: | :---: |"]
    for text, value, shown, met in _scale_targets(res):
        if value == value:  # not nan: the section ran
            lines.append(f"| {text} | {shown} | {'yes' if met else 'NO'} |")
    notes = [f"- {key}: {text}" for key, text in sorted(res.notes.items()) if "_left_" in key]
    return "\n".join(_drop_empty_tables([line for line in lines if "nan" not in line] + notes))


def _s(x: float) -> str:
    return f"{x:,.2f} s"


def _scale_targets(res: Results) -> list[tuple[str, float, str, bool]]:
    """Issues 18 and 19's targets measured here: (what, measured, shown, met)."""
    g = res.get
    out = []
    for n in _sizes(res, "fan_grid_"):
        cpu = g(f"cpu_fan_grid_{n}") / g(f"cpu_fan_floor_{n}")
        wall = g(f"fan_grid_{n}") / g(f"fan_floor_{n}")
        out.append((f"driver CPU per call, {n}-way broadcast+gather <= 2x the floor", cpu, f"{cpu:.2f}x", cpu <= 2))
        out.append((f"wall time of the {n}-way broadcast+gather <= 2.5x the floor", wall, f"{wall:.2f}x", wall <= 2.5))
        added = g(f"fan_threads_{n}") - g(f"fan_threads_base_{n}")
        out.append((f"driver threads <= 8 plus the user's own, {n} slots", added, f"+{added:.0f}", added <= 8))
    for key, label in (("lat_wait", "wait([r])"), ("lat_as_completed", "as_completed([r])")):
        ratio = g(key) / g("lat_result")
        out.append((f"{label} <= 1.3x r.result() latency", ratio, f"{ratio:.2f}x", ratio <= 1.3))
    sync = g("grid_sync") / g("raw_marshal")
    out.append(("sync no-op call <= 2.0x raw Pyro5 (marshal)", sync, f"{sync:.2f}x", sync <= 2.0))
    rate = g("raw_marshal") / g("pipelined")
    out.append(("pipelined rate >= 10x raw Pyro5 sync rate", rate, f"{rate:.1f}x", rate >= 10))
    for n, bound in ((8, 0.25), (64, 1.0)):
        start = g(f"start_publish_grid_{n}")
        out.append((f"{n} local slots start + publish <= {bound} s", start, _s(start), start <= bound))
    for n in _sizes(res, "pss_grid_"):
        pss = g(f"pss_grid_{n}") / MB
        out.append((f"memory per idle slot (Pss) <= 4 MB, {n} slots", pss, f"{pss:.1f} MB", pss <= 4))
    for n in _sizes(res, "start_publish_grid_"):
        if n >= 1000:
            start = g(f"start_publish_grid_{n}")
            out.append((f"{n:,} local slots start + publish <= 20 s", start, _s(start), start <= 20))
    for n in _sizes(res, "scale_start_grid_"):
        if n >= 1000:
            start = g(f"scale_start_publish_grid_{n}")
            out.append((f"{n:,} local slots start + publish <= 20 s (scale)", start, _s(start), start <= 20))
            ratio = g(f"scale_grid_{n}") / g(f"scale_floor_{n}")
            out.append((f"{n:,} local slots broadcast+gather <= 3x the floor", ratio, f"{ratio:.2f}x", ratio <= 3))
        left = g(f"scale_left_grid_{n}") + g(f"scale_folders_grid_{n}")
        out.append((f"{n:,} slots: terminate() leaves no process and no folder", left, f"{left:.0f} left", left == 0))
    seen = g("respawn_seen")
    out.append(("a killed worker's loss seen by the driver <= 0.2 s", seen, _ms(seen), seen <= 0.2))
    back = g("respawn_serving")
    what = "respawn of a kill -9ed slot serving again <= 0.3 s after the loss is seen"
    out.append((what, back, _ms(back), back <= 0.3))
    bound = g("hung_stop_timeout") + 1.0
    keys = [(kind, k, f"hung_{kind}_{k}") for kind in HUNG_KINDS for k in _sizes(res, f"hung_{kind}_")]
    for kind, k, key in [*keys, ("host", 0, "hung_host")]:
        took = g(key)
        out.append((f"terminate() with {_hung_what(kind, k)} <= stop_timeout + 1 s", took, _s(took), took <= bound))
        left = g(f"{key}_left")
        if left == left and left:
            out.append((f"terminate() with {_hung_what(kind, k)} leaves no process", left, f"{left:.0f} left", False))
    return out


def _hung_what(kind: str, k: int) -> str:
    if kind == "host":
        return "the host daemon SIGSTOPped"
    workers = f"{k} slot worker{'s' if k > 1 else ''}"
    return f"{workers} SIGSTOPped" if kind == "stopped" else f"{workers} stuck in C code holding the GIL"


def _drop_empty_tables(lines: list[str]) -> list[str]:
    """``lines`` without the header of a table that has no rows (its sections did not run)."""
    out: list[str] = []
    for i, line in enumerate(lines):
        header = line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("| --")
        rule = line.startswith("| --")
        if (header and not _has_row(lines, i + 2)) or (rule and not _has_row(lines, i + 1)):
            continue
        if not line and out and not out[-1]:
            continue
        out.append(line)
    return out


def _has_row(lines: list[str], i: int) -> bool:
    return i < len(lines) and lines[i].startswith("|") and not lines[i].startswith("| --")


# Rows of the before/after table: (what, the figure shown, from a run's getter).
def _fmt(key: str, fmt: Callable[[float], str]) -> Callable[[Getter], str]:
    return lambda g: fmt(g(key))


def _ratio(num: str, den: str, digits: int = 2) -> Callable[[Getter], str]:
    return lambda g: f"{g(num) / g(den):.{digits}f}x"


def _percent(x: float) -> str:
    return f"{x * 100:.2f} %"


def _mb(x: float) -> str:
    return f"{x / 1e6:+.1f} MB"


_COMPARED: list[tuple[str, Callable[[Getter], str]]] = [
    ("sync no-op call", _fmt("grid_sync", _us)),
    ("raw Pyro5 sync no-op call (marshal), the peer", _fmt("raw_marshal", _us)),
    ("sync call / raw Pyro5 (marshal)", _ratio("grid_sync", "raw_marshal")),
    ("driver CPU per sync call", _fmt("cpu_driver_grid_sync", _us)),
    ("daemon CPU per sync call", _fmt("cpu_remote_grid_sync", _us)),
    ("pipelined call (per call)", _fmt("pipelined", _us1)),
    ("pipelined rate / raw Pyro5 sync rate", _ratio("raw_marshal", "pipelined", 1)),
    ("driver CPU per pipelined call", _fmt("cpu_driver_pipelined", _us1)),
    ("broadcast+gather, 1 server", _fmt("bcast_1", _us)),
    ("broadcast+gather, 2 servers", _fmt("bcast_2", _us)),
    ("broadcast+gather, 4 servers", _fmt("bcast_4", _us)),
    ("broadcast+gather, 8 servers", _fmt("bcast_8", _us)),
    ("multiprocessing.Pool(4).map of 4 no-ops, the peer", _fmt("pool4_map", _us)),
    ("broadcast+gather 4 / Pool(4).map", _ratio("bcast_4", "pool4_map")),
    ("CPU per 4-server broadcast+gather, driver", _fmt("cpu_driver_bcast_4", _us)),
    ("CPU per 4-server broadcast+gather, 4 daemons", _fmt("cpu_remote_bcast_4", _us)),
    ("1 KB numpy echo", _fmt(f"echo_grid_{1 << 10}", _ms)),
    ("1 MB numpy echo", _fmt(f"echo_grid_{MB}", _ms)),
    ("8 MB numpy echo", _fmt(f"echo_grid_{8 * MB}", _ms)),
    ("8 MB raw socket echo, the peer", _fmt(f"echo_socket_{8 * MB}", _ms)),
    ("8 MB echo / raw socket", _ratio(f"echo_grid_{8 * MB}", f"echo_socket_{8 * MB}")),
    ("start 1 slot + publish", _fmt("start_publish_1", _ms)),
    ("start 4 slots + publish", _fmt("start_publish_4", _ms)),
    ("start 8 slots + publish", _fmt("start_publish_8", _ms)),
    ("idle CPU, driver", _fmt("idle_cpu_driver", _percent)),
    ("idle CPU, each daemon", _fmt("idle_cpu_daemons", _percent)),
    ("RSS growth over the memory run, driver", _fmt("rss_driver_growth", _mb)),
    ("RSS growth over the memory run, daemon", _fmt("rss_daemon_growth", _mb)),
    (
        "threads added over the memory run, driver / daemon",
        lambda g: f"{g('threads_driver_growth'):+.0f} / {g('threads_daemon_growth'):+.0f}",
    ),
    *(
        row
        for n in (16, 64, 128, 256)
        for row in (
            (f"{n}-way broadcast+gather round", _fmt(f"fan_grid_{n}", _ms)),
            (f"{n}-way round / the floor's", _ratio(f"fan_grid_{n}", f"fan_floor_{n}")),
            (f"{n}-way driver CPU per call / the floor's", _ratio(f"cpu_fan_grid_{n}", f"cpu_fan_floor_{n}")),
            (f"driver threads with {n} slots", _fmt(f"fan_threads_{n}", lambda x: f"{x:.0f}")),
        )
    ),
    ("wait([r]) / r.result() latency", _ratio("lat_wait", "lat_result")),
    ("as_completed([r]) / r.result() latency", _ratio("lat_as_completed", "lat_result")),
    ("start 64 slots + publish", _fmt("start_publish_grid_64", _ms)),
    ("Pss per idle slot, 64 slots", _fmt("pss_grid_64", lambda x: f"{x / MB:.1f} MB")),
]


def compare(before: dict[str, Any], after: Results) -> str:
    """The before/after table: the same rows from an earlier run's JSON and this run."""
    old = Results({k: list(v) for k, v in before["values"].items()})
    facts = before["facts"]
    lines = [
        f"Before: isdgrid from {facts['isdgrid']}, {facts['date']}, load average {facts['load'][0]:.2f} at start, "
        f"{facts['load'][1]:.2f} at end, median of {facts['repeat']} run(s). After: this run.",
        "",
        "| measurement | before | after |",
        "| --- | ---: | ---: |",
    ]
    for label, shown in _COMPARED:
        lines.append(f"| {label} | {shown(old.get)} | {shown(after.get)} |")
    lines += ["", "| target (issue 10) | before | after |", "| --- | ---: | ---: |"]
    for (text, _, shown_old, met_old), (_, _, shown_new, met_new) in zip(
        _targets(old.get), _targets(after.get), strict=True
    ):
        old_cell = f"{shown_old} ({'met' if met_old else 'missed'})"
        new_cell = f"{shown_new} ({'met' if met_new else 'missed'})"
        lines.append(f"| {text} | {old_cell} | {new_cell} |")
    return "\n".join(_drop_empty_tables([line for line in lines if "nan" not in line]))


def plot(res: Results, path: str, before: Results | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    servers = [1, 2, 4, 8]
    left.plot(servers, [res.get(f"bcast_{n}") * 1e6 for n in servers], "o-", label="broadcast + gather")
    left.plot(servers, [res.get(f"bcast_ref_{n}") * 1e6 for n in servers], "s--", label="one sync call (same grid)")
    left.plot([4], [res.get("pool4_map") * 1e6], "D", color="tab:red", label="multiprocessing.Pool(4).map, 4 no-ops")
    left.axhline(res.get("raw_marshal") * 1e6, color="gray", ls=":", label="raw Pyro5 sync call (marshal)")
    if before is not None:
        left.plot(
            servers,
            [before.get(f"bcast_{n}") * 1e6 for n in servers],
            "o-",
            color="lightgray",
            label="broadcast + gather, before",
            zorder=0,
        )
    left.set_xlabel("servers (local slots)")
    left.set_ylabel("latency (us)")
    left.set_xticks(servers)
    left.set_title("Fan-out")
    left.legend(fontsize="small")
    sizes = [1 << 10, MB, 8 * MB]
    for key, label, style in (
        ("echo_grid", "isdgrid numpy echo", "o-"),
        ("echo_socket", "raw socket echo", "s--"),
        ("echo_pyro_marshal", "raw Pyro5 (marshal) bytes echo", "^:"),
    ):
        right.loglog(sizes, [res.get(f"{key}_{s}") * 1e3 for s in sizes], style, label=label)
    if before is not None:
        right.loglog(
            sizes,
            [before.get(f"echo_grid_{s}") * 1e3 for s in sizes],
            "o-",
            color="lightgray",
            label="isdgrid numpy echo, before",
            zorder=0,
        )
    right.set_xlabel("payload (bytes)")
    right.set_ylabel("round trip (ms)")
    right.set_title("Payload echo")
    right.legend(fontsize="small")
    runs = len(res.values.get("grid_sync", [0]))
    fig.suptitle(f"isdgrid benchmark on {os.cpu_count()} cores (median of {runs} runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measure(res: Results, args: argparse.Namespace, sections: set[str]) -> None:
    """Run the chosen sections ``args.repeat`` times into ``res`` (fanout, start and scale: once)."""
    peers = RawPeers() if sections & {"calls", "payloads"} else None

    def section(name: str, longest: float = 0.0) -> None:
        print(f"  {name}", file=sys.stderr, flush=True)
        if args.hang_timeout > 0:  # a benchmark that hangs says where, instead of waiting forever
            faulthandler.dump_traceback_later(args.hang_timeout + longest, exit=True)

    try:
        for run in range(args.repeat):
            print(f"run {run + 1}/{args.repeat} ...", file=sys.stderr, flush=True)
            if peers is not None:
                with Grid([Host("localhost", n_cpu=1)], status_file=False) as grid:
                    if "calls" in sections:
                        section("calls")
                        bench_calls(res, peers, grid, args.quick)
                    if "payloads" in sections:
                        section("payloads")
                        bench_payloads(res, peers, grid, args.quick)
            if "bcast" in sections:
                section("bcast")
                bench_fanout_and_start(res, args.quick)
            if "pool" in sections:
                section("pool")
                bench_pool(res, args.quick)
            if "idle" in sections and run == 0:
                section("idle")
                bench_idle_and_memory(res, args.quick)
            if "latency" in sections:
                section("latency")
                bench_latency(res, args.quick)
            if "fanout" in sections and run == 0:
                section("fanout", args.start_timeout * len(args.sizes))
                bench_fanout(res, args.sizes, args.quick, args.start_timeout, args.round_timeout)
            if "start" in sections and run == 0:
                section("start", args.start_timeout * len(args.start_sizes) * 3)
                bench_start(res, args.start_sizes, args.quick, args.start_timeout)
            if "scale" in sections and run == 0:
                section("scale", args.start_timeout)
                bench_scale(res, args.floor_scale, args.scale, args.start_timeout)
            if "respawn" in sections and run == 0:
                section("respawn", args.start_timeout)
                bench_respawn(res, args.respawn_slots, args.kills, args.start_timeout)
            if "hung" in sections and run == 0:
                section("hung", (args.start_timeout + args.stop_timeout) * (len(args.hung) + 1))
                res.add("hung_stop_timeout", args.stop_timeout)
                bench_hung(res, args.hung, args.stop_timeout, args.start_timeout)
    finally:
        faulthandler.cancel_dump_traceback_later()
        if peers is not None:
            peers.close()


SECTIONS = ("calls", "payloads", "bcast", "pool", "idle", "latency", "fanout", "start", "scale", "respawn", "hung")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (about a minute)")
    parser.add_argument("--repeat", type=int, default=3, help="runs to take the median of (default 3)")
    default_plot = os.path.join(REPO, "docs", "performance.png")
    parser.add_argument("--plot", default=default_plot, help="PNG to write ('' for none)")
    parser.add_argument("--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument(
        "--sizes", type=_ints, default=[16, 64, 256], help="fanout: slots of the grid and the floor (default 16,64,256)"
    )
    parser.add_argument(
        "--start-sizes", type=_ints, default=[8, 64], help="start: slots to start and weigh (default 8,64)"
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=0,
        help="scale: also start a grid of this many local slots (e.g. 1000; default: off)",
    )
    parser.add_argument(
        "--floor-scale", type=int, default=1000, help="scale: echo processes of the floor (default %(default)s)"
    )
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=60.0,
        help="fanout: a grid's broadcast+gather round taking longer is reported as such (default %(default)s)",
    )
    parser.add_argument(
        "--start-timeout", type=float, default=300.0, help="the grids' start_timeout, seconds (default %(default)s)"
    )
    parser.add_argument(
        "--respawn-slots", type=int, default=8, help="respawn: slots of the grid (default %(default)s)"
    )
    parser.add_argument(
        "--kills", type=int, default=5, help="respawn: workers killed, one at a time (default %(default)s)"
    )
    parser.add_argument(
        "--hung", type=_ints, default=[1, 3, 6], help="hung: SIGSTOPped workers per terminate() (default 1,3,6)"
    )
    parser.add_argument(
        "--stop-timeout", type=float, default=5.0, help="hung: the grids' stop_timeout (default %(default)s)"
    )
    parser.add_argument("--json", default="", help="also write every figure of this run to this JSON file")
    parser.add_argument("--before", default="", help="JSON of an earlier run (--json): print a before/after table")
    parser.add_argument("--load", default="", help="report (and plot) a run saved with --json instead of running one")
    parser.add_argument(
        "--hang-timeout",
        type=float,
        default=300.0,
        help="a section that takes longer than this many seconds is taken as hung: every thread's "
        "stack is printed and the run ends with an error (0: wait forever; default %(default)s)",
    )
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: every thread's stack, the run goes on
    sections = set(args.only.split(",")) if args.only else set(SECTIONS)
    if sections - set(SECTIONS):
        parser.error(f"unknown sections {','.join(sorted(sections - set(SECTIONS)))}; pick from {','.join(SECTIONS)}")
    before = None
    if args.before:
        with open(args.before) as fh:
            before = json.load(fh)
    if args.load:
        with open(args.load) as fh:
            saved = json.load(fh)
        res, facts = Results(saved["values"], saved.get("notes", {})), saved["facts"]
    else:
        res = Results()
        load_start = os.getloadavg()[0]
        try:
            measure(res, args, sections)
        except KeyboardInterrupt:  # what was measured so far is still shown
            print("interrupted: the figures so far", file=sys.stderr, flush=True)
        facts = run_facts(args, (load_start, os.getloadavg()[0]))
    print(report(res, facts))
    scale = report_scale(res)
    if scale.count("\n| ") > 0:
        print()
        print(scale)
    if before is not None:
        print()
        print(compare(before, res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"facts": facts, "values": res.values, "notes": res.notes}, fh, indent=1)
    if args.plot and "grid_sync" in res.values:
        plot(res, args.plot, None if before is None else Results(before["values"]))
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
