"""Daemons started by hand: a grid attaches to them by URI or through a Pyro5 name server."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import Pyro5.core
import Pyro5.errors
import pytest
from conftest import wait_until
from remote_objects import Recorder

from isdgrid import AuthenticationError, ConfigError, Grid, LaunchError
from isdgrid.announce import parse_announcement
from isdgrid.launchers.attach import AttachLauncher, uri_address
from isdgrid.nameserver import entry_name, group_prefix, locate, parse_location

REPO_ROOT = str(Path(__file__).resolve().parent.parent)
SECRET = "attach-test-secret-0123456789"


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    uri: str


@dataclass
class Setup:
    nameserver: str
    ns_proc: subprocess.Popen[bytes]
    daemons: list[Daemon]
    other: Daemon
    tmp: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=REPO_ROOT)


def _read_uri(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline().decode()
            if not line:
                break
            uri = parse_announcement(line)
            if uri is not None:
                return uri
    raise AssertionError(f"daemon pid {proc.pid} printed no URI within {timeout} s")


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def _start_daemon(tmp: Path, name: str, args: list[str]) -> Daemon:
    # Its own private working folder (the temp path of a daemon given none): nothing it
    # makes (.isdgrid-users.lock) lands in the folder pytest runs in.
    folder = tmp / f"{name}-cwd"
    folder.mkdir(mode=0o700, exist_ok=True)
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed when the process ends
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=_env(), cwd=folder
    )
    log.close()
    try:
        return Daemon(proc, _read_uri(proc))
    except BaseException:
        _end(proc)
        raise


def _ns_entries(location: str, group: str) -> dict[str, str]:
    host, port = parse_location(location)
    with Pyro5.core.locate_ns(host, port, broadcast=False) as ns:
        return dict(ns.list(prefix=group_prefix(group)))


def _wait_entries(location: str, group: str, count: int, timeout: float = 30.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        entries = _ns_entries(location, group)
        if len(entries) == count or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("attach")
    secret_file = tmp / "secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    port = _free_port()
    location = f"127.0.0.1:{port}"
    ns_log = open(tmp / "ns.log", "wb")  # noqa: SIM115
    ns_proc = subprocess.Popen(
        [sys.executable, "-m", "Pyro5.nameserver", "-n", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL, stdout=ns_log, stderr=subprocess.STDOUT, env=_env(), cwd=tmp,
    )
    ns_log.close()
    started: list[Daemon] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _ns_entries(location, "g")
                break
            except Pyro5.errors.PyroError:
                assert ns_proc.poll() is None and time.monotonic() < deadline, "the name server did not start"
                time.sleep(0.1)
        common = ["--secret-file", str(secret_file), "--nameserver", location]
        # one through `python -m isdgrid.daemon` with a label, one through the CLI without
        started.append(_start_daemon(tmp, "d0", [
            sys.executable, "-m", "isdgrid.daemon", *common, "--group", "g", "--label", "worker-a",
            "--temp-path", str(tmp / "d0")]))
        started.append(_start_daemon(tmp, "d1", [
            sys.executable, "-m", "isdgrid", "daemon", *common, "--group", "g", "--temp-path", str(tmp / "d1")]))
        other = _start_daemon(tmp, "d2", [sys.executable, "-m", "isdgrid.daemon", *common, "--group", "other"])
        started.append(other)
        yield Setup(location, ns_proc, started[:2], other, tmp)
    finally:
        for daemon in started:
            _end(daemon.proc)
        _end(ns_proc)


def test_daemons_register_under_their_group(setup: Setup) -> None:
    entries = _wait_entries(setup.nameserver, "g", 2)
    assert set(entries.values()) == {d.uri for d in setup.daemons}
    assert entry_name("g", "worker-a") in entries
    assert entry_name("g", f"{socket.gethostname()}-{setup.daemons[1].proc.pid}") in entries
    assert list(_wait_entries(setup.nameserver, "other", 1).values()) == [setup.other.uri]


def test_attach_through_the_name_server_uses_both_and_leaves_them_running(setup: Setup) -> None:
    _wait_entries(setup.nameserver, "g", 2)
    grid = Grid.attach(nameserver=setup.nameserver, group="g", secret=SECRET)
    try:
        assert len(grid.slots) == 2
        assert {slot.uri for slot in grid.slots} == {d.uri for d in setup.daemons}
        assert [(h.name, h.n_cpu) for h in grid.hosts] == [("127.0.0.1", 2)]
        sid = grid.publish(Recorder())
        pids = grid.gather(grid.broadcast(sid, "pid"), timeout=30)
        assert sorted(pids) == sorted(d.proc.pid for d in setup.daemons)
        assert grid.gather(grid.scatter(sid, "add", ["x", "y"]), timeout=30) == [1, 1]
        assert grid.gather(grid.broadcast(sid, "history"), timeout=30) == [["x"], ["y"]]
        grid.release_all()
        infos = {slot.uri: slot.control("info") for slot in grid.slots}
        assert {os.path.basename(i["temp_path"]) for i in infos.values()} == {"d0", "d1"}
    finally:
        grid.terminate()
    for daemon in setup.daemons:
        assert daemon.proc.poll() is None  # the user's daemons outlive the grid
    # ... and carry nothing of it: its service was unpublished
    again = Grid.attach(setup.nameserver, group="g", secret=SECRET)
    try:
        assert all(slot.control("info")["services"] == [] for slot in again.slots)
    finally:
        again.terminate()


def test_attach_by_uri_list(setup: Setup) -> None:
    uris = [d.uri for d in setup.daemons]
    with Grid.attach(uris, secret=SECRET) as grid:
        assert [slot.uri for slot in grid.slots] == uris
        sid = grid.publish(Recorder())
        assert grid.gather(grid.broadcast(sid, "ident", 7), timeout=30) == [7, 7]
    with Grid.attach(setup.other.uri, secret=SECRET) as grid:  # one URI alone
        sid = grid.publish(Recorder())
        assert grid.gather(grid.broadcast(sid, "pid"), timeout=30) == [setup.other.proc.pid]
    assert all(d.proc.poll() is None for d in [*setup.daemons, setup.other])


def test_daemons_started_by_hand_work_in_folders_of_the_tests_own(setup: Setup) -> None:
    # A daemon given no --temp-path works in the folder it was started in: never the one
    # pytest runs in (its .isdgrid-users.lock would be left in the checkout).
    every = [*setup.daemons, setup.other]
    with Grid.attach([d.uri for d in every], secret=SECRET) as grid:
        folders = [Path(slot.control("info")["temp_path"]) for slot in grid.slots]
    assert len(folders) == len(every)
    assert all(folder.is_relative_to(setup.tmp) for folder in folders), folders


def test_wrong_secret_is_an_authentication_error(setup: Setup) -> None:
    with pytest.raises(AuthenticationError, match="could not be authenticated"):
        Grid.attach(nameserver=setup.nameserver, group="g", secret="not-the-secret")
    with pytest.raises(AuthenticationError):
        Grid.attach([setup.daemons[0].uri], secret="")
    assert all(d.proc.poll() is None for d in setup.daemons)


def test_attach_errors(setup: Setup) -> None:
    with pytest.raises(LaunchError, match="no running daemon registered as isdgrid.empty"):
        Grid.attach(nameserver=setup.nameserver, group="empty", secret=SECRET)
    with pytest.raises(ConfigError, match="bad group name"):
        Grid.attach(nameserver=setup.nameserver, group="a.b", secret=SECRET)
    with pytest.raises(ConfigError, match="not a daemon URI"):
        Grid.attach(["PYRO:isdgrid.agent"], secret=SECRET)
    with pytest.raises(ConfigError, match="not both"):
        AttachLauncher([setup.daemons[0].uri], nameserver=setup.nameserver)
    port = _free_port()
    with pytest.raises(LaunchError, match="cannot reach"):
        Grid.attach([f"PYRO:isdgrid.agent@127.0.0.1:{port}"], secret=SECRET)
    with pytest.raises(LaunchError, match="no Pyro5 name server"):
        Grid.attach(f"127.0.0.1:{port}", secret=SECRET)
    assert uri_address(setup.daemons[0].uri)[0] == "127.0.0.1"


def test_a_name_server_that_stops_answering_is_an_error_within_the_timeout(setup: Setup) -> None:
    """``nameserver.set_call_timeout`` (Pyro5's per-proxy ``_pyroTimeout``) bounds the calls to the name server."""
    os.kill(setup.ns_proc.pid, signal.SIGSTOP)
    try:
        assert wait_until(lambda: psutil.Process(setup.ns_proc.pid).status() == psutil.STATUS_STOPPED, 10)
        started = time.monotonic()
        with pytest.raises(LaunchError, match="no Pyro5 name server"):
            locate(setup.nameserver, timeout=1.0)
        assert time.monotonic() - started < 10
    finally:
        os.kill(setup.ns_proc.pid, signal.SIGCONT)
    assert _ns_entries(setup.nameserver, "g")  # answering again


def test_a_stopped_daemon_unregisters_and_a_killed_one_is_skipped(setup: Setup) -> None:
    secret_file = setup.tmp / "secret"
    common = [sys.executable, "-m", "isdgrid.daemon", "--secret-file", str(secret_file),
              "--nameserver", setup.nameserver, "--group", "short"]
    polite = _start_daemon(setup.tmp, "polite", [*common, "--label", "polite"])
    killed = _start_daemon(setup.tmp, "killed", [*common, "--label", "killed"])
    try:
        assert len(_wait_entries(setup.nameserver, "short", 2)) == 2
        polite.proc.send_signal(signal.SIGTERM)
        assert polite.proc.wait(timeout=15) == 0
        assert list(_wait_entries(setup.nameserver, "short", 1)) == [entry_name("short", "killed")]
        killed.proc.kill()
        killed.proc.wait(timeout=15)
        # its entry stays behind; attaching skips it (nothing answers) and finds no daemon
        assert list(_ns_entries(setup.nameserver, "short")) == [entry_name("short", "killed")]
        with pytest.raises(LaunchError, match="no running daemon"):
            Grid.attach(nameserver=setup.nameserver, group="short", secret=SECRET)
    finally:
        _end(polite.proc)
        _end(killed.proc)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9999", ("127.0.0.1", 9999)), ("nshost", ("nshost", 9090)), ("[::1]:7000", ("::1", 7000))],
)
def test_name_server_locations(text: str, expected: tuple[str, int]) -> None:
    assert parse_location(text) == expected


@pytest.mark.parametrize("text", ["", ":9090", "host:port", "host:0", "[::1", "[::1]x"])
def test_bad_name_server_locations(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_location(text)


def test_entry_names() -> None:
    assert group_prefix("run-1") == "isdgrid.run-1."
    assert entry_name("g", "node1/3") == "isdgrid.g.node1_3"
    with pytest.raises(ConfigError, match="bad group name"):
        entry_name("a b", "x")


def test_daemon_with_a_bad_group_says_so_in_one_line(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o600)
    proc = subprocess.run(
        [sys.executable, "-m", "isdgrid", "daemon", "--secret-file", str(secret_file),
         "--nameserver", "127.0.0.1:9", "--group", "a.b"],
        capture_output=True, text=True, timeout=60, env=_env(), stdin=subprocess.DEVNULL, cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "bad group name 'a.b'" in proc.stderr and "Traceback" not in proc.stderr


# -- a host daemon started by hand: isdgrid daemon --slots N --------------------------------


def _read_uris(proc: subprocess.Popen[bytes], count: int, timeout: float = 60.0) -> list[str]:
    """The first ``count`` URIs ``proc`` prints on stdout (bounded by ``timeout``)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    uris: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while len(uris) < count and time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            data = os.read(fd, 65536)  # not the buffered reader: one read may hold several lines
            if not data:
                break
            *lines, pending = (pending + data).split(b"\n")
            uris += [u for u in (parse_announcement(line.decode()) for line in lines) if u is not None]
    assert len(uris) >= count, f"host daemon pid {proc.pid} printed {len(uris)} of {count} URIs within {timeout} s"
    return uris[:count]


def _start_host(tmp: Path, name: str, slots: int, options: list[str]) -> tuple[subprocess.Popen[bytes], list[str]]:
    folder = tmp / f"{name}-cwd"
    folder.mkdir(mode=0o700, exist_ok=True)
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed when the process ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "isdgrid", "daemon", "--slots", str(slots), "--secret-file", str(tmp / "secret"),
         *options],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=_env(), cwd=folder,
    )
    log.close()
    try:
        return proc, _read_uris(proc, slots)
    except BaseException:
        _end(proc)
        raise


def _running(procs: list[psutil.Process]) -> list[int]:
    still = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                still.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return still


def test_a_host_daemon_with_slots_serves_each_slot_and_registers_them_all(setup: Setup) -> None:
    uri_file = setup.tmp / "host.uris"
    proc, uris = _start_host(setup.tmp, "host3", 3, [
        "--nameserver", setup.nameserver, "--group", "hand", "--label", "node-a", "--uri-file", str(uri_file)])
    workers: list[psutil.Process] = []
    try:
        entries = _wait_entries(setup.nameserver, "hand", 3)
        names = [entry_name("hand", f"node-a/{i}") for i in range(3)]
        assert sorted(entries) == names and sorted(entries.values()) == sorted(uris)
        assert wait_until(uri_file.exists, 30)
        assert uri_file.read_text().split() == [entries[name] for name in names]  # one URI a line, slot order
        with Grid.attach(nameserver=setup.nameserver, group="hand", secret=SECRET) as grid:
            assert sorted(slot.uri for slot in grid.slots) == sorted(uris)
            sid = grid.publish(Recorder())
            pids = grid.gather(grid.broadcast(sid, "pid"), timeout=30)
            grid.release_all()
        workers = [psutil.Process(pid) for pid in pids]
        assert len(set(pids)) == 3 and proc.pid not in pids
        for worker in workers:  # forked by the host daemon, each in a process group of its own
            assert worker.ppid() == proc.pid and os.getpgid(worker.pid) == worker.pid
        with Grid.attach(uri_file.read_text().split(), secret=SECRET) as grid:  # the file serves attach too
            sid = grid.publish(Recorder())
            assert grid.gather(grid.broadcast(sid, "ident", 5), timeout=30) == [5, 5, 5]
        assert proc.poll() is None and _running(workers) == [w.pid for w in workers]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert wait_until(lambda: not _running(workers), 30), f"workers outlived their host daemon: {_running(workers)}"
        assert _wait_entries(setup.nameserver, "hand", 0) == {}  # every worker unregistered
    finally:
        _end(proc)
        for pid in _running(workers):
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_of_a_host_daemon_with_slots_ends_every_worker(setup: Setup) -> None:
    proc, uris = _start_host(setup.tmp, "host2", 2, [])
    workers: list[psutil.Process] = []
    try:
        with Grid.attach(uris, secret=SECRET) as grid:
            sid = grid.publish(Recorder())
            workers = [psutil.Process(pid) for pid in grid.gather(grid.broadcast(sid, "pid"), timeout=30)]
        assert [w.ppid() for w in workers] == [proc.pid, proc.pid]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert wait_until(lambda: not _running(workers), 30), f"workers outlived their host daemon: {_running(workers)}"
        for uri in uris:  # nothing listens there any more
            with pytest.raises(OSError), socket.create_connection(uri_address(uri), timeout=5):
                pass
    finally:
        _end(proc)
        for pid in _running(workers):
            os.kill(pid, signal.SIGKILL)


def test_daemon_slots_must_be_positive_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "isdgrid", "daemon", "--slots", "0", "--secret-file", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60, env=_env(), stdin=subprocess.DEVNULL, cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "--slots" in proc.stderr and "Traceback" not in proc.stderr


def test_a_port_in_use_for_one_slot_is_one_line_and_the_other_slots_serve(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "secret").chmod(0o600)
    taken = None
    for _ in range(50):  # a free port for slot 0 and, held here, the next one for slot 1
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]
        with contextlib.suppress(OSError):
            taken = socket.create_server(("127.0.0.1", port + 1))
            break
    assert taken is not None, "no two consecutive ports on loopback"
    with taken:
        proc = subprocess.Popen(
            [sys.executable, "-m", "isdgrid", "daemon", "--slots", "2", "--port", str(port), "--secret-file",
             str(tmp_path / "secret")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path,
        )
        try:
            uris = _read_uris(proc, 1)
            assert uri_address(uris[0])[1] == port
            with Grid.attach(uris, secret=SECRET) as grid:  # the slot that could listen serves
                sid = grid.publish(Recorder())
                assert grid.gather(grid.broadcast(sid, "ident", 3), timeout=30) == [3]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            assert proc.stderr is not None
            err = proc.stderr.read().decode()
            assert f"cannot listen on 127.0.0.1:{port + 1}" in err and "already in use" in err, err
            assert "Traceback" not in err, err
        finally:
            _end(proc)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
