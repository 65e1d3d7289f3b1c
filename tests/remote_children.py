"""Classes tests/test_host_daemon.py publishes (pickled by value): a slot that starts processes."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from typing import Any


class Spawner:
    """Starts child processes in its slot and says where it runs."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start_child(self, seconds: int = 300) -> int:
        """Start ``sleep SECONDS`` (in the slot's process group, as a published object would); its pid."""
        child = subprocess.Popen(["sleep", str(seconds)], stdin=subprocess.DEVNULL)
        self.children.append(child)
        return child.pid

    def where(self) -> dict[str, Any]:
        """The worker's pid, process group and parent, and its ``ISDGRID_*`` variables."""
        return {
            "pid": os.getpid(),
            "pgid": os.getpgid(0),
            "ppid": os.getppid(),
            **{k: v for k, v in os.environ.items() if k.startswith("ISDGRID_")},
        }

    def module_attribute(self, module: str, name: str) -> Any:
        """``sys.modules[module].name`` (None if the module is not imported)."""
        loaded = sys.modules.get(module)
        return None if loaded is None else getattr(loaded, name, None)

    def hang_in_c(self, started: str, seconds: int) -> int:
        """Make the file ``started``, then sleep in C holding the GIL (its threads and signal handlers stop)."""
        with open(started, "w"):
            pass
        return int(ctypes.PyDLL(None).sleep(seconds))

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def add(self, a: int, b: int) -> int:
        return a + b
