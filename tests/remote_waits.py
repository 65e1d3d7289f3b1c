"""Classes the wait tests publish (pickled by value): calls and loads held at a gate file."""

from __future__ import annotations

import os
import time
from typing import Any

GATE_LIMIT = 120.0  # a gate never opened fails the call instead of blocking the daemon for good


def wait_for(path: str, present: bool = True) -> None:
    """Return once ``path`` exists (``present``) or is gone; TimeoutError after GATE_LIMIT."""
    deadline = time.monotonic() + GATE_LIMIT
    while os.path.exists(path) != present:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} not {'opened' if present else 'removed'} within {GATE_LIMIT} s")
        time.sleep(0.01)


class Gated:
    """A method that returns once a gate file exists; a load that waits while a hold file exists."""

    def __init__(self, hold: str = "") -> None:
        self.hold = hold  # while this file exists, a copy being loaded (a respawn) waits

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.hold:
            wait_for(self.hold, present=False)

    def through(self, gate: str, tag: Any) -> Any:
        wait_for(gate)
        return tag

    def pid(self) -> int:
        return os.getpid()
