"""The SGE launcher: $PE_HOSTFILE parsing and qrsh command lines, then real Grid Engine jobs.

The jobs run on the single-node Grid Engine that .ci/setup-sge.sh sets up (queue all.q,
parallel environment smp with control_slaves TRUE). Each job's driver runs as the job
script (as root, the driver's interpreter by absolute path, this worktree's isdgrid through
PYTHONPATH and ``qsub -V``); its host daemon is a ``qrsh -inherit`` task of the job (one per
host), which forks the slot workers. Every job a test submits is deleted at the end, and the
test checks by PID and by process listing that none of its processes is left.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import alive, require, wait_until

from isdgrid import ConfigError, Host
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
    node_1_7 = specs[4:]
    cmd = launcher.command(node_1_7)  # one qrsh -inherit for the host, whatever its number of slots
    assert cmd[1:4] == ["-inherit", "-V", "node-1-7.cluster.local"] and len(cmd) == 5
    remote = shlex.split(cmd[4])
    assert remote[0] == "env" and remote[1].startswith(f"PYTHONPATH={REPO_ROOT}")
    assert remote[2:6] == [sys.executable, "-u", "-m", "isdgrid.hostd"]
    assert remote[remote.index("--bind") + 1] == "node-1-7.cluster.local"
    assert remote[remote.index("--label") + 1] == "node-1-7.cluster.local"
    assert remote[remote.index("--temp-path") + 1] == node_1_7[0].temp_path
    assert "--remove-temp" in remote  # the host's slot 0 is among them
    assert "--secret-stdin" in remote and "--gpus-per-slot" not in remote
    # the slots reach it as spawn commands on its stdin: slot, rank (the grid's), GPU
    assert launcher.gpu_argument(node_1_7[1]) == "-"
    env = launcher.environment(node_1_7[0])
    assert env["PYTHONPATH"].split(os.pathsep)[0] == REPO_ROOT
    assert env["SGE_TASK_ID"] == "undefined"  # qrsh -inherit refuses to run without it
    in_array_job = SgeLauncher(environ={**env, "SGE_TASK_ID": "7"})
    assert in_array_job.environment(specs[0])["SGE_TASK_ID"] == "7"
    niced = launcher.command(launcher.slot_specs([Host("n9", niceness=5, init_cmd="module load python")]))
    remote = shlex.split(niced[4])
    assert remote[2:4] == ["sh", "-c"] and remote[4].startswith("module load python && exec nice -n 5 ")


# -- real jobs ---------------------------------------------------------------------------
PE = "smp"


def _sge_up() -> bool:
    if not shutil.which("qsub") or not shutil.which("qstat"):
        return False
    try:
        pe = subprocess.run(["qconf", "-sp", PE], capture_output=True, text=True, timeout=20)
        queues = subprocess.run(["qstat", "-f"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    # a queue instance line without a state column (u, E, d...) takes jobs
    usable = any(len(line.split()) == 5 and "@" in line.split()[0] for line in queues.splitlines())
    tight = any(line.split() == ["control_slaves", "TRUE"] for line in pe.stdout.splitlines())
    return pe.returncode == 0 and tight and usable


def _need_sge() -> None:
    require(_sge_up(), f"no Grid Engine with a usable queue and PE {PE!r} (run .ci/setup-sge.sh as root)")


def _job_env(**extra: str) -> dict[str, str]:
    """The submitter's environment (``-V`` passes it to the job): this worktree's isdgrid."""
    env = {k: v for k, v in os.environ.items() if k not in ("JOB_ID", "PE_HOSTFILE")}
    env.update(PYTHONPATH=REPO_ROOT, PYTHON=sys.executable, **extra)
    return env


def _qsub(script: str, output: Path, *args: str, **env: str) -> str:
    """Submit ``script`` (a path in this repository) with ``qsub -pe smp 2``; the job id."""
    cmd = ["qsub", "-terse", "-cwd", "-V", "-j", "y", "-pe", PE, "2", "-o", str(output), script, *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_job_env(**env), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"qsub failed: {proc.stdout}{proc.stderr}"
    return proc.stdout.strip()


def _listed(job_id: str) -> bool:
    return subprocess.run(["qstat", "-j", job_id], capture_output=True, timeout=20).returncode == 0


def _state(job_id: str) -> str:
    """The job's state letters in ``qstat`` (``r``, ``dr``...); "" when it is not listed."""
    out = subprocess.run(["qstat"], capture_output=True, text=True, timeout=20).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields[:1] == [job_id] and len(fields) > 4:
            return fields[4]
    return ""


def _delete(job_id: str) -> None:
    """qdel the job (if it is still there) and wait until Grid Engine no longer lists it."""
    if _listed(job_id):
        subprocess.run(["qdel", job_id], capture_output=True, timeout=20)
    assert wait_until(lambda: not _listed(job_id), 30, step=0.2), f"job {job_id} still listed 30 s after qdel"


def _read(output: Path) -> str:
    return output.read_text(errors="replace") if output.exists() else ""


def _line(output: Path, tag: str, timeout: float = 60) -> dict[str, Any]:
    """The JSON of the first line ``TAG {...}`` of the job's output (waits, bounded)."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        for line in _read(output).splitlines():
            if line.startswith(tag + " "):
                found.append(json.loads(line[len(tag) + 1:]))
                return True
        return False

    assert wait_until(seen, timeout, step=0.1), f"no {tag} line within {timeout} s; job output:\n{_read(output)}"
    return found[0]


def _job_processes(ready: dict[str, Any]) -> list[psutil.Process]:
    """Processes of the job's grid: host daemons, their workers and qrsh name its folder on their command line."""
    marker = f"{ready['tmpdir']}/isdgrid-{ready['job']}-"
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _processes(ready: dict[str, Any]) -> list[psutil.Process]:
    """The driver, the slot workers, their children, the host daemons and their qrsh, as READY lists them."""
    pids = [ready["driver"], *ready["daemons"], *ready["children"], *ready["host_daemons"], *ready["launchers"]]
    return [psutil.Process(pid) for pid in pids]


def _no_process_left(ready: dict[str, Any], procs: list[psutil.Process], timeout: float = 20) -> None:
    gone = wait_until(lambda: not alive(procs) and not _job_processes(ready), timeout, step=0.2)
    left = [f"{p.pid} {' '.join(p.cmdline())}" for p in alive(procs) + _job_processes(ready)]
    assert gone, f"processes of job {ready['job']} left: {left}"


def test_replica_exchange_job_runs_on_qrsh_tasks(tmp_path: Path) -> None:
    _need_sge()
    output = tmp_path / "rex.out"
    env = _job_env(ISDGRID_BIND="127.0.0.1", ROUNDS="3")
    cmd = ["qsub", "-sync", "y", "-terse", "-pe", PE, "2", "-o", str(output), "scripts/sge_job.sh"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    job_id = stdout.split()[0] if stdout.split() else ""
    text = _read(output)
    try:
        assert proc.returncode == 0, f"job failed ({proc.returncode}): {stdout}{stderr}\n{text}"
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, text
        result = json.loads(lines[0][len("RESULT "):])
        assert result["hosts"] == [os.uname().nodename]  # from $PE_HOSTFILE
        replicas = result["replicas"]
        assert len(replicas) == 2  # one worker per slot of the job
        assert {r["sge_job"] for r in replicas} == {job_id}
        tasks = [r["sge_task"] for r in replicas]
        assert None not in tasks and len(set(tasks)) == 1  # the host's one qrsh -inherit task forked both
        assert len({r["pid"] for r in replicas}) == 2
        assert [r["identity"][1:] for r in replicas] == [["0", "0"], ["1", "1"]]  # through qrsh -inherit
        assert [r["identity"][0] for r in replicas] == result["hosts"] * 2
        rounds = result["rounds"]
        assert len(rounds) == 3
        for item in rounds:
            assert sorted(item["temperatures"]) == sorted(rounds[0]["temperatures"])
            assert len(item["energies"]) == 2 and all(e >= 0.0 for e in item["energies"])
        assert not alive([psutil.Process(r["pid"]) for r in replicas if psutil.pid_exists(r["pid"])])
    finally:
        if job_id:
            _delete(job_id)


def test_qdel_ends_the_driver_and_every_task(tmp_path: Path) -> None:
    _need_sge()
    secret = secrets.token_hex(16)
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    output = tmp_path / "job.out"
    job_id = _qsub("tests/sge_hold_job.sh", output, "--bind", "127.0.0.1", "--secret-file", str(secret_file))
    try:
        ready = _line(output, "READY")
        assert ready["job"] == job_id and ready["hosts"] == [[os.uname().nodename, 2]]
        procs = _processes(ready)
        # driver, 2 workers, their 2 children, 1 host daemon, 1 qrsh
        assert len(ready["host_daemons"]) == 1 and len(ready["launchers"]) == 1, _read(output)
        assert len(alive(procs)) == 7, _read(output)
        for proc in procs:  # the secret went over stdin, never on a command line
            assert secret not in " ".join(proc.cmdline())
        [qrsh_pid] = ready["launchers"]  # one qrsh -inherit for the host, started by the driver
        qrsh = psutil.Process(qrsh_pid).cmdline()  # /usr/bin/qrsh execs Grid Engine's own
        assert os.path.basename(qrsh[0]) == "qrsh" and qrsh[1] == "-inherit"
        assert psutil.Process(qrsh_pid).ppid() == ready["driver"]
        [host_pid] = ready["host_daemons"]  # the host daemon runs under Grid Engine's shepherd, not the driver
        parents = psutil.Process(host_pid).parents()
        assert "sge_shepherd" in [p.name() for p in parents] and ready["driver"] not in [p.pid for p in parents]
        for pid in ready["daemons"]:  # each worker: forked by the host daemon, in a process group of its own
            assert psutil.Process(pid).ppid() == host_pid and os.getpgid(pid) == pid
        for pid in ready["children"]:  # what a published object started: in its worker's group
            assert os.getpgid(pid) in ready["daemons"]
        assert {p.pid for p in _job_processes(ready)} >= {*ready["daemons"], host_pid, qrsh_pid}
        subprocess.run(["qdel", job_id], capture_output=True, timeout=20, check=True)
        assert wait_until(lambda: not _listed(job_id), 30, step=0.2), _read(output)
        _no_process_left(ready, procs)
        assert "DONE" not in _read(output)  # qdel killed the driver too
    finally:
        _delete(job_id)


def test_killed_driver_leaves_no_task_and_the_job_runs_on(tmp_path: Path) -> None:
    _need_sge()
    output = tmp_path / "job.out"
    job_id = _qsub("tests/sge_hold_job.sh", output, "--bind", "127.0.0.1", HOLD="120")
    try:
        ready = _line(output, "READY")
        procs = _processes(ready)
        os.kill(ready["driver"], 9)
        # stdin of each qrsh closes with the driver: the daemons exit, then their qrsh
        _no_process_left(ready, procs)
        _line(output, "DRIVER-EXIT", timeout=10)
        # No task failed, so Grid Engine leaves the job alone: its script runs on, and the job
        # is not marked for deletion (as it is at execd's next report when a task fails: every
        # 5 s on the test cluster) in the next 6 s.
        shell = psutil.Process(_line(output, "SHELL")["pid"])
        disturbed = wait_until(lambda: "d" in _state(job_id) or not alive([shell]), 6, step=0.2)
        assert not disturbed and _state(job_id) in ("r", "t"), f"{_state(job_id)}\n{_read(output)}"
    finally:
        _delete(job_id)


def test_worker_killed_mid_call_is_host_lost_and_the_job_runs_on(tmp_path: Path) -> None:
    _need_sge()
    output = tmp_path / "job.out"
    job_id = _qsub("tests/sge_hold_job.sh", output, "--bind", "127.0.0.1", "--kill-one", "--host-timeout", "10",
                   "--nap", "5", HOLD="120")
    try:
        ready = _line(output, "READY")
        procs = _processes(ready)
        lost = _line(output, "LOST", timeout=30)
        assert (lost["index"], lost["host"], lost["slot"]) == (0, ready["hosts"][0][0], 0)
        assert "lost" in lost["error"]
        assert lost["after_kill"] < 10  # host_timeout: the host daemon's report told the driver first
        # The host daemon reaped the worker (and ended its child): its task, the qrsh, is
        # unharmed, so the other slot finishes its call and Grid Engine leaves the job alone.
        child = procs[[p.pid for p in procs].index(ready["children"][0])]
        assert wait_until(lambda: not alive([child]), 10), "the killed worker's child survived it"
        assert _line(output, "ENDED", timeout=30) == {"index": 1, "error": None}
        _line(output, "DONE", timeout=30)
        _no_process_left(ready, procs)
        assert _line(output, "DRIVER-EXIT", timeout=10) == 0
        assert "d" not in _state(job_id) and _state(job_id) in ("r", "t"), f"{_state(job_id)}\n{_read(output)}"
    finally:
        _delete(job_id)


def test_host_daemon_killed_mid_call_is_host_lost_then_grid_engine_kills_the_job(tmp_path: Path) -> None:
    _need_sge()
    output = tmp_path / "job.out"
    job_id = _qsub("tests/sge_hold_job.sh", output, "--bind", "127.0.0.1", "--kill-host", "--host-timeout", "10",
                   HOLD="300")
    try:
        ready = _line(output, "READY")
        procs = _processes(ready)
        shell = psutil.Process(_line(output, "SHELL")["pid"])
        lost = _line(output, "LOST", timeout=30)
        assert lost["host"] == ready["hosts"][0][0] and "lost" in lost["error"]
        assert lost["after_kill"] < 10  # host_timeout: the qrsh's end told the driver first
        # The task died of a signal: Grid Engine marks the job for deletion and kills all of
        # it at execd's next report, long before the job script's HOLD ends. The workers (in
        # process groups of their own) end when their host daemon's pipe closes, and end
        # their groups (the children) with them.
        assert wait_until(lambda: not _listed(job_id), 60, step=0.2), _read(output)
        assert not alive([shell])
        _no_process_left(ready, procs)
    finally:
        _delete(job_id)
