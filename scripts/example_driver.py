"""A small driver: publish a sampler on 4 local slots, sample in parallel, read energies.

Run: python scripts/example_driver.py
"""

from __future__ import annotations

import logging
import math
import random

from isdgrid import Grid, Host


class Sampler:
    """Metropolis sampling of a 1D double well at temperature T (lives in __main__)."""

    def __init__(self, temperature: float, seed: int = 0) -> None:
        self.temperature = temperature
        self.x = -1.0
        self.rng = random.Random(seed)

    def set_temperature(self, temperature: float) -> None:
        self.temperature = temperature

    def energy(self) -> float:
        return (self.x * self.x - 1.0) ** 2 * 5.0

    def sample(self, steps: int) -> float:
        accepted = 0
        for _ in range(steps):
            old_x, old_e = self.x, self.energy()
            self.x += self.rng.gauss(0.0, 0.3)
            de = self.energy() - old_e
            if de <= 0 or self.rng.random() < math.exp(-de / self.temperature):
                accepted += 1
            else:
                self.x = old_x
        return accepted / steps


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    temperatures = [0.5, 1.0, 2.0, 4.0]
    with Grid([Host("localhost", n_cpu=len(temperatures))]) as grid:
        sid = grid.publish(Sampler(1.0))
        grid.gather(grid.scatter(sid, "set_temperature", temperatures))
        acceptance = grid.gather(grid.broadcast(sid, "sample", 20000), timeout=120)
        energies = grid.gather(grid.broadcast(sid, "energy"), timeout=60)
        grid.release_all()
        for t, a, e in zip(temperatures, acceptance, energies):
            print(f"T={t:4.1f}  acceptance={a:5.3f}  energy={e:7.3f}")
        for row in grid.status():
            print(f"{row.host}/{row.slot}: {row.calls} calls, mean {row.mean_call_time * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
