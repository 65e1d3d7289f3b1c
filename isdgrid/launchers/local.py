"""The local launcher: one host daemon on this machine, which forks every slot."""

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
    stop_timeout: float = 5.0,
    paths: Sequence[str] = (),
    preload: Sequence[str] = (),
    remove_temp: bool | None = None,
    unix_socket_dir: str | None = None,
    gpus_per_slot: int = 0,
) -> list[str]:
    """The ``python -m isdgrid.hostd`` argument list of the host daemon for ``spec``'s host.

    ``paths`` go on the daemons' ``sys.path`` (``--path``, after the temp folder) in place
    of the folder the host daemon starts in; ``preload`` modules are imported once, before
    the workers are forked. The slots themselves (their number, rank and GPU) reach the
    host daemon as ``spawn`` commands on its stdin, through ssh, srun and qrsh alike.
    """
    args = [
        python, "-u", "-m", "isdgrid.hostd",
        "--bind", bind,
        "--secret-stdin",
        "--temp-path", spec.temp_path,
        "--label", spec.host.name,
        "--stop-timeout", f"{stop_timeout:g}",
    ]
    if unix_socket_dir:
        args += ["--unix-socket-dir", unix_socket_dir]
    for path in paths:
        args += ["--path", path]
    for name in preload:
        args += ["--preload", name]
    if gpus_per_slot:
        args += ["--gpus-per-slot", str(gpus_per_slot)]
    if heartbeat_timeout > 0:
        args += ["--heartbeat-timeout", f"{heartbeat_timeout:g}"]
    if spec.remove_temp if remove_temp is None else remove_temp:
        args.append("--remove-temp")
    if spec.host.cpu_bind:
        args.append("--cpu-bind")
    return args


def wrap_host_setup(host: Host, args: list[str]) -> list[str]:
    """Apply the host's niceness and ``init_cmd`` to a daemon argument list."""
    if host.niceness:
        args = ["nice", "-n", str(host.niceness), *args]
    if host.init_cmd:
        args = ["sh", "-c", f"{host.init_cmd} && exec {shlex.join(args)}"]
    return args


class LocalLauncher(ProcessLauncher):
    """Starts one host daemon per host as a subprocess of the driver; it forks the slots.

    A host whose ``python`` is the default ``python3`` runs the driver's own interpreter
    (``sys.executable``), so a virtual environment carries over; the driver's ``isdgrid``
    is put on the daemon's ``PYTHONPATH``, the driver script's folder on its ``sys.path``.
    """

    name = "local"
    local_pids = True

    def __init__(
        self,
        *,
        log_dir: str | None = None,
        heartbeat_timeout: float = 0.0,
        stop_timeout: float = 5.0,
        forward_output: bool = True,
        preload: Sequence[str] = (),
    ) -> None:
        super().__init__(log_dir=log_dir, stop_timeout=stop_timeout, forward_output=forward_output, preload=preload)
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
            # The host daemon of slot 0 removes the folder even if the driver dies without terminate().
            specs += [SlotSpec(host, slot, path, remove_temp=made and slot == 0) for slot in range(host.n_cpu)]
        return specs

    def command(self, specs: Sequence[SlotSpec]) -> list[str]:
        spec = specs[0]
        python = sys.executable if spec.host.python == DEFAULT_PYTHON else spec.host.python
        args = daemon_args(
            spec, python, heartbeat_timeout=self.heartbeat_timeout, stop_timeout=self.stop_timeout,
            paths=self.import_paths(spec), preload=self.preload, remove_temp=any(s.remove_temp for s in specs),
        )
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
        super().close()
        for path in self._made_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._made_dirs.clear()
