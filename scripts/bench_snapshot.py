#!/usr/bin/env python3
"""What a snapshot costs: ``grid.checkpoint`` / ``grid.restore`` against raw Pyro5 moving the same bytes.

Four servers each hold an object of a given size (a numpy array plus a few fields). For
each size it times, in interleaved rounds (median):

- ``checkpoint``: ``grid.checkpoint(sid)``, every server's object pickled on its host and
  brought to the driver, in server order, between calls;
- ``checkpoint+file``: the same, saved to a file (atomic rename, fsync);
- ``restore``: ``grid.restore(sid, snapshot)``, the bytes sent back and unpickled;
- ``get_state``: what a driver did by hand before: ``broadcast("get_state")`` returning
  the pickled object, and ``gather``;
- ``raw Pyro5``: the floor: four plain Pyro5 daemons (marshal serializer) each return the
  same pickle, fetched from four threads at once.

    PYTHONPATH=. python scripts/bench_snapshot.py [--sizes 1e3,1e6,3.2e7] [--rounds 7]

Not a test: it asserts nothing; it reports.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np
import Pyro5.client
from bench import Timed, interleaved  # scripts/ is on sys.path when a script in it runs

from isdgrid import Grid, Host

SERVERS = 4

RAW_PYRO = r"""
import os, sys, threading, pickle, Pyro5.server, numpy as np
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
size = int(sys.argv[1])
state = {"data": np.ones(size // 8), "step": 1, "name": "raw"}
class Raw:
    @Pyro5.server.expose
    def state(self):
        return pickle.dumps(state, protocol=5)
daemon = Pyro5.server.Daemon(host="127.0.0.1")
print(daemon.register(Raw(), "raw"), flush=True)
daemon.requestLoop()
"""


class Holder:
    """A replica-like object: an array of ``size`` bytes and a few fields (travels by value)."""

    def __init__(self, size: int) -> None:
        self.data = np.ones(size // 8)
        self.step = 1
        self.name = "holder"

    def get_state(self) -> bytes:
        return pickle.dumps(self.__dict__, protocol=5)


def bench_size(grid: Grid, size: int, rounds: int, folder: str) -> dict[str, float]:
    sid = grid.publish(Holder(size))
    raws = [
        subprocess.Popen([sys.executable, "-c", RAW_PYRO, str(size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
        for _ in range(SERVERS)
    ]
    proxies: list[Pyro5.client.Proxy] = []
    try:
        for raw in raws:
            assert raw.stdout is not None
            proxy = Pyro5.client.Proxy(raw.stdout.readline().strip())
            proxy._pyroSerializer = "marshal"  # the fastest Pyro5 serializer, as in scripts/bench.py
            proxies.append(proxy)
        pool = concurrent.futures.ThreadPoolExecutor(SERVERS)

        def raw_fetch() -> None:
            def one(proxy: Pyro5.client.Proxy) -> bytes:
                proxy._pyroClaimOwnership()  # a pool thread uses it now
                return proxy.state()

            list(pool.map(one, proxies))

        snapshot = grid.checkpoint(sid)
        path = os.path.join(folder, "bench.snap")

        def by_hand() -> None:
            grid.gather(grid.broadcast(sid, "get_state"))

        figures = interleaved(
            {
                "checkpoint": Timed(lambda: grid.checkpoint(sid)),
                "checkpoint+file": Timed(lambda: grid.checkpoint(sid, path)),
                "restore": Timed(lambda: grid.restore(sid, snapshot)),
                "get_state": Timed(by_hand),
                "raw": Timed(raw_fetch),
            },
            block=1, rounds=rounds, warmup=1,
        )
        figures["bytes"] = float(snapshot.nbytes)
        grid.release_all(sid)
        pool.shutdown()
        return figures
    finally:
        for proxy in proxies:
            proxy._pyroClaimOwnership()
            proxy._pyroRelease()
        for raw in raws:
            raw.kill()
            raw.wait(10)
        grid.terminate(sid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e6,3.2e7", help="bytes of state per server, comma-separated")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per figure (median)")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    print(f"{SERVERS} servers, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; median of {args.rounds} rounds")
    header = (
        f"{'state/server':>12} {'snapshot':>10} {'checkpoint':>11} {'+file':>9} {'restore':>9} "
        f"{'get_state':>10} {'raw Pyro5':>10} {'ckpt/raw':>9} {'ckpt/by hand':>12}"
    )
    print(header)
    with Grid([Host("localhost", n_cpu=SERVERS)], status_file=False) as grid, tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            f = bench_size(grid, size, args.rounds, folder)
            ratios = f"{f['checkpoint'] / f['raw']:>8.2f}x {f['checkpoint'] / f['get_state']:>11.2f}x"
            print(
                f"{size:>12,d} {f['bytes'] / 1e6:>8.2f}MB {f['checkpoint'] * 1e3:>9.2f}ms "
                f"{f['checkpoint+file'] * 1e3:>7.2f}ms {f['restore'] * 1e3:>7.2f}ms {f['get_state'] * 1e3:>8.2f}ms "
                f"{f['raw'] * 1e3:>8.2f}ms {ratios}"
            )


if __name__ == "__main__":
    main()
