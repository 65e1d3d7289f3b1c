"""The ssh launcher: daemons on other machines, started through the OpenSSH client.

Each host is first *prepared* with one ssh session: ``init_cmd`` runs, the grid's temp
folder is made under ``Host.temp_path`` (``$TMPDIR`` or ``/tmp`` when None), and a short
probe tells which Python the host runs and whether it can import isdgrid, Pyro5, serpent
and cloudpickle at the driver's versions. What is missing is shipped from the driver's own
installed copies (pure Python) as one tar over a second session into the temp folder
("zero-install"). Then each host gets one more ssh session, which runs the host daemon
(:mod:`isdgrid.hostd`): it reads the grid's secret and then the grid's commands from the
session's stdin, forks one worker per slot, and ends with its workers when that stdin
closes, so a dead ssh session or driver never leaves a daemon behind. A respawned slot is
a fork in the running host daemon, not a new session. The driver script's folder is put
on the daemons' ``sys.path`` as a path on the host: it is there only on a shared file system.

All command lines are built by the pure functions below; the part run by the remote
shell is a single string made with :func:`shlex.join` of ``sh -c SCRIPT`` and its
arguments, so host settings are never spliced into shell text (``init_cmd`` is the one
field that is shell code by design).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib
import io
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from Pyro5.core import URI

from ..agent import AGENT_ID
from ..errors import ConfigError, LaunchError
from ..hosts import Host
from .base import DaemonHandle, ProcessLauncher, Progress, SlotSpec, wait_for_exit
from .local import daemon_args

__all__ = [
    "DEFAULT_SSH_OPTIONS",
    "HostSetup",
    "SHIPPABLE",
    "SshLauncher",
    "host_command",
    "package_archive",
    "parse_probe",
    "prepare_command",
    "ssh_args",
]

log = logging.getLogger("isdgrid.launcher.ssh")

#: Options always given to ssh (an option the user sets in ``ssh_options`` wins).
DEFAULT_SSH_OPTIONS: dict[str, str] = {
    "BatchMode": "yes",
    "ConnectTimeout": "10",
    "ServerAliveInterval": "15",
    "ServerAliveCountMax": "3",
}

#: Modules the daemon needs on the host; shipped from the driver when missing there.
SHIPPABLE: tuple[str, ...] = ("isdgrid", "Pyro5", "serpent", "cloudpickle", "tomli")

MIN_PYTHON = (3, 10)
LIB_FOLDER = ".isdgrid-lib"
SSH_FAILED = 255  # ssh's own exit code when it cannot connect (else: the remote command's)
FOLDER_MISSING = 3  # exit code of folder_check_command when the grid's folder is gone
REACHED_FRESH = 2.0  # seconds a successful reachability probe of a host stands for
RETIRE_LINGER = 60.0  # seconds a replaced host daemon's ssh session may take to deliver "retire"
UNIX_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS

# The scripts run by ``sh -c`` on the host. One line each (a csh login shell rejects a
# newline inside quotes); every host setting arrives as a positional argument.
PREPARE_SCRIPT = (
    'isdgrid_init=$1 isdgrid_py=$2 isdgrid_parent=$3 isdgrid_name=$4 isdgrid_shared=$5 isdgrid_probe=$6; '
    'if [ -n "$isdgrid_init" ]; then eval "$isdgrid_init" '
    '|| { echo "ISDGRID-ERROR init_cmd failed: $isdgrid_init"; exit 3; }; fi; '
    'command -v "$isdgrid_py" >/dev/null 2>&1 '
    '|| { echo "ISDGRID-ERROR python not found: $isdgrid_py (PATH=$PATH)"; exit 4; }; '
    '[ -n "$isdgrid_parent" ] || isdgrid_parent=${TMPDIR:-/tmp}; '
    'case $isdgrid_parent in "~") isdgrid_parent=$HOME;; "~/"*) isdgrid_parent=$HOME/${isdgrid_parent#"~/"};; esac; '
    'case $isdgrid_parent in /*) ;; *) isdgrid_parent=$PWD/$isdgrid_parent;; esac; '
    'isdgrid_dir=$isdgrid_parent/$isdgrid_name; '
    'mkdir -p -- "$isdgrid_parent" && { mkdir -m 700 -- "$isdgrid_dir" 2>/dev/null '
    '|| { [ "$isdgrid_shared" = 1 ] && [ -d "$isdgrid_dir" ]; }; } '
    '|| { echo "ISDGRID-ERROR cannot create folder $isdgrid_dir"; exit 5; }; '
    'echo "ISDGRID-DIR $isdgrid_dir"; echo "ISDGRID-SSH $SSH_CONNECTION"; '
    'cd -- "$isdgrid_dir" && "$isdgrid_py" -c "$isdgrid_probe" '
    '|| { isdgrid_rc=$?; [ "$isdgrid_shared" = 1 ] || rm -rf -- "$isdgrid_dir"; exit $isdgrid_rc; }'
)

HOST_SCRIPT = (
    'isdgrid_init=$1; cd -- "$2" || exit 4; shift 2; '
    'if [ -n "$isdgrid_init" ]; then eval "$isdgrid_init" '
    '|| { echo "isdgrid: init_cmd failed: $isdgrid_init" >&2; exit 3; }; fi; '
    'exec "$@"'
)

CLEANUP_SCRIPT = 'rm -rf -- "$1"'

# Python run by the host's interpreter in the new temp folder: report the python and the
# modules it can import, then unpack the tar the driver sends on stdin, if any, into
# LIB_FOLDER. (Python 3.0 syntax up to the version line, so a too old python reports.)
PROBE_CODE = (
    "import sys\n"
    "print('ISDGRID-PYTHON %d.%d.%d %s' % (tuple(sys.version_info[:3]) + (sys.executable,)))\n"
    "names = ['isdgrid', 'Pyro5', 'serpent', 'cloudpickle'] + (['tomli'] if sys.version_info < (3, 11) else [])\n"
    "for name in names:\n"
    "    try:\n"
    "        version = str(getattr(__import__(name), '__version__', '?'))\n"
    "    except Exception:\n"
    "        version = '-'\n"
    "    print('ISDGRID-MODULE %s %s' % (name, version))\n"
    "print('ISDGRID-PROBED')\n"
    "sys.stdout.flush()\n"
    "data = sys.stdin.buffer.read()\n"
    "if data:\n"
    "    import io, tarfile\n"
    "    tar = tarfile.open(fileobj=io.BytesIO(data), mode='r:gz')\n"
    "    if hasattr(tarfile, 'data_filter'):\n"
    "        tar.extractall('LIB', filter='data')\n"
    "    else:\n"
    "        tar.extractall('LIB')\n"
    "    print('ISDGRID-SHIPPED %d' % len(tar.getnames()))\n"
).replace("LIB", LIB_FOLDER)

# Runs the host daemon from the shipped folder even under ``python -I`` (which ignores
# PYTHONPATH): the folder comes first on sys.path, then the host daemon's main() runs.
BOOT_CODE = "import sys; sys.path.insert(0, sys.argv.pop(1)); from isdgrid.hostd import main; main()"


# -- pure command builders -------------------------------------------------------------
def ssh_args(
    host_alias: str,
    remote_command: Sequence[str],
    *,
    options: Mapping[str, str],
    config_file: str | None = None,
    tunnel: Sequence[tuple[str, str]] = (),
    ssh: str = "ssh",
) -> list[str]:
    """The ssh argument list that runs ``remote_command`` on ``host_alias``.

    ``options`` become ``-o Key=Value`` (given before the user's ssh config is read, so
    they win over it); user, port, identity and jump hosts come from the ssh config
    (``config_file`` or ``~/.ssh/config``). Each ``(local_socket, remote_socket)`` of
    ``tunnel`` forwards a Unix socket of this machine to one on the host (one ``-L``
    each). The remote command is joined into one shell string with :func:`shlex.join`.
    """
    args = [ssh]
    if config_file:
        args += ["-F", config_file]
    for key, value in options.items():
        args += ["-o", f"{key}={value}"]
    args += ["-T", "-x", "-a"]  # no terminal, no X11, no agent forwarding
    if tunnel:
        args += ["-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes"]
        for local, remote in tunnel:
            args += ["-L", f"{local}:{remote}"]
    args += ["--", host_alias, shlex.join(list(remote_command))]
    return args


def merge_options(extra: Mapping[str, object] | Sequence[str] | None, connect_timeout: float) -> dict[str, str]:
    """The defaults, then ``extra`` (a mapping or ``"Key=Value"`` strings) over them."""
    merged = {**DEFAULT_SSH_OPTIONS, "ConnectTimeout": f"{max(1, round(connect_timeout))}"}
    items: list[tuple[str, object]]
    if extra is None:
        items = []
    elif isinstance(extra, Mapping):
        items = list(extra.items())
    else:
        items = []
        for entry in extra:
            key, sep, value = str(entry).partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"ssh option {entry!r} must look like Key=Value")
            items.append((key, value))
    lower = {k.lower(): k for k in merged}
    for raw_key, raw_value in items:
        name = raw_key.strip()
        merged.pop(lower.get(name.lower(), name), None)
        merged[name] = "yes" if raw_value is True else "no" if raw_value is False else str(raw_value)
    return merged


def prepare_command(host: Host, folder_name: str, *, shared: bool = False) -> list[str]:
    """Remote argv: run ``init_cmd``, make the temp folder, probe the host's python.

    The probe then reads stdin: a gzip tar sent there is unpacked into the folder's
    ``.isdgrid-lib`` (zero-install); an empty stdin ships nothing.
    """
    return [
        "sh", "-c", PREPARE_SCRIPT, "isdgrid-prepare",
        host.init_cmd, host.python, host.temp_path or "", folder_name, "1" if shared else "0", PROBE_CODE,
    ]


def host_command(
    specs: Sequence[SlotSpec],
    *,
    bind: str,
    lib_dir: str | None = None,
    unix_socket_dir: str | None = None,
    heartbeat_timeout: float = 0.0,
    stop_timeout: float = 5.0,
    paths: Sequence[str] = (),
    preload: Sequence[str] = (),
    remove_temp: bool = False,
) -> list[str]:
    """Remote argv that runs the host daemon of ``specs`` (slots of one host) in its temp folder.

    ``init_cmd`` runs first, then ``nice`` and the host's python, with the host daemon
    booted from ``lib_dir`` (the shipped modules) when given. ``paths`` (folders on the
    host) go on the daemons' ``sys.path``, after the temp folder; with ``unix_socket_dir``
    the workers listen on ``DIR/.isdgrid-SLOT.sock`` instead of a port. The slots
    themselves reach the host daemon as ``spawn`` commands on its stdin.
    """
    spec = specs[0]
    host = spec.host
    args = daemon_args(
        spec, host.python, bind=bind, heartbeat_timeout=heartbeat_timeout, stop_timeout=stop_timeout,
        paths=paths, preload=preload, remove_temp=remove_temp, unix_socket_dir=unix_socket_dir,
    )
    if lib_dir:
        at = args.index("-m")
        args[at:at + 2] = ["-c", BOOT_CODE, lib_dir]
    if host.niceness:
        args = ["nice", "-n", str(host.niceness), *args]
    return ["sh", "-c", HOST_SCRIPT, "isdgrid-host", host.init_cmd, spec.temp_path, *args]


def folder_check_command(folder: str) -> list[str]:
    """Remote argv that exits 0 if ``folder`` is there, FOLDER_MISSING if it is not."""
    return ["sh", "-c", f'test -d "$1" || exit {FOLDER_MISSING}', "isdgrid-check", folder]


def cleanup_command(folder: str) -> list[str]:
    """Remote argv that removes the grid's temp folder."""
    return ["sh", "-c", CLEANUP_SCRIPT, "isdgrid-cleanup", folder]


# -- probe results and shipping --------------------------------------------------------
@dataclass
class HostSetup:
    """What preparing a host found: its temp folder, python, address and missing modules."""

    temp_dir: str
    server_address: str = ""
    python_version: tuple[int, ...] = ()
    modules: dict[str, str] = dataclasses.field(default_factory=dict)
    lib_dir: str | None = None
    #: A host daemon that removes the folder when the driver is gone has started there.
    slot0_started: bool = False

    def to_ship(self, driver_versions: Mapping[str, str], always: bool = False) -> list[str]:
        """Modules the host lacks, or has at another version than the driver."""
        return [
            name for name, version in self.modules.items()
            if always or version == "-" or version != driver_versions.get(name)
        ]


def parse_probe(output: str) -> HostSetup:
    """Read the ``ISDGRID-*`` lines of a prepare session (other lines are ignored)."""
    setup = HostSetup(temp_dir="")
    for line in output.splitlines():
        tag, _, rest = line.strip().partition(" ")
        if tag == "ISDGRID-DIR":
            setup.temp_dir = rest.strip()
        elif tag == "ISDGRID-SSH":
            fields = rest.split()
            setup.server_address = fields[2] if len(fields) >= 3 else ""
        elif tag == "ISDGRID-PYTHON":
            version = rest.split()[0] if rest.split() else ""
            setup.python_version = tuple(int(p) for p in version.split(".") if p.isdigit())
        elif tag == "ISDGRID-MODULE":
            name, _, version = rest.partition(" ")
            setup.modules[name] = version.strip()
    return setup


def driver_versions(names: Sequence[str]) -> dict[str, str]:
    """``__version__`` of each module as the driver has it ('-' when it has not)."""
    versions = {}
    for name in names:
        try:
            versions[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
        except ImportError:
            versions[name] = "-"
    return versions


@functools.lru_cache(maxsize=8)
def package_archive(names: tuple[str, ...]) -> bytes:
    """A gzip tar of the driver's installed copies of ``names`` (no byte code)."""
    buffer = io.BytesIO()

    def skip_cache(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        base = os.path.basename(info.name)
        return None if base == "__pycache__" or base.endswith((".pyc", ".pyo")) else info

    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for name in names:
            module = importlib.import_module(name)
            path = getattr(module, "__file__", None)
            if not path:
                raise LaunchError(f"cannot ship {name}: the driver's copy has no file")
            if os.path.basename(path) == "__init__.py":
                tar.add(os.path.dirname(path), arcname=name, filter=skip_cache)
            else:
                tar.add(path, arcname=os.path.basename(path), filter=skip_cache)
    return buffer.getvalue()


# -- the launcher ----------------------------------------------------------------------
class SshLauncher(ProcessLauncher):
    """Starts one host daemon per host through ``ssh``; it forks the host's slots (one session per host).

    Options (``Grid(..., launcher="ssh", launcher_options={...})``):

    - ``ssh_config``: an ssh config file used instead of ``~/.ssh/config``;
    - ``ssh_options``: extra ``-o`` options, a mapping or ``"Key=Value"`` strings;
    - ``connect_timeout``: seconds to wait for a host to answer (default 10);
    - ``tunnel``: carry all grid traffic through the ssh connections (each worker listens on
      a Unix socket in its temp folder; the host's one session forwards a socket on this
      machine to each of them);
    - ``bind``: address the daemons listen on; default: the host's address that ssh
      reached (from ``$SSH_CONNECTION``); ``"0.0.0.0"`` only when asked;
    - ``keep_temp``: leave the hosts' temp folders in place at terminate;
    - ``ship``: ``"auto"`` (ship what the host lacks), ``"always"`` or ``"never"``;
    - ``preload``: modules each host daemon imports once, before it forks its workers.

    ``max_starts_per_host`` (sessions opened at once on one host, when each slot had its
    own session) is deprecated and ignored: it gives a ``FutureWarning``.
    """

    name = "ssh"

    def __init__(
        self,
        *,
        log_dir: str | None = None,
        heartbeat_timeout: float = 0.0,
        stop_timeout: float = 5.0,
        ssh_config: str | os.PathLike[str] | None = None,
        ssh_options: Mapping[str, object] | Sequence[str] | None = None,
        connect_timeout: float = 10.0,
        tunnel: bool = False,
        bind: str | None = None,
        keep_temp: bool = False,
        ship: str = "auto",
        ssh: str = "ssh",
        forward_output: bool = True,
        preload: Sequence[str] = (),
        max_starts_per_host: int | None = None,
    ) -> None:
        super().__init__(log_dir=log_dir, stop_timeout=stop_timeout, forward_output=forward_output, preload=preload)
        if ship not in ("auto", "always", "never"):
            raise ConfigError(f"ssh launcher: ship must be 'auto', 'always' or 'never', got {ship!r}")
        if max_starts_per_host is not None:
            warnings.warn(
                "ssh launcher: max_starts_per_host is deprecated and ignored: each host now gets one ssh "
                "session, whatever its number of slots",
                FutureWarning,
                stacklevel=2,
            )
        if tunnel and bind:
            raise ConfigError("ssh launcher: give either tunnel=True or bind, not both")
        self.heartbeat_timeout = heartbeat_timeout
        self.config_file = os.fspath(ssh_config) if ssh_config else None
        if self.config_file and not os.path.isfile(self.config_file):
            raise ConfigError(f"ssh launcher: ssh_config {self.config_file!r} is not a file")
        self.options = merge_options(ssh_options, connect_timeout)
        self.tunnel = tunnel
        self.bind = bind
        self.keep_temp = keep_temp
        self.ship = ship
        self.ssh = ssh
        self._token = uuid.uuid4().hex[:10]
        self._setups: dict[str, HostSetup] = {}
        self._lock = threading.Lock()
        self._reach_locks: dict[str, threading.Lock] = {}
        self._reached: dict[str, float] = {}
        self._folder_generation: dict[str, int] = {}  # hosts whose folder was made anew, how often
        self._lingering: set[Any] = set()  # retired host daemons (HostProcess) whose session is still open
        self._socket_dir: str | None = None

    # -- commands --------------------------------------------------------------------------
    def _ssh(self, host: Host, remote: Sequence[str], tunnel: Sequence[tuple[str, str]] = ()) -> list[str]:
        return ssh_args(
            host.name, remote, options=self.options, config_file=self.config_file, tunnel=tunnel, ssh=self.ssh
        )

    def _folder_name(self, host: Host) -> str:
        if self.shared_temp_path:
            return f"isdgrid-{self._token}"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in host.name)
        return f"isdgrid-{self._token}-{safe}"

    def _sockets(self, spec: SlotSpec) -> tuple[str, str]:
        """The slot's socket on this machine and the one its worker listens on (hostd's naming)."""
        with self._lock:
            if self._socket_dir is None:
                self._socket_dir = tempfile.mkdtemp(prefix="isdgrid-ssh-")
            folder = self._socket_dir
        safe = "".join(c if c.isalnum() else "_" for c in spec.host.name)[:40]
        local = os.path.join(folder, f"{safe}-{spec.slot}.sock")
        remote = f"{spec.temp_path}/.isdgrid-{spec.slot}.sock"
        return local, remote

    def command(self, specs: Sequence[SlotSpec]) -> list[str]:
        """One ssh session running the host daemon of ``specs``' host (with the tunnel: a forward per slot)."""
        spec = specs[0]
        setup = self._setups[spec.host.name]
        forwards: list[tuple[str, str]] = []
        if self.tunnel:
            # Every slot of the host, not only those started now: a slot respawned later is
            # forked by this host daemon, and reached through this session.
            slots = sorted({s.slot for s in specs} | set(range(spec.host.n_cpu)))
            forwards = [self._sockets(dataclasses.replace(spec, slot=slot)) for slot in slots]
        remote = host_command(
            specs,
            bind="127.0.0.1" if self.tunnel else self.bind or setup.server_address,
            lib_dir=setup.lib_dir,
            unix_socket_dir=setup.temp_dir if self.tunnel else None,
            heartbeat_timeout=self.heartbeat_timeout,
            stop_timeout=self.stop_timeout,
            paths=self.import_paths(spec),
            preload=self.preload,
            # Every host daemon of the grid may remove the folder once the driver is gone: the
            # last of its users does (isdgrid.folderusers), so a respawned host daemon never
            # removes it from under the others, and a host whose slot 0 failed is still cleaned.
            remove_temp=not self.keep_temp,
        )
        return self._ssh(spec.host, remote, forwards)

    # -- start -----------------------------------------------------------------------------
    def slot_specs(self, hosts: Sequence[Host]) -> list[SlotSpec]:
        # The folder's full path is known once the host is prepared (see start()); who
        # removes it is the host daemon's business (see command()), not a slot's.
        return [
            SlotSpec(host, slot, f"{host.temp_path or '$TMPDIR'}/{self._folder_name(host)}")
            for host in hosts
            for slot in range(host.n_cpu)
        ]

    def start(self, specs: Sequence[SlotSpec], secret: str, timeout: float) -> list[DaemonHandle | LaunchError]:
        deadline = time.monotonic() + timeout
        hosts: dict[str, Host] = {}
        for spec in specs:
            hosts.setdefault(spec.host.name, spec.host)
        new_hosts = [h for h in hosts.values() if h.name not in self._setups]
        known_hosts = [h for h in hosts.values() if h.name in self._setups]
        failed = self._prepare_all(new_hosts, deadline)
        failed.update(self._wait_all_reachable(known_hosts, deadline))
        outcome: dict[int, DaemonHandle | LaunchError] = {}
        runnable: list[tuple[int, SlotSpec]] = []
        for index, spec in enumerate(specs):
            if spec.host.name in failed:
                outcome[index] = failed[spec.host.name]
            else:
                real = dataclasses.replace(spec, temp_path=self._setups[spec.host.name].temp_dir)
                runnable.append((index, real))
        # One host daemon (one ssh session) per host, or a fork in the one that runs there.
        results = self.start_processes([s for _, s in runnable], secret, deadline, Progress(len(runnable)))
        for (index, spec), result in zip(runnable, results, strict=True):
            if isinstance(result, DaemonHandle):
                self._finish_handle(result)
                result.folder_generation = self._folder_generation.get(spec.host.name, 0)
                if not self.keep_temp:
                    self._setups[spec.host.name].slot0_started = True
            outcome[index] = result
        return [outcome[i] for i in range(len(specs))]

    def _finish_handle(self, handle: DaemonHandle) -> None:
        """Point the handle's URI where the driver can reach the slot's worker."""
        if self.tunnel:
            local, _ = self._sockets(handle.spec)
            handle.uri = f"PYRO:{AGENT_ID}@./u:{local}"
            return
        uri = URI(handle.uri)
        if uri.host in ("0.0.0.0", "::", ""):  # bound to every interface: use the address ssh reached
            setup = self._setups[handle.host.name]
            uri.host = setup.server_address or handle.host.name
            handle.uri = str(uri)

    # -- hosts seen before: a respawn waits out a network partition --------------------------
    def _wait_all_reachable(self, hosts: Sequence[Host], deadline: float) -> dict[str, LaunchError]:
        """Wait (in parallel, until ``deadline``) for ssh to reach each host again; those it never did."""
        if not hosts:
            return {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
            errors = list(pool.map(lambda h: self._wait_reachable(h, deadline), hosts))
        return {h.name: error for h, error in zip(hosts, errors, strict=True) if error is not None}

    def _wait_reachable(self, host: Host, deadline: float) -> LaunchError | None:
        """Wait until ssh reaches ``host``, a host prepared earlier whose slots start again.

        A slot is started again after it was lost, often because the network between the
        driver and the host failed: its ssh session would fail at once while the network
        is still down. So the host is probed (does its grid folder exist?) until ssh
        connects, or ``deadline``. Concurrent respawns of one host share a probe. An error
        other than ssh's own failure to connect is left for the slot's start to report.

        A partition longer than the daemons' heartbeat timeout makes them take the driver
        for gone: they exit, and slot 0 removes the folder. The host is then prepared
        again (a new folder, modules shipped again); what ``copy_files`` had sent is gone,
        which is logged.
        """
        with self._lock:
            lock = self._reach_locks.setdefault(host.name, threading.Lock())
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return LaunchError("ssh did not reach the host before the start timeout", host=host.name)
        try:
            if time.monotonic() - self._reached.get(host.name, -REACHED_FRESH) < REACHED_FRESH:
                return None
            pause, told = 0.5, False
            while True:
                cmd = self._ssh(host, folder_check_command(self._setups[host.name].temp_dir))
                code, output = run_bounded(cmd, deadline)
                if code == 0:
                    self._reached[host.name] = time.monotonic()
                    if told:
                        log.warning("%s: reachable over ssh again", host.name)
                    return None
                if code == FOLDER_MISSING:
                    return self._prepare_again(host, deadline)
                if code != SSH_FAILED:
                    return None
                if time.monotonic() + pause >= deadline:
                    return LaunchError(
                        "ssh did not reach the host before the start timeout", host=host.name, command=cmd,
                        output=output,
                    )
                if not told:
                    log.warning("%s: ssh cannot reach the host (%s); trying until the start timeout",
                                host.name, output.strip().splitlines()[-1] if output.strip() else f"exit code {code}")
                    told = True
                time.sleep(pause)
                pause = min(2 * pause, 2.0)
        finally:
            lock.release()

    def _prepare_again(self, host: Host, deadline: float) -> LaunchError | None:
        """Prepare a host whose grid folder was removed (its daemons took the driver for gone)."""
        with self._lock:  # the old setup stays until the new one is made: a failure here is tried again
            gone = self._setups[host.name].temp_dir
        log.warning("%s: the grid's folder %s was removed (the host's daemons took the driver for gone); "
                    "making it again (the grid sends what copy_files sent there again)", host.name, gone)
        try:
            setup = self._prepare(host, deadline)
        except LaunchError as exc:
            return exc
        with self._lock:
            self._setups[host.name] = setup
            self._folder_generation[host.name] = self._folder_generation.get(host.name, 0) + 1
        self._reached[host.name] = time.monotonic()
        return None

    def _prepare_all(self, hosts: Sequence[Host], deadline: float) -> dict[str, LaunchError]:
        """Prepare every host in parallel; the hosts that failed, with their error."""
        failed: dict[str, LaunchError] = {}
        if not hosts:
            return failed
        loud = len(hosts) > 3
        done = 0
        workers = min(32, len(hosts))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="isdgrid-ssh") as pool:
            futures = {pool.submit(self._prepare, host, deadline): host for host in hosts}
            for future in concurrent.futures.as_completed(futures):
                host = futures[future]
                done += 1
                try:
                    setup = future.result()
                except LaunchError as exc:
                    failed[host.name] = exc
                    log.debug("%s: %s", host.name, exc)
                except Exception as exc:  # noqa: BLE001 - one host's surprise must not stop the others
                    failed[host.name] = LaunchError(f"preparing the host failed: {exc!r}", host=host.name)
                    log.debug("%s: preparing failed", host.name, exc_info=True)
                else:
                    with self._lock:
                        self._setups[host.name] = setup
                if loud:
                    log.info("ssh: %d/%d hosts prepared (%d failed)", done, len(hosts), len(failed))
        return failed

    def _prepare(self, host: Host, deadline: float) -> HostSetup:
        """One ssh session: init, temp folder, probe, and the modules the host lacks."""
        cmd = self._ssh(host, prepare_command(host, self._folder_name(host), shared=self.shared_temp_path))
        session = _Session(cmd)
        probed = session.read_until("ISDGRID-PROBED", deadline)
        setup = parse_probe(session.output())
        problem = ""
        archive = b""
        if probed and setup.temp_dir and setup.python_version:
            wanted = [] if self.ship == "never" else setup.to_ship(
                driver_versions(list(setup.modules)), always=self.ship == "always"
            )
            if setup.python_version[:2] < MIN_PYTHON:
                problem = (
                    f"python {host.python!r} is {'.'.join(map(str, setup.python_version))}; "
                    f"isdgrid needs {'.'.join(map(str, MIN_PYTHON))} or newer"
                )
            elif not (self.tunnel or self.bind or setup.server_address):
                problem = "$SSH_CONNECTION is not set on the host; give the launcher option bind= or tunnel=True"
            elif self.tunnel and len(setup.temp_dir) + 24 > UNIX_SOCKET_MAX:
                problem = (
                    f"tunnel: the temp folder {setup.temp_dir!r} is too long a path for a Unix socket; "
                    "give the host a shorter temp_path"
                )
            elif wanted:
                lacking = [n for n in wanted if driver_versions([n])[n] == "-"]
                if lacking:
                    problem = f"the host's python cannot import {', '.join(lacking)} and the driver has none to ship"
                else:
                    archive = package_archive(tuple(sorted(wanted)))
        started = time.monotonic()
        code, output = session.finish(b"" if problem else archive, deadline)
        if not problem and (code != 0 or not probed or not setup.temp_dir or not setup.python_version):
            problem = _prepare_failure(host, code, output)
        if not problem and archive and "ISDGRID-SHIPPED" not in output:
            problem = f"could not ship {', '.join(wanted)} to the host (exit code {code})"
        if problem:
            self._forget_folder(host, setup)
            raise LaunchError(problem, host=host.name, command=cmd, output=output)
        if archive:
            setup.lib_dir = f"{setup.temp_dir}/{LIB_FOLDER}"
            log.info("%s: shipped %s (%d kB) in %.2f s", host.name, ", ".join(wanted), len(archive) // 1024,
                     time.monotonic() - started)
        log.debug("%s prepared: %s", host.name, setup)
        return setup

    def _forget_folder(self, host: Host, setup: HostSetup) -> None:
        """Remove a temp folder made for a host that then failed (best effort)."""
        if setup.temp_dir and not self.keep_temp and not self.shared_temp_path:
            run_bounded(self._ssh(host, cleanup_command(setup.temp_dir)), time.monotonic() + 15.0)

    # -- stop ------------------------------------------------------------------------------
    def stop(self, handles: Sequence[DaemonHandle], timeout: float, *, retire: bool = False) -> None:
        """End these slots (see :meth:`ProcessLauncher.stop`); a retired host daemon's session may linger.

        A slot the grid replaces (``retire``) is usually lost because the network to its
        host failed. When that leaves its host daemon no slot, the whole host daemon is
        retired (``retire``, then the end of its stdin), and its ssh session cannot deliver
        those until the network is back. Killing the session would make the host see its
        stdin end without ``retire`` once the network is back: the old host daemon would
        take the driver for gone, and try to remove the folder the new daemons use. So a
        session that has not ended ``timeout`` + 1 s later is left to deliver them and end
        by itself (ssh gives up on a silent host after ``ServerAliveInterval`` x
        ``ServerAliveCountMax``); it is killed after ``RETIRE_LINGER`` seconds, or at
        :meth:`close`. A slot whose host daemon keeps other slots is ended by it (``stop``).
        """
        if not retire:
            super().stop(handles, timeout)
            return
        deadline = time.monotonic() + timeout + 1.0
        ending = self._ask_to_end(handles, retire=True)
        for handle in handles:
            if handle.process is not None and handle.host_daemon is not None:
                wait_for_exit(handle.process, max(0.0, deadline - time.monotonic()))
        for host in ending:
            if wait_for_exit(host.process, max(0.0, deadline - time.monotonic())):
                self._end_host(host, deadline)
                continue
            log.info("%s: the ssh session of its retired host daemon is still open; it may take %.0f s to "
                     "deliver 'retire'", host.label, RETIRE_LINGER)
            with self._lock:
                self._lingering.add(host)
            threading.Thread(target=self._linger, args=(host,), name="isdgrid-ssh-retire", daemon=True).start()
        for handle in handles:
            if handle.host_daemon not in self._lingering:
                self._reap(handle)

    def _linger(self, host: Any) -> None:
        try:
            if not wait_for_exit(host.process, RETIRE_LINGER):
                log.warning("%s: the ssh session of its retired host daemon did not end within %.0f s of "
                            "'retire'; killing it", host.label, RETIRE_LINGER)
            self._end_host(host, time.monotonic())  # kills it if it is still there, reads its output out
        except BaseException:  # noqa: BLE001 - this thread must not die silently
            log.exception("%s: ending its replaced ssh session failed", host.label)
        finally:
            with self._lock:
                self._lingering.discard(host)

    def close(self) -> None:
        """End every host daemon (lingering ones too); remove folders no host daemon removes, and local sockets."""
        with self._lock:
            lingering = list(self._lingering)
        for host in lingering:
            self._end_host(host, time.monotonic())  # killed now, its output read out
        super().close()
        with self._lock:
            leftovers = [(name, s) for name, s in self._setups.items() if not s.slot0_started]
            self._setups.clear()
        if leftovers and not self.keep_temp:
            deadline = time.monotonic() + 15.0
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(leftovers))) as pool:
                for name, setup in leftovers:
                    pool.submit(run_bounded, self._ssh(Host(name), cleanup_command(setup.temp_dir)), deadline)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


class _Session:
    """One ssh process whose output is read by a thread, so every wait can be bounded."""

    def __init__(self, cmd: list[str]) -> None:
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as exc:
            self._lines.append(f"cannot run {cmd[0]}: {exc}")
            self._eof = True
            return
        self._reader = threading.Thread(target=self._read, name="isdgrid-ssh-prepare", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            with self._changed:
                self._lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self._lines)

    def read_until(self, tag: str, deadline: float) -> bool:
        """Wait for a line equal to ``tag``; False on end of output or at ``deadline``."""
        with self._changed:
            while True:
                if tag in self._lines:
                    return True
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return False
                self._changed.wait(remaining)

    def finish(self, data: bytes, deadline: float) -> tuple[int, str]:
        """Send ``data``, close stdin and wait for the end; exit code (-9 if killed) and output."""
        proc = self.proc
        if proc is None:
            return 127, self.output()
        assert proc.stdin is not None
        try:
            if data:
                proc.stdin.write(data)
            proc.stdin.close()
        except OSError:
            pass
        code: int | None = None
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait()
        self._reader.join(timeout=5.0)
        if proc.stdout is not None:
            proc.stdout.close()
        if code is None:
            return -signal.SIGKILL, self.output() + "\n(timed out)"
        return code, self.output()


def _prepare_failure(host: Host, code: int, output: str) -> str:
    for line in output.splitlines():
        if line.startswith("ISDGRID-ERROR "):
            return line[len("ISDGRID-ERROR "):]
    if output.startswith("cannot run "):
        return output.splitlines()[0]
    if code == SSH_FAILED:
        return "cannot connect over ssh (exit code 255)"
    if code == 127:
        return f"python {host.python!r} not found (exit code 127)"
    if code < 0:
        return f"the host did not answer in time (ssh stopped with signal {-code})"
    return f"probing the host's python {host.python!r} failed (exit code {code})"


def run_bounded(cmd: list[str], deadline: float) -> tuple[int, str]:
    """Run ``cmd`` (its own process group) until ``deadline``; exit code and output.

    On time-out the whole group is killed and the code is negative (the signal).
    """
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return 127, f"cannot run {cmd[0]}: {exc}"
    try:
        out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        out, _ = proc.communicate()
        return -signal.SIGKILL, out.decode("utf-8", "replace") + "\n(timed out)"
    return proc.returncode, out.decode("utf-8", "replace")
