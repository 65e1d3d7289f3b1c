#!/usr/bin/env python3
"""OpenMM temperature replica exchange of alanine dipeptide on a grid, as a script.

    python scripts/openmm_tempering.py [--slots N | --hosts FILE] [--rounds R] [--steps S]
        [--thin K] [--tmax KELVIN] [--solvent obc|vacuum] [--platform CPU|Reference]
        [--scheme gromacs|evenodd|random] [--seed N] [--launcher NAME] [--log FILE]

``isdgrid demo --engine openmm`` runs the same with the defaults of the options it shares.
The driver is isdgrid/examples/openmm_tempering.py (replica, exchanges) and
isdgrid/examples/openmm_demo.py (the run and its report); needs ``pip install 'isdgrid[openmm]'``.
"""

from __future__ import annotations

import argparse
import contextlib

import click

from isdgrid.cli import LAUNCHERS
from isdgrid.examples.openmm_demo import T_MAX, check_options, run_cli
from isdgrid.examples.openmm_peptide import SOLVENTS
from isdgrid.examples.replica_exchange import SCHEMES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, help="local slots, one replica each (default 4)")
    parser.add_argument("--hosts", metavar="FILE", help="hosts file (TOML): one replica per slot")
    parser.add_argument("--rounds", type=int, default=200, help="exchange rounds (default 200)")
    parser.add_argument("--steps", type=int, default=200, help="MD steps of 2 fs per round (default 200)")
    parser.add_argument("--thin", type=int, default=50, help="record phi/psi every THIN steps at the lowest T")
    parser.add_argument("--tmax", type=float, default=T_MAX, help=f"highest temperature in K (default {T_MAX:g})")
    parser.add_argument("--solvent", choices=sorted(SOLVENTS), default="obc")
    parser.add_argument("--platform", choices=("CPU", "Reference"), default="CPU")
    parser.add_argument("--scheme", choices=SCHEMES, default="gromacs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local")
    parser.add_argument("--log", metavar="FILE", help="write the replica-per-temperature log to FILE")
    args = parser.parse_args()
    try:
        hosts, t_max = check_options(slots=args.slots, hosts_file=args.hosts, t_max=args.tmax)
    except click.ClickException as exc:
        parser.error(exc.format_message())
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(args.log, "w", encoding="utf-8")) if args.log else None
        run_cli(
            hosts, rounds=args.rounds, steps=args.steps, launcher=args.launcher, scheme=args.scheme, seed=args.seed,
            t_max=t_max, log=log, solvent=args.solvent, platform=args.platform, thin=args.thin,
        )  # fmt: skip


if __name__ == "__main__":
    main()
