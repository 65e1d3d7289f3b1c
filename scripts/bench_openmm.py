#!/usr/bin/env python3
"""OpenMM tempering on the grid against the same protocol run serially in one process.

For 2, 4 and 8 replicas of alanine dipeptide (OBC implicit solvent), it runs ``--rounds``
exchange rounds of ``--steps`` MD steps on a local grid (one slot per replica) and then the
same rounds with the replicas called one after the other in this process, and prints per
round: the serial wall time, the grid's wall time, the speed-up, and how the grid's round
splits into OpenMM (the longest ``sample`` call, timed on the host) and the grid (the
rest: sending the calls, pickling, replies, the exchange decisions, and waiting for a slot
to be scheduled). The first round of each run (Context creation) is left out. Figures are
medians over rounds and over ``--repeat`` runs.

    PYTHONPATH=. python scripts/bench_openmm.py                       # CPU platform (a few minutes)
    PYTHONPATH=. python scripts/bench_openmm.py --platform Reference  # a faster engine: the grid's share shows
    PYTHONPATH=. python scripts/bench_openmm.py --replicas 2 4 --rounds 5 --steps 200

Not a test: it asserts nothing; it reports. Needs ``pip install 'isdgrid[openmm]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from isdgrid import Grid, Host, codec
from isdgrid.examples.openmm_demo import dipeptide_replica
from isdgrid.examples.openmm_tempering import GridReplicas, OpenMMReplica, ReplicaSet, SerialReplicas, Tempering
from isdgrid.examples.replica_exchange import geometric_ladder


@dataclass
class Row:
    """Per-round medians (seconds) of one replica count."""

    replicas: int
    serial: float
    grid: float
    openmm: float  # the longest sample call of a grid round
    openmm_serial: float  # the sum of the sample calls of a serial round
    md_serial: float  # the sum of the time in integrator.step of a serial round

    @property
    def overhead(self) -> float:
        return max(0.0, self.grid - self.openmm)


Series = list[float]


def _run(replicas: ReplicaSet, n: int, rounds: int, steps: int) -> tuple[Series, Series, Series, Series]:
    """Per round (the first left out): wall, longest call, sum of calls, sum of MD."""
    try:
        tempering = Tempering(replicas, geometric_ladder(n, 300.0, 500.0), steps=steps, thin=0, seed=n)
        result = tempering.run(rounds + 1)
    finally:
        replicas.close()
    calls, md = result.call_times[1:], result.md_times[1:]
    return result.round_times[1:], [max(c) for c in calls], [sum(c) for c in calls], [sum(m) for m in md]


def measure(replica: OpenMMReplica, n: int, rounds: int, steps: int, repeat: int) -> Row:
    grid_wall: list[float] = []
    longest: list[float] = []
    serial_wall: list[float] = []
    serial_calls: list[float] = []
    serial_md: list[float] = []
    with Grid([Host("localhost", n_cpu=n)]) as grid:
        for _ in range(repeat):
            wall, top, _, _ = _run(GridReplicas(grid, replica), n, rounds, steps)
            grid_wall += wall
            longest += top
            wall, _, total, md = _run(SerialReplicas(replica, n), n, rounds, steps)
            serial_wall += wall
            serial_calls += total
            serial_md += md
    med = statistics.median
    return Row(n, med(serial_wall), med(grid_wall), med(longest), med(serial_calls), med(serial_md))


def pickling_per_round(replica: OpenMMReplica, n: int, steps: int) -> tuple[float, int]:
    """Seconds and bytes to encode one round's calls and decode its replies (driver side, isdgrid.codec)."""
    replica.reset(1, 300.0)
    reply = replica.sample(steps, 300.0)
    args = [(steps, 300.0 + i, 0) for i in range(n)]
    loops = 2000
    size = 0
    start = time.perf_counter()
    for _ in range(loops):  # what the grid does: encode_op / loads for calls, encode_value / decode_reply for replies
        size = 0
        for a in args:
            data, buffers = codec.encode_op(codec.CALL, "sample", a, None, codec.OOB_MIN)
            codec.loads(data, buffers)
            size += len(data)
        for _ in range(n):
            item, buffers = codec.encode_value(reply, 0.0, "sample()", codec.OOB_MIN)
            codec.decode_reply(item, buffers)
            size += len(item[1])
    return (time.perf_counter() - start) / loops, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds per run (default 10)")
    parser.add_argument("--steps", type=int, default=500, help="MD steps of 2 fs per round (default 500)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per replica count (default 2)")
    parser.add_argument("--platform", choices=("CPU", "Reference"), default="CPU")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()

    replica = dipeptide_replica(platform=args.platform)
    print(
        f"OpenMM tempering of alanine dipeptide (OBC, {args.platform} platform): {args.steps} steps per round, "
        f"{args.rounds} rounds x {args.repeat} runs; {os.cpu_count()} cores; Python {sys.version.split()[0]}",
        flush=True,
    )
    header = (
        f"{'replicas':>8} {'serial ms':>10} {'grid ms':>9} {'speed-up':>8} "
        f"{'OpenMM ms':>10} {'grid rest ms':>12} {'grid share':>10} {'MD steps/s':>11}"
    )
    print(header)
    rows = []
    for n in args.replicas:
        started = time.perf_counter()
        row = measure(replica, n, args.rounds, args.steps, args.repeat)
        rows.append(row)
        steps_per_s = n * args.steps / row.md_serial if row.md_serial else float("nan")
        print(
            f"{n:8d} {row.serial * 1e3:10.1f} {row.grid * 1e3:9.1f} {row.serial / row.grid:8.2f} "
            f"{row.openmm * 1e3:10.1f} {row.overhead * 1e3:12.1f} {100 * row.overhead / row.grid:9.1f}% "
            f"{steps_per_s:11.0f}   ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    for n in args.replicas:
        seconds, size = pickling_per_round(replica, n, args.steps)
        print(f"pickling a round of {n} replicas (calls and replies, both ways): {seconds * 1e6:.0f} us, {size} bytes")
    print(
        "serial: the replicas called in turn in this process; grid: one slot per replica, local launcher.\n"
        "OpenMM ms: the longest sample call of a grid round (timed on its host); grid rest: the round's other time.\n"
        "MD steps/s: one replica's rate in the serial run (integrator.step only)."
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            doc = {"platform": args.platform, "steps": args.steps, "rows": [asdict(r) for r in rows]}
            json.dump(doc, out, indent=1)


if __name__ == "__main__":
    main()
