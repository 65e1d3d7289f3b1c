"""Classes the tests publish. Pickled by value (see conftest), as a driver's __main__ is."""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def hold(started: str, release: str, limit: float = 120.0) -> str:
    """Make the file ``started``, then wait (bounded) until the file ``release`` exists."""
    with open(started, "w"):
        pass
    deadline = time.monotonic() + limit
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.01)
    return "released"


class Recorder:
    """Records the order of calls and offers fast, slow and failing methods."""

    def __init__(self, tag: str = "r") -> None:
        self.tag = tag
        self.seen: list[Any] = []
        self.value = 0

    def add(self, item: Any) -> int:
        self.seen.append(item)
        return len(self.seen)

    def add_size(self, blob: Any) -> int:
        """Record the size of ``blob`` (a large argument), not the blob."""
        return self.add(("size", len(blob)))

    def slow_add(self, seconds: float, item: Any) -> int:
        time.sleep(seconds)
        return self.add(item)

    def history(self) -> list[Any]:
        return list(self.seen)

    def echo(self, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs

    def ident(self, x: Any) -> Any:
        return x

    def apply(self, fn: Any, *args: Any) -> Any:
        return fn(*args)

    def pid(self) -> int:
        return os.getpid()

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def hold(self, started: str, release: str, limit: float = 120.0) -> str:
        """Make the file ``started``, then run until the file ``release`` exists (conftest.Gate)."""
        return hold(started, release, limit)

    def fail(self, kind: str, message: str = "boom") -> None:
        if kind == "value":
            raise ValueError(message)
        if kind == "key":
            raise KeyError(message)
        if kind == "custom":
            raise CustomError(message, 42)
        if kind == "unpicklable":
            raise UnpicklableError(message)
        raise RuntimeError(message)

    def fail_if(self, flag: bool, message: str) -> str:
        if flag:
            raise ValueError(message)
        return message

    def unpicklable_result(self) -> Any:
        return threading.Lock()

    @property
    def doubled(self) -> int:
        return 2 * self.value


class CustomError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


class UnpicklableError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class FailsToLoad:
    """Pickles fine in the driver but raises when unpickled on a host."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_explode, ("no such module on the host",))


def _explode(message: str) -> None:
    raise ImportError(message)
