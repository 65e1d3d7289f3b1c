"""Replica-exchange Monte Carlo on a grid: the driver of ``isdgrid demo``, as a script.

Run: python scripts/replica_exchange.py [--slots N] [--rounds R] [--steps S] [--hosts FILE]
     [--launcher NAME] [--scheme gromacs|evenodd|random] [--seed N] [--tmax T] [--log FILE]

The driver itself (model, replicas, exchanges, the Boltzmann check) is in
isdgrid/examples/replica_exchange.py; copy it to write your own (a copy runs as a script).
``isdgrid demo`` adds a progress bar, checkpoints and --resume.
"""

from __future__ import annotations

from isdgrid.examples.replica_exchange import main

if __name__ == "__main__":
    main()
