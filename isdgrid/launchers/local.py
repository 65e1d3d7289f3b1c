"""The local launcher: one daemon subprocess per slot on this machine."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence

from ..hosts import Host
from .base import ProcessLauncher, SlotSpec

__all__ = ["LocalLauncher", "daemon_args", "package_root"]

DEFAULT_PYTHON = "python3"


def package_root() -> str:
    """The folder that holds the ``isdgrid`` package the driver runs."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.dirname(package)


def daemon_args(
    spec: SlotSpec,
    python: str,
    *,
    bind: str = "127.0.0.1",
    heartbeat_timeout: float = 0.0,
    paths: Sequence[str] = (),
    set_gpu: bool = True,
) -> list[str]:
    """The ``python -m isdgrid.daemon`` argument list for one grid-started slot.

    ``paths`` go on the daemon's ``sys.path`` (``--path``, after its temp folder) in place
    of the folder the daemon starts in; ``--tag-output`` marks what its objects print.
    ``--slot-env`` and ``--gpu`` give the daemon its place in the grid and its GPU (from
    ``Host.gpus``; ``set_gpu=False`` when the scheduler binds GPUs itself), which it puts
    in its environment before anything is published: on the command line, they reach the
    daemon through ssh, srun and qrsh alike.
    """
    args = [
        python, "-u", "-m", "isdgrid.daemon",
        "--host", bind, "--port", "0",
        "--secret-stdin", "--watch-stdin", "--tag-output",
        "--temp-path", spec.temp_path,
        "--label", spec.label,
        "--slot-env", spec.host.name, str(spec.slot), str(spec.rank),
    ]
    if set_gpu and spec.gpu is not None:
        args += ["--gpu", spec.gpu]
    for path in paths:
        args += ["--path", path]
    if heartbeat_timeout > 0:
        args += ["--heartbeat-timeout", f"{heartbeat_timeout:g}"]
    if spec.remove_temp:
        args.append("--remove-temp")
    return args


def wrap_host_setup(host: Host, args: list[str]) -> list[str]:
    """Apply the host's niceness and ``init_cmd`` to a daemon argument list."""
    if host.niceness:
        args = ["nice", "-n", str(host.niceness), *args]
    if host.init_cmd:
        args = ["sh", "-c", f"{host.init_cmd} && exec {shlex.join(args)}"]
    return args


class LocalLauncher(ProcessLauncher):
    """Starts every slot as a subprocess of the driver on this machine.

    A host whose ``python`` is the default ``python3`` runs the driver's own interpreter
    (``sys.executable``), so a virtual environment carries over; the driver's ``isdgrid``
    is put on the daemon's ``PYTHONPATH``, the driver script's folder on its ``sys.path``.
    """

    name = "local"

    def __init__(
        self,
        *,
        log_dir: str | None = None,
        heartbeat_timeout: float = 0.0,
        stop_timeout: float = 5.0,
        forward_output: bool = True,
    ) -> None:
        super().__init__(log_dir=log_dir, stop_timeout=stop_timeout, forward_output=forward_output)
        self.heartbeat_timeout = heartbeat_timeout
        self._made_dirs: list[str] = []

    def slot_specs(self, hosts: Sequence[Host]) -> list[SlotSpec]:
        specs = []
        shared: dict[str | None, str] = {}  # with shared_temp_path: one folder per temp_path
        for host in hosts:
            # Each host's daemons work in a private folder (0700) the grid makes under the
            # host's temp_path ($TMPDIR when None): never in a folder others may write. A
            # folder made here is recorded at once: close() removes it however the start
            # ends (an error, Ctrl-C); the daemons are ended before that.
            path = shared.get(host.temp_path) if self.shared_temp_path else None
            made = path is None
            if path is None:
                parent = None
                if host.temp_path is not None:
                    parent = os.path.abspath(os.path.expanduser(str(host.temp_path)))
                    os.makedirs(parent, exist_ok=True)
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in host.name)
                path = tempfile.mkdtemp(prefix=f"isdgrid-{safe}-", dir=parent)
                self._made_dirs.append(path)
                shared[host.temp_path] = path
            # Slot 0 removes the folder even if the driver dies without terminate().
            specs += [SlotSpec(host, slot, path, remove_temp=made and slot == 0) for slot in range(host.n_cpu)]
        return specs

    def command(self, spec: SlotSpec) -> list[str]:
        python = sys.executable if spec.host.python == DEFAULT_PYTHON else spec.host.python
        args = daemon_args(spec, python, heartbeat_timeout=self.heartbeat_timeout, paths=self.import_paths(spec))
        return wrap_host_setup(spec.host, args)

    def workdir(self, spec: SlotSpec) -> str:
        # ``python -m`` puts the folder it starts in first on sys.path, before PYTHONPATH:
        # started in the driver's folder, a daemon would import an ``isdgrid/`` found there.
        return spec.temp_path

    def environment(self, spec: SlotSpec) -> dict[str, str]:
        env = dict(os.environ)
        paths = [package_root()]  # the daemon puts its folder first itself (isdgrid.importpath)
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def close(self) -> None:
        for path in self._made_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._made_dirs.clear()
