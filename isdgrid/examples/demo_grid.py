"""What both demos do around their driver: start the grid, show a progress bar, time the start."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, TypeVar

from ..grid import Grid
from ..hosts import Host, load_hosts
from .run_checkpoint import RunCheckpoint

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["demo_hosts", "progress_bar", "run_with_progress"]

R = TypeVar("R")

#: On a stderr that is no terminal (a log file, a pipe), the bar writes a line this often (seconds).
LOG_EVERY = 30.0


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

    ``progress(k)`` moves a bar of ``rounds`` rounds (:func:`progress_bar`; from the resumed
    round, if any); the grid is terminated when ``run`` returns or raises.
    """
    import click

    n_slots = sum(h.n_cpu for h in hosts)
    click.echo(f"starting {n_slots} slots on {len(hosts)} host(s) with the {launcher} launcher ...", err=True)
    started = time.perf_counter()
    with Grid(hosts, launcher, respawn=True) as grid:
        startup = time.perf_counter() - started
        with progress_bar(rounds, label, initial=resume.rounds if resume is not None else 0) as bar:
            return run(grid, bar.update, startup)


def progress_bar(total: int, desc: str, *, initial: int = 0, unit: str = "round") -> tqdm:
    """A progress bar of ``total`` steps from ``tqdm.auto``: a widget in Jupyter, a bar on a terminal.

    On a stderr that is no terminal (a log file, a pipe) the bar's state is written as a
    plain line (no carriage returns) when it starts, every :data:`LOG_EVERY` seconds, and
    when it closes. ``bar.update(k)`` moves it by ``k`` (negative: back).
    """
    from tqdm.auto import tqdm as auto_tqdm
    from tqdm.notebook import tqdm as widget_tqdm
    from tqdm.std import tqdm as text_tqdm

    if not issubclass(auto_tqdm, widget_tqdm) and not _shows_bars(sys.stderr):
        return text_tqdm(
            total=total, desc=desc, initial=initial, unit=unit, file=_Lines(sys.stderr), mininterval=LOG_EVERY,
            ascii=True, ncols=80,
        )
    return auto_tqdm(total=total, desc=desc, initial=initial, unit=unit)


def _shows_bars(stream: IO[str]) -> bool:
    """True for a terminal, and for a Jupyter kernel's stream (a text bar when ipywidgets is missing)."""
    if type(stream).__module__.startswith("ipykernel."):
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stand-in stream
        return False


class _Lines:
    """A file for tqdm on a non-terminal: each state of the bar on a line of its own, repeats dropped."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._last = ""

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        if line and line != self._last:
            self._last = line
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()
