#!/usr/bin/env python3
"""isdgrid benchmark: the grid against raw Pyro5, a raw socket and multiprocessing, side by side.

Everything runs in one process tree on this machine, at the same moment: a raw Pyro5
daemon and a raw socket echo server run as subprocesses next to the grid's daemons, and
the timings of the things compared are taken in interleaved blocks, so that load from
elsewhere hits both sides alike. Each figure is the median over ``--repeat`` runs (and
over blocks within a run). It prints a table and the target ratios, and writes a plot.

    PYTHONPATH=. python scripts/bench.py              # full run (a few minutes)
    PYTHONPATH=. python scripts/bench.py --quick      # smaller counts (about a minute)

Not a test: it asserts nothing; it reports. Needs numpy, psutil and (for the plot)
matplotlib: ``pip install 'isdgrid[bench]'``.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import Pyro5
import Pyro5.client

from isdgrid import Grid, Host

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

RAW_PYRO = r"""
import sys, Pyro5.server
class Bench:
    @Pyro5.server.expose
    def f(self):
        return None
    @Pyro5.server.expose
    def echo(self, data):
        return data
daemon = Pyro5.server.Daemon(host="127.0.0.1")
print(daemon.register(Bench(), "bench"), flush=True)
daemon.requestLoop()
"""

RAW_ECHO = r"""
import socket, struct, sys
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

    def f(self) -> None:
        return None

    def echo(self, data: Any) -> Any:
        return data


def _noop() -> None:
    return None


def _echo(data: Any) -> Any:
    return data


# -- measuring ---------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], Any]], block: int, rounds: int, warmup: int = 20) -> dict[str, float]:
    """Seconds per call of each function: the median over ``rounds`` blocks, taken in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            times[name].append((time.perf_counter() - t0) / block)
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass
class Results:
    """Every figure of a run, keyed by name; several repeats give several values."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def get(self, name: str) -> float:
        return statistics.median(self.values[name]) if name in self.values else float("nan")


class RawPeers:
    """The raw Pyro5 daemon and the raw socket echo server, as subprocesses."""

    def __init__(self) -> None:
        self.pyro = subprocess.Popen([sys.executable, "-c", RAW_PYRO], stdout=subprocess.PIPE, text=True)
        self.echo = subprocess.Popen([sys.executable, "-c", RAW_ECHO], stdout=subprocess.PIPE, text=True)
        assert self.pyro.stdout is not None and self.echo.stdout is not None
        uri = self.pyro.stdout.readline().strip()
        port = int(self.echo.stdout.readline())
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


# -- the sections ------------------------------------------------------------------------------
def bench_calls(res: Results, peers: RawPeers, grid: Grid, quick: bool) -> None:
    sid = grid.publish(Bench())
    proxy = grid.acquire_service(sid)
    block, rounds = (100, 8) if quick else (200, 15)
    times = interleaved(
        {
            "raw_serpent": peers.serpent.f,
            "raw_marshal": peers.marshal.f,
            "grid_sync": lambda: proxy.f().get(),
        },
        block,
        rounds,
    )
    for name, value in times.items():
        res.add(name, value)
    n = 2000 if quick else 10000
    proxy.f().get()
    t0 = time.perf_counter()
    pending = [proxy.f() for _ in range(n)]
    for result in pending:
        result.get()
    res.add("pipelined", (time.perf_counter() - t0) / n)
    grid.release_service(proxy)
    grid.terminate(sid)


def bench_payloads(res: Results, peers: RawPeers, grid: Grid, quick: bool) -> None:
    sid = grid.publish(Bench())
    proxy = grid.acquire_service(sid)
    for size in (1 << 10, 1 << 20, 8 << 20):
        array = np.random.default_rng(1).random(size // 8)
        data = array.tobytes()
        back = proxy.echo(array).get()
        assert np.array_equal(back, array)
        block = {1 << 10: 100, 1 << 20: 10, 8 << 20: 3}[size]
        rounds = 5 if quick else 9
        times = interleaved(
            {
                f"echo_grid_{size}": lambda: proxy.echo(array).get(),  # noqa: B023
                f"echo_socket_{size}": lambda: peers.socket_echo(data),  # noqa: B023
                f"echo_pyro_marshal_{size}": lambda: peers.marshal.echo(data),  # noqa: B023
            },
            block,
            rounds,
            warmup=2,
        )
        for name, value in times.items():
            res.add(name, value)
    grid.release_service(proxy)
    grid.terminate(sid)


def bench_fanout_and_start(res: Results, quick: bool) -> None:
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
            block, rounds = (30, 6) if quick else (50, 12)
            times = interleaved(
                {
                    f"bcast_{n}": lambda: grid.gather(grid.broadcast(sid, "f")),  # noqa: B023
                    f"bcast_ref_{n}": lambda: proxy.f().get(),  # noqa: B023
                },
                block,
                rounds,
            )
            for name, value in times.items():
                res.add(name, value)
            grid.release_service(proxy)
            grid.release_all(sid)
        finally:
            grid.terminate()


def bench_pool(res: Results, quick: bool) -> None:
    array = np.random.default_rng(2).random((8 << 20) // 8)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        times = interleaved({"pool_noop": lambda: pool.apply(_noop)}, 100 if quick else 200, 5 if quick else 9)
        res.add("pool_noop", times["pool_noop"])
        times = interleaved({"pool_echo": lambda: pool.apply(_echo, (array,))}, 3, 5 if quick else 9, warmup=2)
        res.add("pool_echo_8M", times["pool_echo"])


def _cpu(procs: Sequence[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def bench_idle_and_memory(res: Results, quick: bool) -> None:
    with Grid([Host("localhost", n_cpu=2)], status_file=False) as grid:
        sid = grid.publish(Bench())
        proxy = grid.acquire_service(sid)
        proxy.f().get()
        me = psutil.Process()
        daemons = [psutil.Process(s.handle.process.pid) for s in grid.slots if s.handle.process is not None]
        window = 2.0 if quick else 5.0
        time.sleep(0.5)
        before_driver, before_daemons = _cpu([me]), _cpu(daemons)
        time.sleep(window)
        res.add("idle_cpu_driver", (_cpu([me]) - before_driver) / window)
        res.add("idle_cpu_daemons", (_cpu(daemons) - before_daemons) / window / len(daemons))
        server = proxy._isdgrid_server
        daemon = psutil.Process(server.slot.handle.process.pid)
        calls = 20_000 if quick else 100_000
        chunk = 1000
        for _ in range(5):  # warm up: allocator pools, caches
            for r in [proxy.echo(i) for i in range(chunk)]:
                r.get()
        gc.collect()
        rss = (me.memory_info().rss, daemon.memory_info().rss)
        threads = (threading.active_count(), daemon.num_threads())
        done = 0
        while done < calls:
            for r in [proxy.echo(i) for i in range(chunk // 2)]:
                r.get()
            for i in range(chunk // 2):
                proxy.echo(i).get()
            done += chunk
        gc.collect()
        res.add("calls_for_memory", calls)
        res.add("rss_driver_growth", me.memory_info().rss - rss[0])
        res.add("rss_daemon_growth", daemon.memory_info().rss - rss[1])
        res.add("rss_driver", me.memory_info().rss)
        res.add("rss_daemon", daemon.memory_info().rss)
        res.add("threads_driver_growth", threading.active_count() - threads[0])
        res.add("threads_daemon_growth", daemon.num_threads() - threads[1])
        grid.release_service(proxy)


# -- report ------------------------------------------------------------------------------------
def _us(x: float) -> str:
    return f"{x * 1e6:,.0f} us"


def _ms(x: float) -> str:
    return f"{x * 1e3:,.2f} ms"


def report(res: Results, args: argparse.Namespace, load: tuple[float, float]) -> str:
    g = res.get
    lines = [
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, Pyro5 {Pyro5.__version__}, "
        f"numpy {np.__version__}; load average {load[0]:.2f} at start, {load[1]:.2f} at end; "
        f"median of {args.repeat} run(s){' (--quick)' if args.quick else ''}.",
        "",
        "| measurement | isdgrid | peer | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| sync no-op call vs raw Pyro5 (marshal) | {_us(g('grid_sync'))} | {_us(g('raw_marshal'))} | "
        f"{g('grid_sync') / g('raw_marshal'):.2f}x |",
        f"| sync no-op call vs raw Pyro5 (serpent) | {_us(g('grid_sync'))} | {_us(g('raw_serpent'))} | "
        f"{g('grid_sync') / g('raw_serpent'):.2f}x |",
        f"| pipelined calls on one proxy (per call) | {_us(g('pipelined'))} ({1 / g('pipelined'):,.0f}/s) | "
        f"{_us(g('raw_marshal'))} ({1 / g('raw_marshal'):,.0f}/s raw sync) | "
        f"{g('raw_marshal') / g('pipelined'):.1f}x the rate |",
        f"| sync no-op call vs multiprocessing.Pool.apply | {_us(g('grid_sync'))} | {_us(g('pool_noop'))} | "
        f"{g('grid_sync') / g('pool_noop'):.2f}x |",
    ]
    for n in (1, 2, 4, 8):
        lines.append(
            f"| broadcast+gather over {n} servers vs one call (same grid) | {_us(g(f'bcast_{n}'))} | "
            f"{_us(g(f'bcast_ref_{n}'))} | {g(f'bcast_{n}') / g(f'bcast_ref_{n}'):.2f}x |"
        )
    for size, label in ((1 << 10, "1 KB"), (1 << 20, "1 MB"), (8 << 20, "8 MB")):
        lines.append(
            f"| {label} numpy echo vs raw socket echo | {_ms(g(f'echo_grid_{size}'))} | "
            f"{_ms(g(f'echo_socket_{size}'))} | {g(f'echo_grid_{size}') / g(f'echo_socket_{size}'):.2f}x |"
        )
        lines.append(
            f"| {label} numpy echo vs raw Pyro5 (marshal) bytes echo | {_ms(g(f'echo_grid_{size}'))} | "
            f"{_ms(g(f'echo_pyro_marshal_{size}'))} | {g(f'echo_grid_{size}') / g(f'echo_pyro_marshal_{size}'):.2f}x |"
        )
    lines.append(
        f"| 8 MB numpy echo vs multiprocessing.Pool.apply | {_ms(g(f'echo_grid_{8 << 20}'))} | "
        f"{_ms(g('pool_echo_8M'))} | {g(f'echo_grid_{8 << 20}') / g('pool_echo_8M'):.2f}x |"
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
        f"{g('threads_daemon_growth'):+.0f} | | |",
        "",
        "| target | measured | met |",
        "| --- | ---: | :---: |",
    ]
    targets = [
        ("grid sync call <= 1.2x raw Pyro5 sync call (marshal)", g("grid_sync") / g("raw_marshal"), 1.2, "x"),
        ("pipelined calls >= 8x the raw sync call rate", g("raw_marshal") / g("pipelined"), -8.0, "x"),
        ("broadcast+gather over 4 servers <= 2x one grid call", g("bcast_4") / g("bcast_ref_4"), 2.0, "x"),
        ("8 MB numpy echo <= 2x raw socket echo", g(f"echo_grid_{8 << 20}") / g(f"echo_socket_{8 << 20}"), 2.0, "x"),
        ("8-slot local start + publish <= 1 s", g("start_publish_8"), 1.0, " s"),
    ]
    for text, value, bound, unit in targets:
        met = value >= -bound if bound < 0 else value <= bound
        lines.append(f"| {text} | {value:.2f}{unit} | {'yes' if met else 'NO'} |")
    return "\n".join(line for line in lines if "nan" not in line)  # sections not run


def plot(res: Results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    servers = [1, 2, 4, 8]
    left.plot(servers, [res.get(f"bcast_{n}") * 1e6 for n in servers], "o-", label="broadcast + gather")
    left.plot(servers, [res.get(f"bcast_ref_{n}") * 1e6 for n in servers], "s--", label="one sync call (same grid)")
    left.axhline(res.get("raw_marshal") * 1e6, color="gray", ls=":", label="raw Pyro5 sync call (marshal)")
    left.set_xlabel("servers (local slots)")
    left.set_ylabel("latency (us)")
    left.set_xticks(servers)
    left.set_title("Fan-out")
    left.legend()
    sizes = [1 << 10, 1 << 20, 8 << 20]
    for key, label, style in (
        ("echo_grid", "isdgrid numpy echo", "o-"),
        ("echo_socket", "raw socket echo", "s--"),
        ("echo_pyro_marshal", "raw Pyro5 (marshal) bytes echo", "^:"),
    ):
        right.loglog(sizes, [res.get(f"{key}_{s}") * 1e3 for s in sizes], style, label=label)
    right.set_xlabel("payload (bytes)")
    right.set_ylabel("round trip (ms)")
    right.set_title("Payload echo")
    right.legend()
    runs = len(res.values.get("grid_sync", [0]))
    fig.suptitle(f"isdgrid benchmark on {os.cpu_count()} cores (median of {runs} runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (about a minute)")
    parser.add_argument("--repeat", type=int, default=3, help="runs to take the median of (default 3)")
    default_plot = os.path.join(REPO, "docs", "performance.png")
    parser.add_argument("--plot", default=default_plot, help="PNG to write ('' for none)")
    parser.add_argument("--only", default="", help="comma-separated sections: calls,payloads,fanout,pool,idle")
    args = parser.parse_args(argv)
    sections = set(args.only.split(",")) if args.only else {"calls", "payloads", "fanout", "pool", "idle"}
    load_start = os.getloadavg()[0]
    res = Results()
    peers = RawPeers()
    try:
        for run in range(args.repeat):
            print(f"run {run + 1}/{args.repeat} ...", file=sys.stderr, flush=True)
            if sections & {"calls", "payloads"}:
                with Grid([Host("localhost", n_cpu=1)], status_file=False) as grid:
                    if "calls" in sections:
                        bench_calls(res, peers, grid, args.quick)
                    if "payloads" in sections:
                        bench_payloads(res, peers, grid, args.quick)
            if "fanout" in sections:
                bench_fanout_and_start(res, args.quick)
            if "pool" in sections:
                bench_pool(res, args.quick)
            if "idle" in sections and run == 0:
                bench_idle_and_memory(res, args.quick)
    finally:
        peers.close()
    print(report(res, args, (load_start, os.getloadavg()[0])))
    if args.plot:
        plot(res, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
