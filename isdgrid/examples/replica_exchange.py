"""Replica exchange (parallel tempering) Monte Carlo on a grid: the use IMP.isd built it for.

One :class:`Replica` (a Metropolis sampler of :class:`RuggedDoubleWell`) is published on
every slot; replica ``i`` stays on server ``i``. Each round the driver

1. ``broadcast``s ``sample(steps, thin)`` and ``gather``s each replica's energy (and, from
   the replica at the lowest temperature, its thinned samples),
2. picks pairs of neighbouring temperatures (``scheme``: ``"gromacs"`` alternates the even
   and the odd pairs from round to round, as IMP.isd's ``ReplicaTracker``; ``"evenodd"``
   picks the even or the odd set by a coin each round; ``"random"`` pairs random
   neighbours, as the tracker's random variant),
3. accepts each swap with probability ``min(1, exp((beta_i - beta_j) * (E_i - E_j)))``,
4. ``scatter``s the new temperatures: the replicas keep their coordinates, the
   temperatures move. These calls are not waited for: calls on one server run in order,
   so the next round's ``sample`` runs after them (one round trip per round),
5. appends the replica number at each temperature to the log file (1-based, as the
   original ``replicanums.txt``).

It counts swap attempts and acceptances per temperature pair and the replica round trips
(a replica that went from the lowest to the highest temperature and back).
:func:`run_demo` runs it end to end; ``isdgrid demo`` and ``scripts/replica_exchange.py``
call it. A copy of this file runs as a script (``python my_rex.py --slots 2 --rounds 20``,
see :func:`main`): start your own driver from one.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

# Absolute imports: a copy of this file runs as a script (python my_rex.py) outside the package.
from isdgrid.errors import ConfigError, GridError
from isdgrid.examples.boltzmann import BoltzmannCheck, ExactMarginal, check_boltzmann, exact_marginal
from isdgrid.examples.exchange import (
    LOG_HEADER,
    SCHEMES,
    ExchangeBook,
    check_scheme,
    exchange_pairs,
    geometric_ladder,
)
from isdgrid.examples.run_checkpoint import CheckpointedRun, RunCheckpoint, RunCheckpointer
from isdgrid.grid import Grid, ServerStatus
from isdgrid.hosts import Host, load_hosts
from isdgrid.result import Result

__all__ = [
    "SCHEMES",
    "ExchangeResult",
    "Replica",
    "ReplicaExchange",
    "RuggedDoubleWell",
    "exchange_pairs",
    "format_report",
    "geometric_ladder",
    "run_demo",
]

CHECK_BLOCKS = 10  # blocks of the Boltzmann check, which needs at least as many samples


@dataclass(frozen=True)
class RuggedDoubleWell:
    """A 2D energy with two wells of unequal depth, a barrier, and ripples.

    ``E(x, y) = h (x^2 - 1)^2 + a x + r cos(w x) + k/2 (y - c x)^2``

    With the defaults the left well (x ~ -1) is lower by about 1 and the barrier is about 6:
    at T = 1 a plain Metropolis walker stays in one well for thousands of steps, while at
    T = 6 it crosses freely, which is what tempering exploits.
    """

    barrier: float = 6.0
    tilt: float = 0.5
    ripple: float = 0.4
    ripple_freq: float = 3 * math.pi
    stiffness: float = 4.0
    coupling: float = 0.5

    def energy(self, x: float, y: float) -> float:
        """E(x, y)."""
        u = x * x - 1.0
        v = y - self.coupling * x
        return (
            self.barrier * u * u
            + self.tilt * x
            + self.ripple * math.cos(self.ripple_freq * x)
            + 0.5 * self.stiffness * v * v
        )


class Replica:
    """A Metropolis sampler of a model at a temperature; one lives on each grid slot.

    Pure Python (``random.Random`` seeded per replica), so a host needs nothing but
    isdgrid. The step size grows with sqrt(T) to keep the acceptance reasonable.
    """

    def __init__(self, model: RuggedDoubleWell | None = None, step: float = 0.3) -> None:
        self.model = model or RuggedDoubleWell()
        self.step = step
        self.temperature = 1.0
        self.record = False
        self.x = 0.0
        self.y = 0.0
        self.rng = random.Random(0)
        self.steps_done = 0  # Metropolis steps since reset (a restored replica goes on from its snapshot's)

    def reset(self, seed: int, temperature: float, record: bool, x: float, y: float) -> float:
        """Seed this replica, put it at (x, y) and temperature; returns its energy."""
        self.rng = random.Random(seed)
        self.temperature, self.record = temperature, record
        self.x, self.y = x, y
        self.steps_done = 0
        return self.model.energy(x, y)

    def set_temperature(self, temperature: float, record: bool = False) -> float:
        """Move to ``temperature``; ``record`` asks ``sample`` to return its samples."""
        self.temperature, self.record = temperature, record
        return temperature

    def energy(self) -> float:
        """The energy of the current coordinates."""
        return self.model.energy(self.x, self.y)

    def sample(self, steps: int, thin: int = 10) -> dict[str, Any]:
        """Run ``steps`` Metropolis steps; the final energy, acceptance and samples.

        ``xs`` holds every ``thin``-th ``x`` when this replica records (is at the lowest
        temperature), else it is empty.
        """
        energy_of = self.model.energy
        gauss, uniform, exp = self.rng.gauss, self.rng.random, math.exp
        beta = 1.0 / self.temperature
        width = self.step * math.sqrt(self.temperature)
        x, y = self.x, self.y
        e = energy_of(x, y)
        accepted = 0
        xs: list[float] = []
        for i in range(1, steps + 1):
            nx, ny = x + gauss(0.0, width), y + gauss(0.0, width)
            ne = energy_of(nx, ny)
            d = beta * (ne - e)
            if d <= 0.0 or uniform() < exp(-d):
                x, y, e = nx, ny, ne
                accepted += 1
            if self.record and i % thin == 0:
                xs.append(x)
        self.x, self.y = x, y
        self.steps_done += steps
        return {"energy": e, "acceptance": accepted / steps if steps else 0.0, "xs": xs}


@dataclass
class ExchangeResult:
    """What a replica-exchange run measured."""

    temperatures: list[float]
    scheme: str
    steps: int
    rounds: int = 0
    attempts: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    round_trips: int = 0
    round_times: list[float] = field(default_factory=list)
    samples: list[list[float]] = field(default_factory=list)  # lowest-temperature x, per round
    mc_acceptance: list[float] = field(default_factory=list)  # per state, mean over rounds
    checkpoints: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes) of this process's checkpoints
    rollbacks: list[tuple[int, int]] = field(default_factory=list)  # (round it failed in, round it went back to)

    @property
    def acceptance(self) -> list[float | None]:
        """Swap acceptance rate per pair of neighbouring temperatures (None: never tried)."""
        return [a / n if n else None for a, n in zip(self.accepted, self.attempts, strict=True)]

    def lowest_samples(self, burn_in: float = 0.1) -> list[float]:
        """The x samples at the lowest temperature, without the first ``burn_in`` of rounds."""
        skip = int(round(burn_in * len(self.samples)))
        return [x for chunk in self.samples[skip:] for x in chunk]


class ReplicaExchange(CheckpointedRun):
    """A parallel-tempering driver on a grid: one replica per slot (see the module doc).

    ``checkpoint_every=K`` takes a run checkpoint (every replica's snapshot and the
    driver's state, see :mod:`isdgrid.examples.run_checkpoint`) at the start and every K
    rounds, and also writes it to ``checkpoint_path`` when given. When a host is lost
    mid-run the driver waits for its respawn (the grid needs ``respawn=True``), puts every
    replica and its own state back to the last checkpoint, and goes on from there: at most
    K rounds are done again, and the run ends exactly as it would have without the loss.
    ``resume`` continues a run from its checkpoint on this grid instead of starting one
    (its settings are the checkpoint's; the grid needs one slot per replica).
    """

    def __init__(
        self,
        grid: Grid,
        temperatures: Sequence[float] | None = None,
        *,
        model: RuggedDoubleWell | None = None,
        scheme: str = "gromacs",
        steps: int = 1000,
        thin: int = 10,
        seed: int = 0,
        log: IO[str] | None = None,
        timeout: float = 300.0,
        checkpoint_every: int | None = None,
        checkpoint_path: str | None = None,
        resume: RunCheckpoint | None = None,
    ) -> None:
        state = resume.driver_state() if resume is not None else None
        if state is not None:
            settings = state["settings"]
            model, scheme, steps, thin, seed = (
                settings["model"], settings["scheme"], settings["steps"], settings["thin"], settings["seed"]
            )
            temperatures = settings["temperatures"]
            if checkpoint_every is None:
                checkpoint_every = settings["checkpoint_every"]
        check_scheme(scheme)
        if steps < 1 or thin < 1:
            raise ConfigError("steps and thin must be >= 1")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be at least 1 round, not {checkpoint_every}")
        if temperatures is not None and sorted(temperatures) != list(temperatures):
            raise ConfigError("temperatures must be in increasing order")
        self.grid = grid
        self.model = model or RuggedDoubleWell()
        self.service_id = grid.publish(Replica(self.model))
        n = len(grid.servers[self.service_id])
        self.temperatures = list(temperatures) if temperatures is not None else geometric_ladder(n)
        if len(self.temperatures) != n:
            what = "the checkpoint has" if resume is not None else "got"
            grid.terminate(self.service_id)
            raise ConfigError(f"{what} {len(self.temperatures)} temperatures for {n} replicas (one per slot)")
        self.betas = [1.0 / t for t in self.temperatures]
        self.n = n
        self.steps, self.thin, self.timeout = steps, thin, timeout
        self.scheme = scheme
        self.seed = seed
        self.checkpoint_every = checkpoint_every
        self.target_rounds = 0
        self.rng = random.Random(seed)
        self.log = log
        self.book = ExchangeBook(self.betas, scheme, self.rng)
        self._pending: list[Result] = []
        self.result = ExchangeResult(
            self.temperatures, scheme, steps, attempts=self.book.attempts, accepted=self.book.accepted
        )
        self._mc_sum = [0.0] * n
        # The remote work of the run (per server: calls, seconds) is kept in its checkpoints, so a
        # resumed run reports the whole run: the counters carried in, plus the grid's since then.
        self._work_from = 0  # the rounds the counters do not cover (a checkpoint written without them)
        self._work_base: list[tuple[int, float]] = [(0, 0.0)] * n
        self._work_mark = self._server_work()
        self._checkpointer: RunCheckpointer | None = RunCheckpointer(
            grid, self.service_id, path=checkpoint_path, log=log, timeout=timeout, last=resume
        )
        if resume is not None and state is not None:
            self._continue_from(resume, state)
            return
        starts = [(self.rng.uniform(-1.5, 1.5), self.rng.uniform(-1.0, 1.0)) for _ in range(n)]
        seeds = [self.rng.randrange(2**31) for _ in range(n)]
        args = [(seeds[r], self.temperatures[r], r == 0, *starts[r]) for r in range(n)]
        self._pending = grid.scatter(self.service_id, "reset", args)
        if self.log is not None:
            self.log.write(LOG_HEADER)
        if self.checkpoint_every is not None:
            self.checkpoint()

    @property
    def replica_at_state(self) -> list[int]:
        """The replica (0-based) at each temperature, lowest first: IMP.isd's replicanums."""
        return self.book.replica_at_state

    @property
    def state_of_replica(self) -> list[int]:
        """The temperature index of each replica: IMP.isd's statenums."""
        return self.book.state_of_replica

    def step(self) -> None:
        """One round: sample, exchange, move the temperatures, log."""
        start = time.perf_counter()
        reports = self.grid.gather(
            self.grid.broadcast(self.service_id, "sample", self.steps, self.thin), timeout=self.timeout
        )
        self.grid.gather(self._pending, timeout=self.timeout)  # done already: they ran before sample
        res, book = self.result, self.book
        res.samples.append(list(reports[book.replica_at_state[0]]["xs"]))
        for s in range(self.n):
            self._mc_sum[s] += reports[book.replica_at_state[s]]["acceptance"]
        book.exchange([rep["energy"] for rep in reports])
        res.rounds, res.round_trips = book.rounds, book.round_trips
        if self.log is not None:
            self.log.write(book.log_row())
        args = [(self.temperatures[s], s == 0) for s in book.state_of_replica]
        self._pending = self.grid.scatter(self.service_id, "set_temperature", args)
        res.round_times.append(time.perf_counter() - start)

    def run(self, rounds: int, progress: Callable[[int], None] | None = None) -> ExchangeResult:
        """Run until ``rounds`` rounds are done in all (a resumed run counts those before), and finish.

        ``progress(k)`` is called with the rounds done since the last call (negative after
        a roll-back to a checkpoint). A lost host is survived as the class doc says when
        checkpoints are on; otherwise its :class:`HostLostError` ends the run.
        """
        self.run_rounds(rounds, progress)
        return self.finish()

    def finish(self) -> ExchangeResult:
        """Wait for the last temperature moves and release the servers."""
        self.grid.gather(self._pending, timeout=self.timeout)
        self._pending = []
        self.grid.release_all(self.service_id)
        rounds = max(1, self.result.rounds)
        self.result.mc_acceptance = [m / rounds for m in self._mc_sum]
        return self.result

    def status(self) -> list[ServerStatus]:
        """The grid's statistics for this run's servers."""
        return [row for row in self.grid.status() if row.service_id == self.service_id]

    def remote_work(self) -> tuple[int, list[tuple[int, float]]]:
        """The run's remote work per server (calls, seconds), and the first round it counts from.

        A resumed run counts from round 0, its earlier sessions included (the counters travel
        in the checkpoint); rounds undone by a roll-back are not counted. The grid's own
        snapshot and restore operations are never counted.
        """
        now = self._server_work()
        work = [
            (calls + c1 - c0, seconds + s1 - s0)
            for (calls, seconds), (c0, s0), (c1, s1) in zip(self._work_base, self._work_mark, now, strict=True)
        ]
        return self._work_from, work

    def _server_work(self) -> list[tuple[int, float]]:
        return [(row.calls, row.mean_call_time * row.calls) for row in self.status()]

    def _state(self) -> dict[str, Any]:
        """The driver's part of a run checkpoint."""
        self.grid.gather(self._pending, timeout=self.timeout)  # done by now; counted in remote_work
        return {
            "settings": {
                "engine": "toy", "model": self.model, "temperatures": self.temperatures, "scheme": self.scheme,
                "steps": self.steps, "thin": self.thin, "seed": self.seed, "checkpoint_every": self.checkpoint_every,
                "target_rounds": self.target_rounds,
            },
            "book": self.book,  # with its random generator
            "mc_sum": self._mc_sum,
            "result": self.result,
            "remote_work": self.remote_work(),
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.book = state["book"]
        self.rng = self.book.rng
        self._mc_sum = state["mc_sum"]
        self.result = state["result"]
        self.target_rounds = state["settings"]["target_rounds"]
        self._pending = []  # calls of rounds that were undone
        # A checkpoint of an older isdgrid has no counters: count from its round on, and say so.
        self._work_from, self._work_base = state.get("remote_work", (self.result.rounds, [(0, 0.0)] * self.n))
        self._work_mark = self._server_work()


@dataclass
class DemoReport:
    """A finished demo run: the exchange result, the sampling check, the grid's figures.

    ``work`` is each server's remote work over the whole run (calls, seconds), a resumed
    run's earlier sessions included; it covers the rounds after ``counted_from`` (0 unless
    the run was resumed from a checkpoint that holds no counters).
    """

    result: ExchangeResult
    check: BoltzmannCheck | None
    status: list[ServerStatus]
    slots: int
    hosts: int
    launcher: str
    startup_time: float
    wall_time: float
    work: list[tuple[int, float]] = field(default_factory=list)
    counted_from: int = 0

    @property
    def calls(self) -> int:
        """Remote calls made on the replicas."""
        return sum(calls for calls, _ in self.work)

    @property
    def time_per_round(self) -> float:
        """Mean wall time of a round, in seconds."""
        times = self.result.round_times[self.counted_from:]
        return sum(times) / len(times) if times else 0.0

    @property
    def compute_per_round(self) -> float:
        """Remote compute time per round: the busiest server's call time per round."""
        rounds = max(1, self.result.rounds - self.counted_from)
        return max((seconds / rounds for _, seconds in self.work), default=0.0)

    @property
    def overhead_per_round(self) -> float:
        """Time per round that was not remote computing: the grid's cost."""
        return max(0.0, self.time_per_round - self.compute_per_round)


def run_demo(
    grid: Grid,
    *,
    rounds: int | None = 50,
    steps: int = 1000,
    thin: int = 10,
    scheme: str = "gromacs",
    seed: int = 0,
    t_max: float = 6.0,
    log: IO[str] | None = None,
    progress: Callable[[int], None] | None = None,
    check: bool = True,
    startup_time: float = 0.0,
    checkpoint_every: int | None = None,
    checkpoint_path: str | None = None,
    resume: RunCheckpoint | None = None,
) -> DemoReport:
    """Run replica exchange on every slot of ``grid`` and check the lowest temperature.

    ``rounds`` counts the rounds of the whole run: a run resumed from ``resume`` goes on
    until it has done that many (None: as many as the checkpointed run was asked for).
    ``checkpoint_every`` and ``checkpoint_path`` are :class:`ReplicaExchange`'s.
    """
    start = time.perf_counter()
    n = len(grid.slots)
    rex = ReplicaExchange(
        grid, None if resume is not None else geometric_ladder(n, 1.0, t_max), scheme=scheme, steps=steps,
        thin=thin, seed=seed, log=log, checkpoint_every=checkpoint_every, checkpoint_path=checkpoint_path,
        resume=resume,
    )
    if rounds is None:
        rounds = rex.target_rounds
    try:
        result = rex.run(rounds, progress)
        status = rex.status()
        counted_from, work = rex.remote_work()
    finally:
        grid.terminate(rex.service_id)
    outcome = None
    samples = result.lowest_samples()
    if check and len(samples) >= CHECK_BLOCKS:
        exact: ExactMarginal = exact_marginal(rex.model.energy, result.temperatures[0])
        outcome = check_boltzmann(samples, exact, blocks=CHECK_BLOCKS, round_trips=result.round_trips)
    launcher = getattr(getattr(grid, "_launcher", None), "name", "?")
    return DemoReport(
        result, outcome, status, n, len(grid.hosts), launcher, startup_time, time.perf_counter() - start, work,
        counted_from,
    )


def format_report(report: DemoReport) -> list[str]:
    """The demo's closing table, as lines of text."""
    res = report.result
    temps = res.temperatures
    lines = [
        f"replica exchange: {len(temps)} replicas on {report.slots} slots of {report.hosts} host(s) "
        f"({report.launcher} launcher), {res.rounds} rounds x {res.steps} steps, scheme {res.scheme}",
        "temperatures: " + " ".join(f"{t:.2f}" for t in temps),
        "",
        f"{'pair':>6} {'T_low':>7} {'T_high':>7} {'tried':>6} {'swapped':>8} {'rate':>6}",
    ]
    for s, rate in enumerate(res.acceptance):
        shown = f"{rate:6.2f}" if rate is not None else f"{'-':>6}"
        lines.append(
            f"{s:>3}-{s + 1:<2} {temps[s]:7.2f} {temps[s + 1]:7.2f} {res.attempts[s]:6d} {res.accepted[s]:8d} {shown}"
        )
    lines += [
        "",
        f"replica round trips (lowest -> highest -> lowest): {res.round_trips}",
        "Metropolis acceptance per temperature: " + " ".join(f"{a:.2f}" for a in res.mc_acceptance),
    ]
    if report.counted_from:
        covered = f"rounds {report.counted_from + 1}..{res.rounds}" if res.rounds > report.counted_from else "no rounds"
        lines.append(f"the figures below cover {covered} (the checkpoint resumed holds none of the rounds before)")
    lines += [
        f"calls made: {report.calls} on {len(report.status)} servers",
        f"grid start: {report.startup_time * 1e3:.0f} ms",
        f"time per round: {report.time_per_round * 1e3:.2f} ms",
        f"remote compute per round (busiest server): {report.compute_per_round * 1e3:.2f} ms",
        f"grid overhead per round: {report.overhead_per_round * 1e3:.2f} ms",
    ]
    if res.checkpoints:
        seconds = sum(t for t, _ in res.checkpoints) / len(res.checkpoints)
        size = sum(b for _, b in res.checkpoints) / len(res.checkpoints)
        lines.append(f"checkpoints: {len(res.checkpoints)}, {seconds * 1e3:.1f} ms and {size / 1024:.1f} KiB each")
    if res.rollbacks:
        redone = sum(failed - back for failed, back in res.rollbacks)
        lines.append(f"hosts lost: {len(res.rollbacks)}, rounds done again: {redone}")
    if report.check is not None:
        lines.append(f"Boltzmann check at T={temps[0]:g}: {report.check.summary()}")
    else:
        lines.append(
            f"Boltzmann check: skipped (fewer than {CHECK_BLOCKS} samples at the lowest temperature: "
            "run more rounds or steps)"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Run this driver from the command line: ``python replica_exchange.py --slots 4 --rounds 50``.

    It runs the classes of this very file, so a copy of it (``cp .../replica_exchange.py
    my_rex.py``), once edited, runs as edited. ``isdgrid demo`` runs the package's copy, with
    a progress bar, checkpoints and ``--resume``. Exit status 1 when the Boltzmann check
    fails or the grid reports an error (one line on stderr).
    """
    import argparse
    import contextlib
    import sys

    parser = argparse.ArgumentParser(description="Replica-exchange Monte Carlo on an isdgrid grid.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--slots", type=int, default=4, help="local slots, one replica each (default 4)")
    where.add_argument("--hosts", metavar="FILE", help="hosts file (TOML): one replica per slot of its hosts")
    parser.add_argument("--launcher", help="how the daemons start: local, ssh, slurm, sge (default: the grid's)")
    parser.add_argument("--rounds", type=int, default=200, help="exchange rounds (default 200)")
    parser.add_argument("--steps", type=int, default=200, help="Metropolis steps per replica and round (default 200)")
    parser.add_argument("--scheme", choices=SCHEMES, default="gromacs", help="how swap pairs are picked")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    parser.add_argument("--tmax", type=float, default=6.0, help="highest temperature, the lowest is 1 (default 6)")
    parser.add_argument("--log", metavar="FILE", help="write the replica log (replica at each temperature, per round)")
    args = parser.parse_args(argv)
    launcher = {"launcher": args.launcher} if args.launcher else {}
    try:
        hosts = load_hosts(args.hosts) if args.hosts else [Host("localhost", n_cpu=args.slots)]
        with contextlib.ExitStack() as stack:
            log = stack.enter_context(open(args.log, "w", encoding="utf-8")) if args.log else None
            started = time.perf_counter()
            grid = stack.enter_context(Grid(hosts, **launcher))
            report = run_demo(
                grid, rounds=args.rounds, steps=args.steps, scheme=args.scheme, seed=args.seed, t_max=args.tmax,
                log=log, startup_time=time.perf_counter() - started,
            )
    except (GridError, OSError) as exc:
        sys.exit(f"{parser.prog}: error: {str(exc).splitlines()[0]}")
    for line in format_report(report):
        print(line)
    if report.check is not None and report.check.verdict == "FAIL":
        sys.exit(1)


if __name__ == "__main__":
    main()
