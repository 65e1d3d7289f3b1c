"""The ssh launcher, against a real OpenSSH server on loopback (.ci/setup-ssh.sh starts it).

The command builders are also checked on their own: the remote shell strings are run
through ``sh -c`` here, as the remote login shell runs them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shlex
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest
from conftest import alive, require, wait_until

from isdgrid import Grid, Host, LaunchError
from isdgrid.hosts import Host as HostType
from isdgrid.launchers import make_launcher
from isdgrid.launchers.base import Progress, SlotSpec
from isdgrid.launchers.ssh import (
    LIB_FOLDER,
    SshLauncher,
    host_command,
    merge_options,
    package_archive,
    parse_probe,
    prepare_command,
    ssh_args,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SSHD_DIR = Path(os.environ.get("ISDGRID_SSHD_DIR", "/tmp/isdgrid-sshd"))
PY = sys.executable

pytestmark = pytest.mark.timeout(120)

# The daemons cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- the test sshd ---------------------------------------------------------------------
def _sshd_pid() -> int | None:
    try:
        pid = int((SSHD_DIR / "sshd.pid").read_text().strip())
        port = int((SSHD_DIR / "port").read_text().strip())
    except (OSError, ValueError):
        return None
    if not psutil.pid_exists(pid):
        return None
    with socket.socket() as sock:
        sock.settimeout(2.0)
        if sock.connect_ex(("127.0.0.1", port)) != 0:
            return None
    return pid


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def sshd_pid() -> int:
    pid = _sshd_pid()
    require(pid is not None and os.path.exists("/usr/bin/ssh"), "no test sshd running (run .ci/setup-ssh.sh)")
    assert pid is not None
    return pid


def _client_settings() -> str:
    return textwrap.dedent(
        f"""\
            User root
            IdentityFile {SSHD_DIR}/client_ed25519
            IdentitiesOnly yes
            StrictHostKeyChecking no
            UserKnownHostsFile /dev/null
            LogLevel ERROR
        """
    )


@pytest.fixture(scope="module")
def ssh_config(sshd_pid: int, tmp_path_factory: pytest.TempPathFactory) -> str:
    port = (SSHD_DIR / "port").read_text().strip()
    common = _client_settings()
    text = (
        f"Host node-a node-b\n    HostName 127.0.0.1\n    Port {port}\n{common}"
        f"Host node-dead\n    HostName 127.0.0.1\n    Port {_closed_port()}\n{common}"
    )
    path = tmp_path_factory.mktemp("ssh") / "config"
    path.write_text(text)
    return str(path)


@pytest.fixture
def default_sshd(sshd_pid: int, tmp_path: Path) -> Iterator[tuple[int, str, Path]]:
    """A second sshd, started here, left at OpenSSH's default MaxStartups and MaxSessions.

    The test sshd of .ci/setup-ssh.sh raises both; this one has the same keys and settings
    without those two lines, on a port of its own. Its pid, an ssh config naming it
    ``node-c`` and ``node-d``, and its log file.
    """
    require(os.path.exists("/usr/sbin/sshd") and os.geteuid() == 0, "a second sshd needs root and /usr/sbin/sshd")
    folder = tmp_path / "sshd-defaults"
    folder.mkdir()
    port = _closed_port()
    raised = {"port", "pidfile", "maxstartups", "maxsessions"}
    lines = [line for line in (SSHD_DIR / "sshd_config").read_text().splitlines()
             if line.split() and line.split()[0].lower() not in raised]
    config = folder / "sshd_config"
    config.write_text("\n".join([*lines, f"Port {port}", f"PidFile {folder}/sshd.pid"]) + "\n")
    shown = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    settings = dict(line.split(" ", 1) for line in shown.stdout.splitlines() if " " in line)
    assert (settings["maxstartups"], settings["maxsessions"]) == ("10:30:100", "10")  # OpenSSH's defaults
    log_file = folder / "sshd.log"
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(config), "-E", str(log_file)])
    try:
        def listening() -> bool:
            with socket.socket() as sock:
                sock.settimeout(1.0)
                return sock.connect_ex(("127.0.0.1", port)) == 0

        assert wait_until(listening, 15.0), log_file.read_text() if log_file.exists() else "no log"
        client = folder / "ssh_config"
        client.write_text(f"Host node-c node-d\n    HostName 127.0.0.1\n    Port {port}\n{_client_settings()}")
        yield proc.pid, str(client), log_file
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def sshd_descendants(sshd_pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(sshd_pid).children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def wait_no_sessions(sshd_pid: int, timeout: float = 15.0) -> list[str]:
    """Wait (bounded) until the test sshd has no session left; what is left, if any."""
    deadline = time.monotonic() + timeout
    while True:
        left = sshd_descendants(sshd_pid)
        if not left or time.monotonic() > deadline:
            return [" ".join(p.cmdline()) for p in left if p.is_running()]
        time.sleep(0.2)


def host_daemon_sessions(sshd_pid: int) -> list[psutil.Process]:
    """The host daemons running under ``sshd_pid`` (not their workers, forks of them)."""
    found = []
    for proc in sshd_descendants(sshd_pid):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.cmdline()
            parent = proc.parent()
            if "isdgrid.hostd" in " ".join(cmdline) and (parent is None or parent.cmdline() != cmdline):
                found.append(proc)
    return found


def driver_ssh_sessions() -> list[psutil.Process]:
    """The ssh clients this process (the driver) runs a host daemon through."""
    return [
        p for p in psutil.Process().children()
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and p.name() == "ssh"
        and "isdgrid.hostd" in " ".join(p.cmdline())
    ]


def ssh_grid(hosts: list[Host], ssh_config: str, **kwargs: object) -> Grid:
    options = {"ssh_config": ssh_config, **kwargs.pop("launcher_options", {})}  # type: ignore[dict-item]
    return Grid(hosts, launcher="ssh", launcher_options=options, start_timeout=60, **kwargs)  # type: ignore[arg-type]


class Probe:
    """Published on every slot: tells where it runs and what it imported from where."""

    def where(self) -> dict[str, object]:
        import cloudpickle
        import Pyro5
        import serpent

        import isdgrid

        return {
            "pid": os.getpid(),
            "cwd": os.getcwd(),
            "identity": [os.environ.get(f"ISDGRID_{name}") for name in ("HOST", "SLOT", "RANK")],
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "modules": {m.__name__: m.__file__ for m in (isdgrid, Pyro5, serpent, cloudpickle)},
        }

    def use_copied(self) -> str:
        import simmod  # copied by copy_files into the temp folder

        return simmod.describe()


# -- pure builders ---------------------------------------------------------------------
def _run_setup_ssh(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", os.path.join(REPO_ROOT, ".ci", "setup-ssh.sh")],
        env={**os.environ, "ISDGRID_SSHD_DIR": str(folder)}, capture_output=True, text=True, timeout=60,
    )


def test_setup_ssh_starts_its_own_sshd_when_the_pid_file_names_another_process(tmp_path: Path) -> None:
    # The README's test command on a machine where the folder holds a pid file of a server
    # long gone, its pid now another process's: the script must not take it for its sshd.
    require(os.path.exists("/usr/sbin/sshd") and os.geteuid() == 0, "setup-ssh.sh needs root and /usr/sbin/sshd")
    folder = tmp_path / "sshd"
    folder.mkdir()
    stranger = subprocess.Popen(["sleep", "120"])
    started: int | None = None
    try:
        (folder / "sshd.pid").write_text(f"{stranger.pid}\n")
        first = _run_setup_ssh(folder)
        assert first.returncode == 0, first.stdout + first.stderr
        started = int((folder / "sshd.pid").read_text().strip())
        assert started != stranger.pid, first.stdout
        port = int((folder / "port").read_text().strip())
        assert f"-f {folder}/sshd_config" in " ".join(psutil.Process(started).cmdline())
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
        second = _run_setup_ssh(folder)  # now it is ours and listens: reused, not restarted
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"already running (pid {started}, port {port})" in second.stdout
        (folder / "port").unlink()  # ours, but the port file is gone: a new server, the old one ended
        old = psutil.Process(started)
        third = _run_setup_ssh(folder)
        assert third.returncode == 0, third.stdout + third.stderr
        started = int((folder / "sshd.pid").read_text().strip())
        assert started != old.pid and (folder / "port").is_file()
        assert wait_until(lambda: not alive([old]), 10)
    finally:
        stranger.kill()
        stranger.wait(timeout=10)
        if started is not None:
            with contextlib.suppress(psutil.Error):
                psutil.Process(started).terminate()


def test_ssh_args_defaults_config_and_remote_quoting() -> None:
    remote = ["sh", "-c", 'echo "$1"', "x", "it's a test; rm -rf /"]
    args = ssh_args("node7", remote, options=merge_options(None, 7), config_file="/cfg")
    assert args[:3] == ["ssh", "-F", "/cfg"]
    opts = [args[i + 1] for i, a in enumerate(args) if a == "-o"]
    assert {"BatchMode=yes", "ConnectTimeout=7", "ServerAliveInterval=15"} <= set(opts)
    assert args[-3:-1] == ["--", "node7"]
    assert shlex.split(args[-1]) == remote  # one shell string, quoted
    assert "-L" not in args and "-T" in args


def test_user_ssh_options_override_defaults_and_tunnel_forwards_a_socket() -> None:
    options = merge_options(["ConnectTimeout=3", "ProxyJump=gate"], 10)
    assert options["ConnectTimeout"] == "3" and options["ProxyJump"] == "gate" and options["BatchMode"] == "yes"
    assert merge_options({"batchmode": "no"}, 10)["batchmode"] == "no"
    assert "BatchMode" not in merge_options({"batchmode": "no"}, 10)
    with pytest.raises(Exception, match="Key=Value"):
        merge_options(["nonsense"], 10)
    args = ssh_args("n", ["true"], options=options, tunnel=[("/tmp/l0.sock", "/tmp/r0.sock"), ("/tmp/l1", "/tmp/r1")])
    assert [args[i + 1] for i, a in enumerate(args) if a == "-L"] == ["/tmp/l0.sock:/tmp/r0.sock", "/tmp/l1:/tmp/r1"]
    assert "ExitOnForwardFailure=yes" in args


def test_progress_is_logged_for_many_slots(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="isdgrid.launcher")
    progress = Progress(10, every=3600)
    for _ in range(10):
        progress.ready()
    assert [r.getMessage() for r in caplog.records] == ["10/10 slots ready"]
    caplog.clear()
    quiet = Progress(3)
    for _ in range(3):
        quiet.ready()
    assert not caplog.records


def test_make_launcher_knows_ssh() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no option given: no warning
        launcher = make_launcher("ssh", keep_temp=True, tunnel=True, preload=["json"])
    assert isinstance(launcher, SshLauncher) and launcher.keep_temp and launcher.tunnel
    assert launcher.preload == ["json"]


def test_max_starts_per_host_is_accepted_with_a_deprecation_warning() -> None:
    # Each host has one session now: the old option is ignored, and says so.
    with pytest.warns(FutureWarning, match="max_starts_per_host is deprecated and ignored"):
        launcher = make_launcher("ssh", max_starts_per_host=2)
    assert isinstance(launcher, SshLauncher) and not hasattr(launcher, "max_starts_per_host")


def test_prepare_script_through_a_local_shell(tmp_path: Path) -> None:
    """The prepare command, run by sh as a remote login shell would: folder, probe, ship."""
    host = Host("h", python=PY, temp_path=str(tmp_path / "base"), init_cmd="export ISDGRID_T=1")
    remote = ssh_args("h", prepare_command(host, "isdgrid-test"), options={})[-1]
    env = {**os.environ, "SSH_CONNECTION": "10.1.2.3 40000 10.9.8.7 22"}
    archive = package_archive(("serpent",))
    out = subprocess.run(["sh", "-c", remote], input=archive, capture_output=True, timeout=60, env=env)
    text = out.stdout.decode()
    assert out.returncode == 0, text + out.stderr.decode()
    setup = parse_probe(text)
    assert setup.temp_dir == str(tmp_path / "base" / "isdgrid-test")
    assert setup.server_address == "10.9.8.7"
    assert setup.python_version[:2] == sys.version_info[:2]
    assert set(setup.modules) >= {"isdgrid", "Pyro5", "serpent", "cloudpickle"}
    assert "ISDGRID-SHIPPED 1" in text
    assert (Path(setup.temp_dir) / LIB_FOLDER / "serpent.py").is_file()
    assert oct(Path(setup.temp_dir).stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize(
    ("host", "message"),
    [
        (Host("h", python="/no/such/python3.99"), "python not found: /no/such/python3.99"),
        (Host("h", python=PY, init_cmd="false"), "init_cmd failed: false"),
    ],
)
def test_prepare_script_reports_what_is_wrong(host: HostType, message: str, tmp_path: Path) -> None:
    host = Host(host.name, python=host.python, init_cmd=host.init_cmd, temp_path=str(tmp_path))
    remote = ssh_args("h", prepare_command(host, "isdgrid-x"), options={})[-1]
    out = subprocess.run(["sh", "-c", remote], input=b"", capture_output=True, timeout=60)
    assert out.returncode != 0
    assert message in out.stdout.decode()
    assert not (tmp_path / "isdgrid-x").exists()


def test_host_command_through_a_local_shell(tmp_path: Path) -> None:
    """The host command runs init, nice and the host daemon from a shipped folder, secret on stdin.

    Its workers listen on the sockets the launcher forwards with the tunnel (``.isdgrid-SLOT.sock``).
    """
    lib = tmp_path / LIB_FOLDER
    lib.mkdir()
    with tarfile.open(fileobj=io.BytesIO(package_archive(("isdgrid",))), mode="r:gz") as tar:
        tar.extractall(lib, filter="data")
    host = Host("h", n_cpu=2, python=PY, niceness=3, init_cmd="echo init-ran")
    specs = [SlotSpec(host, slot, str(tmp_path)) for slot in range(2)]
    remote = host_command(specs, bind="127.0.0.1", lib_dir=str(lib), unix_socket_dir=str(tmp_path))
    assert remote[:2] == ["sh", "-c"] and "nice" in remote and "--secret-stdin" in remote
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # isdgrid only from the shipped copy
    proc = subprocess.Popen(
        ["sh", "-c", shlex.join(remote)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"a-secret\nspawn 0 0 -\nspawn 1 1 -\n")
        proc.stdin.flush()
        lines, uris = [], []
        for raw in iter(proc.stdout.readline, b""):
            lines.append(raw.decode())
            if raw.startswith(b"\x1d") and b"ISDGRID-URI " in raw:
                uris.append(raw.decode().split("ISDGRID-URI ", 1)[1].strip())
                if len(uris) == 2:
                    break
        assert lines[0].strip() == "init-ran"
        assert sorted(uris) == [f"PYRO:isdgrid.agent@./u:{tmp_path}/.isdgrid-{slot}.sock" for slot in range(2)]
        shell = psutil.Process(proc.pid)
        hostd = [p for p in [shell, *shell.children(recursive=True)] if "--secret-stdin" in p.cmdline()]
        assert len(hostd) == 3  # the host daemon and its two workers (forks of it)
        assert all(p.nice() == min(19, os.nice(0) + 3) and str(lib) in p.cmdline() for p in hostd)
        proc.stdin.close()  # the host daemon's cue to end its workers and exit
        assert proc.wait(timeout=30) == 0
        assert wait_until(lambda: not alive(hostd), 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


# -- against the real sshd -------------------------------------------------------------
def _make_tree(root: Path, n_files: int) -> None:
    (root / "simmod" / "data").mkdir(parents=True)
    (root / "simmod" / "__init__.py").write_text(
        "import os\n"
        "def describe():\n"
        "    here = os.path.dirname(__file__)\n"
        "    n = len(os.listdir(os.path.join(here, 'data')))\n"
        "    return open(os.path.join(here, 'data', 'f0.txt')).read() + ':' + str(n)\n"
    )
    for i in range(n_files):
        (root / "simmod" / "data" / f"f{i}.txt").write_text(f"data{i}")
    (root / "simmod" / "data" / "skip.log").write_text("not copied")


def test_two_hosts_several_slots_copy_files_logs_and_clean_end(
    ssh_config: str, sshd_pid: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    tree = tmp_path / "src"
    _make_tree(tree, 200)
    hosts = [Host("node-a", n_cpu=3, python=PY, gpus=[1, 0]), Host("node-b", n_cpu=2, python=PY, niceness=2)]
    grid = ssh_grid(hosts, ssh_config, log_dir=str(tmp_path / "logs"))
    try:
        assert [s.label for s in grid.slots] == ["node-a/0", "node-a/1", "node-a/2", "node-b/0", "node-b/1"]
        assert all(s.uri.startswith("PYRO:isdgrid.agent@127.0.0.1:") for s in grid.slots)
        sid = grid.publish(Probe())
        where = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        assert len({w["pid"] for w in where}) == 5
        # each slot knows its place and its GPU: on the daemon's command line, through ssh
        assert [w["identity"] for w in where] == [
            ["node-a", "0", "0"], ["node-a", "1", "1"], ["node-a", "2", "2"],
            ["node-b", "0", "3"], ["node-b", "1", "4"],
        ]
        assert [w["gpu"] for w in where[:3]] == ["1", "0", "1"]
        temp_dirs = {w["cwd"] for w in where}
        assert len(temp_dirs) == 2 and all(os.path.isdir(d) for d in temp_dirs)
        daemons = sshd_descendants(sshd_pid)
        assert {w["pid"] for w in where} <= {p.pid for p in daemons}  # the daemons run under sshd
        # one host daemon (one ssh session) per host, whose forks serve the slots
        assert len({id(s.handle.host_daemon) for s in grid.slots}) == 2
        assert sorted(p.cmdline()[-2] for p in driver_ssh_sessions()) == ["node-a", "node-b"]
        hostds = host_daemon_sessions(sshd_pid)
        assert len(hostds) == 2
        assert all(psutil.Process(w["pid"]).ppid() in {p.pid for p in hostds} for w in where)
        assert all(psutil.Process(w["pid"]).nice() == 2 for w in where[3:])

        assert grid.copy_files(str(tree), ["simmod/*.py", "simmod/data/*.txt"]) == 201
        got = grid.gather(grid.broadcast(sid, "use_copied"), timeout=60)
        assert got == ["data0:200"] * 5
        assert not any(os.path.exists(os.path.join(d, "simmod", "data", "skip.log")) for d in temp_dirs)

        remote = [r for r in caplog.records if r.name == "isdgrid.remote"]
        for label in ("node-a/0", "node-a/2", "node-b/1"):
            assert any(f"[{label}]" in r.getMessage() and "serving" in r.getMessage() for r in remote)
        logs = sorted(os.listdir(tmp_path / "logs"))
        assert logs == [
            "node-a-0.log", "node-a-1.log", "node-a-2.log", "node-a-hostd.log", "node-b-0.log", "node-b-1.log",
            "node-b-hostd.log",
        ]
        assert "host daemon ready" in (tmp_path / "logs" / "node-a-hostd.log").read_text()
        assert wait_until(lambda: "received 201 files" in (tmp_path / "logs" / "node-b-0.log").read_text(), 15.0)
    finally:
        grid.terminate()
    assert wait_no_sessions(sshd_pid) == []
    assert not any(os.path.exists(d) for d in temp_dirs)


def test_shared_temp_path_gets_one_copy(ssh_config: str, sshd_pid: int, tmp_path: Path) -> None:
    """With shared_temp_path every host uses one folder, and copy_files sends once."""
    tree = tmp_path / "src"
    _make_tree(tree, 3)
    hosts = [Host("node-a", python=PY, temp_path=str(tmp_path / "shared")), Host("node-b", python=PY,
             temp_path=str(tmp_path / "shared"))]
    grid = ssh_grid(hosts, ssh_config, shared_temp_path=True, log_dir=str(tmp_path / "logs"))
    try:
        sid = grid.publish(Probe())
        where = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        assert where[0]["cwd"] == where[1]["cwd"]
        assert grid.copy_files(str(tree), ["simmod/*.py", "*.txt"]) == 4
        assert grid.gather(grid.broadcast(sid, "use_copied"), timeout=60) == ["data0:3"] * 2
        def received() -> list[str]:  # the log lines come through the host daemon, maybe after the call returned
            return [f for f in os.listdir(tmp_path / "logs") if "received" in (tmp_path / "logs" / f).read_text()]

        assert wait_until(lambda: len(received()) == 1, 15.0), received()
    finally:
        grid.terminate()
    assert wait_no_sessions(sshd_pid) == []
    assert not os.path.exists(str(where[0]["cwd"]))


def test_zero_install_bare_python_through_the_tunnel(ssh_config: str, sshd_pid: int, tmp_path: Path) -> None:
    """A python that sees no site-packages and ignores PYTHONPATH gets everything shipped."""
    bare = tmp_path / "bare-python"
    bare.write_text(f"#!/bin/sh\nexec {shlex.quote(PY)} -I -S \"$@\"\n")
    bare.chmod(0o755)
    check = subprocess.run([str(bare), "-c", "import Pyro5"], capture_output=True, timeout=30)
    assert check.returncode != 0  # really bare
    grid = ssh_grid([Host("node-a", n_cpu=2, python=str(bare))], ssh_config, launcher_options={"tunnel": True})
    try:
        assert all(s.uri.startswith("PYRO:isdgrid.agent@./u:") for s in grid.slots)
        sid = grid.publish(Probe())
        where = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        for w in where:
            lib = os.path.join(str(w["cwd"]), LIB_FOLDER)
            assert all(str(path).startswith(lib) for path in w["modules"].values()), w  # type: ignore[union-attr]
        temp_dir = str(where[0]["cwd"])
    finally:
        grid.terminate()
    assert wait_no_sessions(sshd_pid) == []
    assert not os.path.exists(temp_dir)


@pytest.mark.timeout(300)
def test_two_hosts_of_32_slots_one_session_each_under_default_sshd_limits(
    default_sshd: tuple[int, str, Path]
) -> None:
    """64 slots over ssh against OpenSSH's default MaxStartups (10:30:100) and MaxSessions (10)."""
    sshd, config, sshd_log = default_sshd
    hosts = [Host("node-c", n_cpu=32, python=PY), Host("node-d", n_cpu=32, python=PY)]
    procs: list[psutil.Process] = []
    folders: set[str] = set()
    grid = ssh_grid(hosts, config)
    try:
        assert len(grid.slots) == 64
        # From the driver's side: one host daemon, run through one ssh session, per host.
        assert len({id(s.handle.host_daemon) for s in grid.slots}) == 2
        sessions = driver_ssh_sessions()
        assert sorted(p.cmdline()[-2] for p in sessions) == ["node-c", "node-d"]

        # From the server's: two connections open (the preparing ones ended), two host daemons.
        def connections() -> int:
            return len([p for p in psutil.Process(sshd).children() if p.status() != psutil.STATUS_ZOMBIE])

        assert wait_until(lambda: connections() == 2, 15.0), connections()
        hostds = host_daemon_sessions(sshd)
        assert len(hostds) == 2
        sid = grid.publish(Probe())
        where = grid.gather(grid.broadcast(sid, "where"), timeout=120)
        expected = [[h.name, str(slot), str(32 * i + slot)] for i, h in enumerate(hosts) for slot in range(32)]
        assert [w["identity"] for w in where] == expected
        pids = {int(w["pid"]) for w in where}  # type: ignore[call-overload]
        assert len(pids) == 64
        assert {psutil.Process(pid).ppid() for pid in pids} == {p.pid for p in hostds}  # forks of the host daemons
        folders = {str(w["cwd"]) for w in where}
        assert len(folders) == 2
        procs = [*(psutil.Process(pid) for pid in pids), *hostds, *sessions]
    finally:
        grid.terminate()
    assert len(procs) == 64 + 2 + 2
    assert wait_until(lambda: not alive(procs), 15.0), alive(procs)
    assert not any(os.path.exists(folder) for folder in folders)
    assert wait_no_sessions(sshd) == []
    assert "MaxStartups" not in sshd_log.read_text()  # sshd logs each connection it drops past MaxStartups


DRIVER = textwrap.dedent(
    """
    import sys
    from isdgrid import Grid, Host

    class Replica:                      # lives in this driver's __main__
        def __init__(self, temperature):
            self.temperature = temperature
        def energy(self, x):
            return self.temperature * x

    hosts = [Host("node-a", python=sys.executable), Host("node-b", python=sys.executable)]
    grid = Grid(hosts, launcher="ssh", launcher_options={"ssh_config": sys.argv[1]})  # atexit ends it
    sid = grid.publish(Replica(2.0))
    print("ENERGIES", grid.gather(grid.broadcast(sid, "energy", 21), timeout=60))
    print("TEMPS", " ".join(s.handle.spec.temp_path for s in grid.slots))
    """
)


def test_class_from_drivers_main_over_ssh_and_cleanup_at_exit(ssh_config: str, sshd_pid: int) -> None:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    out = subprocess.run(
        [PY, "-c", DRIVER, ssh_config], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ENERGIES [42.0, 42.0]" in out.stdout
    temps = out.stdout.split("TEMPS", 1)[1].split()
    assert len(temps) == 2
    assert wait_no_sessions(sshd_pid) == []
    assert not any(os.path.exists(t) for t in temps)


KILLED_DRIVER = textwrap.dedent(
    """
    import sys, time
    from isdgrid import Grid, Host

    grid = Grid([Host("node-a", n_cpu=2, python=sys.executable)], launcher="ssh",
                launcher_options={"ssh_config": sys.argv[1]})
    print("TEMP", grid.slots[0].handle.spec.temp_path, flush=True)
    time.sleep(300)
    """
)


def test_killed_driver_leaves_nothing_on_the_host(ssh_config: str, sshd_pid: int) -> None:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    driver = subprocess.Popen(
        [PY, "-c", KILLED_DRIVER, ssh_config], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        assert driver.stdout is not None
        line = driver.stdout.readline()
        assert line.startswith("TEMP "), line
        temp_dir = line.split()[1]
        assert os.path.isdir(temp_dir) and len(sshd_descendants(sshd_pid)) >= 2
    finally:
        driver.kill()  # SIGKILL: no atexit, no terminate()
        driver.wait(timeout=30)
        if driver.stdout is not None:
            driver.stdout.close()
    assert wait_no_sessions(sshd_pid) == []
    deadline = time.monotonic() + 10
    while os.path.exists(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(temp_dir)


def test_unreachable_host_is_a_launch_error(ssh_config: str) -> None:
    with pytest.raises(LaunchError) as info:
        ssh_grid([Host("node-dead", python=PY)], ssh_config, launcher_options={"connect_timeout": 5})
    err = info.value
    assert err.host == "node-dead"
    assert err.command[0] == "ssh" and "node-dead" in err.command
    assert "refused" in err.output.lower()
    assert "node-dead" in str(err) and "cannot connect" in str(err)


def test_missing_ssh_client_is_a_launch_error(ssh_config: str) -> None:
    with pytest.raises(LaunchError, match="cannot run /no/such/ssh"):
        ssh_grid([Host("node-a", python=PY)], ssh_config, launcher_options={"ssh": "/no/such/ssh"})


def test_bad_python_is_a_launch_error_naming_it(ssh_config: str, sshd_pid: int) -> None:
    with pytest.raises(LaunchError) as info:
        ssh_grid([Host("node-a", python="/opt/none/python3.99")], ssh_config)
    assert info.value.host == "node-a"
    assert "/opt/none/python3.99" in str(info.value)
    assert wait_no_sessions(sshd_pid) == []


def test_daemon_dying_at_start_is_a_launch_error_with_its_output(
    ssh_config: str, sshd_pid: int, tmp_path: Path
) -> None:
    # init_cmd passes while preparing (run from $HOME) and fails in the slot (run in the temp folder)
    scratch = tmp_path / "scratch"
    host = Host("node-a", python=PY, init_cmd='[ "$PWD" = "$HOME" ]', temp_path=str(scratch))
    with pytest.raises(LaunchError) as info:
        ssh_grid([host], ssh_config)
    assert info.value.host == "node-a"
    assert "exited with code 3" in str(info.value)
    assert "init_cmd failed" in info.value.output
    assert wait_no_sessions(sshd_pid) == []
    assert scratch.is_dir() and not list(scratch.iterdir())  # the folder made for the grid is gone


def test_min_hosts_goes_on_with_the_hosts_that_started_and_keep_temp(
    ssh_config: str, sshd_pid: int, tmp_path: Path
) -> None:
    hosts = [Host("node-a", n_cpu=2, python=PY, temp_path=str(tmp_path / "scratch")), Host("node-dead", python=PY)]
    options = {"keep_temp": True, "bind": "0.0.0.0"}
    grid = ssh_grid(hosts, ssh_config, min_hosts=1, launcher_options=options)
    try:
        assert [h.name for h in grid.hosts] == ["node-a"]
        # bound to every interface, asked for; the URI names the address ssh reached
        assert all(s.uri.startswith("PYRO:isdgrid.agent@127.0.0.1:") for s in grid.slots)
        assert [s.label for s in grid.slots] == ["node-a/0", "node-a/1"]
        sid = grid.publish(Probe())
        where = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        temp_dir = str(where[0]["cwd"])
        assert temp_dir.startswith(str(tmp_path / "scratch" / "isdgrid-"))
    finally:
        grid.terminate()
    assert wait_no_sessions(sshd_pid) == []
    assert os.path.isdir(temp_dir)  # keep_temp=True


@pytest.mark.parametrize("tunnel", [False, True])
def test_respawn_of_a_killed_daemon_over_ssh_is_a_fork_in_the_same_session(
    ssh_config: str, sshd_pid: int, tunnel: bool
) -> None:
    grid = ssh_grid([Host("node-a", n_cpu=2, python=PY)], ssh_config, respawn=True, host_timeout=5.0,
                    launcher_options={"tunnel": tunnel})
    try:
        sid = grid.publish(Probe())
        before = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        grid.release_all()
        sessions = [p.pid for p in driver_ssh_sessions()]
        assert len(sessions) == 1
        psutil.Process(int(before[1]["pid"])).kill()  # type: ignore[call-overload]
        deadline = time.monotonic() + 60
        while grid.respawn_count < 1 or any(s.lost.is_set() for s in grid.slots):
            assert time.monotonic() < deadline, "the killed slot was not respawned"
            time.sleep(0.2)
        after = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        assert after[0]["pid"] == before[0]["pid"] and after[1]["pid"] != before[1]["pid"]
        assert after[1]["cwd"] == before[1]["cwd"]  # same host folder
        assert after[1]["identity"] == before[1]["identity"] == ["node-a", "1", "1"]  # same place in the grid
        # forked by the same host daemon, reached through the same session (and, tunnelled, its forward)
        assert [p.pid for p in driver_ssh_sessions()] == sessions
        assert len({id(s.handle.host_daemon) for s in grid.slots}) == 1
        parents = {psutil.Process(int(a["pid"])).ppid() for a in after}  # type: ignore[call-overload]
        assert len(parents) == 1 and parents == {p.pid for p in host_daemon_sessions(sshd_pid)}
        assert grid.slots[1].uri.startswith("PYRO:isdgrid.agent@./u:" if tunnel else "PYRO:isdgrid.agent@127.0.0.1:")
    finally:
        grid.terminate()
    assert wait_no_sessions(sshd_pid) == []
    assert not os.path.exists(str(before[0]["cwd"]))


def test_a_retired_host_daemons_session_is_left_to_deliver_retire(
    ssh_config: str, sshd_pid: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A replaced host daemon whose session cannot deliver ``retire`` yet is not killed.

    Its ssh client is stopped (SIGSTOP): with the tunnel, the host is then cut off from the
    driver as by a partition. The slot is lost and respawned in a new host daemon (a new
    session); once the old session runs again it delivers ``retire``, and its host daemon
    ends its worker and leaves the folder to the new one.
    """
    caplog.set_level(logging.INFO)
    grid = ssh_grid([Host("node-a", python=PY)], ssh_config, respawn=True, heartbeat_interval=0.5, host_timeout=3.0,
                    launcher_options={"tunnel": True})
    try:
        sid = grid.publish(Probe())
        before = grid.gather(grid.broadcast(sid, "where"), timeout=60)[0]
        grid.release_all()
        old = grid.slots[0].handle.host_daemon
        session = psutil.Process(old.process.pid)
        session.suspend()
        try:
            assert wait_until(lambda: grid.respawn_count >= 1 and not grid.slots[0].lost.is_set(), 60.0, step=0.1)
            after = grid.gather(grid.broadcast(sid, "where"), timeout=60)[0]
            grid.release_all()
            assert grid.slots[0].handle.host_daemon is not old
            assert old.process.poll() is None  # left open, to deliver 'retire' later
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                session.resume()
        assert old.process.wait(timeout=30) == 0  # it ended by itself, not killed
        assert wait_until(lambda: not psutil.pid_exists(int(before["pid"])), 15.0)  # type: ignore[call-overload]
        assert after["pid"] != before["pid"] and after["cwd"] == before["cwd"]
        assert os.path.isdir(str(before["cwd"]))
        assert any("retired by the grid" in r.getMessage() for r in caplog.records if r.name == "isdgrid.remote")
        assert grid.gather(grid.broadcast(sid, "where"), timeout=60)[0]["pid"] == after["pid"]
    finally:
        grid.terminate()
    assert wait_no_sessions(sshd_pid) == []
    assert not os.path.exists(str(before["cwd"]))
