"""A scheduler smoke job: a small replica exchange that reports where each replica ran.

Runs on this machine (``--launcher local``), inside a SLURM allocation (``--launcher
slurm``, see scripts/slurm_job.sh) or an SGE parallel job (``--launcher sge``, see
scripts/sge_job.sh). Prints one line ``RESULT {json}`` with the temperatures and
energies of every round and where each replica ran.

    python scripts/scheduler_job_driver.py --rounds 10
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import socket
import sys

from isdgrid import Grid, Host


class Replica:
    """Metropolis sampling of a 1D double well; lives in ``__main__``, shipped by value."""

    def __init__(self) -> None:
        self.temperature = 1.0
        self.x = -1.0
        self.rng = random.Random(0)

    def seed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def set_temperature(self, temperature: float) -> None:
        self.temperature = temperature

    def energy(self) -> float:
        return (self.x * self.x - 1.0) ** 2 * 5.0

    def sample(self, steps: int) -> float:
        """Run ``steps`` Metropolis steps; return the energy at the end."""
        for _ in range(steps):
            old_x, old_e = self.x, self.energy()
            self.x += self.rng.gauss(0.0, 0.3)
            de = self.energy() - old_e
            if de > 0 and self.rng.random() >= math.exp(-de / self.temperature):
                self.x = old_x
        return self.energy()

    def where(self) -> dict[str, object]:
        """The host, process and scheduler step (SLURM) or task (SGE) this replica runs in."""
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_step": os.environ.get("SLURM_STEP_ID"),
            "sge_job": os.environ.get("JOB_ID"),
            # a `qrsh -inherit` task has its own spool folder, named after its task id
            "sge_task": os.path.basename(os.environ.get("SGE_JOB_SPOOL_DIR", ""))
            if os.environ.get("JOB_SCRIPT") == "QRSH" else None,
            # where the grid put it: host as the grid names it, slot on that host, rank in the grid
            "identity": [os.environ.get(f"ISDGRID_{name}") for name in ("HOST", "SLOT", "RANK")],
        }


def exchange(temperatures: list[float], energies: list[float], offset: int, rng: random.Random) -> int:
    """Try swapping the temperatures of neighbours (offset 0: pairs 0-1, 2-3...; 1: 1-2...)."""
    accepted = 0
    for i in range(offset, len(temperatures) - 1, 2):
        j = i + 1
        delta = (1.0 / temperatures[i] - 1.0 / temperatures[j]) * (energies[i] - energies[j])
        if delta >= 0 or rng.random() < math.exp(delta):
            temperatures[i], temperatures[j] = temperatures[j], temperatures[i]
            accepted += 1
    return accepted


def make_grid(args: argparse.Namespace) -> Grid:
    options = {"bind": args.bind} if args.bind else {}
    if args.launcher == "slurm":
        return Grid.from_slurm(bind=args.bind)
    if args.launcher == "sge":
        return Grid(None, "sge", launcher_options=options)
    return Grid([Host("localhost", n_cpu=args.slots)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launcher", choices=["local", "slurm", "sge"], default="local")
    parser.add_argument("--bind", help="address the daemons listen on (default: the node's name)")
    parser.add_argument("--slots", type=int, default=4, help="local launcher: number of replicas")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2000, help="Metropolis steps per round")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    rng = random.Random(1)
    rounds = []
    with make_grid(args) as grid:
        sid = grid.publish(Replica())
        n = len(grid.servers[sid])
        temperatures = [0.5 * 2.0 ** (i * 3.0 / max(1, n - 1)) for i in range(n)]
        grid.gather(grid.scatter(sid, "seed", list(range(n))), timeout=60)
        for number in range(args.rounds):
            grid.gather(grid.scatter(sid, "set_temperature", temperatures), timeout=60)
            energies = grid.gather(grid.broadcast(sid, "sample", args.steps), timeout=300)
            rounds.append({"temperatures": list(temperatures), "energies": energies})
            exchange(temperatures, energies, number % 2, rng)
        where = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        grid.release_all()
        hosts = [h.name for h in grid.hosts]
    sys.stdout.write("RESULT " + json.dumps({"hosts": hosts, "replicas": where, "rounds": rounds}) + "\n")


if __name__ == "__main__":
    main()
