from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import cloudpickle
import psutil
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's isdgrid, installed or not
import remote_objects  # noqa: E402

from isdgrid import Grid, Host  # noqa: E402

# The daemons cannot import the tests package; ship its classes by value, as classes of
# a driver's __main__ are.
cloudpickle.register_pickle_by_value(remote_objects)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip when a component is missing, but fail in CI, where it must be there."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class Gate:
    """Holds a remote call (``Recorder.hold``) running until the test opens the gate.

    The call makes the file ``started`` when it runs and ends once ``release`` exists, so
    a test knows the call is running, and decides when it ends, without guessing times.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        name = uuid.uuid4().hex[:12]
        self.started = os.path.join(folder, f"gate-{name}.started")
        self.release = os.path.join(folder, f"gate-{name}.release")

    @property
    def args(self) -> tuple[str, str]:
        """The arguments of ``Recorder.hold``."""
        return self.started, self.release

    def wait_started(self, timeout: float = 30.0) -> None:
        """Wait (bounded) until the held call runs on its server."""
        if not wait_until(lambda: os.path.exists(self.started), timeout):
            pytest.fail(f"the held call did not start within {timeout} s")

    def open(self) -> None:
        """Let the held call end."""
        with open(self.release, "w"):
            pass


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (zombies count as ended)."""
    running = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc)
        except psutil.NoSuchProcess:
            pass
    return running


def child_pids() -> set[int]:
    """PIDs of every living descendant of this test process."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return set()
    return {c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE}


@pytest.fixture(autouse=True)
def private_run_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Status files of the grids a test makes go to a folder of the test's own."""
    monkeypatch.setenv("ISDGRID_RUN_DIR", str(tmp_path_factory.mktemp("run")))


@pytest.fixture
def grid() -> Iterator[Grid]:
    g = Grid([Host("localhost", n_cpu=4)], host_timeout=10.0)
    try:
        yield g
    finally:
        g.terminate()


@pytest.fixture
def grid1() -> Iterator[Grid]:
    g = Grid([Host("localhost", n_cpu=1)])
    try:
        yield g
    finally:
        g.terminate()
