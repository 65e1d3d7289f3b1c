"""The command line: demo, status (with a live driver), check, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from isdgrid.cli import cli, main
from isdgrid.examples.run_checkpoint import RunCheckpoint
from isdgrid.statusfile import RUN_DIR_ENV, read_status_files

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private run folder, so other drivers on this machine stay out of the test."""
    folder = tmp_path / "run"
    monkeypatch.setenv(RUN_DIR_ENV, str(folder))
    return folder


def _env(run_dir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    if run_dir is not None:
        env[RUN_DIR_ENV] = str(run_dir)
    return env


def _isdgrid(*args: str, run_dir: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isdgrid", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(run_dir),
        cwd=REPO_ROOT,
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -- demo ------------------------------------------------------------------------------
def test_demo_runs_end_to_end(tmp_path: Path, run_dir: Path) -> None:
    log = tmp_path / "replicanums.txt"
    proc = _isdgrid("demo", "--slots", "2", "--rounds", "5", "--steps", "50", "--log", str(log), run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "2 replicas on 2 slots" in out and "5 rounds x 50 steps" in out
    assert "  0-1 " in out  # the acceptance table has the one pair
    assert "replica round trips" in out and "calls made: 22 on 2 servers" in out  # 1 + 5 + 5 per server
    assert "time per round:" in out and "grid overhead per round:" in out
    assert "Boltzmann check at T=1: INCONCLUSIVE" in out  # 5 rounds give too few samples to judge
    rows = [line.split() for line in log.read_text().splitlines() if not line.startswith("#")]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(sorted(r[1:]) == ["1", "2"] for r in rows)
    # The progress bar (tqdm) goes to stderr; on a non-terminal as plain lines, no carriage returns.
    assert "\r" not in proc.stderr
    bar = [line for line in proc.stderr.splitlines() if line.startswith("replica exchange:")]
    assert bar and "| 5/5 [" in bar[-1] and "100%" in bar[-1], proc.stderr
    assert not list(run_dir.glob("*.json"))  # the status file went with the grid


def _grid_figures(report: str) -> list[str]:
    keep = ("calls made:", "time per round:", "remote compute per round", "grid overhead per round:")
    return [line for line in report.splitlines() if line.startswith(keep)]


def test_a_resumed_demo_reports_the_whole_run(tmp_path: Path, run_dir: Path) -> None:
    """The grid's figures after --resume count the rounds of the earlier sessions too."""
    ckpt = tmp_path / "run.ckpt"
    common = ("--slots", "2", "--steps", "50")
    first = _isdgrid("demo", *common, "--rounds", "6", "--checkpoint", str(ckpt), run_dir=run_dir)
    assert first.returncode == 0, first.stderr
    assert "calls made: 26 on 2 servers" in first.stdout  # (1 reset + 6 sample + 6 set_temperature) x 2
    # The run is finished: this session runs no round, and reports the run's figures as they were.
    again = _isdgrid("demo", "--resume", str(ckpt), "--slots", "2", run_dir=run_dir)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr and "6 rounds x 50 steps" in again.stdout
    assert len(_grid_figures(first.stdout)) == 4
    assert _grid_figures(again.stdout) == _grid_figures(first.stdout)
    longer = _isdgrid("demo", "--resume", str(ckpt), "--slots", "2", "--rounds", "10", run_dir=run_dir)
    assert longer.returncode == 0, longer.stderr
    assert "10 rounds x 50 steps" in longer.stdout
    assert "calls made: 42 on 2 servers" in longer.stdout  # the whole run: (1 + 10 + 10) x 2
    assert "figures below cover" not in longer.stdout  # they cover the whole run: nothing to say
    # A checkpoint without counters (an older isdgrid's): the report says which rounds it covers.
    old = RunCheckpoint.load(ckpt)
    state = old.driver_state()
    del state["remote_work"]
    dataclasses.replace(old, driver=pickle.dumps(state)).save(ckpt)
    older = _isdgrid("demo", "--resume", str(ckpt), "--slots", "2", "--rounds", "12", run_dir=run_dir)
    assert older.returncode == 0, older.stderr
    assert "the figures below cover rounds 11..12 (the checkpoint resumed holds none" in older.stdout
    assert "calls made: 8 on 2 servers" in older.stdout  # (2 sample + 2 set_temperature) x 2


def test_demo_and_status_help_in_process() -> None:
    runner = CliRunner()
    for command in ("demo", "status", "check"):
        result = runner.invoke(cli, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage: cli " + command in result.output or f"{command} [OPTIONS]" in result.output
    assert "--watch" in runner.invoke(cli, ["status", "--help"]).output


# -- status ----------------------------------------------------------------------------
DRIVER = textwrap.dedent(
    """
    import sys, time
    from isdgrid import Grid, Host

    class Counter:
        def __init__(self):
            self.n = 0
        def bump(self):
            self.n += 1
            time.sleep(0.01)
            return self.n

    with Grid([Host("localhost", n_cpu=2)]) as grid:
        sid = grid.publish(Counter())
        for _ in range(3):
            grid.gather(grid.broadcast(sid, "bump"), timeout=60)
        grid.release_all()
        held = grid.acquire_service(sid)
        print("READY", sid, grid._secret, flush=True)
        sys.stdin.read()          # hold the grid until the test closes our stdin
    print("DONE", flush=True)
    """
)


@pytest.fixture
def driver(run_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(run_dir)
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the test timeout; READY comes in a few s
        assert line.startswith("READY"), line
        _, sid, secret = line.split()
        yield proc, sid, secret
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def _wait_for_calls(run_dir: Path, calls: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        proc = _isdgrid("status", "--json", run_dir=run_dir)
        assert proc.returncode == 0, proc.stderr
        docs = json.loads(proc.stdout)
        if docs and docs[0]["servers"] and all(r["calls"] == calls for r in docs[0]["servers"]):
            return docs
        assert time.monotonic() < deadline, f"status never showed {calls} calls: {docs}"
        time.sleep(0.3)


def test_status_json_while_a_driver_runs(driver: tuple[subprocess.Popen[str], str, str], run_dir: Path) -> None:
    proc, sid, secret = driver
    docs = _wait_for_calls(run_dir, 3)
    assert len(docs) == 1
    doc = docs[0]
    assert doc["pid"] == proc.pid and doc["launcher"] == "auto" and doc["state"] == "running"
    assert doc["hosts"] == [{"name": "localhost", "n_cpu": 2, "python": "python3"}]
    assert [(s["host"], s["slot"], s["lost"]) for s in doc["slots"]] == [
        ("localhost", 0, False),
        ("localhost", 1, False),
    ]
    servers = doc["servers"]
    assert {r["service_id"] for r in servers} == {sid} and sid.startswith("Counter-")
    assert sorted(r["busy"] for r in servers) == [False, True]  # one server held by the driver
    assert all(r["mean_call_time"] >= 0.009 for r in servers)  # bump() sleeps 10 ms

    # The file: private, and without the secret.
    path = Path(doc["file"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert secret not in path.read_text()

    table = _isdgrid("status", run_dir=run_dir)
    assert table.returncode == 0
    assert f"driver pid {proc.pid}" in table.stdout and sid in table.stdout and "busy" in table.stdout
    watched = _isdgrid("status", "--watch", "--interval", "0.2", "--count", "2", run_dir=run_dir)
    assert watched.returncode == 0 and watched.stdout.count(f"driver pid {proc.pid}") == 2

    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    assert not list(run_dir.glob("*.json"))
    after = _isdgrid("status", "--json", run_dir=run_dir)
    assert json.loads(after.stdout) == []
    assert "no running isdgrid driver" in _isdgrid("status", run_dir=run_dir).stdout


def test_status_files_of_dead_drivers_are_ignored_and_removed(run_dir: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    run_dir.mkdir(mode=0o700)
    stale = run_dir / f"{gone.pid}-deadbeef.json"
    stale.write_text(json.dumps({"format": "isdgrid-status/1", "pid": gone.pid, "servers": []}))
    (run_dir / "garbage.json").write_text("{not json")
    assert read_status_files(str(run_dir)) == []
    assert not stale.exists()


# -- check -----------------------------------------------------------------------------
def test_check_reports_each_host(tmp_path: Path, run_dir: Path) -> None:
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(
        '[[host]]\nname = "localhost"\nn_cpu = 2\n\n[[host]]\nname = "127.0.0.2"\npython = "/nonexistent/bin/python3"\n'
        '\n[[host]]\nname = "broken.invalid"\n'
    )
    proc = _isdgrid("check", str(hosts), run_dir=run_dir)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    ok = [line for line in proc.stdout.splitlines() if line.startswith("ok")]
    assert len(ok) == 1 and ok[0].startswith("ok    localhost: python 3.") and " ms" in ok[0]
    fail = [line for line in proc.stderr.splitlines() if line.startswith("FAIL")]
    assert fail[0] == (
        "FAIL  127.0.0.2: cannot run command: [Errno 2] No such file or directory: '/nonexistent/bin/python3'"
    )
    assert fail[1].startswith("FAIL  broken.invalid: cannot connect over ssh"), fail  # never run here
    assert proc.stderr.splitlines()[-1] == "isdgrid: error: 2 of 3 hosts failed: 127.0.0.2, broken.invalid"

    good = tmp_path / "good.toml"
    good.write_text('[[host]]\nname = "localhost"\n')
    proc = _isdgrid("check", str(good), run_dir=run_dir)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "all 1 hosts ok"


# -- bad input ---------------------------------------------------------------------------
def test_bad_input_gives_one_line_and_no_traceback(tmp_path: Path, run_dir: Path) -> None:
    missing = _one_error_line(_isdgrid("check", str(tmp_path / "nope.toml"), run_dir=run_dir))
    assert missing == f"isdgrid: error: {tmp_path / 'nope.toml'}: hosts file not found"

    bad = tmp_path / "bad.toml"
    bad.write_text('[[host]]\nname = "a"\nn_cpu = = 2\n')
    line = _one_error_line(_isdgrid("demo", "--hosts", str(bad), run_dir=run_dir))
    assert line.startswith(f"isdgrid: error: {bad}: invalid TOML") and "line 3" in line

    unreachable = tmp_path / "unreachable.toml"
    unreachable.write_text('[[host]]\nname = "127.0.0.3"\npython = "/nonexistent/bin/python3"\n')
    proc = _isdgrid("demo", "--hosts", str(unreachable), "--rounds", "2", run_dir=run_dir)
    line = [entry for entry in proc.stderr.splitlines() if entry.startswith("isdgrid: error")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert line == [
        "isdgrid: error: host '127.0.0.3': cannot run command: [Errno 2] No such file or directory: "
        "'/nonexistent/bin/python3'"
    ]

    far = tmp_path / "far.toml"
    far.write_text('[[host]]\nname = "far.invalid"\n')  # another machine's name: over ssh, never here
    proc = _isdgrid("demo", "--hosts", str(far), "--rounds", "2", run_dir=run_dir)
    line = [entry for entry in proc.stderr.splitlines() if entry.startswith("isdgrid: error")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(line) == 1 and line[0].startswith("isdgrid: error: host 'far.invalid': cannot connect over ssh"), line


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["demo", "--slots", "2", "--hosts", "h.toml"], 2, "isdgrid demo: error: give --slots or --hosts, not both"),
        (["demo", "--rounds", "0"], 2, "isdgrid demo: error: Invalid value for '--rounds'"),
        (["demo", "--scheme", "convective"], 2, "isdgrid demo: error: Invalid value for '--scheme'"),
        (["status", "--bogus"], 2, "isdgrid status: error: No such option '--bogus'"),
        (["check"], 2, "isdgrid check: error: Missing argument 'HOSTS_FILE'"),
        (
            ["check", "hosts.toml", "--launcher", "carrier-pigeon"],
            2,
            "isdgrid check: error: Invalid value for '--launcher': 'carrier-pigeon' is not one of",
        ),
        (["frobnicate"], 2, "isdgrid: error: No such command 'frobnicate'"),
    ],
)
def test_argument_errors_in_process(
    args: list[str],
    code: int,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hosts.toml").write_text('[[host]]\nname = "localhost"\n')
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(message), err


def test_grid_status_file_option(tmp_path: Path, run_dir: Path) -> None:
    from isdgrid import Grid, Host

    path = tmp_path / "mine.json"
    with Grid([Host("localhost")], status_file=str(path)):
        doc = json.loads(path.read_text())
        assert doc["format"] == "isdgrid-status/1" and doc["pid"] == os.getpid()
        assert doc["servers"] == [] and len(doc["slots"]) == 1
        assert not run_dir.exists()  # an explicit path: nothing in the run folder
    assert not path.exists()
    with Grid([Host("localhost")], status_file=False):
        assert not run_dir.exists() and not path.exists()


def test_a_status_writer_whose_writes_cost_much_writes_less_often_and_says_so(
    tmp_path: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from isdgrid import Grid, Host
    from isdgrid.statusfile import StatusFileWriter

    # A share so small that any write costs too much of it: the writer must space its
    # writes out (as a 1,000-slot grid's do) and write that spacing into the file.
    monkeypatch.setattr(StatusFileWriter, "MAX_SHARE", 1e-6)
    path = tmp_path / "mine.json"
    with Grid([Host("localhost")], status_file=str(path)):
        first = json.loads(path.read_text())
        assert first["interval"] == 1.0  # the first write: the grid's own interval

        def rewritten() -> dict[str, object] | None:
            doc = json.loads(path.read_text())
            return doc if doc["updated"] != first["updated"] else None

        deadline = time.monotonic() + 30
        while (second := rewritten()) is None:
            assert time.monotonic() < deadline, "the status file was not rewritten within 30 s"
            time.sleep(0.1)
        assert float(second["interval"]) > 60.0, second["interval"]  # type: ignore[arg-type]
        time.sleep(2.0)
        assert json.loads(path.read_text())["updated"] == second["updated"]  # not rewritten since
    assert not path.exists()
