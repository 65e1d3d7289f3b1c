"""Replica exchange bookkeeping, engine-agnostic: temperature ladders, swap pairs, the exchange book.

Both example drivers use it: the Monte Carlo toy (:mod:`isdgrid.examples.replica_exchange`)
and OpenMM tempering (:mod:`isdgrid.examples.openmm_tempering`). An :class:`ExchangeBook`
holds which replica is at which temperature, the swap attempts and acceptances and the
round trips, and its random generator: pickling it keeps all of that (a run checkpoint
does).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["LOG_HEADER", "SCHEMES", "ExchangeBook", "Swap", "check_scheme", "exchange_pairs", "geometric_ladder"]

SCHEMES = ("gromacs", "evenodd", "random")
#: The first line of a replica log (IMP.isd's replicanums); :meth:`ExchangeBook.log_row` the others.
LOG_HEADER = "# round, then the replica (1-based) at each temperature, lowest first\n"


def check_scheme(scheme: str) -> None:
    """Raise :class:`ConfigError` for a scheme not in :data:`SCHEMES`."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown exchange scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")


def geometric_ladder(n: int, t_min: float = 1.0, t_max: float = 6.0) -> list[float]:
    """``n`` temperatures from ``t_min`` to ``t_max`` with a constant ratio."""
    if n < 1:
        raise ConfigError("a temperature ladder needs at least one temperature")
    if not 0 < t_min <= t_max:
        raise ConfigError("need 0 < t_min <= t_max")
    if n == 1:
        return [t_min]
    ratio = (t_max / t_min) ** (1.0 / (n - 1))
    return [t_min * ratio**i for i in range(n)]


def exchange_pairs(scheme: str, n_states: int, round_index: int, rng: random.Random) -> list[tuple[int, int]]:
    """The disjoint pairs of neighbouring states ``(s, s + 1)`` to try swapping this round."""
    if scheme == "gromacs":
        parity = round_index % 2
    elif scheme == "evenodd":
        parity = rng.randrange(2)
    elif scheme == "random":
        free = set(range(n_states))
        pairs = []
        order = list(range(n_states))
        rng.shuffle(order)
        for s in order:
            if s not in free:
                continue
            for t in sorted((s - 1, s + 1), key=lambda _: rng.random()):
                if t in free:
                    free -= {s, t}
                    pairs.append((min(s, t), max(s, t)))
                    break
        return sorted(pairs)
    else:
        check_scheme(scheme)
    return [(s, s + 1) for s in range(parity, n_states - 1, 2)]


# -- the exchange book ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Swap:
    """One attempted swap: states ``(state, state + 1)``, ``delta`` = ``(beta_s - beta_t)(U_s - U_t)``."""

    round: int
    state: int
    delta: float
    accepted: bool


class ExchangeBook:
    """Which replica is at which temperature; swap attempts, acceptances and round trips.

    State ``s`` is the ``s``-th temperature (lowest first). A round trip is counted when a
    replica that left the lowest state reached the highest and came back to the lowest.
    """

    def __init__(self, betas: Sequence[float], scheme: str = "gromacs", rng: random.Random | None = None) -> None:
        check_scheme(scheme)
        self.betas = list(betas)
        self.n = len(self.betas)
        self.scheme = scheme
        self.rng = rng or random.Random(0)
        self.replica_at_state = list(range(self.n))
        self.state_of_replica = list(range(self.n))
        self.attempts = [0] * max(0, self.n - 1)
        self.accepted = [0] * max(0, self.n - 1)
        self.round_trips = 0
        self.rounds = 0
        self._been_bottom = [r == 0 for r in range(self.n)]
        self._seen_top = [False] * self.n

    def exchange(self, energies: Sequence[float]) -> list[Swap]:
        """One round of swap attempts, given each replica's energy (by replica)."""
        swaps = []
        for s, t in exchange_pairs(self.scheme, self.n, self.rounds, self.rng):
            low, high = self.replica_at_state[s], self.replica_at_state[t]
            delta = (self.betas[s] - self.betas[t]) * (energies[low] - energies[high])
            ok = delta >= 0.0 or self.rng.random() < math.exp(delta)
            self.attempts[s] += 1
            if ok:
                self.accepted[s] += 1
                self.replica_at_state[s], self.replica_at_state[t] = high, low
                self.state_of_replica[low], self.state_of_replica[high] = t, s
            swaps.append(Swap(self.rounds, s, delta, ok))
        self._count_round_trips()
        self.rounds += 1
        return swaps

    def _count_round_trips(self) -> None:
        for r, s in enumerate(self.state_of_replica):
            if s == self.n - 1 and self._been_bottom[r]:
                self._seen_top[r] = True
            elif s == 0:
                self.round_trips += self._seen_top[r]
                self._been_bottom[r], self._seen_top[r] = True, False

    def log_row(self) -> str:
        """The replica log's line for the round just done: its number, then the replica at each temperature."""
        return f"{self.rounds:8d} " + " ".join(f"{r + 1:2d}" for r in self.replica_at_state) + "\n"
