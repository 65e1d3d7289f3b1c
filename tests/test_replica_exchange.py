"""The replica-exchange example: exchange pairs, bookkeeping, and sampling the right distribution."""

from __future__ import annotations

import io
import math
import random

import pytest

from isdgrid import ConfigError, Grid
from isdgrid.examples.boltzmann import check_boltzmann, chi2_sf, exact_marginal
from isdgrid.examples.replica_exchange import (
    ReplicaExchange,
    RuggedDoubleWell,
    exchange_pairs,
    geometric_ladder,
)

MODEL = RuggedDoubleWell()


def test_geometric_ladder() -> None:
    ladder = geometric_ladder(4, 1.0, 8.0)
    assert ladder == pytest.approx([1.0, 2.0, 4.0, 8.0])
    assert geometric_ladder(1) == [1.0]
    with pytest.raises(ConfigError):
        geometric_ladder(3, 2.0, 1.0)


def test_gromacs_alternates_even_and_odd_pairs() -> None:
    rng = random.Random(0)
    assert exchange_pairs("gromacs", 5, 0, rng) == [(0, 1), (2, 3)]
    assert exchange_pairs("gromacs", 5, 1, rng) == [(1, 2), (3, 4)]
    assert exchange_pairs("gromacs", 2, 1, rng) == []
    assert exchange_pairs("gromacs", 1, 0, rng) == []


@pytest.mark.parametrize("scheme", ["evenodd", "random"])
def test_random_schemes_pick_disjoint_neighbours_and_vary(scheme: str) -> None:
    rng = random.Random(1)
    seen = set()
    for _ in range(200):
        pairs = exchange_pairs(scheme, 6, 0, rng)
        states = [s for pair in pairs for s in pair]
        assert len(states) == len(set(states))  # disjoint
        assert all(t == s + 1 for s, t in pairs)  # neighbours, lower first
        seen.add(tuple(pairs))
    if scheme == "evenodd":
        assert seen == {((0, 1), (2, 3), (4, 5)), ((1, 2), (3, 4))}
    else:
        assert len(seen) > 2  # random neighbours: more than the two even/odd patterns


def test_unknown_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="gromacs"):
        exchange_pairs("convective", 4, 0, random.Random(0))


def test_chi2_survival_function_known_values() -> None:
    assert chi2_sf(3.0, 2) == pytest.approx(math.exp(-1.5))
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(16.918977604620448, 9) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(0.0, 4) == 1.0


def test_exact_marginal_matches_the_analytic_reduction() -> None:
    # The y integral of exp(-k/2 (y - c x)^2 / T) does not depend on x, so the x marginal is
    # exp(-(h (x^2-1)^2 + a x + r cos(w x)) / T): an independent way to get P(x < 0).
    exact = exact_marginal(MODEL.energy, 1.0)
    xs = [-3 + 6 * i / 20000 for i in range(20001)]
    w = [
        math.exp(-(MODEL.barrier * (x * x - 1) ** 2 + MODEL.tilt * x + MODEL.ripple * math.cos(MODEL.ripple_freq * x)))
        for x in xs
    ]
    left = sum(wi for x, wi in zip(xs, w, strict=True) if x < 0) / sum(w)
    assert exact.probability_below(0.0) == pytest.approx(left, abs=1e-4)
    assert 0.6 < left < 0.85  # the tilt makes the left well the heavier one
    assert exact.quantile(exact.probability_below(0.7)) == pytest.approx(0.7, abs=1e-3)


def test_boltzmann_check_accepts_exact_draws_and_rejects_wrong_ones() -> None:
    exact = exact_marginal(MODEL.energy, 1.0)
    rng = random.Random(7)
    good = check_boltzmann(exact.sample(5000, rng), exact)
    assert good.passed, good.summary()
    hotter = check_boltzmann(exact_marginal(MODEL.energy, 1.3).sample(5000, rng), exact)
    assert hotter.verdict == "FAIL", hotter.summary()
    one_well = [x for x in exact.sample(8000, rng) if x < 0][:5000]
    stuck = check_boltzmann(one_well, exact)
    assert stuck.verdict == "FAIL", stuck.summary()
    # A chain that barely moves carries little information: too few effective samples.
    sticky = [x for x in exact.sample(100, rng) for _ in range(50)]
    assert check_boltzmann(sticky, exact).verdict == "INCONCLUSIVE"


def _round_trips_from_log(lines: list[str], n: int) -> int:
    """Recount round trips from the replica-per-state log (written by the driver)."""
    phase = {r: 0 for r in range(1, n + 1)}
    trips = 0
    rows = [[int(v) for v in line.split()[1:]] for line in lines]
    for row in [list(range(1, n + 1)), *rows]:
        for state, replica in enumerate(row):
            if state == 0:
                trips += phase[replica] == 2
                phase[replica] = 1
            elif state == n - 1 and phase[replica] == 1:
                phase[replica] = 2
    return trips


def test_seeded_run_samples_the_boltzmann_distribution(grid: Grid) -> None:
    log = io.StringIO()
    rex = ReplicaExchange(grid, geometric_ladder(4, 1.0, 6.0), steps=200, seed=0, log=log)
    result = rex.run(300)
    status = rex.status()

    # Bookkeeping: gromacs alternation tries each pair every other round.
    assert result.rounds == 300
    assert result.attempts == [150, 150, 150]
    assert all(0.2 < rate < 0.95 for rate in result.acceptance if rate is not None), result.acceptance
    lines = [line for line in log.getvalue().splitlines() if not line.startswith("#")]
    assert len(lines) == 300
    assert all(sorted(int(v) for v in line.split()[1:]) == [1, 2, 3, 4] for line in lines)
    assert result.round_trips == _round_trips_from_log(lines, 4) > 0
    # One reset, then one sample and one set_temperature per round, on every server.
    assert [row.calls for row in status] == [601] * 4
    assert all(row.errors == 0 for row in status)

    # The physics: at T = 1 the samples follow exp(-E/T) (block-averaged chi-square).
    samples = result.lowest_samples(burn_in=0.1)
    assert len(samples) == 270 * 20
    check = check_boltzmann(samples, exact_marginal(MODEL.energy, 1.0))
    assert check.passed, check.summary()
