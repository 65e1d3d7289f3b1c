"""The SLURM launcher: its pure builders, and a real job on the single-node test cluster.

The cluster is set up by .ci/setup-slurm.sh (slurmctld and slurmd on this machine, one
node declaring 4 CPUs, whatever the machine has). Drivers run under ``sbatch`` (the batch
script) and under ``salloc`` (the driver outside the allocation, as on a login node).
Every job a test starts is cancelled at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
from conftest import alive, require, wait_until

from isdgrid import ConfigError, Grid, Host
from isdgrid.hostd import _gpu_shares
from isdgrid.launchers.base import SlotSpec
from isdgrid.launchers.slurm import (
    SlurmLauncher,
    allocation_hosts,
    parse_steps,
    parse_tasks_per_node,
    scancel_command,
    squeue_steps_command,
    srun_command,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The daemons cannot import this module: its classes travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- pure parts ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", [1]),
        ("4", [4]),
        ("2(x3)", [2, 2, 2]),
        ("2(x3),1", [2, 2, 2, 1]),
        ("16,8(x2),4", [16, 8, 8, 4]),
        (" 3(x1) ", [3]),
    ],
)
def test_tasks_per_node_are_expanded(text: str, expected: list[int]) -> None:
    assert parse_tasks_per_node(text) == expected


@pytest.mark.parametrize("text", ["", "x", "2(3)", "2(x)", "2,(x2)", "-1", "2(x3)1"])
def test_unreadable_tasks_per_node_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="tasks per node"):
        parse_tasks_per_node(text)


def test_srun_command_is_one_exact_single_task_step_on_the_node() -> None:
    cmd = srun_command("node07", ["python3", "-m", "isdgrid.hostd"], step_name="isdgrid-abc", cpus_per_task=4)
    assert cmd[0] == "srun"
    assert cmd[-3:] == ["python3", "-m", "isdgrid.hostd"]
    options = cmd[1:-3]
    for option in (
        "--nodes=1", "--ntasks=1", "--cpus-per-task=4", "--exact", "--mem=0",
        "--nodelist=node07", "--input=all", "--job-name=isdgrid-abc",
    ):
        assert option in options
    assert "--overlap" not in options
    with_overlap = srun_command("n1", ["d"], step_name="s", overlap=True, srun="/opt/bin/srun", extra=["--gres=none"])
    assert with_overlap[0] == "/opt/bin/srun"
    assert "--overlap" in with_overlap and with_overlap[-2:] == ["--gres=none", "d"]


def test_gpus_per_slot_asks_srun_for_gpus_and_leaves_the_binding_to_slurm() -> None:
    cmd = srun_command("node07", ["d"], step_name="s", gpus_per_task=2)
    assert "--gres=gpu:2" in cmd[:-1] and cmd[-1] == "d"
    assert not any(a.startswith("--gres") for a in srun_command("n", ["d"], step_name="s"))
    launcher = SlurmLauncher(environ=_env(SLURM_JOB_ID="77"), gpus_per_slot=1)
    specs = [dataclasses.replace(s, rank=r) for r, s in enumerate(launcher.slot_specs([Host("node3", n_cpu=3)]))]
    cmd = launcher.command(specs)  # one step for the node's 3 slots: 1 GPU each
    assert "--gres=gpu:3" in cmd[:cmd.index(sys.executable)]
    daemon = cmd[cmd.index(sys.executable):]
    assert daemon[1:4] == ["-u", "-m", "isdgrid.hostd"]
    assert daemon[daemon.index("--gpus-per-slot") + 1] == "1"  # the host daemon splits the step's GPUs
    # slot k is spawned with "@k": the k-th share of the CUDA_VISIBLE_DEVICES SLURM sets in the step
    assert [launcher.gpu_argument(spec) for spec in specs] == ["@0", "@1", "@2"]
    two = SlurmLauncher(environ=_env(SLURM_JOB_ID="77"), gpus_per_slot=2)
    assert "--gres=gpu:6" in two.command(two.slot_specs([Host("node3", n_cpu=3)]))
    with pytest.raises(ConfigError, match="give one or the other"):
        launcher.slot_specs([Host("node3", n_cpu=2, gpus=[0, 1])])
    with pytest.raises(ConfigError, match="gpus_per_slot must be an integer >= 0"):
        SlurmLauncher(environ=_env(SLURM_JOB_ID="77"), gpus_per_slot=-1)
    # without gpus_per_slot, a host's gpus are the grid's to hand out, as on any launcher
    plain = SlurmLauncher(environ=_env(SLURM_JOB_ID="77"))
    specs = plain.slot_specs([Host("node3", n_cpu=2, gpus=[6])])
    cmd = plain.command(specs)
    assert not any(a.startswith("--gres") for a in cmd) and "--gpus-per-slot" not in cmd
    assert [plain.gpu_argument(spec) for spec in specs] == ["6", "6"]


def test_the_host_daemon_cuts_the_step_s_gpus_into_shares() -> None:
    assert _gpu_shares("4,5,6,7,8,9", 2) == ["4,5", "6,7", "8,9"]
    assert _gpu_shares("GPU-a,GPU-b,GPU-c", 1) == ["GPU-a", "GPU-b", "GPU-c"]
    assert _gpu_shares("0,1,2", 2) == ["0,1"]  # never a short share
    assert _gpu_shares("0,1", 0) == [] and _gpu_shares(None, 1) == [] and _gpu_shares("", 1) == []


class GpuProbe:
    """Reports the slot's place and GPUs, and its worker's pid."""

    def where(self) -> dict[str, Any]:
        names = ("ISDGRID_SLOT", "ISDGRID_RANK", "CUDA_VISIBLE_DEVICES")
        return {"pid": os.getpid(), **{name: os.environ.get(name) for name in names}}


class StepHere(SlurmLauncher):
    """The SLURM launcher's host daemon and spawn commands, run here as SLURM runs the node's
    step (this test cluster has no GPUs): with ``CUDA_VISIBLE_DEVICES`` set to the step's GPUs."""

    local_pids = True
    step_gpus = "4,5,6,7,8,9"

    def command(self, specs: Any) -> list[str]:
        cmd = super().command(specs)
        assert f"--gres=gpu:{self.gpus_per_slot * len(specs)}" in cmd
        return self.daemon_command(specs)  # what srun would run in the step

    def environment(self, spec: SlotSpec) -> dict[str, str]:
        return {**super().environment(spec), "CUDA_VISIBLE_DEVICES": self.step_gpus}

    def close(self) -> None:  # no srun step to cancel
        pass


def test_each_slot_of_a_step_sees_its_own_gpu_share_also_when_respawned() -> None:
    launcher = StepHere(environ=_env(SLURM_JOB_ID="gpus"), bind="127.0.0.1", gpus_per_slot=2)
    with Grid([Host("localhost", n_cpu=3)], launcher, respawn=True, heartbeat_interval=0.2, host_timeout=10.0) as grid:
        folder = grid.slots[0].handle.spec.temp_path
        sid = grid.publish(GpuProbe())
        before = {int(r["ISDGRID_SLOT"]): r for r in grid.gather(grid.broadcast(sid, "where"), timeout=60)}
        shares = {0: "4,5", 1: "6,7", 2: "8,9"}
        assert {slot: r["CUDA_VISIBLE_DEVICES"] for slot, r in before.items()} == shares
        assert [r.gpu for r in sorted(grid.status(), key=lambda r: r.slot)] == [None] * 3  # SLURM's, not the grid's
        victim = grid.slots[1]
        assert victim.handle.process.pid == before[1]["pid"]
        host_daemon = victim.handle.host_daemon
        os.kill(before[1]["pid"], signal.SIGKILL)
        assert wait_until(lambda: grid.respawn_count == 1, 60), "the killed slot was not respawned"
        grid.wait_for_respawn(sid, timeout=60)
        after = {int(r["ISDGRID_SLOT"]): r for r in grid.gather(grid.broadcast(sid, "where"), timeout=60)}
        assert after[1]["pid"] != before[1]["pid"]
        assert grid.slots[1].handle.host_daemon is host_daemon  # a fork of the same host daemon, not a new step
        assert {slot: r["CUDA_VISIBLE_DEVICES"] for slot, r in after.items()} == shares
        assert [after[slot]["ISDGRID_RANK"] for slot in range(3)] == ["0", "1", "2"]
    assert not os.path.exists(folder)


def test_step_listing_and_cancel_commands() -> None:
    assert squeue_steps_command("42") == ["squeue", "--noheader", "--steps", "--jobs=42", "--format=%i|%j"]
    listing = "42.0|isdgrid-ab12\n42.1|isdgrid-ab12\n42.2|other\n42.batch|batch\n42.3|isdgrid-ab12x\n"
    assert parse_steps(listing, "isdgrid-ab12") == ["42.0", "42.1"]
    assert parse_steps("", "isdgrid-ab12") == []
    assert scancel_command(["42.0", "42.1"]) == ["scancel", "--quiet", "42.0", "42.1"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(extra)
    return env


def test_outside_an_allocation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="SLURM_JOB_ID is not set"):
        SlurmLauncher(environ=_env())


def test_launcher_command_runs_one_host_daemon_step_per_node() -> None:
    launcher = SlurmLauncher(environ=_env(SLURM_JOB_ID="77", SLURM_CPUS_PER_TASK="2", SLURM_MEM_PER_CPU="100"))
    assert not launcher.overlap  # a batch script is not a step
    specs = launcher.slot_specs([Host("node3", n_cpu=3), Host("node4", n_cpu=1)])
    node3 = specs[:3]
    assert node3[0].remove_temp and "isdgrid-77-" in node3[0].temp_path and node3[0].temp_path.endswith("-node3")
    assert {s.temp_path for s in node3} == {node3[0].temp_path}
    cmd = launcher.command(node3)
    before = cmd[:cmd.index(sys.executable)]
    assert before[0].endswith("srun") and "--nodelist=node3" in before and "--ntasks=1" in before
    assert "--cpus-per-task=6" in before  # the node's 3 slots x the job's 2 CPUs per task, in one step
    daemon = cmd[cmd.index(sys.executable):]
    assert daemon[1:4] == ["-u", "-m", "isdgrid.hostd"]
    assert daemon[daemon.index("--bind") + 1] == "node3"  # default bind: the node's name
    assert daemon[daemon.index("--label") + 1] == "node3"
    assert "--secret-stdin" in daemon and "--remove-temp" in daemon
    assert "--cpus-per-task=2" in launcher.command(specs[3:])
    env = launcher.environment(node3[0])
    assert "SLURM_MEM_PER_CPU" not in env
    assert env["PYTHONPATH"].split(os.pathsep)[0] == REPO_ROOT
    in_step = SlurmLauncher(environ=_env(SLURM_JOB_ID="77", SLURM_STEP_ID="3"), bind="127.0.0.1")
    cmd = in_step.command([SlotSpec(Host("node3"), 0, "/tmp/x")])
    assert "--overlap" in cmd and cmd[cmd.index("--bind") + 1] == "127.0.0.1"


def test_allocation_hosts_from_the_node_list() -> None:
    require(shutil.which("scontrol") is not None, "scontrol (slurm-client) is not installed")
    env = {"SLURM_JOB_NODELIST": "node[01-03],gpu7", "SLURM_TASKS_PER_NODE": "2(x3),1"}
    hosts = allocation_hosts(env)
    assert [(h.name, h.n_cpu) for h in hosts] == [("node01", 2), ("node02", 2), ("node03", 2), ("gpu7", 1)]
    with pytest.raises(ConfigError, match="4 nodes"):
        allocation_hosts({**env, "SLURM_TASKS_PER_NODE": "2(x2)"})


# -- a real job ------------------------------------------------------------------------
def _cluster_up() -> bool:
    """A node takes jobs (waiting, bounded, while the job of an earlier test is completing)."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False

    def usable() -> bool:
        try:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
        return any(state.startswith(("idle", "mixed")) for state in out.split())

    return wait_until(usable, 30, step=0.5)


def _job_steps(job_id: str) -> list[str]:
    out = subprocess.run(squeue_steps_command(job_id), capture_output=True, text=True, timeout=20).stdout
    return [line for line in out.splitlines() if line.strip()]


_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
          "DEADLINE")


def _job_state(job_id: str) -> tuple[str, int]:
    """The job's state and exit code from ``scontrol show job`` (kept MinJobAge s after its end)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=20).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    code, _, signal = fields.get("ExitCode", "0:0").partition(":")
    signal_code = int(signal) if signal.isdigit() else 0
    return fields.get("JobState", ""), int(code or 0) or (128 + signal_code if signal_code else 0)


def _submit(script: str | Path, output: Path, ntasks: int = 1, **env: str) -> str:
    """``sbatch`` the script; the job id."""
    cmd = ["sbatch", "--parsable", f"--ntasks={ntasks}", f"--output={output}", str(script)]
    environ = dict(os.environ, PYTHONPATH=REPO_ROOT, **env)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=environ, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"sbatch failed: {proc.stdout}{proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def _wait_job(job_id: str, output: Path, timeout: float = 120) -> tuple[int, str]:
    """Wait (polling, bounded) until the job ends; (exit code, output).

    Polled rather than ``sbatch --wait``, which looks at the job less and less often.
    """
    ended: list[int] = []

    def done() -> bool:
        state, code = _job_state(job_id)
        if state in _ENDED:
            ended.append(code)
        return bool(ended)

    finished = wait_until(done, timeout, step=0.2)
    text = output.read_text() if output.exists() else ""
    if not finished:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=20)
        pytest.fail(f"job {job_id} still running after {timeout} s:\n{text}")
    return ended[0], text


def _sbatch(
    script: str | Path, output: Path, ntasks: int = 1, timeout: float = 120, **env: str
) -> tuple[str, int, str]:
    """Submit, wait (bounded) until the job ends; (job id, exit code, output)."""
    job_id = _submit(script, output, ntasks, **env)
    code, text = _wait_job(job_id, output, timeout)
    return job_id, code, text


def _grid_steps(job_id: str) -> list[str]:
    """The ids of the job's steps a grid started (named ``isdgrid-TAG``), as squeue lists them."""
    return [line.split("|")[0] for line in _job_steps(job_id) if line.partition("|")[2].startswith("isdgrid-")]


def _ready(path: Path, timeout: float = 90) -> dict[str, Any]:
    """The JSON of the ``READY {...}`` line the driver writes to ``path`` (waits, bounded)."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        text = path.read_text() if path.exists() else ""
        found.extend(json.loads(line[6:]) for line in text.splitlines() if line.startswith("READY "))
        return bool(found)

    assert wait_until(seen, timeout, step=0.1), path.read_text() if path.exists() else f"no {path}"
    return found[0]


# A published object that reports where it runs and starts a child in its slot's process group.
PROBE = """\
import json, os, subprocess, sys, time
from isdgrid import Grid


class Probe:
    def __init__(self):
        self.child = None

    def __getstate__(self):
        return {"child": None}

    def where(self):
        self.child = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        return {"pid": os.getpid(), "host_daemon": os.getppid(), "step": os.environ.get("SLURM_STEP_ID"),
                "child": self.child.pid}


def wait_for(path):
    deadline = time.monotonic() + 120
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)
"""


def test_replica_exchange_job_runs_on_srun_steps_and_leaves_none(tmp_path: Path) -> None:
    require(_cluster_up(), "no SLURM cluster with an idle node (run .ci/setup-slurm.sh as root)")
    # 4 tasks, more than this machine's cores: the node declares 4 CPUs (.ci/setup-slurm.sh)
    job_id, code, text = _sbatch("scripts/slurm_job.sh", tmp_path / "job.out", ntasks=4,
                                 PYTHON=sys.executable, ISDGRID_BIND="127.0.0.1", ROUNDS="4")
    try:
        assert code == 0, f"job failed ({code}):\n{text}"
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, text
        result = json.loads(lines[0][len("RESULT "):])
        node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, timeout=10).stdout.strip()
        assert result["hosts"] == [node]
        replicas = result["replicas"]
        assert len(replicas) == 4  # one worker per allocated task
        assert {r["slurm_job"] for r in replicas} == {job_id}
        steps = [r["slurm_step"] for r in replicas]
        assert None not in steps and len(set(steps)) == 1  # the node's one srun step forked them all
        assert len({r["pid"] for r in replicas}) == 4
        # each slot knows its place (spawned with it by the host daemon, through srun's stdin)
        assert [r["identity"] for r in replicas] == [[node, str(i), str(i)] for i in range(4)]
        rounds = result["rounds"]
        assert len(rounds) == 4
        ladder = sorted(rounds[0]["temperatures"])
        for item in rounds:
            assert sorted(item["temperatures"]) == ladder
            assert len(item["energies"]) == 4 and all(e >= 0.0 for e in item["energies"])
        assert "cancelling" not in text  # teardown ended every step without scancel
        assert wait_until(lambda: not _job_steps(job_id), 30, step=0.2)
        for replica in replicas:
            pid = replica["pid"]
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=20)


def test_the_slots_of_a_node_are_one_step_and_terminate_leaves_no_step_and_no_process(tmp_path: Path) -> None:
    require(_cluster_up(), "no SLURM cluster with an idle node (run .ci/setup-slurm.sh as root)")
    go, end = tmp_path / "go", tmp_path / "end"
    script = tmp_path / "job.py"
    script.write_text(f"#!{sys.executable}\n" + PROBE + textwrap.dedent(f"""\
        grid = Grid.from_slurm(bind="127.0.0.1")
        sid = grid.publish(Probe())
        print("READY", json.dumps(grid.gather(grid.broadcast(sid, "where"), timeout=60)), flush=True)
        wait_for({str(go)!r})
        grid.terminate()
        print("DONE", flush=True)
        wait_for({str(end)!r})
        """))
    output = tmp_path / "job.out"
    job_id = _submit(script, output, ntasks=3)
    try:
        where = _ready(output)
        assert len(where) == 3 and len({w["pid"] for w in where}) == 3  # a worker per task
        host_daemons = {w["host_daemon"] for w in where}
        assert len(host_daemons) == 1  # all forked by the node's one host daemon
        [step] = {w["step"] for w in where}
        assert _grid_steps(job_id) == [f"{job_id}.{step}"]  # one srun step for the node's 3 slots
        [host_pid] = host_daemons
        assert "slurmstepd" in [p.name() for p in psutil.Process(host_pid).parents()]
        pids = [host_pid, *(w["pid"] for w in where), *(w["child"] for w in where)]
        procs = [psutil.Process(pid) for pid in pids]
        assert len(alive(procs)) == 7
        go.touch()
        assert wait_until(lambda: "DONE" in output.read_text(), 60, step=0.1), output.read_text()
        # the job still runs: what ended, terminate() ended
        assert wait_until(lambda: not alive(procs), 10), [p.pid for p in alive(procs)]
        assert _grid_steps(job_id) == []
        end.touch()
        code, text = _wait_job(job_id, output)
        assert code == 0, text
        assert "cancelling" not in text  # no scancel was needed
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=20)


def test_scancel_ends_a_leftover_step_of_the_grid(tmp_path: Path) -> None:
    require(_cluster_up(), "no SLURM cluster with an idle node (run .ci/setup-slurm.sh as root)")
    script = tmp_path / "job.sh"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import subprocess, time
        from isdgrid.launchers.slurm import SlurmLauncher, srun_command
        launcher = SlurmLauncher()
        [host] = launcher.default_hosts()
        step = subprocess.Popen(srun_command(host.name, ["sleep", "300"], step_name=launcher.step_name),
                                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not launcher.leftover_steps() and time.monotonic() < deadline:
            time.sleep(0.2)
        print("RUNNING", launcher.leftover_steps(), flush=True)
        launcher.cancel_leftover_steps()
        step.wait(timeout=30)
        while launcher.leftover_steps() and time.monotonic() < deadline + 30:
            time.sleep(0.2)
        print("LEFT", launcher.leftover_steps(), "SRUN-EXIT", step.returncode, flush=True)
        """))
    job_id, code, text = _sbatch(script, tmp_path / "job.out")
    try:
        assert code == 0, text
        assert f"RUNNING ['{job_id}.0']" in text
        assert "LEFT []" in text
        assert "SRUN-EXIT 0" not in text  # the step was cancelled, not finished
    finally:
        if job_id:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=20)


def test_daemon_step_and_workers_end_when_the_driver_is_killed(tmp_path: Path) -> None:
    require(_cluster_up(), "no SLURM cluster with an idle node (run .ci/setup-slurm.sh as root)")
    driver = tmp_path / "driver.py"
    driver.write_text(PROBE + textwrap.dedent("""\
        grid = Grid.from_slurm(bind="127.0.0.1")
        sid = grid.publish(Probe())
        print("READY", json.dumps(grid.gather(grid.broadcast(sid, "where"), timeout=60)), flush=True)
        time.sleep(600)
        """))
    out = tmp_path / "driver.out"
    script = tmp_path / "job.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        {sys.executable} {driver} > {out} 2>&1 &
        DRIVER=$!
        for i in $(seq 600); do grep -q READY {out} && break; sleep 0.1; done
        echo "STEPS-BEFORE $(squeue -h -s -j $SLURM_JOB_ID -o %j | grep -c '^isdgrid-')"
        kill -9 $DRIVER
        for i in $(seq 300); do
            [ "$(squeue -h -s -j $SLURM_JOB_ID -o %j | grep -c '^isdgrid-')" = 0 ] && break
            sleep 0.1
        done
        echo "STEPS-AFTER $(squeue -h -s -j $SLURM_JOB_ID -o %j | grep -c '^isdgrid-')"
        sleep 600
        """))
    output = tmp_path / "job.out"
    job_id = _submit(script, output, ntasks=3)
    try:
        where = _ready(out)
        assert len(where) == 3
        pids = [where[0]["host_daemon"], *(w["pid"] for w in where), *(w["child"] for w in where)]
        procs = []
        for pid in pids:  # the job kills the driver as soon as it is READY: some may have ended already
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.append(psutil.Process(pid))
        assert wait_until(lambda: "STEPS-AFTER" in output.read_text(), 60, step=0.1), output.read_text()
        text = output.read_text()
        assert "STEPS-BEFORE 1" in text, text + out.read_text()  # one step for the node's 3 slots
        assert "STEPS-AFTER 0" in text  # the host daemon saw its stdin close and its step ended
        # the job still runs: the host daemon ended its workers and their children itself
        assert wait_until(lambda: not alive(procs), 10), [p.pid for p in alive(procs)]
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=20)


# -- salloc: the driver outside the allocation ---------------------------------------------
def _salloc(output: Path, *command: str, ntasks: int = 2) -> subprocess.Popen[bytes]:
    """``salloc --ntasks=N command...`` in the background, its stdout and stderr to ``output``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = REPO_ROOT
    with output.open("wb") as out:
        return subprocess.Popen(["salloc", f"--ntasks={ntasks}", sys.executable, *command], cwd=REPO_ROOT,
                                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _granted(text: str) -> str:
    for line in text.splitlines():
        if "Granted job allocation" in line:
            return line.split()[-1]
    return ""


def _end(proc: subprocess.Popen[bytes], output: Path, job_id: str) -> None:
    """Cancel the job if it is still there, end salloc (bounded), and check no step is left."""
    if job_id:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=20)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail(f"salloc did not end within 30 s of scancel:\n{output.read_text()}")


def _processes_named(marker: str) -> list[psutil.Process]:
    """Processes with ``marker`` on their command line (daemons name their job's folder)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if marker in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def test_from_slurm_under_salloc_runs_replica_exchange(tmp_path: Path) -> None:
    require(_cluster_up(), "no SLURM cluster with an idle node (run .ci/setup-slurm.sh as root)")
    output = tmp_path / "salloc.out"
    proc = _salloc(output, "scripts/scheduler_job_driver.py", "--launcher", "slurm", "--bind", "127.0.0.1",
                   "--rounds", "2")
    job_id = ""
    try:
        proc.wait(timeout=120)
        text = output.read_text()
        job_id = _granted(text)
        assert proc.returncode == 0 and job_id, text
        [line] = [line for line in text.splitlines() if line.startswith("RESULT ")]
        result = json.loads(line[len("RESULT "):])
        replicas = result["replicas"]
        assert len(replicas) == 2 and {r["slurm_job"] for r in replicas} == {job_id}
        assert len({r["slurm_step"] for r in replicas}) == 1 and None not in {r["slurm_step"] for r in replicas}
        assert len(result["rounds"]) == 2
        assert not _processes_named(f"{os.environ.get('TMPDIR', '/tmp')}/isdgrid-{job_id}-")
    finally:
        _end(proc, output, job_id)


def test_scancel_of_the_job_ends_the_calls_with_host_lost(tmp_path: Path) -> None:
    require(_cluster_up(), "no SLURM cluster with an idle node (run .ci/setup-slurm.sh as root)")
    output = tmp_path / "salloc.out"
    host_timeout = 10.0
    proc = _salloc(output, "tests/scheduler_hold_driver.py", "--launcher", "slurm", "--bind", "127.0.0.1",
                   "--host-timeout", str(host_timeout))
    job_id = ""
    try:
        assert wait_until(lambda: "READY " in output.read_text(), 60, step=0.1), output.read_text()
        text = output.read_text()
        job_id = _granted(text)
        [line] = [line for line in text.splitlines() if line.startswith("READY ")]
        ready = json.loads(line[len("READY "):])
        assert ready["job"] == job_id and len(ready["daemons"]) == 2
        assert len(ready["host_daemons"]) == 1 and len(ready["launchers"]) == 1  # one srun step for the node
        pids = [*ready["daemons"], *ready["children"], *ready["host_daemons"], *ready["launchers"]]
        procs = [psutil.Process(pid) for pid in pids]
        assert len(alive(procs)) == 6
        marker = f"{ready['tmpdir']}/isdgrid-{job_id}-"
        assert {p.pid for p in _processes_named(marker)} >= {*ready["daemons"], *ready["host_daemons"]}
        cancelled = time.time()
        subprocess.run(["scancel", job_id], capture_output=True, timeout=20, check=True)
        assert wait_until(lambda: "DONE " in output.read_text(), 30, step=0.1), output.read_text()
        text = output.read_text()
        lost = [json.loads(line[len("LOST "):]) for line in text.splitlines() if line.startswith("LOST ")]
        assert sorted(item["index"] for item in lost) == [0, 1], text  # every call ended with HostLostError
        for item in lost:
            assert item["time"] - cancelled < host_timeout, text
        proc.wait(timeout=30)  # the driver went on after the allocation was revoked, then ended
        assert wait_until(lambda: not alive(procs), 20), [p.pid for p in alive(procs)]
        assert not _processes_named(marker)
        assert _job_steps(job_id) == []
    finally:
        _end(proc, output, job_id)
