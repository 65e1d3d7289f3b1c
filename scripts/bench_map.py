#!/usr/bin/env python3
"""How well ``grid.map`` balances items of unequal length, against the tools a user knows.

Items of two lengths (default: 4 long of 0.4 s and 36 short of 0.04 s, sleeps) on 4
workers, in three item orders (long first, long last, shuffled). The ideal split takes
``max(longest item, total work / workers)`` (0.76 s by default); each way to run them
is timed (median of ``--rounds``) and printed as a ratio to that ideal:

- ``grid.map``: ``list(grid.map(sid, "nap", items))`` (and ``ordered=False``);
- ``acquire loop``: the loop a user writes by hand: for each item ``acquire_service``,
  call, ``release_service`` (the server goes back when the call ends), then ``gather``;
- ``Pool.imap``: ``multiprocessing.Pool(4).imap(nap, items)`` (chunksize 1), the floor
  for local processes.

    PYTHONPATH=. python scripts/bench_map.py [--long 4 --short 36 --long-s 0.4 --short-s 0.04] [--rounds 5]

Not a test: it asserts nothing but that the values are right; it reports.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import sys
import time
from collections.abc import Callable

from isdgrid import Grid, Host

WORKERS = 4


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


class Napper:
    """The published object: one item is one sleep."""

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def timed(run: Callable[[list[float]], list[float]], items: list[float], ordered: bool = True) -> float:
    started = time.perf_counter()
    values = run(items)
    elapsed = time.perf_counter() - started
    assert (values if ordered else sorted(values)) == (items if ordered else sorted(items)), "wrong values"
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--long", type=int, default=4, help="number of long items")
    parser.add_argument("--short", type=int, default=36, help="number of short items")
    parser.add_argument("--long-s", type=float, default=0.4, help="seconds of a long item")
    parser.add_argument("--short-s", type=float, default=0.04, help="seconds of a short item")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    long_items, short_items = [args.long_s] * args.long, [args.short_s] * args.short
    shuffled = long_items + short_items
    random.Random(1).shuffle(shuffled)
    orders = {
        "long first": long_items + short_items,
        "long last": short_items + long_items,
        "shuffled": shuffled,
    }
    ideal = max(args.long_s, (sum(long_items) + sum(short_items)) / WORKERS)
    print(f"{args.long} x {args.long_s} s + {args.short} x {args.short_s} s on {WORKERS} workers: "
          f"ideal {ideal:.3f} s (max(longest item, total work / workers))")

    with Grid([Host("localhost", n_cpu=WORKERS)], status_file=False) as grid, \
            multiprocessing.Pool(WORKERS) as pool:
        sid = grid.publish(Napper())

        def grid_map(items: list[float]) -> list[float]:
            return list(grid.map(sid, "nap", items, timeout=120))

        def grid_map_unordered(items: list[float]) -> list[float]:
            return list(grid.map(sid, "nap", items, ordered=False, timeout=120))

        def acquire_loop(items: list[float]) -> list[float]:
            results = []
            for seconds in items:
                proxy = grid.acquire_service(sid, timeout=120)
                results.append(proxy.nap(seconds))
                grid.release_service(proxy)
            return grid.gather(results, timeout=120)

        def pool_imap(items: list[float]) -> list[float]:
            return list(pool.imap(nap, items))

        ways: list[tuple[str, Callable[[list[float]], list[float]], bool]] = [
            ("grid.map", grid_map, True),
            ("grid.map(ordered=False)", grid_map_unordered, False),
            ("acquire loop", acquire_loop, True),
            ("Pool.imap", pool_imap, True),
        ]
        for run in (grid_map, pool_imap):  # warm up: first calls, worker start
            run([0.0] * WORKERS)
        print(f"{'':26}" + "".join(f"{order:>22}" for order in orders))
        worst = 0.0
        for name, run, ordered in ways:
            cells = []
            for items in orders.values():
                median = statistics.median(timed(run, items, ordered) for _ in range(args.rounds))
                cells.append(f"{median:7.3f} s {median / ideal:5.2f}x")
                if name.startswith("grid.map"):
                    worst = max(worst, median / ideal)
            print(f"{name:26}" + "".join(f"{cell:>22}" for cell in cells))
    print(f"grid.map worst ratio to the ideal split: {worst:.2f}x (the goal: within 1.30x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
