"""Temperature replica exchange with OpenMM: one ``Context`` per replica, one replica per slot.

:class:`OpenMMReplica` is what a driver publishes. An OpenMM ``Context`` cannot be pickled,
so the replica carries what rebuilds one, all plain data: the ``System`` as XML, the
positions and velocities (nm, nm/ps), the temperature, the seed and the steps done. The
host builds the ``Context`` on the first call (:meth:`OpenMMReplica.context`), and
``__getstate__`` reads the current positions and velocities back out of it, so a copy
(a snapshot of a published object, say) resumes where the replica was.

:class:`Tempering` is the driver. Each round it ``scatter``s ``sample(steps, T, thin)``: the
temperature of the replica's current state travels with the call (one call per replica and
round); the replica rescales its velocities by ``sqrt(T_new / T_old)`` when it changed, runs
``steps`` Langevin steps, and returns its potential energy (and, at the lowest temperature,
the recorded dihedrals). :class:`ExchangeBook` then tries swaps between neighbouring
temperatures (``exchange_pairs``, the toy example's schemes) with the Metropolis criterion
``min(1, exp((beta_i - beta_j)(U_i - U_j)))``, ``beta = 1 / (R T)``, and counts acceptances
and round trips.

The replicas run on a grid (:class:`GridReplicas`) or one after the other in this process
(:class:`SerialReplicas`), with the same calls in the same order: with the CPU platform at
``DeterministicForces`` and one thread (or the Reference platform) the two runs give the same
energies and the same exchange decisions, bit for bit.

Needs ``openmm`` where the replicas run (``pip install 'isdgrid[openmm]'``); it is imported
inside the methods that use it, so this module imports without it.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from ..errors import ConfigError
from ..grid import Grid
from .exchange import LOG_HEADER, ExchangeBook, Swap
from .openmm_peptide import dihedral
from .replica_exchange import ExchangeResult
from .run_checkpoint import CheckpointedRun, RunCheckpoint, RunCheckpointer

__all__ = [
    "GAS_CONSTANT",
    "ExchangeBook",
    "GridReplicas",
    "OpenMMReplica",
    "ReplicaSet",
    "SerialReplicas",
    "Tempering",
    "TemperingResult",
    "predicted_acceptance",
]

GAS_CONSTANT = 0.00831446261815324  # R in kJ/(mol K): beta = 1 / (R T) for energies in kJ/mol

Vec = tuple[float, float, float]

#: Platform properties that make the CPU platform reproducible (one thread, fixed-point sums).
DETERMINISTIC_CPU = {"Threads": "1", "DeterministicForces": "true"}

#: The platforms ``isdgrid demo --engine openmm --platform`` offers.
PLATFORMS = ("CUDA", "OpenCL", "CPU", "Reference")


def available_platforms() -> list[str]:
    """The names of the platforms OpenMM has on this machine (``openmm.Platform``)."""
    import openmm

    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def check_platform(platform: str, where: str = "this machine") -> None:
    """Raise a one-line :class:`ConfigError` naming the platforms there when OpenMM lacks ``platform``."""
    have = available_platforms()
    if platform not in have:
        raise ConfigError(f"OpenMM has no {platform} platform on {where}; the platforms it has: {', '.join(have)}")


def platform_properties(platform: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The properties a replica asks ``platform`` for, on the host it runs on.

    CPU: one thread, deterministic forces (:data:`DETERMINISTIC_CPU`). CUDA and OpenCL:
    the devices the slot sees, as OpenMM numbers them: ``CUDA_VISIBLE_DEVICES`` (set by the
    grid from ``Host.gpus``, or by SLURM) leaves the slot its own device(s), renumbered
    from 0, so ``DeviceIndex`` is ``"0"`` (``"0,1"`` for two); without it, OpenMM picks.
    NVIDIA's OpenCL honours ``CUDA_VISIBLE_DEVICES`` as CUDA does.
    """
    if platform == "CPU":
        return dict(DETERMINISTIC_CPU)
    if platform in ("CUDA", "OpenCL"):
        env = os.environ if environ is None else environ
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if visible:
            return {"DeviceIndex": ",".join(str(i) for i in range(len(visible)))}
    return {}


class OpenMMReplica:
    """One replica of an OpenMM ``System``: a Langevin integrator in a ``Context`` built on the host.

    ``system_xml`` is ``XmlSerializer.serialize(system)``; ``positions`` in nm.
    ``dihedrals`` are 4-tuples of atom indices that :meth:`sample` records when asked
    (``thin > 0``). ``platform`` and ``properties`` choose the OpenMM platform; the default is
    the CPU platform at deterministic settings. Without ``properties``, the replica asks for
    :func:`platform_properties` on the host it runs on (its slot's GPU for CUDA and OpenCL);
    it checks there, as it is published, that OpenMM has ``platform``.
    """

    def __init__(
        self,
        system_xml: str,
        positions: Sequence[Sequence[float]],
        *,
        dihedrals: Sequence[Sequence[int]] = (),
        timestep: float = 0.002,
        friction: float = 1.0,
        platform: str = "CPU",
        properties: dict[str, str] | None = None,
    ) -> None:
        self.system_xml = system_xml
        self.positions: list[Vec] = [(float(x), float(y), float(z)) for x, y, z in positions]
        self.velocities: list[Vec] | None = None
        self.dihedrals = [tuple(int(a) for a in quad) for quad in dihedrals]
        self.timestep, self.friction = timestep, friction  # ps, 1/ps
        self.platform = platform
        self.properties = None if properties is None else dict(properties)  # None: platform_properties on the host
        self.temperature = 300.0  # K
        self.seed = 1
        self.steps_done = 0
        self._context: Any = None
        self._integrator: Any = None

    # -- state that travels --------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Plain data only: the current positions and velocities come out of the ``Context``."""
        self._pull_state()
        state = dict(self.__dict__)
        state["_context"] = state["_integrator"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Take the plain data; the ``Context`` is built again on the first call.

        Imports ``openmm`` and checks that it has the platform now, so that publishing on a
        host without them fails at once (a ``PublishError`` naming the host), not at the
        first call.
        """
        import socket

        import openmm  # noqa: F401

        self.__dict__.update(state)
        check_platform(self.platform, socket.gethostname())

    def _pull_state(self) -> None:
        if self._context is None:
            return
        from openmm import unit

        st = self._context.getState(getPositions=True, getVelocities=True)
        positions = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        velocities = st.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
        self.positions = [(float(x), float(y), float(z)) for x, y, z in positions]
        self.velocities = [(float(x), float(y), float(z)) for x, y, z in velocities]

    def context(self) -> Any:
        """The ``openmm.Context``, built from the plain state on first use.

        The integrator's random seed is derived from ``seed`` and ``steps_done``: a replica
        rebuilt from a snapshot continues with a fresh, reproducible random stream (OpenMM
        has no way to read a stream's position back).
        """
        if self._context is not None:
            return self._context
        import openmm
        from openmm import unit

        system = openmm.XmlSerializer.deserialize(self.system_xml)
        integrator = openmm.LangevinMiddleIntegrator(self.temperature, self.friction, self.timestep)
        integrator.setRandomNumberSeed((self.seed * 1_000_003 + self.steps_done) % 2_147_483_647 or 1)
        platform = openmm.Platform.getPlatformByName(self.platform)
        properties = platform_properties(self.platform) if self.properties is None else self.properties
        context = openmm.Context(system, integrator, platform, properties)
        context.setPositions(unit.Quantity([list(p) for p in self.positions], unit.nanometer))
        if self.velocities is None:
            context.setVelocitiesToTemperature(self.temperature, self.seed)
        else:
            context.setVelocities(unit.Quantity([list(v) for v in self.velocities], unit.nanometer / unit.picosecond))
        self._context, self._integrator = context, integrator
        return context

    # -- the calls a driver makes ----------------------------------------------------------
    def reset(self, seed: int, temperature: float) -> float:
        """Start over at ``temperature`` (K) with velocities drawn with ``seed``; the energy (kJ/mol)."""
        self._pull_state()
        self._context = self._integrator = None
        self.seed, self.temperature, self.steps_done, self.velocities = seed, temperature, 0, None
        return self.energy()

    def energy(self) -> float:
        """The potential energy of the current positions, in kJ/mol."""
        from openmm import unit

        state = self.context().getState(getEnergy=True)
        return float(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))

    def set_temperature(self, temperature: float) -> None:
        """Move to ``temperature`` (K): the thermostat's, and the velocities scaled by sqrt(T_new / T_old)."""
        if temperature == self.temperature:
            return
        from openmm import unit

        context = self.context()
        velocities = context.getState(getVelocities=True).getVelocities(asNumpy=True)
        context.setVelocities(velocities * math.sqrt(temperature / self.temperature))
        self._integrator.setTemperature(temperature * unit.kelvin)
        self.temperature = temperature

    def sample(self, steps: int, temperature: float, thin: int = 0) -> dict[str, Any]:
        """Move to ``temperature``, run ``steps`` MD steps; the energy and, if ``thin``, dihedrals.

        Returns ``energy`` (kJ/mol, at the end), ``angles`` (every ``thin`` steps, one
        tuple of degrees per entry of ``dihedrals``; empty when ``thin`` is 0), ``md``
        (seconds in ``integrator.step``) and ``seconds`` (the whole call).
        """
        start = time.perf_counter()
        self.set_temperature(temperature)
        self.context()
        angles: list[tuple[float, ...]] = []
        md = 0.0
        chunk = thin if thin > 0 else steps
        left = steps
        while left > 0:
            n = min(chunk, left)
            t0 = time.perf_counter()
            self._integrator.step(n)
            md += time.perf_counter() - t0
            left -= n
            if thin > 0 and n == chunk:
                angles.append(self._angles())
        self.steps_done += steps
        energy = self.energy()
        return {"energy": energy, "angles": angles, "md": md, "seconds": time.perf_counter() - start}

    def _angles(self) -> tuple[float, ...]:
        from openmm import unit

        pos = self.context().getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        return tuple(dihedral(*(pos[a] for a in quad)) for quad in self.dihedrals)


# -- where the replicas run ------------------------------------------------------------------
class ReplicaSet(Protocol):
    """Replicas that answer calls in order: on a grid, or in this process."""

    n: int

    def scatter(self, name: str, arglist: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Call ``name(*arglist[i])`` on replica ``i``; the values, in order."""
        ...

    def close(self) -> None:
        """Release the replicas."""
        ...


class GridReplicas:
    """One copy of ``replica`` published on every slot of ``grid``; replica ``i`` is server ``i``."""

    def __init__(self, grid: Grid, replica: OpenMMReplica, timeout: float = 600.0) -> None:
        self.grid = grid
        self.service_id = grid.publish(replica)
        self.n = len(grid.servers[self.service_id])
        self.timeout = timeout

    def scatter(self, name: str, arglist: Sequence[tuple[Any, ...]]) -> list[Any]:
        """``grid.scatter`` and ``grid.gather``."""
        return self.grid.gather(self.grid.scatter(self.service_id, name, arglist), timeout=self.timeout)

    def close(self) -> None:
        """Release and end the service."""
        self.grid.release_all(self.service_id)
        self.grid.terminate(self.service_id)


class SerialReplicas:
    """``n`` copies of ``replica`` in this process (made as a grid would: pickled and loaded), called in turn."""

    def __init__(self, replica: OpenMMReplica, n: int) -> None:
        payload = pickle.dumps(replica)
        self.replicas = [pickle.loads(payload) for _ in range(n)]
        self.n = n

    def scatter(self, name: str, arglist: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Call each replica in turn."""
        if len(arglist) != self.n:
            raise ValueError(f"scatter: {len(arglist)} argument items for {self.n} replicas")
        return [getattr(rep, name)(*args) for rep, args in zip(self.replicas, arglist, strict=True)]

    def close(self) -> None:
        """Drop the replicas (and their Contexts)."""
        self.replicas = []


def predicted_acceptance(mean_low: float, var_low: float, mean_high: float, var_high: float, dbeta: float) -> float:
    """The swap acceptance two Gaussian energy distributions predict.

    With ``x = dbeta (U_low - U_high)`` normal, mean ``m``, variance ``v``:
    ``E[min(1, e^x)] = Phi(m / sd) + exp(m + v / 2) Phi(-(m + v) / sd)``.
    """
    m = dbeta * (mean_low - mean_high)
    v = dbeta * dbeta * (var_low + var_high)
    if v <= 0.0:
        return 1.0 if m >= 0 else math.exp(m)
    sd = math.sqrt(v)

    def phi(z: float) -> float:
        return 0.5 * math.erfc(-z / math.sqrt(2.0))

    return phi(m / sd) + math.exp(m + v / 2.0) * phi(-(m + v) / sd)


# -- the driver --------------------------------------------------------------------------------
@dataclass
class TemperingResult(ExchangeResult):
    """What a tempering run measured (energies in kJ/mol, times in seconds).

    The toy example's result (temperatures, attempts, accepted, round trips, the wall time
    of each round, ``acceptance``) and, per round: each state's energy before the swaps,
    the dihedrals recorded at the lowest temperature, and each replica's time in its
    ``sample`` call and in ``integrator.step``. Its ``samples`` stay empty.
    """

    swaps: list[Swap] = field(default_factory=list)
    energies: list[list[float]] = field(default_factory=list)  # per round, by state (before the swaps)
    angles: list[list[tuple[float, ...]]] = field(default_factory=list)  # per round, at the lowest temperature
    call_times: list[list[float]] = field(default_factory=list)  # per round, each replica's time in sample
    md_times: list[list[float]] = field(default_factory=list)  # per round, each replica's time in integrator.step

    def timing(self) -> tuple[float, float]:
        """Mean per round of the wall time and of the longest ``sample`` call (the time in OpenMM)."""
        if not self.round_times:
            return 0.0, 0.0
        return statistics.fmean(self.round_times), statistics.fmean(max(row) for row in self.call_times)

    def expected_acceptance(self) -> list[float | None]:
        """Per pair, the mean of ``min(1, exp(delta))`` over the attempts: what the coin should have given."""
        sums = [0.0] * len(self.attempts)
        for swap in self.swaps:
            sums[swap.state] += min(1.0, math.exp(min(0.0, swap.delta)))
        return [s / n if n else None for s, n in zip(sums, self.attempts, strict=True)]

    def predicted_acceptance(self, burn_in: float = 0.1) -> list[float | None]:
        """Per pair, the acceptance the ladder predicts from each state's energy mean and variance."""
        rows = self.energies[int(round(burn_in * len(self.energies))) :]
        if len(rows) < 2:
            return [None] * len(self.attempts)
        n = len(rows)
        means = [sum(r[s] for r in rows) / n for s in range(len(self.temperatures))]
        var = [sum((r[s] - means[s]) ** 2 for r in rows) / (n - 1) for s in range(len(self.temperatures))]
        betas = [1.0 / (GAS_CONSTANT * t) for t in self.temperatures]
        return [
            predicted_acceptance(means[s], var[s], means[s + 1], var[s + 1], betas[s] - betas[s + 1])
            for s in range(len(self.temperatures) - 1)
        ]

    def lowest_angles(self, burn_in: float = 0.1) -> list[tuple[float, ...]]:
        """The dihedrals recorded at the lowest temperature, without the first ``burn_in`` of rounds."""
        skip = int(round(burn_in * len(self.angles)))
        return [a for chunk in self.angles[skip:] for a in chunk]


class Tempering(CheckpointedRun):
    """Temperature replica exchange of :class:`OpenMMReplica` (see the module doc).

    ``replicas`` runs them (a grid or this process); ``temperatures`` in K, increasing, one
    per replica; ``steps`` MD steps per round; ``thin``: record the dihedrals at the lowest
    temperature every ``thin`` steps (0: never).

    ``checkpoint_every=K`` (replicas on a grid only) takes a run checkpoint at the start and
    every K rounds (every replica's snapshot: positions, velocities, temperature, steps; the
    exchange book; the result so far). When a host is lost mid-run the driver waits for its
    respawn (``Grid(respawn=True)``), takes every replica and itself back to the last
    checkpoint, and goes on: at most K rounds are done again. The integrators' random
    streams cannot be read back from OpenMM, so a restored replica continues with a new
    (seeded) stream: the run stays a valid simulation, not a bit-for-bit copy of an
    undisturbed one.
    """

    def __init__(
        self,
        replicas: ReplicaSet,
        temperatures: Sequence[float] | None = None,
        *,
        scheme: str = "gromacs",
        steps: int = 500,
        thin: int = 50,
        seed: int = 0,
        log: IO[str] | None = None,
        checkpoint_every: int | None = None,
        checkpoint_path: str | None = None,
        resume: RunCheckpoint | None = None,
    ) -> None:
        state = resume.driver_state() if resume is not None else None
        if state is not None:
            settings = state["settings"]
            temperatures, scheme, steps, thin, seed = (
                settings["temperatures"], settings["scheme"], settings["steps"], settings["thin"], settings["seed"]
            )
            checkpoint_every = settings["checkpoint_every"] if checkpoint_every is None else checkpoint_every
        if temperatures is None:
            raise ConfigError("give the temperatures (or resume a checkpointed run)")
        wants_grid = checkpoint_every is not None or checkpoint_path is not None or resume is not None
        if wants_grid and not isinstance(replicas, GridReplicas):
            raise ConfigError("checkpoints and resume need replicas on a grid (GridReplicas)")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be at least 1 round, not {checkpoint_every}")
        if len(temperatures) != replicas.n:
            raise ConfigError(f"{len(temperatures)} temperatures for {replicas.n} replicas (one per slot)")
        if list(temperatures) != sorted(temperatures) or temperatures[0] <= 0:
            raise ConfigError("temperatures must be positive and in increasing order")
        if steps < 1 or thin < 0:
            raise ConfigError("steps must be >= 1 and thin >= 0")
        self.replicas = replicas
        self.temperatures = list(temperatures)
        self.steps, self.thin, self.seed, self.scheme = steps, thin, seed, scheme
        self.target_rounds = 0
        self.rng = random.Random(seed)
        self.book = ExchangeBook([1.0 / (GAS_CONSTANT * t) for t in self.temperatures], scheme, self.rng)
        self.result = TemperingResult(
            self.temperatures, scheme, steps, attempts=self.book.attempts, accepted=self.book.accepted
        )
        self.log = log
        self.checkpoint_every = checkpoint_every
        self._checkpointer: RunCheckpointer | None = None
        if isinstance(replicas, GridReplicas) and wants_grid:
            self._checkpointer = RunCheckpointer(
                replicas.grid, replicas.service_id, path=checkpoint_path, log=log, timeout=replicas.timeout,
                last=resume,
            )
        if resume is not None and state is not None:
            self._continue_from(resume, state)
            self.start_energies: list[Any] = []
            return
        seeds = [self.rng.randrange(1, 2**31 - 1) for _ in range(replicas.n)]
        self.start_energies = replicas.scatter("reset", [(seeds[r], self.temperatures[r]) for r in range(replicas.n)])
        if log is not None:
            log.write(LOG_HEADER)
        if self._checkpointer is not None and checkpoint_every is not None:
            self.checkpoint()

    def step(self) -> list[Swap]:
        """One round: sample at the current temperatures, try swaps, log."""
        start = time.perf_counter()
        book, res = self.book, self.result
        args = [
            (self.steps, self.temperatures[s], self.thin if s == 0 else 0) for s in book.state_of_replica
        ]
        reports = self.replicas.scatter("sample", args)
        energies = [rep["energy"] for rep in reports]
        res.energies.append([energies[r] for r in book.replica_at_state])
        res.angles.append([tuple(a) for a in reports[book.replica_at_state[0]]["angles"]])
        res.call_times.append([rep["seconds"] for rep in reports])
        res.md_times.append([rep["md"] for rep in reports])
        swaps = book.exchange(energies)
        res.swaps += swaps
        res.rounds, res.round_trips = book.rounds, book.round_trips
        if self.log is not None:
            self.log.write(book.log_row())
        res.round_times.append(time.perf_counter() - start)
        return swaps

    def run(self, rounds: int, progress: Callable[[int], None] | None = None) -> TemperingResult:
        """Run until ``rounds`` rounds are done; ``progress(k)``: the rounds done since its last call.

        ``k`` is negative after a roll-back to a checkpoint (see the class doc).
        """
        self.run_rounds(rounds, progress)
        return self.result

    def _state(self) -> dict[str, Any]:
        settings = {
            "engine": "openmm", "temperatures": self.temperatures, "scheme": self.scheme, "steps": self.steps,
            "thin": self.thin, "seed": self.seed, "checkpoint_every": self.checkpoint_every,
            "target_rounds": self.target_rounds,
        }
        return {"settings": settings, "book": self.book, "result": self.result}  # the book holds the random generator

    def _load(self, state: dict[str, Any]) -> None:
        self.book = state["book"]
        self.rng = self.book.rng
        self.result = state["result"]
        self.target_rounds = state["settings"]["target_rounds"]
