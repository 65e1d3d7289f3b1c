"""What both demos do around their driver: start the grid, show a progress bar, time the start."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..grid import Grid
from ..hosts import Host, load_hosts
from .run_checkpoint import RunCheckpoint

__all__ = ["demo_hosts", "run_with_progress"]

R = TypeVar("R")


def demo_hosts(slots: int | None, hosts_file: str | None, default_slots: int = 4) -> list[Host]:
    """A demo's hosts: those of ``hosts_file``, else ``slots`` (or ``default_slots``) local slots.

    Raises a ``click`` usage error when both are given.
    """
    import click

    if hosts_file is not None and slots is not None:
        raise click.UsageError("give --slots or --hosts, not both")
    return load_hosts(hosts_file) if hosts_file is not None else [Host("localhost", n_cpu=slots or default_slots)]


def run_with_progress(
    hosts: Sequence[Host],
    launcher: str,
    *,
    rounds: int,
    label: str,
    resume: RunCheckpoint | None,
    run: Callable[[Grid, Callable[[int], None], float], R],
) -> R:
    """Start a grid on ``hosts`` (``respawn=True``), then ``run(grid, progress, startup_seconds)``.

    ``progress(k)`` moves a bar of ``rounds`` rounds on stderr (from the resumed round, if
    any); the grid is terminated when ``run`` returns or raises.
    """
    import click

    n_slots = sum(h.n_cpu for h in hosts)
    click.echo(f"starting {n_slots} slots on {len(hosts)} host(s) with the {launcher} launcher ...", err=True)
    started = time.perf_counter()
    with Grid(hosts, launcher, respawn=True) as grid:
        startup = time.perf_counter() - started
        with click.progressbar(length=rounds, label=label, file=sys.stderr) as bar:
            if resume is not None:
                bar.update(resume.rounds)
            return run(grid, bar.update, startup)
