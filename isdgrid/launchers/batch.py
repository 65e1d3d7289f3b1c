"""What the batch-scheduler launchers (slurm, sge) share.

Inside an allocation the driver starts one host daemon per allocated node with the
scheduler's own remote-start tool (``srun``, ``qrsh -inherit``); it forks the node's slots. The nodes are
assumed to see the driver's Python and its ``isdgrid`` at the same paths (a shared file
system or the same installation), as is usual on a cluster; the driver script's folder
is put on the daemons' ``sys.path`` at the same path.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping, Sequence

from ..hosts import Host
from .base import ProcessLauncher, SlotSpec
from .local import DEFAULT_PYTHON, daemon_args, package_root, wrap_host_setup

__all__ = ["BatchLauncher", "job_temp_path"]


def job_temp_path(root: str, job_id: str, tag: str, host: str) -> str:
    """The working folder of a grid's daemons on ``host`` (made by the daemons, removed at exit)."""
    safe_host = host.replace(os.sep, "_")
    return os.path.join(root, f"isdgrid-{job_id}-{tag}-{safe_host}")


class BatchLauncher(ProcessLauncher):
    """A launcher that starts daemons on the nodes of a scheduler allocation.

    ``bind`` is the address the daemons listen on: None means the node's own name as the
    scheduler lists it (it must resolve, on the node and for the driver, to an address
    the driver reaches); give ``"127.0.0.1"`` on a single-node allocation.
    ``temp_root`` is where each node's working folder goes when a host has no
    ``temp_path`` (default ``$TMPDIR`` or ``/tmp``).
    """

    def __init__(
        self,
        *,
        job_id: str,
        log_dir: str | None = None,
        heartbeat_timeout: float = 0.0,
        stop_timeout: float = 5.0,
        bind: str | None = None,
        temp_root: str | None = None,
        environ: Mapping[str, str] | None = None,
        forward_output: bool = True,
        preload: Sequence[str] = (),
    ) -> None:
        super().__init__(log_dir=log_dir, stop_timeout=stop_timeout, forward_output=forward_output, preload=preload)
        self.environ = dict(os.environ if environ is None else environ)
        self.job_id = job_id
        self.tag = uuid.uuid4().hex[:8]
        self.heartbeat_timeout = heartbeat_timeout
        self.bind = bind
        self.temp_root = temp_root or self.environ.get("TMPDIR") or "/tmp"

    def slot_specs(self, hosts: Sequence[Host]) -> list[SlotSpec]:
        specs = []
        for host in hosts:
            # A folder of the grid's own under the host's temp_path (made 0700 by the host daemon,
            # which refuses one another user could write); the host daemon of slot 0 removes it.
            name = "shared" if self.shared_temp_path else host.name
            path = job_temp_path(host.temp_path or self.temp_root, self.job_id, self.tag, name)
            specs += [SlotSpec(host, slot, path, remove_temp=slot == 0) for slot in range(host.n_cpu)]
        return specs

    def bind_address(self, spec: SlotSpec) -> str:
        """The address the daemon of ``spec`` listens on."""
        return self.bind or spec.host.name

    def daemon_command(self, specs: Sequence[SlotSpec]) -> list[str]:
        """The host daemon's own argument list on the node, host setup (nice, init_cmd) applied."""
        return self.host_daemon_command(specs)

    def host_daemon_command(self, specs: Sequence[SlotSpec], *, gpus_per_slot: int = 0) -> list[str]:
        """:meth:`daemon_command`; ``gpus_per_slot`` splits the scheduler's GPUs among the slots."""
        spec = specs[0]
        python = sys.executable if spec.host.python == DEFAULT_PYTHON else spec.host.python
        args = daemon_args(
            spec, python, bind=self.bind_address(spec), heartbeat_timeout=self.heartbeat_timeout,
            stop_timeout=self.stop_timeout, paths=self.import_paths(spec), preload=self.preload,
            remove_temp=any(s.remove_temp for s in specs), gpus_per_slot=gpus_per_slot,
        )
        return wrap_host_setup(spec.host, args)

    def python_path(self, spec: SlotSpec) -> str:
        """``PYTHONPATH`` for the daemon: the driver's isdgrid first, then the driver's own."""
        paths = [package_root()]
        if self.environ.get("PYTHONPATH"):
            paths.append(self.environ["PYTHONPATH"])
        return os.pathsep.join(paths)
