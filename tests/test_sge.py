"""The SGE launcher: $PE_HOSTFILE parsing of recorded samples and the qrsh command lines.

No Grid Engine is available here. The last test runs a whole grid through the launcher
with a stand-in ``qrsh`` that runs the remote command in a local shell, stdin passed on,
as ``qrsh -inherit`` does on the node: it checks the quoting, the inline PYTHONPATH and
the secret over stdin, not SGE itself.
"""

from __future__ import annotations

import os
import shlex
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from conftest import child_pids
from remote_objects import Recorder

from isdgrid import ConfigError, Grid, Host
from isdgrid.launchers.sge import SgeLauncher, parse_pe_hostfile, pe_hosts, qrsh_command

DATA = Path(__file__).parent / "data"
REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOB_ID", "PE_HOSTFILE")}
    env.update(extra)
    return env


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        ("pe_hostfile_one_slot", [("vm", 1)]),
        ("pe_hostfile_two_hosts", [("node-1-3.cluster.local", 4), ("node-1-7.cluster.local", 2)]),
        # a host given slots in two queues is one host with the slots added up
        ("pe_hostfile_two_queues", [("compute-0-1", 3), ("compute-0-2", 3)]),
    ],
)
def test_recorded_pe_hostfiles(sample: str, expected: list[tuple[str, int]]) -> None:
    path = DATA / sample
    assert parse_pe_hostfile(path.read_text()) == expected
    assert [(h.name, h.n_cpu) for h in pe_hosts(str(path))] == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no hosts"),
        ("node1\n", "line 1: expected"),
        ("node1 2 all.q@node1 UNDEFINED\nnode2 two all.q@node2 UNDEFINED\n", "line 2: slots"),
        ("node1 0 all.q@node1 UNDEFINED\n", "line 1: slots"),
    ],
)
def test_bad_pe_hostfile_names_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_pe_hostfile(text)


def test_missing_pe_hostfile_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read PE_HOSTFILE"):
        pe_hosts(str(tmp_path / "nope"))
    launcher = SgeLauncher(environ=_env(JOB_ID="5"))
    with pytest.raises(ConfigError, match="PE_HOSTFILE is not set"):
        launcher.default_hosts()


def test_outside_a_job_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="JOB_ID is not set"):
        SgeLauncher(environ=_env())


def test_qrsh_command_keeps_stdin_and_quotes_the_remote_part() -> None:
    cmd = qrsh_command("node1", ["env", "PYTHONPATH=/a b", "python3", "-c", "print('x')"])
    assert cmd[:4] == ["qrsh", "-inherit", "-V", "node1"]
    assert "-nostdin" not in cmd  # the secret and the end of file travel over stdin
    assert len(cmd) == 5 and shlex.split(cmd[4]) == ["env", "PYTHONPATH=/a b", "python3", "-c", "print('x')"]
    plain = qrsh_command("n2", ["true"], qrsh="/sge/bin/qrsh", export_env=False, extra=["-verbose"])
    assert plain == ["/sge/bin/qrsh", "-inherit", "-verbose", "n2", "true"]


def test_launcher_command_lines_for_the_hosts_of_the_job() -> None:
    env = _env(JOB_ID="4711", PE_HOSTFILE=str(DATA / "pe_hostfile_two_hosts"), TMPDIR="/scratch")
    launcher = SgeLauncher(environ=env)
    hosts = launcher.default_hosts()
    specs = launcher.slot_specs(hosts)
    assert [s.label for s in specs] == [f"node-1-3.cluster.local/{i}" for i in range(4)] + [
        "node-1-7.cluster.local/0", "node-1-7.cluster.local/1"]
    assert [s.remove_temp for s in specs] == [True, False, False, False, True, False]
    assert all(s.temp_path.startswith("/scratch/isdgrid-4711-") for s in specs)
    cmd = launcher.command(specs[5])
    assert cmd[1:4] == ["-inherit", "-V", "node-1-7.cluster.local"]
    remote = shlex.split(cmd[4])
    assert remote[0] == "env" and remote[1].startswith(f"PYTHONPATH={REPO_ROOT}")
    assert remote[2:6] == [sys.executable, "-u", "-m", "isdgrid.daemon"]
    assert remote[remote.index("--host") + 1] == "node-1-7.cluster.local"
    assert remote[remote.index("--label") + 1] == "node-1-7.cluster.local/1"
    assert "--secret-stdin" in remote and "--watch-stdin" in remote
    niced = launcher.command(launcher.slot_specs([Host("n9", niceness=5, init_cmd="module load python")])[0])
    remote = shlex.split(niced[4])
    assert remote[2:4] == ["sh", "-c"] and remote[4].startswith("module load python && exec nice -n 5 ")


def test_a_grid_through_a_qrsh_stand_in(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qrsh = bin_dir / "qrsh"
    qrsh.write_text(textwrap.dedent("""\
        #!/bin/sh
        # Stand-in for `qrsh -inherit [-V] HOST COMMAND`: runs COMMAND here, stdin passed on.
        [ "$1" = "-inherit" ] || { echo "qrsh stand-in: expected -inherit" >&2; exit 2; }
        shift
        [ "$1" = "-V" ] && shift
        shift
        exec sh -c "$*"
        """))
    qrsh.chmod(0o755)
    hostfile = tmp_path / "pe_hostfile"
    hostfile.write_text("127.0.0.1 2 all.q@127.0.0.1 UNDEFINED\n")
    env = _env(JOB_ID="99", PE_HOSTFILE=str(hostfile), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)  # the daemons find isdgrid through the inline PYTHONPATH only
    before = child_pids()
    grid = Grid(None, "sge", secret="sge-stand-in-secret", launcher_options={"environ": env, "bind": "127.0.0.1"})
    try:
        assert [(h.name, h.n_cpu) for h in grid.hosts] == [("127.0.0.1", 2)]
        for pid in child_pids() - before:
            assert "sge-stand-in-secret" not in " ".join(psutil.Process(pid).cmdline())
        sid = grid.publish(Recorder())
        assert grid.gather(grid.scatter(sid, "ident", [1, 2]), timeout=30) == [1, 2]
        infos = [slot.control("info") for slot in grid.slots]
        assert len({i["pid"] for i in infos}) == 2
        temp_path = infos[0]["temp_path"]
        assert "isdgrid-99-" in temp_path and os.path.isdir(temp_path)
    finally:
        grid.terminate()
    assert child_pids() - before == set()
    assert not os.path.exists(temp_path)  # slot 0 removed the folder the grid chose
