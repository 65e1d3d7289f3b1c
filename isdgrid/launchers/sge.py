"""The SGE launcher: one host daemon per host, started with ``qrsh -inherit`` inside a parallel environment job.

The driver runs as the job script of a Grid Engine job submitted with a parallel
environment (``qsub -pe NAME N``) whose ``control_slaves`` is TRUE (tight integration).
Hosts and slots come from ``$PE_HOSTFILE``, one line per host and queue::

    node01.cluster 4 all.q@node01.cluster UNDEFINED

(host, slots, queue, processor range). Each host runs one task of the job, its host
daemon (:mod:`isdgrid.hostd`), which forks the host's slot workers::

    qrsh -inherit -V HOST 'env PYTHONPATH=... python -u -m isdgrid.hostd ...'

without ``-nostdin``, so ``qrsh`` forwards its stdin (the secret, the grid's commands,
then the end of file that ends the host daemon) to the remote command; ``-V`` passes the
job's environment on. ``qrsh -inherit`` joins its arguments and has a shell on the node
parse them again, like ssh, so the command is one string quoted with :func:`shlex.join`;
the interpreter is the driver's by absolute path (a task's ``PATH`` is the node's default
one).

Grid Engine watches every task: one that ends by a signal (the host daemon killed, or
the local ``qrsh`` killed) makes it kill the whole job, driver included, at the execution
daemon's next report. A slot worker killed is not a task: its host daemon reaps it, the
slot is lost and the job runs on. So host daemons are stopped by closing their stdin, and
``qrsh`` is signalled only when a host daemon has not exited ``stop_timeout`` seconds
later. ``qdel`` kills the tasks' process groups; the workers, in groups of their own, end
when their host daemon's pipe closes, and end their groups with them. Tested on a real
single-node Grid Engine (Son of Grid Engine 8.1.9, see docs/clusters.md and
tests/test_sge.py).
"""

from __future__ import annotations

import logging
import shlex
import shutil
from collections.abc import Mapping, Sequence

from ..errors import ConfigError
from ..hosts import Host
from .base import SlotSpec
from .batch import BatchLauncher

__all__ = ["SgeLauncher", "parse_pe_hostfile", "pe_hosts", "qrsh_command"]

log = logging.getLogger(__name__)


def parse_pe_hostfile(text: str, source: str = "$PE_HOSTFILE") -> list[tuple[str, int]]:
    """(host, slots) pairs of a PE host file, in order; a host listed for several queues
    is merged into one entry with the slots added up."""
    slots: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2:
            raise ConfigError(f"{source}: line {number}: expected 'host slots queue processors', got {line!r}")
        host, count = fields[0], fields[1]
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"{source}: line {number}: slots must be a positive integer, got {count!r}")
        slots[host] = slots.get(host, 0) + int(count)
    if not slots:
        raise ConfigError(f"{source}: no hosts listed")
    return list(slots.items())


def pe_hosts(path: str) -> list[Host]:
    """One Host per host of the PE host file at ``path``, its slots as ``n_cpu``."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read PE_HOSTFILE {path}: {exc.strerror}") from None
    return [Host(host, n_cpu=count) for host, count in parse_pe_hostfile(text, path)]


def qrsh_command(
    host: str,
    remote: Sequence[str],
    *,
    qrsh: str = "qrsh",
    export_env: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``qrsh -inherit`` argument list that runs ``remote`` on ``host`` with stdin forwarded."""
    args = [qrsh, "-inherit"]
    if export_env:
        args.append("-V")
    return [*args, *extra, host, shlex.join(remote)]


class SgeLauncher(BatchLauncher):
    """Starts one host daemon per host of the current SGE job with ``qrsh -inherit``.

    ``qrsh_args`` are extra ``qrsh`` options; ``export_env=False`` drops ``-V``. See
    :class:`~isdgrid.launchers.batch.BatchLauncher` for ``bind`` and ``temp_root``.
    """

    name = "sge"

    def __init__(
        self,
        *,
        log_dir: str | None = None,
        heartbeat_timeout: float = 0.0,
        stop_timeout: float = 5.0,
        bind: str | None = None,
        temp_root: str | None = None,
        export_env: bool = True,
        qrsh_args: Sequence[str] = (),
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
        job_id = self.environ.get("JOB_ID")
        if not job_id:
            raise ConfigError("launcher='sge' runs inside a Grid Engine job (qsub -pe ...): JOB_ID is not set")
        self.job_id = job_id
        self.export_env = export_env
        self.qrsh_args = list(qrsh_args)
        self.qrsh = shutil.which("qrsh", path=self.environ.get("PATH")) or "qrsh"

    def default_hosts(self) -> list[Host]:
        path = self.environ.get("PE_HOSTFILE")
        if not path:
            raise ConfigError("PE_HOSTFILE is not set: submit the job with a parallel environment (qsub -pe NAME N)")
        return pe_hosts(path)

    def remote_command(self, specs: Sequence[SlotSpec]) -> list[str]:
        """What runs on the node: the host daemon, with the driver's isdgrid on its PYTHONPATH."""
        return ["env", f"PYTHONPATH={self.python_path(specs[0])}", *self.daemon_command(specs)]

    def command(self, specs: Sequence[SlotSpec]) -> list[str]:
        return qrsh_command(
            specs[0].host.name, self.remote_command(specs), qrsh=self.qrsh, export_env=self.export_env,
            extra=self.qrsh_args,
        )

    def environment(self, spec: SlotSpec) -> dict[str, str]:
        env = dict(self.environ)
        env["PYTHONPATH"] = self.python_path(spec)
        # qrsh -inherit refuses to run without it; Grid Engine sets "undefined" outside array jobs
        env.setdefault("SGE_TASK_ID", "undefined")
        return env
