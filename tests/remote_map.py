"""The class the map tests publish (pickled by value): items that sleep, hold at a gate, or fail."""

from __future__ import annotations

import os
import time
from typing import Any

LIMIT = 120.0  # a gate never opened fails the call instead of blocking the daemon for good


class Mapper:
    """One method per kind of map item."""

    def square(self, x: int) -> int:
        return x * x

    def nap(self, x: Any, seconds: float) -> Any:
        """``x`` after sleeping ``seconds``."""
        time.sleep(seconds)
        return x

    def gated(self, x: Any, started: str | None, release: str | None) -> Any:
        """``x``; with a gate, first make the file ``started`` and wait until ``release`` exists."""
        if started is not None and release is not None:
            with open(started, "w"):
                pass
            deadline = time.monotonic() + LIMIT
            while not os.path.exists(release):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{release} never appeared")
                time.sleep(0.01)
        return x

    def slow_first_time(self, x: Any, marker: str | None) -> tuple[Any, int]:
        """``(x, pid)``; the first run with a ``marker`` writes its PID there and runs ``LIMIT`` seconds."""
        if marker is not None and not os.path.exists(marker):
            with open(marker + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(marker + ".tmp", marker)
            time.sleep(LIMIT)
        return x, os.getpid()

    def fail_at(self, x: int, bad: int) -> int:
        if x == bad:
            raise ValueError(f"item {x} is bad")
        return x
