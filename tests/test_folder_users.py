"""A host's temp folder is removed by slot 0 only when no other daemon uses it.

Real daemon processes sharing one folder, as the slots of a host do; the second one
stands for a slot that replaced a lost one while the old slot 0 still ran (a network
partition that healed): the old slot 0, told its driver is gone, must leave the folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import wait_until

from isdgrid.announce import parse_announcement
from isdgrid.daemon import LAST_USER_WAIT
from isdgrid.folderusers import LOCK_NAME

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _daemon(folder: Path, *, remove: bool) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "isdgrid.daemon", "--secret-stdin", "--watch-stdin", "--temp-path", str(folder)]
    if remove:
        cmd.append("--remove-temp")
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("a-secret-of-the-test\n")
    proc.stdin.flush()
    for _ in range(50):
        if parse_announcement(proc.stdout.readline()) is not None:
            return proc
    raise AssertionError("the daemon never announced its URI")


def _end(*procs: subprocess.Popen[str]) -> None:
    """Close the daemons' stdin (their driver is gone), then reap them; killed if they do not end."""
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(timeout=LAST_USER_WAIT + 20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()


def test_slot0_leaves_a_folder_another_daemon_still_uses(tmp_path: Path) -> None:
    folder = tmp_path / "host-folder"
    old_slot0 = _daemon(folder, remove=True)
    newcomer = _daemon(folder, remove=False)
    try:
        (folder / "copied.py").write_text("VALUE = 1\n")
        _end(old_slot0)
        assert folder.is_dir() and (folder / "copied.py").exists()  # still in use: left in place
    finally:
        _end(newcomer)
    assert folder.is_dir()  # nobody that may remove it saw it unused


def test_slot0_removes_the_folder_when_every_daemon_of_the_host_ends(tmp_path: Path) -> None:
    folder = tmp_path / "host-folder"
    slot0 = _daemon(folder, remove=True)
    others = [_daemon(folder, remove=False) for _ in range(2)]
    assert (folder / LOCK_NAME).exists()
    _end(slot0, *others)  # the driver is gone for all of them at once
    assert wait_until(lambda: not folder.exists(), 10), "slot 0 never removed the unused folder"
