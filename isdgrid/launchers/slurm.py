"""The SLURM launcher: one host daemon per node, as an ``srun`` job step inside the driver's allocation.

The driver runs in a batch script (``sbatch``) or an interactive allocation (``salloc``).
Hosts and slots come from the allocation: the nodes of ``$SLURM_JOB_NODELIST`` (expanded
with ``scontrol show hostnames``) with ``$SLURM_TASKS_PER_NODE`` slots each. Each node
runs one job step, its host daemon (:mod:`isdgrid.hostd`), which forks the node's slot
workers (a respawn is a fork in the same step, not a new step)::

    srun --nodes=1 --ntasks=1 --cpus-per-task=C*N --exact --mem=0 --nodelist=NODE \
         --input=all --job-name=isdgrid-TAG [--gres=gpu:G*N] [--overlap] python -u -m isdgrid.hostd ...

for the node's N slots. ``--exact`` limits the step to the CPUs it asks for (C per slot),
so the grid never uses more than the allocation; ``--mem=0`` lets the step use the job's
memory; ``--overlap`` (added when the driver itself runs inside a step, which holds the
CPUs) lets the daemons share them. ``--gres=gpu:G*N`` (``gpus_per_slot`` G) asks for
the node's slots' GPUs, which SLURM binds to the step (it sets ``CUDA_VISIBLE_DEVICES``);
the host daemon (``--gpus-per-slot G``) gives slot k the k-th G of them (``spawn ... @k``).
``--gres`` rather than ``--gpus-per-task`` works with ``select/cons_res`` too. The
secret and then the grid's commands go over ``srun``'s stdin, which ``--input=all``
forwards to the task; when ``srun`` ends, the host daemon's stdin closes and it ends its
workers and exits. Teardown closes stdin, then signals ``srun``, and finally cancels
(``scancel``) any step of this grid that is still listed.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from ..errors import ConfigError, LaunchError
from ..hosts import Host
from .base import SlotSpec
from .batch import BatchLauncher

__all__ = [
    "SlurmLauncher",
    "allocation_hosts",
    "parse_steps",
    "parse_tasks_per_node",
    "scancel_command",
    "squeue_steps_command",
    "srun_command",
]

log = logging.getLogger(__name__)

_TASKS_RE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")
# Memory requests of the job, inherited through the environment, would clash with --mem=0.
_STEP_ENV_DROP = ("SLURM_MEM_PER_CPU", "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_GPU")


def parse_tasks_per_node(text: str) -> list[int]:
    """Expand SLURM's compressed tasks-per-node list: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for item in text.strip().split(","):
        match = _TASKS_RE.match(item.strip())
        if not match:
            raise ConfigError(f"cannot read SLURM tasks per node {text!r} (item {item!r})")
        count, repeat = int(match.group(1)), int(match.group(2) or 1)
        counts += [count] * repeat
    return counts


def srun_command(
    node: str,
    daemon: Sequence[str],
    *,
    step_name: str,
    cpus_per_task: int = 1,
    gpus_per_task: int = 0,
    overlap: bool = False,
    srun: str = "srun",
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``srun`` argument list that runs ``daemon`` as one single-task step on ``node``.

    ``gpus_per_task`` > 0 asks for that many GPUs for the step (``--gres=gpu:N``).
    """
    args = [
        srun,
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={cpus_per_task}",
        "--exact",
        "--mem=0",
        f"--nodelist={node}",
        "--input=all",
        f"--job-name={step_name}",
    ]
    if gpus_per_task:
        args.append(f"--gres=gpu:{gpus_per_task}")
    if overlap:
        args.append("--overlap")
    return [*args, *extra, *daemon]


def squeue_steps_command(job_id: str) -> list[str]:
    """The ``squeue`` argument list that lists the steps of ``job_id`` as ``ID|NAME``."""
    return ["squeue", "--noheader", "--steps", f"--jobs={job_id}", "--format=%i|%j"]


def parse_steps(output: str, step_name: str) -> list[str]:
    """Step ids (``JOB.STEP``) named ``step_name`` in :func:`squeue_steps_command` output."""
    ids = []
    for line in output.splitlines():
        step_id, sep, name = line.strip().partition("|")
        if sep and name.strip() == step_name:
            ids.append(step_id.strip())
    return ids


def scancel_command(step_ids: Sequence[str]) -> list[str]:
    """The ``scancel`` argument list that ends the given steps."""
    return ["scancel", "--quiet", *step_ids]


def allocation_hosts(environ: Mapping[str, str], scontrol: str = "scontrol") -> list[Host]:
    """One Host per node of the allocation, with its number of tasks as ``n_cpu``."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("SLURM_JOB_NODELIST is not set: is this a SLURM allocation?")
    cmd = [scontrol, "show", "hostnames", nodelist]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"cannot expand the node list: {exc}", command=cmd) from exc
    if proc.returncode != 0:
        raise LaunchError("cannot expand the node list", command=cmd, output=proc.stdout + proc.stderr)
    nodes = proc.stdout.split()
    tasks_text = environ.get("SLURM_TASKS_PER_NODE", "")
    if not tasks_text:
        log.info("SLURM_TASKS_PER_NODE is not set; one slot per node")
    tasks = parse_tasks_per_node(tasks_text) if tasks_text else [1] * len(nodes)
    if len(tasks) != len(nodes):
        raise ConfigError(f"SLURM lists {len(nodes)} nodes ({nodelist}) but tasks for {len(tasks)} ({tasks_text})")
    return [Host(node, n_cpu=count) for node, count in zip(nodes, tasks, strict=True) if count > 0]


class SlurmLauncher(BatchLauncher):
    """Starts one host daemon per node of the current allocation as a one-task ``srun`` step.

    ``cpus_per_task`` (CPUs per slot) defaults to the job's ``$SLURM_CPUS_PER_TASK`` (else
    1); ``overlap`` defaults to True only when the driver runs inside a job step;
    ``gpus_per_slot`` GPUs per slot are asked for the node's step, bound by SLURM and split
    among the slots by the host daemon (the hosts then may not list ``gpus``: SLURM, not
    the grid, picks the devices);
    ``srun_args`` are extra ``srun`` options. See :class:`BatchLauncher` for ``bind``
    and ``temp_root``.
    """

    name = "slurm"

    def __init__(
        self,
        *,
        log_dir: str | None = None,
        heartbeat_timeout: float = 0.0,
        stop_timeout: float = 5.0,
        bind: str | None = None,
        temp_root: str | None = None,
        cpus_per_task: int | None = None,
        overlap: bool | None = None,
        gpus_per_slot: int | None = None,
        srun_args: Sequence[str] = (),
        environ: Mapping[str, str] | None = None,
        forward_output: bool = True,
        preload: Sequence[str] = (),
    ) -> None:
        super().__init__(
            job_id="",
            preload=preload,
            log_dir=log_dir,
            heartbeat_timeout=heartbeat_timeout,
            stop_timeout=stop_timeout,
            bind=bind,
            temp_root=temp_root,
            environ=environ,
            forward_output=forward_output,
        )
        job_id = self.environ.get("SLURM_JOB_ID") or self.environ.get("SLURM_JOBID")
        if not job_id:
            raise ConfigError(
                "launcher='slurm' runs inside a SLURM allocation (sbatch or salloc): SLURM_JOB_ID is not set"
            )
        self.job_id = job_id
        if cpus_per_task is None:
            cpus_per_task = int(self.environ.get("SLURM_CPUS_PER_TASK") or 1)
        if cpus_per_task < 1:
            raise ConfigError(f"cpus_per_task must be >= 1, got {cpus_per_task}")
        self.cpus_per_task = cpus_per_task
        if gpus_per_slot is not None and (
            not isinstance(gpus_per_slot, int) or isinstance(gpus_per_slot, bool) or gpus_per_slot < 0
        ):
            raise ConfigError(f"gpus_per_slot must be an integer >= 0, got {gpus_per_slot!r}")
        self.gpus_per_slot = gpus_per_slot or 0
        self.overlap = "SLURM_STEP_ID" in self.environ if overlap is None else overlap
        self.srun_args = list(srun_args)
        self.step_name = f"isdgrid-{self.tag}"
        self.srun = shutil.which("srun", path=self.environ.get("PATH")) or "srun"

    def default_hosts(self) -> list[Host]:
        return allocation_hosts(self.environ)

    def slot_specs(self, hosts: Sequence[Host]) -> list[SlotSpec]:
        if self.gpus_per_slot:
            for host in hosts:
                if host.gpus:
                    raise ConfigError(
                        f"host {host.name!r} lists gpus, and gpus_per_slot asks SLURM for them: give one or the other"
                    )
        return super().slot_specs(hosts)

    def daemon_command(self, specs: Sequence[SlotSpec]) -> list[str]:
        return self.host_daemon_command(specs, gpus_per_slot=self.gpus_per_slot)

    def gpu_argument(self, spec: SlotSpec) -> str:
        # With gpus_per_slot, SLURM binds the step's GPUs; the host daemon gives each slot its share.
        return f"@{spec.slot}" if self.gpus_per_slot else super().gpu_argument(spec)

    def command(self, specs: Sequence[SlotSpec]) -> list[str]:
        spec = specs[0]
        return srun_command(
            spec.host.name,
            self.daemon_command(specs),
            step_name=self.step_name,
            cpus_per_task=self.cpus_per_task * len(specs),
            gpus_per_task=self.gpus_per_slot * len(specs),
            overlap=self.overlap,
            srun=self.srun,
            extra=self.srun_args,
        )

    def environment(self, spec: SlotSpec) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items() if k not in _STEP_ENV_DROP}
        env["PYTHONPATH"] = self.python_path(spec)
        return env

    def close(self) -> None:
        # Leftover steps are cancelled here, not in stop(): scancel names every step of the
        # grid, and stop() may end just some of them (a respawn, hosts below min_hosts).
        self.cancel_leftover_steps()

    def leftover_steps(self) -> list[str]:
        """Step ids of this grid's daemons that SLURM still lists."""
        cmd = squeue_steps_command(self.job_id)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False, env=self.environ)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("cannot list the job's steps (%s): %s", " ".join(cmd), exc)
            return []
        if proc.returncode != 0:
            log.warning("cannot list the job's steps (%s): %s", " ".join(cmd), proc.stderr.strip())
            return []
        return parse_steps(proc.stdout, self.step_name)

    def cancel_leftover_steps(self) -> None:
        """The last net of teardown: ``scancel`` the steps of this grid still running."""
        steps = self.leftover_steps()
        if not steps:
            return
        log.warning("cancelling %d leftover daemon steps: %s", len(steps), " ".join(steps))
        cmd = scancel_command(steps)
        try:
            subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False, env=self.environ)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("scancel of leftover steps failed: %s", exc)
