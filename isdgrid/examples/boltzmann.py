"""The exact Boltzmann distribution of the example model, and a check of sampled data.

The model of :mod:`isdgrid.examples.replica_exchange` is two-dimensional; its marginal
density in ``x`` at temperature ``T``,

    p(x) ∝ ∫ exp(-E(x, y) / T) dy,

is computed numerically on a grid (trapezoid rule in ``y`` and a cumulative trapezoid in
``x``), which gives its distribution function and quantiles to about 1e-6.

:func:`check_boltzmann` compares samples with it. The ``x`` axis is cut into ``bins``
intervals that are equally probable under the exact distribution (so every expected
frequency is ``1/bins``). Monte Carlo samples are correlated: ``g``, the statistical
inefficiency (how many correlated samples are worth one independent one), is estimated
twice for the indicator series of every bin, by batch means (the spread of the histograms
of ``blocks`` consecutive blocks) and from the autocorrelation function (Geyer's initial
positive sequence), and the largest value is used (an underestimated ``g`` would make a
short, still correlated chain look like proof of a wrong distribution). The chi-square
statistic is computed with the effective sample size ``N_eff = N / g``:

    chi2 = N_eff * sum_k (f_k - 1/K)^2 / (1/K)      (K - 1 degrees of freedom)

The chi-square distribution is a good approximation of this statistic only when every bin
expects at least 5 counts (Cochran's rule); ``N_eff`` is itself an estimate, uncertain by
a factor of about two with 10 blocks, so the check asks for twice that: ``N_eff >= 10 K``
(``min_effective``, 100 with the default 10 bins).

The slowest motion of the model is the hop between its two wells. In replica exchange the
lowest temperature gets a fresh well when a replica that crossed at the top comes down: the
well populations rest on about one independent draw per replica round trip, however many
samples each draw yields. Given ``round_trips``, the check also asks for at least 5
expected draws of the rarer well: ``round_trips * min(P(x<0), P(x>0)) >= 5`` (19 round
trips for the example model at T = 1).

The verdict is INCONCLUSIVE when either condition fails (too few effective samples to
judge: run more rounds), else FAIL when the chi-square p-value is below ``alpha`` (default
0.001), else PASS. The total variation distance ``1/2 sum_k |f_k - 1/K|`` and the
population of the left well (``x < 0``, with its block standard error) are reported
beside it.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "BoltzmannCheck",
    "ExactMarginal",
    "autocorrelation_inefficiency",
    "check_boltzmann",
    "chi2_sf",
    "exact_marginal",
]

Energy = Callable[[float, float], float]


@dataclass(frozen=True)
class ExactMarginal:
    """The exact marginal distribution in ``x``, tabulated: grid points and their CDF."""

    temperature: float
    xs: tuple[float, ...]
    cdf: tuple[float, ...]

    def probability_below(self, x: float) -> float:
        """P(X < x), linearly interpolated on the grid."""
        if x <= self.xs[0]:
            return 0.0
        if x >= self.xs[-1]:
            return 1.0
        i = bisect.bisect_right(self.xs, x)
        x0, x1, c0, c1 = self.xs[i - 1], self.xs[i], self.cdf[i - 1], self.cdf[i]
        return c0 + (c1 - c0) * (x - x0) / (x1 - x0)

    def quantile(self, q: float) -> float:
        """The ``x`` with P(X < x) = q (0 < q < 1), linearly interpolated."""
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile needs 0 < q < 1, got {q}")
        i = bisect.bisect_left(self.cdf, q)
        c0, c1, x0, x1 = self.cdf[i - 1], self.cdf[i], self.xs[i - 1], self.xs[i]
        return x0 + (x1 - x0) * (q - c0) / (c1 - c0) if c1 > c0 else x1

    def sample(self, n: int, rng: random.Random) -> list[float]:
        """``n`` independent draws (inverse transform): reference data for tests."""
        return [self.quantile(min(max(rng.random(), 1e-12), 1 - 1e-12)) for _ in range(n)]


def exact_marginal(
    energy: Energy,
    temperature: float,
    *,
    x_range: tuple[float, float] = (-3.0, 3.0),
    y_range: tuple[float, float] = (-5.0, 5.0),
    nx: int = 1201,
    ny: int = 201,
) -> ExactMarginal:
    """Tabulate the marginal distribution in ``x`` of ``exp(-energy(x, y) / temperature)``.

    The ranges must hold all but a negligible part of the probability (the example model's
    does, with a margin of many standard deviations).
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    beta = 1.0 / temperature
    (x_lo, x_hi), (y_lo, y_hi) = x_range, y_range
    xs = [x_lo + (x_hi - x_lo) * i / (nx - 1) for i in range(nx)]
    ys = [y_lo + (y_hi - y_lo) * j / (ny - 1) for j in range(ny)]
    dy = ys[1] - ys[0]
    # Shift energies by the minimum over the grid so exp() never underflows to all zeros.
    table = [[energy(x, y) for y in ys] for x in xs]
    e_min = min(min(row) for row in table)
    density = []
    for row in table:
        w = [math.exp(-beta * (e - e_min)) for e in row]
        density.append(dy * (sum(w) - 0.5 * (w[0] + w[-1])))
    dx = xs[1] - xs[0]
    cdf = [0.0]
    for i in range(1, nx):
        cdf.append(cdf[-1] + 0.5 * dx * (density[i - 1] + density[i]))
    total = cdf[-1]
    return ExactMarginal(temperature, tuple(xs), tuple(c / total for c in cdf))


def chi2_sf(x: float, dof: int) -> float:
    """P(chi2_dof >= x), exact for integer ``dof`` (closed forms of the incomplete gamma)."""
    if dof < 1:
        raise ValueError("dof must be >= 1")
    if x <= 0:
        return 1.0
    half = x / 2.0
    if dof % 2 == 0:
        term, total = 1.0, 1.0
        for i in range(1, dof // 2):
            term *= half / i
            total += term
        return min(1.0, math.exp(-half) * total)
    total = math.erfc(math.sqrt(half))
    term = math.sqrt(half) / math.gamma(1.5)
    acc = 0.0
    for i in range((dof - 1) // 2):
        if i:
            term *= half / (i + 0.5)
        acc += term
    return min(1.0, total + math.exp(-half) * acc)


MIN_EXPECTED = 5.0  # Cochran's rule: the chi-square approximation wants >= 5 expected per cell


@dataclass(frozen=True)
class BoltzmannCheck:
    """The outcome of :func:`check_boltzmann` (see the module docstring for the method)."""

    temperature: float
    samples: int
    bins: int
    blocks: int
    inefficiency: float
    effective_samples: float
    chi2: float
    dof: int
    p_value: float
    alpha: float
    min_effective: float
    tvd: float
    frequencies: tuple[float, ...]
    left_fraction: float
    left_fraction_se: float
    left_fraction_exact: float
    round_trips: int | None = None
    min_round_trips: int = 0

    @property
    def reason(self) -> str:
        """Why the verdict is INCONCLUSIVE ('' when it is not)."""
        if self.effective_samples < self.min_effective:
            return (
                f"too few effective samples to judge: N_eff {self.effective_samples:.0f} < {self.min_effective:.0f} "
                f"({self.min_effective / self.bins:.0f} expected per bin); run more rounds"
            )
        if self.round_trips is not None and self.round_trips < self.min_round_trips:
            return (
                f"too few replica round trips to judge the well populations: {self.round_trips} < "
                f"{self.min_round_trips}; run more rounds"
            )
        return ""

    @property
    def verdict(self) -> str:
        """``"INCONCLUSIVE"`` (too few effective samples), ``"FAIL"`` (p < alpha) or ``"PASS"``."""
        if self.reason:
            return "INCONCLUSIVE"
        if self.p_value < self.alpha:
            return "FAIL"
        return "PASS"

    @property
    def passed(self) -> bool:
        """True when the verdict is PASS."""
        return self.verdict == "PASS"

    def summary(self) -> str:
        """One line for people: the verdict, the figures it rests on, and why if INCONCLUSIVE."""
        trips = "" if self.round_trips is None else f", round trips {self.round_trips} (need >= {self.min_round_trips})"
        why = f"; {self.reason}" if self.reason else ""
        return (
            f"{self.verdict}: {self.samples} samples at T={self.temperature:g}, "
            f"N_eff {self.effective_samples:.0f} (g {self.inefficiency:.1f}; need >= {self.min_effective:.0f}){trips}; "
            f"chi2 {self.chi2:.1f} on {self.dof} dof, p={self.p_value:.3g} (alpha {self.alpha:g}), "
            f"TVD {self.tvd:.3f}; P(x<0) {self.left_fraction:.3f} +- {self.left_fraction_se:.3f} "
            f"vs exact {self.left_fraction_exact:.3f}{why}"
        )


def autocorrelation_inefficiency(index: Sequence[int], bins: int) -> list[float]:
    """Per bin, ``g = 1 + 2 sum_t rho_t`` of the bin's indicator series (Geyer's initial positive sequence).

    The autocovariances of all the bins' indicator series are computed together, one
    lag at a time, and each bin's sum stops at its first pair ``c(2m) + c(2m+1) <= 0``.
    A bin never or always visited has no variance: its ``g`` is 1.
    """
    n = len(index)
    counts = [0] * bins
    for k in index:
        counts[k] += 1
    freq = [c / n for c in counts]
    head = list(counts)  # occurrences of k in index[: n - t]
    tail = list(counts)  # occurrences of k in index[t:]

    def autocovariances(t: int) -> list[float]:
        same = [0] * bins
        for a, b in zip(index, index[t:], strict=False):
            if a == b:
                same[a] += 1
        return [(same[k] - freq[k] * (head[k] + tail[k]) + (n - t) * freq[k] ** 2) / n for k in range(bins)]

    c0 = [f * (1.0 - f) for f in freq]
    active = [c > 0 for c in c0]
    sums = [0.0] * bins
    t = 0
    previous = c0
    while any(active) and t + 1 < n:
        t += 1
        head[index[n - t]] -= 1
        tail[index[t - 1]] -= 1
        current = autocovariances(t)
        if t % 2:  # the pair (c(t - 1), c(t)) is complete
            for k in range(bins):
                if active[k]:
                    pair = previous[k] + current[k]
                    if pair <= 0:
                        active[k] = False
                    else:
                        sums[k] += pair
        previous = current
    return [max(1.0, (2.0 * sums[k] - c0[k]) / c0[k]) if c0[k] > 0 else 1.0 for k in range(bins)]


def check_boltzmann(
    samples: Sequence[float],
    exact: ExactMarginal,
    *,
    bins: int = 10,
    blocks: int = 10,
    alpha: float = 1e-3,
    min_effective: float | None = None,
    round_trips: int | None = None,
) -> BoltzmannCheck:
    """Compare a chain of ``x`` samples with the exact marginal (chi-square on the effective sample size).

    ``min_effective`` defaults to ``2 * 5 * bins`` (see the module docstring);
    ``round_trips``, the replica round trips of a replica-exchange run, adds the
    well-population condition.
    """
    if bins < 2 or blocks < 2:
        raise ValueError("need at least 2 bins and 2 blocks")
    length = len(samples) // blocks
    if length < 1:
        raise ValueError(f"need at least {blocks} samples for {blocks} blocks, got {len(samples)}")
    if min_effective is None:
        min_effective = 2 * MIN_EXPECTED * bins
    used = list(samples[: length * blocks])
    n = len(used)
    edges = [exact.quantile(k / bins) for k in range(1, bins)]
    index = [bisect.bisect_right(edges, x) for x in used]
    p = 1.0 / bins
    counts = [0] * bins
    block_freq = [[0.0] * bins for _ in range(blocks)]
    for t, k in enumerate(index):
        counts[k] += 1
        block_freq[t // length][k] += 1.0 / length
    freq = [c / n for c in counts]
    g_bins = []
    for k in range(bins):
        var = sum((block_freq[b][k] - freq[k]) ** 2 for b in range(blocks)) / (blocks - 1)
        g_bins.append(length * var / (p * (1 - p)))
    # The slowest bin, by the larger of the two estimates: conservative.
    inefficiency = max(1.0, *g_bins, *autocorrelation_inefficiency(index, bins))
    n_eff = n / inefficiency
    chi2 = n_eff * sum((f - p) ** 2 for f in freq) / p
    dof = bins - 1
    tvd = 0.5 * sum(abs(f - p) for f in freq)
    left_blocks = [sum(1 for x in used[b * length : (b + 1) * length] if x < 0) / length for b in range(blocks)]
    left = sum(left_blocks) / blocks
    left_se = math.sqrt(sum((v - left) ** 2 for v in left_blocks) / (blocks - 1) / blocks)
    left_exact = exact.probability_below(0.0)
    rarer_well = min(left_exact, 1.0 - left_exact)
    return BoltzmannCheck(
        temperature=exact.temperature,
        samples=n,
        bins=bins,
        blocks=blocks,
        inefficiency=inefficiency,
        effective_samples=n_eff,
        chi2=chi2,
        dof=dof,
        p_value=chi2_sf(chi2, dof),
        alpha=alpha,
        min_effective=min_effective,
        tvd=tvd,
        frequencies=tuple(freq),
        left_fraction=left,
        left_fraction_se=left_se,
        left_fraction_exact=left_exact,
        round_trips=round_trips,
        min_round_trips=math.ceil(MIN_EXPECTED / rarer_well) if rarer_well > 0 else 0,
    )
