"""The exact Boltzmann distribution of the example model, and a check of sampled data.

The model of :mod:`isdgrid.examples.replica_exchange` is two-dimensional; its marginal
density in ``x`` at temperature ``T``,

    p(x) ∝ ∫ exp(-E(x, y) / T) dy,

is computed numerically on a grid (trapezoid rule in ``y`` and a cumulative trapezoid in
``x``), which gives its distribution function and quantiles to about 1e-6.

:func:`check_boltzmann` compares samples with it. The ``x`` axis is cut into ``bins``
intervals that are equally probable under the exact distribution (so every expected
frequency is ``1/bins``). Monte Carlo samples are correlated, so the chain is cut into
``blocks`` consecutive blocks (batch means): the spread of the per-block histograms gives
the statistical inefficiency ``g`` (how many correlated samples are worth one independent
one; the largest over the bins, which errs on the safe side), and the chi-square
statistic is computed with the effective sample size ``N / g``:

    chi2 = (N / g) * sum_k (f_k - 1/K)^2 / (1/K)      (K - 1 degrees of freedom)

The verdict is FAIL when the chi-square p-value is below ``alpha`` (default 0.001),
INCONCLUSIVE when the chain holds fewer than ``min_effective`` (default 100) effective
samples (too correlated to tell: run longer), and PASS otherwise. The
total variation distance ``1/2 sum_k |f_k - 1/K|`` and the population of the left well
(``x < 0``, with its block standard error) are reported beside it.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["BoltzmannCheck", "ExactMarginal", "check_boltzmann", "chi2_sf", "exact_marginal"]

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

    @property
    def verdict(self) -> str:
        """``"FAIL"`` (p < alpha), ``"INCONCLUSIVE"`` (too few effective samples) or ``"PASS"``."""
        if self.p_value < self.alpha:
            return "FAIL"
        if self.effective_samples < self.min_effective:
            return "INCONCLUSIVE"
        return "PASS"

    @property
    def passed(self) -> bool:
        """True when the verdict is PASS."""
        return self.verdict == "PASS"

    def summary(self) -> str:
        """One line for people."""
        return (
            f"{self.verdict}: {self.samples} samples at T={self.temperature:g} "
            f"(N_eff {self.effective_samples:.0f}, g {self.inefficiency:.1f}), "
            f"chi2 {self.chi2:.1f} on {self.dof} dof, p={self.p_value:.3g} (alpha {self.alpha:g}), "
            f"TVD {self.tvd:.3f}; P(x<0) {self.left_fraction:.3f} +- {self.left_fraction_se:.3f} "
            f"vs exact {self.left_fraction_exact:.3f}"
        )


def check_boltzmann(
    samples: Sequence[float],
    exact: ExactMarginal,
    *,
    bins: int = 10,
    blocks: int = 10,
    alpha: float = 1e-3,
    min_effective: float = 100.0,
) -> BoltzmannCheck:
    """Compare a chain of ``x`` samples with the exact marginal (block-averaged chi-square)."""
    if bins < 2 or blocks < 2:
        raise ValueError("need at least 2 bins and 2 blocks")
    length = len(samples) // blocks
    if length < 1:
        raise ValueError(f"need at least {blocks} samples for {blocks} blocks, got {len(samples)}")
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
    inefficiency = max(1.0, *g_bins)  # the slowest bin: conservative
    n_eff = n / inefficiency
    chi2 = n_eff * sum((f - p) ** 2 for f in freq) / p
    dof = bins - 1
    tvd = 0.5 * sum(abs(f - p) for f in freq)
    left_blocks = [sum(1 for x in used[b * length : (b + 1) * length] if x < 0) / length for b in range(blocks)]
    left = sum(left_blocks) / blocks
    left_se = math.sqrt(sum((v - left) ** 2 for v in left_blocks) / (blocks - 1) / blocks)
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
        left_fraction_exact=exact.probability_below(0.0),
    )
