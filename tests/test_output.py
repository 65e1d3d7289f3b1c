"""What the daemons print reaches the driver's terminal; daemons import from the driver's folder.

Each test runs a real driver script with ``sys.executable`` in a subprocess (its stdout and
stderr captured, as a terminal would show them), which starts real daemons: the local
launcher, and the ssh launcher against the test sshd on 127.0.0.1 (.ci/setup-ssh.sh).
"""

from __future__ import annotations

import os
import pty
import queue
import re
import select
import shlex
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import IO

import psutil
import pytest
from conftest import require

from isdgrid.hosts import Host
from isdgrid.launchers.base import SlotSpec, driver_folder
from isdgrid.launchers.local import LocalLauncher
from isdgrid.launchers.sge import SgeLauncher
from isdgrid.launchers.slurm import SlurmLauncher
from isdgrid.launchers.ssh import host_command

REPO_ROOT = str(Path(__file__).resolve().parent.parent)
SSHD_DIR = Path(os.environ.get("ISDGRID_SSHD_DIR", "/tmp/isdgrid-sshd"))

pytestmark = pytest.mark.timeout(120)

TALKER = textwrap.dedent(
    """\
    import subprocess, sys, warnings
    from isdgrid import Grid, Host

    class Talker:
        def talk(self, word):
            print("out:" + word)
            print("err:" + word, file=sys.stderr)
            warnings.warn("warn:" + word)
            subprocess.run(["echo", "child:" + word], check=True)  # a child process writes to fd 1
            return word

    forward = sys.argv[1] == "on"
    with Grid([Host("localhost", n_cpu=2)], forward_output=forward, log_dir=sys.argv[2], status_file=False) as grid:
        proxy = grid.acquire_service(grid.publish(Talker()))
        print("CALLED", proxy.talk("w1").get(timeout=30), flush=True)
        sys.stdin.readline()  # the test has read what it waits for
    """
)


class Driver:
    """A driver script run in a subprocess; its output lines timestamped as they come."""

    def __init__(self, script: Path, args: list[str], cwd: Path) -> None:
        self.lines: queue.Queue[tuple[float, str, str]] = queue.Queue()
        self.seen: list[tuple[float, str, str]] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(script.relative_to(cwd)), *args],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": REPO_ROOT},
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(name, pipe), daemon=True)
            for name, pipe in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str, pipe: IO[bytes]) -> None:
        for raw in iter(pipe.readline, b""):
            self.lines.put((time.monotonic(), name, raw.decode("utf-8", "replace").rstrip("\n")))

    def wait_for(self, stream: str, pattern: str, deadline: float) -> float | None:
        """When a line of ``stream`` matching ``pattern`` arrived (None: not by ``deadline``)."""
        regex = re.compile(pattern)
        while True:
            for when, name, line in self.seen:
                if name == stream and regex.search(line):
                    return when
            try:
                self.seen.append(self.lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return None

    def finish(self, timeout: float = 30.0) -> tuple[int, list[tuple[float, str, str]]]:
        """Let the driver end (bounded; killed by PID if it hangs); exit code and every line."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(self.proc.pid)
            code = self.proc.wait(timeout=10)
        for reader in self._readers:
            reader.join(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            assert pipe is not None
            pipe.close()
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return code, self.seen


def _kill_tree(pid: int) -> None:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _show(lines: list[tuple[float, str, str]]) -> str:
    return "\n".join(f"{name}: {line}" for _, name, line in lines)


# -- remote output ---------------------------------------------------------------------
def test_prints_of_a_published_object_show_on_the_drivers_streams_at_once(tmp_path: Path) -> None:
    script = tmp_path / "talker.py"
    script.write_text(TALKER)
    log_dir = tmp_path / "logs" / "grid"
    driver = Driver(script, ["on", str(log_dir)], tmp_path)
    try:
        called = driver.wait_for("stdout", r"^CALLED w1$", time.monotonic() + 60)
        assert called is not None, _show(driver.seen)
        by = called + 1.0  # every line within a second of the call's return
        slot = r"^\[localhost/[01]\] "
        for stream, pattern in (
            ("stdout", slot + r"out:w1$"),
            ("stderr", slot + r"err:w1$"),
            ("stderr", slot + r".*UserWarning: warn:w1$"),
            ("stdout", slot + r"child:w1$"),
        ):
            when = driver.wait_for(stream, pattern, by)
            assert when is not None, f"no {pattern!r} on {stream} within 1 s:\n{_show(driver.seen)}"
    finally:
        code, lines = driver.finish()
    assert code == 0, _show(lines)
    # the daemons' own log lines stay in logging (not set up by this driver): not shown
    assert not any("serving" in line for _, _, line in lines), _show(lines)
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700
    logs = sorted(log_dir.iterdir())
    assert [p.name for p in logs] == ["localhost-0.log", "localhost-1.log", "localhost-hostd.log"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in logs)
    assert "host daemon ready" in logs[2].read_text()  # the host daemon's own lines: a log of their own
    text = "".join(p.read_text() for p in logs[:2])
    assert "out:w1\n" in text and "err:w1\n" in text and "child:w1\n" in text and "serving" in text
    assert "\x1e" not in text  # the marks are the launcher's business, not the log's


def test_forward_output_false_shows_nothing_and_keeps_the_log_files(tmp_path: Path) -> None:
    script = tmp_path / "talker.py"
    script.write_text(TALKER)
    log_dir = tmp_path / "logs"
    driver = Driver(script, ["off", str(log_dir)], tmp_path)
    try:
        assert driver.wait_for("stdout", r"^CALLED w1$", time.monotonic() + 60) is not None, _show(driver.seen)
    finally:
        code, lines = driver.finish()  # terminate() reads each daemon's output to its end
    assert code == 0, _show(lines)
    assert [line for _, _, line in lines] == ["CALLED w1"], _show(lines)
    text = "".join(p.read_text() for p in sorted(log_dir.iterdir()))
    assert all(f"{word}:w1\n" in text for word in ("out", "err", "child")) and "warn:w1" in text


# -- whole lines on a terminal -----------------------------------------------------------
SHOUTER = textwrap.dedent(
    """\
    import sys
    from isdgrid import Grid, Host

    class Shouter:
        def shout(self, n):
            for i in range(n):
                print(f"remote line {i}")
            return n

    if sys.argv[1] == "ssh":
        grid = Grid([Host("node-a", python=sys.executable)], launcher="ssh", status_file=False,
                    launcher_options={"ssh_config": sys.argv[2]})
    else:
        grid = Grid([Host("localhost", n_cpu=1)], status_file=False)
    with grid:
        proxy = grid.acquire_service(grid.publish(Shouter()))
        shouted = proxy.shout(2000)
        for i in range(2000):
            print(f"driver {i}", flush=True)
        print("SHOUTED", shouted.get(timeout=90), flush=True)
    """
)


def _run_on_a_terminal(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``command`` with a pty as its stdin, stdout and stderr; its exit code and output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the pty
                break
            if not data:
                break
            chunks.append(data)
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            code = proc.wait(timeout=10)
    finally:
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


def _assert_whole_lines(tmp_path: Path, args: list[str], unbuffered: bool) -> None:
    script = tmp_path / "shouter.py"
    script.write_text(SHOUTER)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:  # print's pieces (text, then "\n") reach the terminal one by one
        env["PYTHONUNBUFFERED"] = "1"
    code, output = _run_on_a_terminal([sys.executable, script.name, *args], tmp_path, env, timeout=100)
    lines = output.splitlines()
    assert code == 0 and "SHOUTED 2000" in lines, output[-3000:]
    whole = re.compile(r"^(driver \d+|\[[\w.-]+/0\] remote line \d+|SHOUTED 2000)$")
    cut = [line for line in lines if line and not whole.match(line)]
    assert cut == [], f"{len(cut)} cut lines, first ones: {cut[:5]}"
    assert sum(line.startswith("driver ") for line in lines) == 2000
    assert sum("] remote line " in line for line in lines) == 2000


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "line-buffered"])
def test_forwarded_lines_never_cut_into_the_drivers_lines_on_a_terminal_local(tmp_path: Path, unbuffered: bool) -> None:
    _assert_whole_lines(tmp_path, ["local"], unbuffered)


def test_forwarded_lines_never_cut_into_the_drivers_lines_on_a_terminal_ssh(tmp_path: Path) -> None:
    require(_sshd_running() and os.path.exists("/usr/bin/ssh"), "no test sshd running (run .ci/setup-ssh.sh)")
    _assert_whole_lines(tmp_path, ["ssh", str(_ssh_config(tmp_path))], unbuffered=True)


# -- the driver's folder on the daemons' sys.path --------------------------------------
IMPORTER = textwrap.dedent(
    """\
    import sys
    from isdgrid import Grid, Host

    class Importer:
        def find(self):
            import importlib.util
            import next_to_driver  # lives beside this script, not in the driver's current folder
            return next_to_driver.VALUE, importlib.util.find_spec("in_current_folder") is None

    if sys.argv[1] == "ssh":
        grid = Grid([Host("node-a", python=sys.executable)], launcher="ssh", status_file=False,
                    launcher_options={"ssh_config": sys.argv[2]})
    else:
        grid = Grid([Host("localhost", n_cpu=1)], status_file=False)
    with grid:
        proxy = grid.acquire_service(grid.publish(Importer()))
        print("FOUND", *proxy.find().get(timeout=60), flush=True)
    """
)


def _driver_in_subfolder(tmp_path: Path) -> Path:
    sub = tmp_path / "project" / "sub"
    sub.mkdir(parents=True)
    (sub / "driver.py").write_text(IMPORTER)
    (sub / "next_to_driver.py").write_text("VALUE = 'beside-the-driver'\n")
    # the driver cannot import this (its sys.path starts with sub/): neither may the daemons
    (tmp_path / "project" / "in_current_folder.py").write_text("VALUE = 'cwd'\n")
    return sub / "driver.py"


def _run_importer(tmp_path: Path, args: list[str]) -> None:
    script = _driver_in_subfolder(tmp_path)
    driver = Driver(script, args, tmp_path / "project")  # python sub/driver.py, from project/
    try:
        found = driver.wait_for("stdout", r"^FOUND ", time.monotonic() + 90)
        assert found is not None, _show(driver.seen)
    finally:
        code, lines = driver.finish()
    assert code == 0, _show(lines)
    assert "FOUND beside-the-driver True" in [line for _, _, line in lines], _show(lines)


def test_daemons_import_from_the_driver_scripts_folder_local(tmp_path: Path) -> None:
    _run_importer(tmp_path, ["local"])


def _sshd_running() -> bool:
    try:
        pid = int((SSHD_DIR / "sshd.pid").read_text().strip())
        port = int((SSHD_DIR / "port").read_text().strip())
    except (OSError, ValueError):
        return False
    if not psutil.pid_exists(pid):
        return False
    with socket.socket() as sock:
        sock.settimeout(2.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_daemons_import_from_the_driver_scripts_folder_ssh(tmp_path: Path) -> None:
    require(_sshd_running() and os.path.exists("/usr/bin/ssh"), "no test sshd running (run .ci/setup-ssh.sh)")
    _run_importer(tmp_path, ["ssh", str(_ssh_config(tmp_path))])


def _ssh_config(tmp_path: Path) -> Path:
    """An ssh config naming the test sshd ``node-a``."""
    port = (SSHD_DIR / "port").read_text().strip()
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host node-a\n    HostName 127.0.0.1\n    Port {port}\n    User root\n"
        f"    IdentityFile {SSHD_DIR}/client_ed25519\n    IdentitiesOnly yes\n"
        "    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n"
    )
    return config


@pytest.mark.parametrize(
    ("args", "folder"),
    [
        (["-c", "from isdgrid.launchers.base import driver_folder; print(driver_folder())"], "cwd"),
        (["-m", "runme"], "cwd"),  # python -m: the driver's sys.path starts with the current folder
        (["sub/runme.py"], "sub"),
        (["link.py"], "sub"),  # a symlink to the script: its real folder, as Python does
    ],
)
def test_driver_folder_is_where_the_drivers_python_looks_first(
    tmp_path: Path, args: list[str], folder: str
) -> None:
    (tmp_path / "sub").mkdir()
    code = "from isdgrid.launchers.base import driver_folder; print(driver_folder())\n"
    (tmp_path / "runme.py").write_text(code)
    (tmp_path / "sub" / "runme.py").write_text(code)
    (tmp_path / "link.py").symlink_to(tmp_path / "sub" / "runme.py")
    out = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=30, check=True,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
    ).stdout.strip()
    assert out == str(tmp_path.resolve() if folder == "cwd" else (tmp_path / "sub").resolve())


def test_every_launcher_gives_the_daemon_the_drivers_folder_and_output_marks() -> None:
    spec = SlotSpec(Host("node1", n_cpu=1), 0, "/tmp/isdgrid-x")
    slurm_env = {"SLURM_JOB_ID": "7", "PATH": os.environ.get("PATH", "")}
    sge_env = {"JOB_ID": "7", "PATH": os.environ.get("PATH", "")}
    commands = {
        "local": LocalLauncher().command([spec]),
        "ssh": host_command([spec], bind="127.0.0.1", paths=[driver_folder()]),
        "slurm": SlurmLauncher(environ=slurm_env, forward_output=False).command([spec]),
        "sge": SgeLauncher(environ=sge_env).command([spec]),
    }
    for name, cmd in commands.items():
        words = cmd[:-1] + shlex.split(cmd[-1]) if name == "sge" else cmd  # qrsh: one remote string
        assert "isdgrid.hostd" in words, name  # the host daemon marks its workers' output itself
        at = words.index("--path")
        assert words[at + 1] == driver_folder(), name
