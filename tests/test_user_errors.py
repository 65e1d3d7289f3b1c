"""What a user trips over (issue 11): attribute reads that return the value, misspelt names
refused at once, remote exceptions as their own type, errors that say how to fix them, and
``await`` on a Result. Real daemons on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from conftest import Gate
from remote_objects import hold

import isdgrid
from isdgrid import (
    Grid,
    Host,
    LaunchError,
    PublishError,
    RemoteError,
    Result,
    ServiceProxy,
    ServiceReleasedError,
    read_attribute,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 30.0
Acquire = Callable[[str], ServiceProxy]

# The daemons cannot import this module: its classes travel by value, as a driver's are.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KwErr(Exception):  # noqa: N818 - the name in the issue
    """An exception whose __init__ takes other arguments than it gives BaseException."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code={code}")
        self.code = code
        self.detail = detail


class Sampler:
    limit = 3  # a class attribute

    def __init__(self) -> None:
        self.converged = False
        self.steps = 0
        self.scale = abs  # a callable instance attribute: called remotely

    def step(self, seconds: float = 0.0, gate: tuple[str, str] | None = None) -> int:
        time.sleep(seconds)
        if gate is not None:  # run until the test opens the gate (conftest.Gate)
            hold(*gate)
        self.steps += 1
        self.converged = self.steps >= self.limit
        return self.steps

    def make_later(self) -> None:
        self.made_later = "late"

    @property
    def energy(self) -> float:
        return -1.5 * self.steps

    def raise_kw(self) -> None:
        raise KwErr(7, "disk full")

    def raise_called_process(self) -> None:
        raise subprocess.CalledProcessError(2, ["simulate"], output="the output")

    def raise_exit(self, code: int) -> None:
        raise SystemExit(code)

    def raise_interrupt(self) -> None:
        raise KeyboardInterrupt

    def raise_timeout(self) -> None:
        raise TimeoutError("the remote one")

    @property
    def slow_timeout(self) -> None:
        raise TimeoutError("a remote property's own")


class Particle:
    """A method that takes one list (issue 20: scatter unpacks a list item)."""

    def __init__(self) -> None:
        self.label = "particle"
        self.pos = [0.0, 0.0, 0.0]

    def set_pos(self, pos: list[float]) -> list[float]:
        self.pos = list(pos)
        return self.pos

    def add(self, a: Any, b: Any) -> Any:
        return a + b


class Dynamic:
    """Answers names dynamically: the proxy does not check them."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("dyn_"):
            return name.upper()
        raise AttributeError(name)


@pytest.fixture(scope="module")
def ugrid() -> Iterator[Grid]:
    g = Grid([Host("localhost", n_cpu=2)], attribute_timeout=1.0, status_file=False)
    try:
        yield g
    finally:
        g.terminate()


@pytest.fixture(scope="module")
def sampler_sid(ugrid: Grid) -> str:
    return ugrid.publish(Sampler())


@pytest.fixture
def acquire(ugrid: Grid) -> Iterator[Acquire]:
    """``acquire(sid)``: a proxy, released at the end of the test if the test did not."""
    taken: list[ServiceProxy] = []

    def take(sid: str) -> ServiceProxy:
        taken.append(ugrid.acquire_service(sid, timeout=T))
        return taken[-1]

    try:
        yield take
    finally:
        ugrid.release_all()
        for proxy in taken:
            with contextlib.suppress(ServiceReleasedError):
                ugrid.release_service(proxy)


# -- attributes: the value, after the proxy's earlier calls -----------------------------------


def test_attribute_read_returns_the_value_after_earlier_calls(ugrid: Grid, acquire: Acquire) -> None:
    proxy = acquire(ugrid.publish(Sampler()))
    assert proxy.converged is False  # the value, not a (always true) Result
    for _ in range(3):
        proxy.step(0.1)
    if not proxy.converged:  # waits for the three steps: the original's meaning
        pytest.fail("proxy.converged read before the earlier calls finished")
    assert proxy.steps == 3 and proxy.energy == -4.5 and proxy.limit == 3
    assert proxy.scale(-2).get(timeout=T) == 2  # a function kept on the instance runs remotely
    proxy.fresh = 5  # a name set through the proxy can be read back
    assert proxy.fresh == 5
    ugrid.release_service(proxy)


def test_attribute_read_is_bounded_and_names_attribute_and_slot(
    ugrid: Grid, sampler_sid: str, acquire: Acquire, tmp_path: Path
) -> None:
    proxy = acquire(sampler_sid)
    label = proxy._isdgrid_server.slot.label
    gate = Gate(tmp_path)
    proxy.step(gate=gate.args)
    gate.wait_started(T)
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError) as info:
            proxy.steps  # noqa: B018
        waited = time.monotonic() - t0
    finally:
        gate.open()
    assert 0.9 < waited < 6.0  # Grid(attribute_timeout=1.0); generous above, for a loaded machine
    text = str(info.value)
    assert "'steps'" in text and label in text and "attribute_timeout" in text and "read_attribute" in text
    read_attribute(proxy, "steps").get(timeout=T)  # the slow step is over
    # a remote TimeoutError is the remote one, not mistaken for the wait's
    with pytest.raises(TimeoutError, match="a remote property's own"):
        proxy.slow_timeout  # noqa: B018
    ugrid.release_service(proxy)


def test_read_attribute_returns_a_result_at_once(
    ugrid: Grid, sampler_sid: str, acquire: Acquire, tmp_path: Path
) -> None:
    proxy = acquire(sampler_sid)
    before = read_attribute(proxy, "steps")
    gate = Gate(tmp_path)
    proxy.step(gate=gate.args)
    t0 = time.monotonic()
    after = read_attribute(proxy, "steps")
    assert time.monotonic() - t0 < 5.0 and isinstance(after, Result) and not after.done()
    gate.open()
    assert after.get(timeout=T) == before.get(timeout=T) + 1
    with pytest.raises(TypeError, match="'step' is a method of Sampler"):
        read_attribute(proxy, "step")
    with pytest.raises(AttributeError, match="'stpes'"):
        read_attribute(proxy, "stpes")
    ugrid.release_service(proxy)
    broadcast = ugrid.broadcast(sampler_sid, "limit")  # the collective read keeps returning Results
    assert all(isinstance(r, Result) for r in broadcast) and ugrid.gather(broadcast, timeout=T) == [3, 3]
    ugrid.release_all(sampler_sid)


# -- misspelt names -------------------------------------------------------------------------


def test_a_name_the_class_lacks_is_an_attribute_error_at_once(
    ugrid: Grid, sampler_sid: str, acquire: Acquire, tmp_path: Path
) -> None:
    proxy = acquire(sampler_sid)
    gate = Gate(tmp_path)
    proxy.step(gate=gate.args)  # a busy server, until the gate opens: the error must not wait for it
    backstop = threading.Timer(20.0, gate.open)  # an error that waited for the server would come then
    backstop.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(AttributeError) as info:
            proxy.no_such_method(1)
        assert time.monotonic() - t0 < 10.0, "the error waited for the busy server"
    finally:
        backstop.cancel()
        gate.open()
    text = str(info.value)
    assert "'no_such_method'" in text and "Sampler" in text
    assert "step" in text and "raise_kw" in text and "make_later" in text  # the public methods
    assert info.value.name == "no_such_method"
    with pytest.raises(AttributeError, match="did you mean 'step'"):
        proxy.stpe()
    assert not hasattr(proxy, "nope")
    # an attribute a method makes later is not known: the message says what to do
    proxy.make_later()
    with pytest.raises(AttributeError, match="check_names=False"):
        proxy.made_later  # noqa: B018
    ugrid.release_service(proxy)
    free = ugrid.queues[sampler_sid].qsize()
    with pytest.raises(AttributeError, match="'no_such'"):
        ugrid.broadcast(sampler_sid, "no_such")
    with pytest.raises(AttributeError, match="'no_such'"):
        ugrid.scatter(sampler_sid, "no_such", [1, 2])
    assert ugrid.queues[sampler_sid].qsize() == free  # refused before any server was taken


def test_setting_a_misspelt_attribute_warns_with_the_close_name(ugrid: Grid, acquire: Acquire) -> None:
    proxy = acquire(ugrid.publish(Particle()))
    with pytest.warns(UserWarning, match=r"'lable'.*did you mean 'label'\?") as record:
        proxy.lable = "x"
    assert len(record) == 1 and record[0].filename == __file__  # the warning points at the user's line
    assert proxy.lable == "x" and proxy.label == "particle"  # set as asked, beside the real one
    proxy.lable = "y"  # known now: no second warning (pytest turns warnings into errors here)
    proxy.label = "z"  # a name the object has
    proxy.temperature = 300.0  # a new name close to none: a plain new attribute
    assert (proxy.label, proxy.temperature) == ("z", 300.0)
    with pytest.raises(AttributeError, match="did you mean 'pos'"):  # reading a misspelt name
        proxy.poss  # noqa: B018
    ugrid.release_service(proxy)


def test_dynamic_classes_and_check_names_false_are_not_checked(ugrid: Grid, acquire: Acquire) -> None:
    dynamic = acquire(ugrid.publish(Dynamic()))
    assert dynamic.dyn_anything == "DYN_ANYTHING"
    with pytest.raises(AttributeError):  # the remote object's own answer
        dynamic.other  # noqa: B018
    ugrid.release_service(dynamic)
    loose = acquire(ugrid.publish(Sampler(), check_names=False))
    loose.make_later()
    assert loose.made_later == "late"
    ugrid.release_service(loose)


# -- exceptions ------------------------------------------------------------------------------


def test_exception_with_its_own_init_comes_back_as_its_type(ugrid: Grid, sampler_sid: str, acquire: Acquire) -> None:
    proxy = acquire(sampler_sid)
    with pytest.raises(KwErr) as info:
        proxy.raise_kw().get(timeout=T)
    assert (info.value.code, info.value.detail, info.value.args) == (7, "disk full", ("code=7",))
    assert isinstance(info.value.__cause__, isdgrid.RemoteTraceback) and "raise_kw" in str(info.value.__cause__)
    with pytest.raises(subprocess.CalledProcessError) as called:  # a library's: its output kept
        proxy.raise_called_process().get(timeout=T)
    assert (called.value.returncode, called.value.output) == (2, "the output")
    ugrid.release_service(proxy)


def test_scatter_of_a_list_that_does_not_fit_the_method_says_it_was_unpacked(ugrid: Grid) -> None:
    sid = ugrid.publish(Particle())
    try:
        with pytest.raises(TypeError) as info:
            ugrid.gather(ugrid.scatter(sid, "set_pos", [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]), timeout=T)
        text = str(info.value)
        assert "set_pos() takes 2 positional arguments but 4 were given" in text  # the remote message, kept
        assert "scatter unpacks a list or tuple item as positional arguments" in text
        assert "item 0, [0.1, 0.2, 0.3], became 3 arguments" in text and "[([0.1, 0.2, 0.3],), ...]" in text
        remote = info.value.__cause__
        assert type(remote) is TypeError and isinstance(remote.__cause__, isdgrid.RemoteTraceback)
        assert "set_pos" in str(remote.__cause__)  # the remote traceback
        # what the message says to do works
        wrapped = [([0.1, 0.2, 0.3],), ([0.4, 0.5, 0.6],)]
        assert ugrid.gather(ugrid.scatter(sid, "set_pos", wrapped), timeout=T) == [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]
        # a TypeError of the method's own work is not about the unpacking: it arrives untouched
        with pytest.raises(TypeError) as own:
            ugrid.gather(ugrid.scatter(sid, "add", [(1, "x"), (2, 3)]), timeout=T)
        assert "unsupported operand" in str(own.value) and "scatter unpacks" not in str(own.value)
        assert isinstance(own.value.__cause__, isdgrid.RemoteTraceback)
    finally:
        ugrid.release_all(sid)
        ugrid.terminate(sid)


def test_remote_system_exit_and_keyboard_interrupt_arrive_as_remote_error(
    ugrid: Grid, sampler_sid: str, acquire: Acquire
) -> None:
    proxy = acquire(sampler_sid)
    for result, name in ((proxy.raise_exit(3), "SystemExit"), (proxy.raise_interrupt(), "KeyboardInterrupt")):
        try:
            result.get(timeout=T)
        except BaseException as exc:  # noqa: BLE001 - what arrives is the point
            caught: BaseException = exc
        else:
            pytest.fail(f"{name} did not fail")
        assert isinstance(caught, RemoteError), f"{name} arrived as {type(caught).__name__}"
        assert name in caught.type_name
    assert proxy.step().get(timeout=T) >= 1  # the daemon serves on
    ugrid.release_service(proxy)


def test_driver_main_exception_is_caught_by_its_own_type(tmp_path: Any) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        from isdgrid import Grid, Host

        class KwErr(Exception):  # noqa: N818 - the name in the issue
            def __init__(self, code, detail):
                super().__init__(f"code={{code}}")
                self.code, self.detail = code, detail

        class Thrower:
            def boom(self):
                raise KwErr(7, "disk full")

            def leave(self):
                raise SystemExit(3)

        if __name__ == "__main__":
            with Grid([Host("localhost", n_cpu=1)], status_file=False) as grid:
                proxy = grid.acquire_service(grid.publish(Thrower()))
                try:
                    proxy.boom().get(timeout=30)
                except KwErr as e:
                    print("caught", e.code, e.detail, type(e.__cause__).__name__)
                try:
                    proxy.leave().get(timeout=30)
                except Exception as e:
                    print("survived", type(e).__name__)
    """)
    )
    proc = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["caught 7 disk full RemoteTraceback", "survived RemoteError"], proc.stdout


# -- errors that say what to do --------------------------------------------------------------


def test_publish_error_for_a_missing_module_says_how_to_fix_it(
    ugrid: Grid, acquire: Acquire, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "physics_issue11"
    (tmp_path / f"{name}.py").write_text("class Forces:\n    def total(self):\n        return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    monkeypatch.setitem(sys.modules, name, module)
    with pytest.raises(PublishError) as info:
        ugrid.publish(module.Forces())  # pickled by reference: the daemons cannot import it
    text = str(info.value)
    assert f"No module named '{name}'" in text
    assert f"grid.copy_files({str(tmp_path)!r}, ['{name}.py'])" in text
    assert f"cloudpickle.register_pickle_by_value({name})" in text
    temp_paths = {slot.control("info")["temp_path"] for slot in ugrid.slots}
    assert any(p in info.value.hint for p in temp_paths), info.value.hint  # where the daemon looks
    # the first advice works
    ugrid.copy_files(str(tmp_path), [f"{name}.py"])
    proxy = acquire(ugrid.publish(module.Forces()))
    assert proxy.total().get(timeout=T) == 42
    ugrid.release_service(proxy)


def test_attach_to_a_dead_uri_says_it_once(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    caplog.set_level(logging.DEBUG, logger="isdgrid")
    with pytest.raises(LaunchError, match="cannot reach the daemon") as info:
        Grid.attach(f"PYRO:isdgrid.agent@127.0.0.1:{port}", secret="s" * 64, status_file=False)
    said = [r for r in caplog.records if r.levelno >= logging.INFO and str(info.value) in r.getMessage()]
    assert said == [], [r.getMessage() for r in said]


# -- await -----------------------------------------------------------------------------------


def test_results_are_awaitable(ugrid: Grid, acquire: Acquire) -> None:
    proxy = acquire(ugrid.publish(Sampler()))

    async def main() -> tuple[int, list[int], int, type]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        tick = asyncio.create_task(ticker())
        first = await proxy.step(0.4)  # the loop runs on while the call does
        steps = await asyncio.gather(*[proxy.step() for _ in range(3)])
        tick.cancel()
        try:
            await proxy.raise_kw()
        except KwErr as exc:
            error = type(exc)
        return first, steps, ticks, error

    first, steps, ticks, error = asyncio.run(asyncio.wait_for(main(), T))
    assert first == 1 and steps == [2, 3, 4] and error is KwErr
    assert ticks >= 5  # the event loop was not blocked during the 0.4 s call
    ugrid.release_service(proxy)
