"""A driver the scheduler tests run in a real job: it keeps its daemons busy until the test acts.

    python tests/scheduler_hold_driver.py --launcher sge|slurm [--bind ADDR] [--kill-one]
                                          [--secret-file F] [--nap S] [--host-timeout S]

Starts a grid on the slots of the job it runs in (``launcher="sge"``: ``$PE_HOSTFILE``
and ``qrsh -inherit``; ``Grid.from_slurm()``: the allocation and ``srun`` steps),
publishes a :class:`Napper` and prints one line ``READY {json}``: the driver's pid, the
job, its ``$TMPDIR``, every daemon's pid and the pid of the local ``qrsh``/``srun`` that
started it. Then
every daemon naps ``--nap`` seconds in a call. With ``--kill-one`` the driver itself
kills slot 0's daemon (SIGKILL) half a second into the call. Each call that ends in
:class:`~isdgrid.HostLostError` prints ``LOST {json}`` (the slot, the message, the wall
clock time it failed, and with ``--kill-one`` the seconds since the kill); the last line
is ``DONE {json}`` after ``terminate()``. The tests read these lines from the job's output.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import sys
import time
from typing import Any

from isdgrid import Grid, HostLostError


class Napper:
    """Lives in ``__main__``, so it travels by value to the daemons."""

    def pid(self) -> int:
        return os.getpid()

    def nap(self, seconds: float) -> int:
        time.sleep(seconds)
        return os.getpid()


def emit(tag: str, data: dict[str, Any]) -> None:
    sys.stdout.write(f"{tag} {json.dumps(data)}\n")
    sys.stdout.flush()


def make_grid(args: argparse.Namespace) -> Grid:
    options: dict[str, Any] = {"host_timeout": args.host_timeout, "start_timeout": 60.0}
    if args.secret_file:
        with open(args.secret_file, encoding="utf-8") as fh:
            options["secret"] = fh.read().strip()
    if args.launcher == "slurm":
        return Grid.from_slurm(bind=args.bind, **options)
    return Grid(None, "sge", launcher_options={"bind": args.bind} if args.bind else {}, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launcher", choices=["sge", "slurm"], required=True)
    parser.add_argument("--bind", help="address the daemons listen on (default: the node's name)")
    parser.add_argument("--nap", type=float, default=120.0, help="seconds each daemon's call lasts")
    parser.add_argument("--host-timeout", type=float, default=10.0)
    parser.add_argument("--kill-one", action="store_true", help="kill slot 0's daemon mid-call")
    parser.add_argument("--secret-file", help="the grid's secret (default: a new one)")
    args = parser.parse_args()

    started = time.monotonic()
    grid = make_grid(args)
    try:
        sid = grid.publish(Napper())
        daemons = grid.gather(grid.broadcast(sid, "pid"), timeout=30)
        first_call = time.monotonic() - started
        launchers = [slot.handle.process.pid for slot in grid.slots if slot.handle.process is not None]
        job = os.environ.get("JOB_ID") or os.environ.get("SLURM_JOB_ID")
        emit("READY", {"driver": os.getpid(), "job": job, "daemons": daemons, "launchers": launchers,
                       "tmpdir": os.environ.get("TMPDIR", "/tmp"),
                       "hosts": [[h.name, h.n_cpu] for h in grid.hosts], "first_call": round(first_call, 3)})
        failed_at: dict[int, float] = {}
        results = grid.broadcast(sid, "nap", args.nap)
        for index, result in enumerate(results):
            result.add_done_callback(lambda _, i=index: failed_at.setdefault(i, time.monotonic()))
        killed = None
        if args.kill_one:
            time.sleep(0.5)
            killed = time.monotonic()
            os.kill(daemons[0], signal.SIGKILL)
        for index, result in enumerate(results):
            try:
                error = result.exception(timeout=args.nap + 30)
            except concurrent.futures.TimeoutError:
                emit("STUCK", {"index": index})
                continue
            if isinstance(error, HostLostError):
                lost = {"index": index, "host": error.host, "slot": error.slot, "error": str(error),
                        "time": time.time() - (time.monotonic() - failed_at[index])}
                if killed is not None:
                    lost["after_kill"] = round(failed_at[index] - killed, 3)
                emit("LOST", lost)
            else:
                emit("ENDED", {"index": index, "error": repr(error)})
    finally:
        grid.terminate()
    emit("DONE", {"seconds": round(time.monotonic() - started, 3)})


if __name__ == "__main__":
    main()
