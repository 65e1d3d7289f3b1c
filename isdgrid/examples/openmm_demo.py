"""The OpenMM tempering demo: alanine dipeptide on every slot of a grid, and its report.

``isdgrid demo --engine openmm`` and ``scripts/openmm_tempering.py`` run it:
:func:`run_demo` builds Ace-Ala-Nme (:mod:`isdgrid.examples.openmm_peptide`), minimizes
it, publishes one :class:`~isdgrid.examples.openmm_tempering.OpenMMReplica` per slot on a
geometric ladder of temperatures, runs the exchange rounds and returns a
:class:`DemoReport`; :func:`format_report` prints the swap acceptance per pair (measured,
what the coin should have given, and what the ladder predicts from the energy
distributions), the round trips, the backbone basins at the lowest temperature, and where
the time went (OpenMM against the grid).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from ..errors import ConfigError, PublishError
from ..grid import Grid
from ..hosts import Host
from ..launchers.auto import is_this_machine
from .demo_grid import demo_hosts, run_with_progress
from .openmm_peptide import BASINS, PHI_ATOMS, PSI_ATOMS, backbone_basin, build_dipeptide, make_system, minimize
from .openmm_tempering import GridReplicas, OpenMMReplica, Tempering, TemperingResult, check_platform
from .replica_exchange import geometric_ladder
from .run_checkpoint import RunCheckpoint

__all__ = [
    "INSTALL_HINT",
    "DemoReport",
    "basin_populations",
    "check_options",
    "dipeptide_replica",
    "format_report",
    "require_openmm",
    "run_cli",
    "run_demo",
]

INSTALL_HINT = "the OpenMM engine needs the openmm package: pip install 'isdgrid[openmm]'"
T_MIN, T_MAX = 300.0, 500.0  # K: the default ladder


def require_openmm() -> None:
    """Raise :class:`ConfigError` with the install command when ``openmm`` cannot be imported."""
    try:
        import openmm  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from None


def dipeptide_replica(solvent: str = "obc", platform: str = "CPU") -> OpenMMReplica:
    """An :class:`OpenMMReplica` of minimized alanine dipeptide that records phi and psi."""
    peptide = build_dipeptide()
    system_xml = make_system(peptide, solvent)
    positions = minimize(system_xml, peptide.positions)
    return OpenMMReplica(system_xml, positions, dihedrals=[PHI_ATOMS, PSI_ATOMS], platform=platform)


def basin_populations(angles: Sequence[tuple[float, ...]]) -> dict[str, float]:
    """The fraction of ``(phi, psi)`` samples in each basin of :data:`BASINS`."""
    counts = dict.fromkeys(BASINS, 0)
    for phi, psi in angles:
        counts[backbone_basin(phi, psi)] += 1
    n = max(1, len(angles))
    return {name: c / n for name, c in counts.items()}


@dataclass
class DemoReport:
    """A finished tempering run on a grid, with where its time went."""

    result: TemperingResult
    slots: int
    hosts: int
    platform: str
    solvent: str
    startup_time: float
    wall_time: float

    @property
    def per_round(self) -> tuple[float, float, float]:
        """Mean per round (s): wall time, OpenMM (the longest call), the grid (the rest: calls, pickling, exchanges)."""
        wall, engine = self.result.timing()
        return wall, engine, max(0.0, wall - engine)


def run_demo(
    grid: Grid,
    *,
    rounds: int = 200,
    steps: int = 200,
    thin: int = 50,
    scheme: str = "gromacs",
    seed: int = 0,
    t_min: float = T_MIN,
    t_max: float = T_MAX,
    solvent: str = "obc",
    platform: str = "CPU",
    log: IO[str] | None = None,
    progress: Callable[[int], None] | None = None,
    startup_time: float = 0.0,
    checkpoint_every: int | None = 10,
    checkpoint_path: str | None = None,
    resume: RunCheckpoint | None = None,
) -> DemoReport:
    """Temperature replica exchange of alanine dipeptide, one replica per slot of ``grid``.

    With ``checkpoint_every`` (and a grid with ``respawn=True``) the run survives lost
    hosts, going back at most that many rounds (see :class:`Tempering`); ``checkpoint_path``
    also writes each checkpoint there, and ``resume`` continues a checkpointed run (its
    settings are the checkpoint's; ``rounds`` counts the whole run).
    """
    require_openmm()
    start = time.perf_counter()
    try:
        replicas = GridReplicas(grid, dipeptide_replica(solvent, platform))
    except PublishError as exc:  # a host without the platform says so in one line: that line
        raise _missing_platform(exc) or exc from None
    try:
        ladder = None if resume is not None else geometric_ladder(replicas.n, t_min, t_max)
        tempering = Tempering(
            replicas, ladder, scheme=scheme, steps=steps, thin=thin, seed=seed, log=log,
            checkpoint_every=checkpoint_every, checkpoint_path=checkpoint_path, resume=resume,
        )
        result = tempering.run(rounds, progress)
    finally:
        replicas.close()
    return DemoReport(
        result, replicas.n, len(grid.hosts), platform, solvent, startup_time, time.perf_counter() - start
    )


def _missing_platform(exc: PublishError) -> ConfigError | None:
    """The host's own one-line error when the replica failed to load for want of its platform."""
    lines = exc.remote_traceback.strip().splitlines()
    kind, _, message = (lines[-1] if lines else "").partition(": ")
    if kind.endswith("ConfigError") and message.startswith("OpenMM has no "):
        return ConfigError(message)
    return None


def _rate(value: float | None) -> str:
    return f"{value:6.2f}" if value is not None else f"{'-':>6}"


def format_report(report: DemoReport) -> list[str]:
    """The demo's closing table, as lines of text."""
    res = report.result
    temps = res.temperatures
    fs = res.steps * 2  # the replicas' 2 fs step
    lines = [
        f"OpenMM tempering of alanine dipeptide ({report.solvent}, {report.platform} platform): "
        f"{len(temps)} replicas on {report.slots} slots of {report.hosts} host(s)",
        f"{res.rounds} rounds x {res.steps} steps ({fs / 1000:g} ps), scheme {res.scheme}; "
        "temperatures (K): " + " ".join(f"{t:.0f}" for t in temps),
        "",
        f"{'pair':>6} {'T_low':>6} {'T_high':>6} {'tried':>6} {'swapped':>8} {'rate':>6} {'coin':>6} {'ladder':>6}",
    ]
    expected, predicted = res.expected_acceptance(), res.predicted_acceptance()
    for s, rate in enumerate(res.acceptance):
        lines.append(
            f"{s:>3}-{s + 1:<2} {temps[s]:6.0f} {temps[s + 1]:6.0f} {res.attempts[s]:6d} {res.accepted[s]:8d} "
            f"{_rate(rate)} {_rate(expected[s])} {_rate(predicted[s])}"
        )
    angles = res.lowest_angles()
    wall, engine, grid = report.per_round
    populations = basin_populations(angles)
    lines += [
        "(coin: mean of min(1, exp(delta)) over the attempts; ladder: predicted from the energy distributions)",
        "",
        f"replica round trips (lowest -> highest -> lowest): {res.round_trips}",
        f"backbone basins at {temps[0]:.0f} K ({len(angles)} samples, first 10% of rounds left out): "
        + (", ".join(f"{name} {populations[name]:.2f}" for name in BASINS) if angles else "none recorded"),
        f"grid start: {report.startup_time:.2f} s; run: {report.wall_time:.1f} s",
        f"time per round: {wall * 1e3:.1f} ms = OpenMM (longest call) {engine * 1e3:.1f} ms "
        f"+ grid {grid * 1e3:.1f} ms ({100 * grid / max(wall, 1e-12):.1f}%)",
    ]
    if res.rollbacks:
        redone = sum(failed - back for failed, back in res.rollbacks)
        lines.append(f"hosts lost: {len(res.rollbacks)}, rounds done again: {redone}")
    return lines


def check_options(
    *,
    slots: int | None,
    hosts_file: str | None,
    t_max: float | None,
    default_slots: int = 4,
    platform: str = "CPU",
    launcher: str = "auto",
) -> tuple[list[Host], float]:
    """Check the demo's options before anything starts; the hosts and the highest temperature.

    Raises ``click`` usage errors, and a one-line ``ClickException`` with the install command
    when ``openmm`` is missing, or naming the platforms OpenMM has here when every slot runs
    on this machine and OpenMM lacks ``platform`` (other hosts check as the replica loads).
    """
    import click

    try:
        require_openmm()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    high = T_MAX if t_max is None else t_max
    if high < T_MIN:
        raise click.BadParameter(f"{high:g} K is below the lowest temperature, {T_MIN:g} K", param_hint="'--tmax'")
    hosts = demo_hosts(slots, hosts_file, default_slots)
    if launcher == "local" or (launcher == "auto" and all(is_this_machine(h.name) for h in hosts)):
        try:
            check_platform(platform)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    return hosts, high


def run_cli(
    hosts: list[Host],
    *,
    rounds: int,
    steps: int,
    launcher: str,
    scheme: str,
    seed: int,
    t_max: float,
    log: IO[str] | None,
    solvent: str = "obc",
    platform: str = "CPU",
    thin: int = 50,
    checkpoint_every: int | None = 10,
    checkpoint_path: str | None = None,
    resume: RunCheckpoint | None = None,
) -> DemoReport:
    """What ``isdgrid demo --engine openmm`` runs after :func:`check_options`: the grid, a progress bar, the report."""
    import click

    report = run_with_progress(
        hosts, launcher, rounds=rounds, label="OpenMM tempering", resume=resume,
        run=lambda grid, progress, startup: run_demo(
            grid, rounds=rounds, steps=steps, thin=thin, scheme=scheme, seed=seed, t_max=t_max,
            solvent=solvent, platform=platform, log=log, progress=progress, startup_time=startup,
            checkpoint_every=checkpoint_every, checkpoint_path=checkpoint_path, resume=resume,
        ),
    )  # fmt: skip
    for line in format_report(report):
        click.echo(line)
    return report
