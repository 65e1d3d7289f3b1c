"""Where code runs: host names decide the machine, folders others can write are never imported from.

- a name that is not this machine's is reached over ssh, never started here (launcher "auto");
- each host's daemons work in a private folder (0700) the grid makes under ``temp_path``;
- a daemon imports from its folder, the driver's folder, the standard library, then site-packages.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from conftest import IN_CI, child_pids
from remote_objects import Recorder

from isdgrid import Grid, Host, LaunchError
from isdgrid.cli import cli as cli_main
from isdgrid.importpath import is_stdlib
from isdgrid.launchers.auto import is_this_machine


def _need_ssh_client() -> None:
    if shutil.which("ssh") is None:
        if IN_CI:
            pytest.fail("CI=true but the OpenSSH client is not installed")
        pytest.skip("no ssh client")


def test_this_machines_names_are_local() -> None:
    for name in ("localhost", "LOCALHOST", "127.0.0.1", "127.3.2.1", "::1", socket.gethostname(), socket.getfqdn()):
        assert is_this_machine(name), name
    for name in ("node7.example.invalid", "10.0.0.7", "192.168.1.2", "remote-node"):
        assert not is_this_machine(name), name


def test_a_remote_name_is_never_started_on_this_machine() -> None:
    _need_ssh_client()
    before = child_pids()
    with pytest.raises(LaunchError) as info:
        Grid([Host("node7.example.invalid", n_cpu=2)], start_timeout=30, status_file=False)
    assert info.value.host == "node7.example.invalid"
    assert "ssh" in " ".join(info.value.command or []), info.value.details()
    leftover = child_pids() - before
    assert not leftover, f"processes left running: {leftover}"


def test_check_reports_an_unknown_host_as_failed(tmp_path: Path) -> None:
    _need_ssh_client()
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[[host]]\nname = "localhost"\n\n[[host]]\nname = "nosuchhost.invalid"\n')
    result = CliRunner().invoke(cli_main, ["check", str(hosts), "--timeout", "30"])
    assert result.exit_code != 0, result.output
    failed = [line for line in result.output.splitlines() if "nosuchhost.invalid" in line]
    assert failed and not any(line.lstrip().startswith("ok") for line in failed), result.output


def test_local_slots_report_this_machine(tmp_path: Path) -> None:
    with Grid([Host("localhost", n_cpu=2)], status_file=False) as grid:
        sid = grid.publish(Recorder())
        pids = grid.gather(grid.broadcast(sid, "pid"), timeout=30)
        grid.release_all()
        mine = {p.pid for p in psutil.Process().children(recursive=True)}
        assert set(pids) <= mine
        assert {row.host for row in grid.status()} == {"localhost"}


EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('evil')\nmean = None\n"


def test_a_temp_path_others_can_write_is_never_imported_from(tmp_path: Path) -> None:
    shared = tmp_path / "work"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp: anyone may put files there
    (shared / "statistics.py").write_text(EVIL)

    def where_from() -> str:
        import statistics

        return str(statistics.__file__)

    with Grid([Host("localhost", n_cpu=2, temp_path=str(shared))], status_file=False) as grid:
        sid = grid.publish(Recorder())
        files = grid.gather(grid.broadcast(sid, "apply", where_from), timeout=30)
        grid.release_all()
        folders = {slot.control("info")["temp_path"] for slot in grid.slots}
    assert all(is_stdlib(os.path.dirname(f)) for f in files), files
    assert not (shared / "RAN").exists()
    [folder] = folders
    assert Path(folder).parent == shared
    assert not os.path.exists(folder), "the grid's folder outlived terminate()"
    assert (shared / "statistics.py").exists(), "the user's own files stay"


def test_grid_folder_is_private(tmp_path: Path) -> None:
    with Grid([Host("localhost", n_cpu=1, temp_path=str(tmp_path / "scratch"))], status_file=False) as grid:
        folder = grid.slots[0].control("info")["temp_path"]
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert Path(folder).parent == tmp_path / "scratch"


def test_a_daemon_refuses_a_folder_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "open"
    shared.mkdir()
    shared.chmod(0o777)
    proc = subprocess.Popen(
        [sys.executable, "-m", "isdgrid.daemon", "--secret-stdin", "--temp-path", str(shared)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    try:
        out, _ = proc.communicate(b"s" * 64 + b"\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 1
    assert b"other users can write it" in out, out


def test_import_order_slot_folder_driver_folder_stdlib_site_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = tmp_path / "driver"
    driver.mkdir()
    (driver / "shadowed.py").write_text("WHO = 'driver folder'\n")
    copies = tmp_path / "copies"
    copies.mkdir()
    (copies / "shadowed.py").write_text("WHO = 'copied'\n")
    monkeypatch.chdir(driver)  # under pytest the driver's folder is the current one

    def who() -> str:
        import shadowed

        return str(shadowed.WHO)

    with Grid([Host("localhost", n_cpu=1)], status_file=False) as grid:
        info = grid.slots[0].control("info")
        path = info["sys_path"]
        assert path[0] == info["temp_path"]
        assert path[1] == str(driver)
        stdlib = [i for i, p in enumerate(path) if is_stdlib(p)]
        site = [i for i, p in enumerate(path) if "site-packages" in p or "dist-packages" in p]
        assert stdlib and site and max(stdlib) < min(site), path
        grid.copy_files(str(copies), ["shadowed.py"])
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid, timeout=30)
        assert proxy.apply(who).get(timeout=30) == "copied"
        grid.release_service(proxy)


def test_entering_the_same_folder_again_keeps_sys_path_and_still_checks_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot worker enters its host daemon's folder again: sys.path is left as it was arranged,
    unless it changed since; a folder that is no longer private is refused all the same."""
    from isdgrid import daemon
    from isdgrid.errors import GridError

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "slot"
    entered = daemon.enter_folder(str(folder))
    arranged = list(sys.path)
    assert arranged[0] == entered == str(folder) and os.getcwd() == entered
    assert daemon.enter_folder(str(folder)) == entered and sys.path == arranged
    sys.path.append(str(tmp_path / "added-since"))  # changed since: arranged anew (the extra entry kept, last)
    daemon.enter_folder(str(folder))
    assert sys.path[0] == entered and sys.path[-1] == str(tmp_path / "added-since")
    folder.chmod(0o777)
    try:
        with pytest.raises(GridError, match="not private"):
            daemon.enter_folder(str(folder))
    finally:
        folder.chmod(0o700)
