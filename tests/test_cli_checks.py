"""Issue 11, the command line and start-up errors: options checked before anything starts,
an honest Boltzmann verdict, no files left behind (not by a demo, not by Ctrl-C during a
start), a host's Python version checked at start, and one line per host that cannot start.

Real daemons in real processes: the local launcher (one host on another Python of this
machine), and the ssh client against ports nobody listens on.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import require

from isdgrid import Grid, Host, LaunchError
from isdgrid.cli import main
from isdgrid.examples.boltzmann import autocorrelation_inefficiency, check_boltzmann, exact_marginal
from isdgrid.examples.replica_exchange import Replica, RuggedDoubleWell
from isdgrid.launchers.ssh import package_archive

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = RuggedDoubleWell()

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's temp folder (tempfile.gettempdir()) moved to a folder of the test's own."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# -- options are checked before anything starts ---------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--launcher", "nonexistent"], "isdgrid demo: error: Invalid value for '--launcher': 'nonexistent'"),
        (
            ["demo", "--log", "/nonexistent/dir/x.txt"],
            "isdgrid demo: error: Invalid value for '--log': cannot write '/nonexistent/dir/x.txt': "
            "No such file or directory",
        ),
        (["demo", "--launcher", "slurm"], "isdgrid demo: error: Invalid value for '--launcher': launcher='slurm'"),
        (["demo", "--launcher", "attach"], "isdgrid demo: error: Invalid value for '--launcher': 'attach'"),
        (
            ["check", "hosts.toml", "--launcher", "carrier-pigeon"],
            "isdgrid check: error: Invalid value for '--launcher': 'carrier-pigeon'",
        ),
    ],
)
def test_a_bad_option_exits_2_before_anything_starts(
    args: list[str],
    message: str,
    private_tmp: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOBID", raising=False)
    (tmp_path / "hosts.toml").write_text('[[host]]\nname = "localhost"\n')
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message), captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err  # no "starting 4 slots ..." before it
    assert captured.out == ""
    assert os.listdir(private_tmp) == []  # no grid temp folder was made: nothing started


# -- the Boltzmann verdict -------------------------------------------------------------------
def test_short_demo_is_inconclusive_exits_0_and_leaves_no_file(
    private_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["demo", "--slots", "2", "--rounds", "5"])  # returns: exit status 0
    out = capsys.readouterr().out
    check = [line for line in out.splitlines() if line.startswith("Boltzmann check")]
    assert len(check) == 1 and check[0].startswith("Boltzmann check at T=1: INCONCLUSIVE: 100 samples"), out
    # The output says what the verdict rests on and what would be enough.
    assert "need >= 100" in check[0] and "round trips 0 (need >= 19)" in check[0]
    assert check[0].endswith("(10 expected per bin); run more rounds")
    assert "replica log" not in out  # not asked for, not written
    assert os.listdir(private_tmp) == []  # no isdgrid-demo-<pid>-replicanums.txt, no grid folder


def test_demo_writes_the_replica_log_only_where_asked(
    private_tmp: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "replicanums.txt"
    main(["demo", "--slots", "2", "--rounds", "3", "--steps", "20", "--log", str(log)])
    assert f"replica log (replica at each temperature, per round): {log}" in capsys.readouterr().out
    assert len([line for line in log.read_text().splitlines() if not line.startswith("#")]) == 3
    assert os.listdir(private_tmp) == []


def _stuck_chain(samples: int, seed: int = 0) -> list[float]:
    """A real Metropolis chain at T=1 started in the right well: it stays there."""
    replica = Replica(MODEL)
    replica.reset(seed, 1.0, True, 1.0, 0.5)
    return list(replica.sample(samples * 10, thin=10)["xs"])


def test_a_chain_too_short_to_cross_is_inconclusive_not_fail() -> None:
    exact = exact_marginal(MODEL.energy, 1.0)
    stuck = _stuck_chain(100)
    assert max(stuck) > 0 and min(stuck) > 0  # never left the right well
    check = check_boltzmann(stuck, exact)
    assert check.p_value < check.alpha  # the histogram is far off ...
    assert check.verdict == "INCONCLUSIVE", check.summary()  # ... but the chain is too short to tell
    assert check.effective_samples < check.min_effective == 100

    # Many independent draws from one well are a real FAIL, unless the replica exchange that
    # produced them made too few round trips to have populated the wells.
    rng = random.Random(5)
    one_well = [x for x in exact.sample(8000, rng) if x < 0][:5000]
    assert check_boltzmann(one_well, exact).verdict == "FAIL"
    few_trips = check_boltzmann(one_well, exact, round_trips=4)
    assert few_trips.verdict == "INCONCLUSIVE" and few_trips.min_round_trips == 19
    assert "round trips" in few_trips.reason
    assert check_boltzmann(exact.sample(5000, rng), exact, round_trips=40).verdict == "PASS"


def test_autocorrelation_inefficiency_of_a_two_state_markov_chain() -> None:
    # Switching with probability q per step: rho_t = (1 - 2q)^t, so g = (1 + rho) / (1 - rho) = (1 - q) / q.
    rng = random.Random(11)
    for q in (0.5, 0.1, 0.02):
        state, chain = 0, []
        for _ in range(40000):
            if rng.random() < q:
                state = 1 - state
            chain.append(state)
        g = autocorrelation_inefficiency(chain, 2)
        expected = max(1.0, (1 - q) / q)
        assert g[0] == pytest.approx(g[1]) and g[0] == pytest.approx(expected, rel=0.25), (q, g)
    assert autocorrelation_inefficiency([1] * 50, 3) == [1.0, 1.0, 1.0]  # no variance: nothing to correct


# -- Ctrl-C while a grid starts ----------------------------------------------------------------
INTERRUPTED_DRIVER = textwrap.dedent(
    """
    import sys
    from isdgrid import Grid, Host

    n_cpu, init_cmd = int(sys.argv[1]), sys.argv[2]
    with Grid([Host("localhost", n_cpu=n_cpu, init_cmd=init_cmd)], status_file=False):
        print("STARTED", flush=True)
    """
)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


@pytest.mark.parametrize(
    ("n_cpu", "init_cmd", "wait_for"),
    [
        (2, "sleep 60", 2),  # interrupted while it waits for daemons that are still in init_cmd
        (24, "", 6),  # interrupted while it starts the processes one by one
    ],
)
def test_ctrl_c_during_start_leaves_no_folder_and_no_process(
    n_cpu: int, init_cmd: str, wait_for: int, tmp_path: Path
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TMPDIR": str(temp)}
    driver = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_DRIVER, str(n_cpu), init_cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 60
        while len(seen) < wait_for:
            assert time.monotonic() < deadline and driver.poll() is None, "the driver started no daemon"
            seen.update((p.pid, p) for p in _descendants(driver.pid))
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=60)
        seen.update((p.pid, p) for p in _descendants(driver.pid))
        assert "STARTED" not in out and "KeyboardInterrupt" in err, (out, err)
        assert driver.returncode != 0
        gone_by = time.monotonic() + 10  # what the driver started is gone when it is (a short grace for reaping)
        alive = [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        while alive and time.monotonic() < gone_by:
            time.sleep(0.1)
            alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], [" ".join(p.cmdline()) for p in alive]
        assert list(temp.iterdir()) == []  # no isdgrid-localhost-XXXX folder
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate(timeout=30)
        for proc in seen.values():  # ended by PID, whatever the outcome
            if proc.is_running():
                for child in _descendants(proc.pid):
                    child.kill()
                proc.kill()


# -- the host's Python version ---------------------------------------------------------------
def _other_pythons() -> Iterator[str]:
    """Interpreters of this machine with another minor version than this one (newest first)."""
    mine = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    pyenv = os.path.expanduser(os.environ.get("PYENV_ROOT", "~/.pyenv"))
    found = sorted(glob.glob(os.path.join(pyenv, "versions", "*", "bin", "python3")), reverse=True)
    found += [path for minor in range(20, 9, -1) if (path := shutil.which(f"python3.{minor}"))]
    for path in found:
        if os.path.basename(os.path.realpath(path)) != mine:
            yield path


@pytest.fixture(scope="module")
def foreign_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Another Python >= 3.10 of this machine, and a folder that lets its daemons run.

    The folder holds this driver's own (pure Python) Pyro5, serpent and cloudpickle, as the
    ssh launcher ships them to a host that lacks them; isdgrid comes from this checkout. So
    any interpreter will do, no virtual environment needed (.ci/run makes its venvs only
    after this suite runs). They are looked for where .ci/run looks: pyenv's versions and
    ``python3.X`` on PATH. None found: skipped here, a failure in CI.
    """
    lib = tmp_path_factory.mktemp("foreign-lib")
    with tarfile.open(fileobj=io.BytesIO(package_archive(("Pyro5", "cloudpickle", "serpent"))), mode="r:gz") as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12
            tar.extractall(lib, filter="data")
        else:
            tar.extractall(lib)  # noqa: S202 - our own archive of the driver's packages
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, str(lib)])}
    probe = "import sys; import isdgrid.daemon; print(*sys.version_info[:2])"
    usable = None
    for python in _other_pythons():
        try:
            proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = tuple(int(part) for part in proc.stdout.split() if part.isdigit())
        if proc.returncode == 0 and version != sys.version_info[:2] and version >= (3, 10):
            usable = python
            break
    require(usable is not None, "no other Python >= 3.10 on this machine that can run an isdgrid daemon")
    assert usable is not None
    return usable, str(lib)


@pytest.fixture
def foreign_host(foreign_python: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """The other Python, with its daemons' PYTHONPATH set (the local launcher passes it on)."""
    python, lib = foreign_python
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([lib, old]) if old else lib)
    return python


def test_a_host_on_another_python_is_refused_naming_both_versions(foreign_host: str) -> None:
    python = foreign_host
    mine = ".".join(map(str, sys.version_info[:3]))
    before = {p.pid for p in _descendants(os.getpid())}
    with pytest.raises(LaunchError) as info:
        Grid([Host("localhost", n_cpu=2, python=python)], status_file=False)
    err = info.value
    assert err.host == "localhost"
    text = str(err)
    assert len(text.splitlines()) == 1
    assert re.search(r"its Python is 3\.\d+\.\d+ \(", text) and f"the driver's is {mine}" in text, text
    assert "allow_python_mismatch=True" in text
    deadline = time.monotonic() + 10  # the refused grid ended its daemons
    while {p.pid for p in _descendants(os.getpid())} - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not {p.pid for p in _descendants(os.getpid())} - before


def test_allow_python_mismatch_warns_and_serves_classes_the_host_imports(
    foreign_host: str, caplog: pytest.LogCaptureFixture
) -> None:
    python = foreign_host
    with caplog.at_level(logging.WARNING, logger="isdgrid"), Grid(
        [Host("localhost", python=python)], status_file=False, allow_python_mismatch=True
    ) as grid:
        warned = [r.getMessage() for r in caplog.records if "allow_python_mismatch" in r.getMessage()]
        assert len(warned) == 1 and "its Python is 3." in warned[0]
        assert grid.slots[0].control("info")["executable"] != sys.executable
        sid = grid.publish(Replica(MODEL))  # a class the host imports: travels by reference
        proxy = grid.acquire_service(sid)
        assert proxy.reset(1, 1.0, False, 0.0, 0.0).get(timeout=30) == pytest.approx(MODEL.energy(0.0, 0.0))
        grid.release_service(proxy)


def test_check_reports_the_python_mismatch(
    foreign_host: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    python = foreign_host
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(f'[[host]]\nname = "localhost"\npython = "{python}"\n')
    with pytest.raises(SystemExit) as info:
        main(["check", str(hosts)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    fail = [line for line in err.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1 and fail[0].startswith("FAIL  localhost: its Python is 3."), err
    assert "the driver's is " + ".".join(map(str, sys.version_info[:3])) in fail[0]


# -- one line per host that cannot start --------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ssh_start_failures_say_one_line_per_host(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    require(shutil.which("ssh") is not None, "no OpenSSH client (ssh) on PATH")
    config = tmp_path / "ssh_config"
    config.write_text(
        "".join(
            f"Host {name}\n    HostName 127.0.0.1\n    Port {_closed_port()}\n"
            "    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n"
            for name in ("dead-1", "dead-2")
        )
    )
    hosts = [Host(name, n_cpu=3, python=sys.executable) for name in ("dead-1", "dead-2")]
    with caplog.at_level(logging.DEBUG, logger="isdgrid"), pytest.raises(LaunchError) as info:
        Grid(hosts, "ssh", launcher_options={"ssh_config": str(config), "connect_timeout": 5}, status_file=False)
    err = info.value
    text = str(err)
    assert text.startswith("host 'dead-1': cannot connect over ssh (exit code 255): ssh: connect to host 127.0.0.1")
    assert text.endswith("Connection refused") and "\n" not in text
    # The facts stay on the exception, and in the debug log.
    assert err.command[0] == "ssh" and "dead-1" in err.command and "refused" in err.output.lower()
    assert "\n  command: ssh " in err.details()
    # At the default level: one line for the host that was not raised (not one per slot).
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("isdgrid")]
    assert len(loud) == 1, loud
    assert loud[0].startswith("host 'dead-2': cannot connect over ssh (exit code 255): ssh: connect to host")
    assert loud[0].endswith("Connection refused") and "\n" not in loud[0]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "command: ssh" in r.getMessage()]
    assert debug  # the full command is there for -vv / debug=True


def test_launch_error_keeps_one_line_with_the_hosts_last_words() -> None:
    err = LaunchError(
        "daemon exited with code 1 before serving",
        host="n1",
        command=["python3", "-m", "isdgrid.daemon"],
        output="Traceback (most recent call last):\n  ...\nModuleNotFoundError: No module named 'Pyro5'\n\n",
    )
    assert str(err) == (
        "host 'n1': daemon exited with code 1 before serving: ModuleNotFoundError: No module named 'Pyro5'"
    )
    assert err.details().splitlines()[1:3] == ["  command: python3 -m isdgrid.daemon", "  output:"]
    assert str(LaunchError("python not found: /x", host="n", output="ISDGRID-ERROR python not found: /x")) == (
        "host 'n': python not found: /x"
    )
    assert str(LaunchError("no host")) == "no host"


# -- isdgrid daemon: one line for a port in use or a weak secret file ---------------------------
def _run_daemon(*args: str) -> subprocess.CompletedProcess[str]:
    """``isdgrid daemon ARGS``, expected to refuse at once; a daemon that serves instead exits
    after 10 silent seconds (and is killed by subprocess.run at its timeout)."""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    return subprocess.run(
        [sys.executable, "-m", "isdgrid", "daemon", "--heartbeat-timeout", "10", *args],
        capture_output=True, text=True, timeout=90, env=env, stdin=subprocess.DEVNULL,
    )


def _secret_file(folder: Path, text: str, mode: int) -> Path:
    path = folder / "secret"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def test_daemon_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    secret = _secret_file(tmp_path, "s" * 64, 0o600)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = _run_daemon("--secret-file", str(secret), "--port", str(port))
    assert proc.returncode != 0
    assert "ISDGRID-URI" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "already in use" in lines[0] and "--port" in lines[0]


@pytest.mark.parametrize(
    ("text", "mode", "says"),
    [
        ("s" * 64, 0o644, ["open to group or others (mode 0644)", "chmod 600"]),
        ("s" * 64, 0o620, ["open to group or others (mode 0620)", "chmod 600"]),
        ("secret", 0o600, ["holds 6 bytes, fewer than 16", "secrets.token_hex(32)", "chmod 600"]),
        ("secret", 0o644, ["open to group or others (mode 0644)"]),  # the file: its mode is said first
    ],
    ids=["readable-by-others", "writable-by-group", "too-short", "short-and-readable"],
)
def test_daemon_refuses_a_weak_secret_file_in_one_line(tmp_path: Path, text: str, mode: int, says: list[str]) -> None:
    secret = _secret_file(tmp_path, text, mode)
    proc = _run_daemon("--secret-file", str(secret))
    assert proc.returncode != 0
    assert "ISDGRID-URI" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(secret) in lines[0] and all(part in lines[0] for part in says), lines[0]
