"""A driver the scheduler tests run in a real job: it keeps its daemons busy until the test acts.

    python tests/scheduler_hold_driver.py --launcher sge|slurm [--bind ADDR] [--kill-one | --kill-host]
                                          [--secret-file F] [--nap S] [--host-timeout S]

Starts a grid on the slots of the job it runs in (``launcher="sge"``: ``$PE_HOSTFILE``
and one ``qrsh -inherit`` per host; ``Grid.from_slurm()``: the allocation and one ``srun``
step per node), publishes a :class:`Napper` (each starts a ``sleep`` child in its slot's
process group) and prints one line ``READY {json}``: the driver's pid, the job, its
``$TMPDIR``, every slot worker's pid (``daemons``), their host daemons' pids
(``host_daemons``), the pid of each local ``qrsh``/``srun`` that started a host daemon
(``launchers``) and the pids of the children (``children``). Then every slot naps
``--nap`` seconds in a call. Half a second into the call the driver itself kills
(SIGKILL) slot 0's worker with ``--kill-one``, or the host daemon of slot 0 with
``--kill-host``. Each call that ends in :class:`~isdgrid.HostLostError` prints ``LOST
{json}`` (the slot, the message, the wall clock time it failed, and after a kill the
seconds since the kill), any other end ``ENDED {json}``; the last line is ``DONE {json}``
after ``terminate()``. The tests read these lines from the job's output.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from isdgrid import Grid, HostLostError


class Napper:
    """Lives in ``__main__``, so it travels by value to the daemons."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"child": None}

    def pid(self) -> int:
        return os.getpid()

    def host_daemon(self) -> int:
        """The pid of the host daemon that forked this slot's worker."""
        return os.getppid()

    def start_child(self) -> int:
        """Start a ``sleep`` in the slot's process group (what a published object may start)."""
        self.child = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        return self.child.pid

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
    kill = parser.add_mutually_exclusive_group()
    kill.add_argument("--kill-one", action="store_true", help="kill slot 0's worker mid-call")
    kill.add_argument("--kill-host", action="store_true", help="kill the host daemon of slot 0 mid-call")
    parser.add_argument("--secret-file", help="the grid's secret (default: a new one)")
    args = parser.parse_args()

    started = time.monotonic()
    grid = make_grid(args)
    try:
        sid = grid.publish(Napper())
        daemons = grid.gather(grid.broadcast(sid, "pid"), timeout=30)
        first_call = time.monotonic() - started
        parents = grid.gather(grid.broadcast(sid, "host_daemon"), timeout=30)
        children = grid.gather(grid.broadcast(sid, "start_child"), timeout=30)
        launchers = sorted({slot.handle.host_daemon.process.pid for slot in grid.slots})
        job = os.environ.get("JOB_ID") or os.environ.get("SLURM_JOB_ID")
        emit("READY", {"driver": os.getpid(), "job": job, "daemons": daemons, "launchers": launchers,
                       "host_daemons": sorted(set(parents)), "children": children,
                       "tmpdir": os.environ.get("TMPDIR", "/tmp"),
                       "hosts": [[h.name, h.n_cpu] for h in grid.hosts], "first_call": round(first_call, 3)})
        failed_at: dict[int, float] = {}
        results = grid.broadcast(sid, "nap", args.nap)
        for index, result in enumerate(results):
            result.add_done_callback(lambda _, i=index: failed_at.setdefault(i, time.monotonic()))
        killed = None
        if args.kill_one or args.kill_host:
            time.sleep(0.5)
            killed = time.monotonic()
            os.kill(daemons[0] if args.kill_one else parents[0], signal.SIGKILL)
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
                emit("ENDED", {"index": index, "error": None if error is None else repr(error)})
    finally:
        grid.terminate()
    emit("DONE", {"seconds": round(time.monotonic() - started, 3)})


if __name__ == "__main__":
    main()
