"""Classes published by test_core_defects.py. Pickled by value, as a driver's __main__ is."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Any


class ExitOnLoad:
    """Pickles fine on the host; unpickling it (in the driver) raises SystemExit."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (sys.exit, ("unpickled an ExitOnLoad",))


class InterruptOnLoad:
    """Pickles fine on the host; unpickling it (in the driver) raises KeyboardInterrupt.

    ``signal.default_int_handler`` raises KeyboardInterrupt when called; no signal is sent.
    """

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (signal.default_int_handler, (signal.SIGINT, None))


class Worker:
    """Methods whose failures are errors of one call, never the loss of the host."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int = 1) -> int:
        self.count += n
        return self.count

    def ident(self, x: Any) -> Any:
        return x

    def pid(self) -> int:
        return os.getpid()

    def size(self, blob: bytes) -> int:
        return len(blob)

    def read_missing(self) -> str:
        with open(os.path.join(os.getcwd(), "no-such-dir", "no-such-file.txt")) as fh:
            return fh.read()

    def deny(self) -> None:
        raise PermissionError(13, "Permission denied", "/forbidden/file")

    def make_dir(self, relpath: str) -> str:
        """Make a folder below the daemon's working folder (its temp path)."""
        path = os.path.join(os.getcwd(), relpath)
        os.makedirs(path, exist_ok=True)
        return path

    def exit_on_load(self) -> ExitOnLoad:
        return ExitOnLoad()

    def interrupt_on_load(self) -> InterruptOnLoad:
        return InterruptOnLoad()


class UsesHelper:
    """Imports a module copied with copy_files when it is loaded on a host."""

    def __init__(self, module: str) -> None:
        self.module = module

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        importlib.invalidate_caches()
        importlib.import_module(self.module)  # publishing fails where the module is missing

    def helper_value(self) -> tuple[int, str]:
        """Import the module again from disk (reload), so a removed file is noticed."""
        importlib.invalidate_caches()
        module = importlib.reload(importlib.import_module(self.module))
        return module.VALUE, os.path.dirname(os.path.abspath(module.__file__ or ""))

    def pid(self) -> int:
        return os.getpid()
