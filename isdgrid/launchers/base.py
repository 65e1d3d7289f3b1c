"""What every launcher shares: the launcher interface, daemon handles, process control.

A launcher turns :class:`~isdgrid.hosts.Host` slots into running daemons and ends them.
Process-based launchers (local, ssh, slurm, sge) only differ in the command line that
starts one slot; :class:`ProcessLauncher` does the rest: starting every slot at once,
handing the secret over stdin, waiting (bounded) for the ``ISDGRID-URI`` line, showing
what the published objects print on the driver's stdout and stderr (prefixed ``[host/slot]``),
sending the daemon's own log lines to ``logging``, keeping a per-slot log file, and a
bounded, escalating stop.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import queue
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from ..announce import parse_announcement, split_output
from ..errors import ConfigError, LaunchError
from ..hosts import Host

if TYPE_CHECKING:
    from .hostprocess import HostProcess, WorkerProcess

__all__ = [
    "DaemonHandle", "Launcher", "ProcessLauncher", "Progress", "SlotOutput", "SlotSpec", "driver_folder",
    "wait_for_exit",
]

log = logging.getLogger("isdgrid.launcher")

STOP_MARGIN = 0.9  # seconds a host daemon gets, after its own stop_timeout, to reap its workers and end
remote_log = logging.getLogger("isdgrid.remote")

# One line at a time on the driver's terminal, whichever slot it comes from.
_console_lock = threading.Lock()


def driver_folder() -> str:
    """The folder the daemons put on ``sys.path``: where the driver's Python looks first.

    ``python drv/driver.py``: the script's folder (symlinks resolved, as Python does);
    ``python -m pkg.mod``, ``python -c``, an interactive session or a notebook: the
    current folder.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and path and getattr(main, "__spec__", None) is None:
        return os.path.dirname(os.path.realpath(path))
    return os.getcwd()


@dataclass(frozen=True)
class SlotSpec:
    """One slot to start: the host, the slot number on it, its working folder and its rank.

    ``rank`` is the slot's index in the grid (slots in grid order, host by host), set by
    the grid; a respawn starts the same spec again, so the slot keeps it.
    """

    host: Host
    slot: int
    temp_path: str
    remove_temp: bool = False
    rank: int = 0

    @property
    def label(self) -> str:
        return f"{self.host.name}/{self.slot}"

    @property
    def gpu(self) -> str | None:
        """The slot's ``CUDA_VISIBLE_DEVICES`` from ``Host.gpus`` (None: the grid sets none)."""
        return self.host.gpu(self.slot)

    def identity(self) -> dict[str, str]:
        """The variables that tell the slot's daemon where it is (``ISDGRID_HOST/SLOT/RANK``)."""
        return {"ISDGRID_HOST": self.host.name, "ISDGRID_SLOT": str(self.slot), "ISDGRID_RANK": str(self.rank)}


@dataclass
class DaemonHandle:
    """A running daemon: where it is, its URI, and (if the grid started it) its process."""

    spec: SlotSpec
    uri: str
    #: The slot's worker (``pid``, ``poll()``, ``wait()``); None for a daemon the user started.
    process: WorkerProcess | None = None
    output: SlotOutput | None = None
    command: list[str] = field(default_factory=list)
    respawns: int = 0
    #: Bumped by a launcher each time it had to make the host's temp folder anew (a respawn
    #: after the old one was removed): the grid then sends what ``copy_files`` sent again.
    folder_generation: int = 0
    #: The host daemon that forked this slot's worker (a ``HostProcess``), if the grid started it.
    host_daemon: HostProcess | None = None

    @property
    def host(self) -> Host:
        return self.spec.host

    @property
    def slot(self) -> int:
        return self.spec.slot

    @property
    def label(self) -> str:
        return self.spec.label

    def exited(self) -> int | None:
        """The exit code if the worker the grid started has ended, else None."""
        return None if self.process is None else self.process.poll()


class Launcher(abc.ABC):
    """Starts and stops the daemons of a grid; the grid talks only to this interface."""

    name = "abstract"
    #: Set by the grid: every host sees the same temp folder (a shared file system).
    shared_temp_path: bool = False
    #: False for daemons the user started: the grid unpublishes its services but never ends them.
    owns_daemons = True

    def default_hosts(self) -> list[Host]:
        """The hosts to use when the grid is given none (an allocation's nodes, attached daemons)."""
        raise ConfigError(f"the {self.name} launcher needs a list of hosts")

    @abc.abstractmethod
    def slot_specs(self, hosts: Sequence[Host]) -> list[SlotSpec]:
        """Decide the slots (and their working folders) for ``hosts``."""

    @abc.abstractmethod
    def start(self, specs: Sequence[SlotSpec], secret: str, timeout: float) -> list[DaemonHandle | LaunchError]:
        """Start every slot at once; one handle, or the error of that slot, per spec."""

    @abc.abstractmethod
    def stop(self, handles: Sequence[DaemonHandle], timeout: float, *, retire: bool = False) -> None:
        """End the daemons (bounded by ``timeout``), reap them, and remove their folders.

        ``retire``: the grid replaces these slots and goes on; the daemons must not clean
        up as if the driver were gone (the temp folder may serve the other slots).
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most launchers hold nothing
        """Release what the launcher itself holds (after the last stop)."""


class SlotOutput:
    """One slot worker's output: first the URI line, then every line until the end.

    Its host daemon's :class:`~isdgrid.launchers.hostprocess.HostOutput` hands it the
    worker's lines. Lines marked as its objects' stdout or stderr go, prefixed
    ``[host/slot]``, to the driver's ``sys.stdout`` or ``sys.stderr`` (``forward=True``) or
    else to the ``isdgrid.remote`` logger; unmarked lines (the worker's own log) go to that
    logger. Every line also goes to the slot's log file under ``log_dir``, made readable by
    the user only.
    """

    def __init__(self, spec: SlotSpec, log_dir: str | None, forward: bool = True) -> None:
        self.spec = spec
        self.forward = forward
        self._uri: queue.Queue[str | None] = queue.Queue(maxsize=1)
        self.early_lines: list[str] = []
        self._seen_uri = False
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._log_file: IO[str] | None = None
        if forward:  # before the first line comes, so that one is whole too
            _console_lines_whole()
        if log_dir:
            self._log_file = open_log(log_dir, f"{spec.host.name}-{spec.slot}.log".replace(os.sep, "_"))

    def is_alive(self) -> bool:
        """True until the worker's output has ended."""
        return not self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout`` seconds) until the output has ended."""
        self._done.wait(timeout)

    def line(self, raw: bytes) -> None:
        """Handle one line of the worker (without its newline)."""
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        uri = None if self._seen_uri else parse_announcement(line)
        if uri is not None:
            self._seen_uri = True
            self._uri.put(uri)
            return
        kind, text = split_output(line)
        if not self._seen_uri:
            self.early_lines.append(text)
            del self.early_lines[:-200]
        self._forward(kind, text)

    def finish(self) -> None:
        """The output ended: no URI will come, the log file is closed."""
        with self._lock:
            if self._done.is_set():
                return
            if not self._seen_uri:
                self._uri.put(None)
            if self._log_file is not None:
                self._log_file.close()
            self._done.set()

    def _forward(self, kind: str | None, text: str) -> None:
        if self._log_file is not None:
            try:
                self._log_file.write(text + "\n")
            except (OSError, ValueError):  # a full disk (or a late line after the end) must not stop the reading
                pass
        if kind is not None and self.forward and _echo(kind, f"[{self.spec.label}] {text}\n"):
            return
        remote_log.info("[%s] %s", self.spec.label, text)

    def wait_uri(self, timeout: float) -> str | None:
        """The URI the worker printed; None if it ended first or ``timeout`` passed."""
        try:
            return self._uri.get(timeout=timeout)
        except queue.Empty:
            return None


class _OutputReader:
    """The driver's one thread that reads the output pipes of every host daemon it started.

    What it reads (:class:`~isdgrid.launchers.hostprocess.HostOutput`) has ``fileno()``,
    ``read_some()`` (False at the end) and ``finish()``.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._new: list[Any] = []
        threading.Thread(target=self._run, name="isdgrid-output", daemon=True).start()

    def add(self, output: Any) -> None:
        os.set_blocking(output.fileno(), False)
        with self._lock:
            self._new.append(output)
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass

    def _run(self) -> None:
        while True:
            try:
                self._step()
            except BaseException:  # noqa: BLE001 - the reader outlives any error
                log.exception("isdgrid output reader error")
                time.sleep(0.05)

    def _step(self) -> None:
        for key, _ in self._selector.select(1.0):
            output = key.data
            if output is None:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    while self._wake_r.recv(4096):
                        pass
                with self._lock:
                    new, self._new = self._new, []
                for added in new:
                    try:
                        self._selector.register(added.fileno(), selectors.EVENT_READ, added)
                    except (ValueError, OSError, KeyError):
                        added.finish()
                continue
            try:
                more = output.read_some()
            except BaseException:  # noqa: BLE001 - one daemon's line never stops the others
                log.exception("%s: reading its output failed", output.label)
                more = True
            if not more:
                self._selector.unregister(key.fileobj)
                output.finish()


_reader: _OutputReader | None = None
_reader_lock = threading.Lock()


def output_reader() -> _OutputReader:
    """The driver's one output thread (started at first use)."""
    global _reader
    with _reader_lock:
        if _reader is None:
            _reader = _OutputReader()
        return _reader


def _forget_reader_in_child() -> None:
    global _reader, _reader_lock
    _reader = None
    _reader_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_reader_in_child)


def open_log(log_dir: str, name: str) -> IO[str]:
    """Open (append) a slot's log file, mode 0600; a folder made here is mode 0700."""
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(log_dir, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a file left by an older run may be readable by others
    except OSError:
        pass
    return open(fd, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by run()


def _fileno(stream: IO[str]) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError):
        return None


def _lines_whole(stream: IO[str]) -> None:
    """Make the driver's own stream hand its text to the file descriptor a whole line at a time.

    ``print`` writes its arguments, separators and ``end`` one by one. A stream that writes
    through (``python -u``, ``PYTHONUNBUFFERED=1``) sends each piece to the descriptor at
    once, so a forwarded line written between two pieces would land inside the driver's
    line; a block-buffered one (a file, a pipe) sends 8 KB at a time, cut anywhere. Line
    buffered, as Python makes a terminal's stdout, a line reaches the descriptor in one
    write when it ends (or when the driver calls ``flush``). Safe from any thread.
    """
    if getattr(stream, "line_buffering", True) and not getattr(stream, "write_through", False):
        return
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(OSError, ValueError, TypeError):
            reconfigure(line_buffering=True, write_through=False)


def _console_lines_whole() -> None:
    """:func:`_lines_whole` for the process's own stdout and stderr, where they are in place."""
    with _console_lock:
        pairs: tuple[tuple[IO[str] | None, object], ...] = (
            (sys.stdout, sys.__stdout__), (sys.stderr, sys.__stderr__),
        )
        for stream, original in pairs:
            if stream is not None and stream is original:
                _lines_whole(stream)


def _echo(kind: str, text: str) -> bool:
    """Write one whole line to the driver's stdout or stderr; False if that failed.

    To the process's own stream (``sys.__stdout__``) the line goes past its buffer, in one
    write to the file descriptor, and that stream is made line buffered (:func:`_lines_whole`):
    a line the driver is in the middle of printing is never cut in two. A stream put in its
    place (pytest's capture, a notebook, ``redirect_stdout``) gets ``write`` and ``flush``.
    Safe from any thread.
    """
    stream: IO[str] | None = sys.stdout if kind == "stdout" else sys.stderr
    original: IO[str] | None = sys.__stdout__ if kind == "stdout" else sys.__stderr__
    if stream is None:  # pythonw, or closed on purpose
        return False
    fd = _fileno(stream) if stream is original else None
    try:
        with _console_lock:
            if fd is None:
                stream.write(text)
                stream.flush()
                return True
            _lines_whole(stream)
            data = text.encode(getattr(stream, "encoding", None) or "utf-8", "replace")
            while data:
                data = data[os.write(fd, data):]
    except (OSError, ValueError):  # closed, a broken pipe, a character the stream cannot take
        return False
    return True


class Progress:
    """Logs "k/N slots ready" while a large grid starts (more than ``quiet_below`` slots)."""

    def __init__(self, total: int, *, quiet_below: int = 8, every: float = 2.0) -> None:
        self.total = total
        self.count = 0
        self._loud = total >= quiet_below
        self._every = every
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def ready(self, n: int = 1) -> None:
        """Count ``n`` more slots ready; log now and then, and at the last one."""
        with self._lock:
            self.count += n
            now = time.monotonic()
            if self._loud and (self.count >= self.total or now - self._last >= self._every):
                self._last = now
                log.info("%d/%d slots ready", self.count, self.total)


class ProcessLauncher(Launcher):
    """A launcher that starts one host daemon per host (local, ssh, srun, qrsh) and forks slots there.

    Each start groups its slots by host: a host whose daemon this launcher runs gets the new
    slots forked there (a respawn costs a fork, not a launch); any other host gets one new
    host daemon (:mod:`isdgrid.hostd`) started with :meth:`command`, whose stdin carries
    the secret and then the grid's commands. ``preload`` names modules every host daemon
    imports once, before it forks its workers (numpy, openmm: each slot then starts with
    them and shares their memory).
    """

    #: The launcher may signal workers by pid itself (they run on this machine).
    local_pids = False

    def __init__(self, *, log_dir: str | None = None, stop_timeout: float = 5.0, forward_output: bool = True,
                 preload: Sequence[str] = ()) -> None:
        self.log_dir = log_dir
        self.stop_timeout = stop_timeout
        #: Show what the published objects print on the driver's stdout/stderr (else: logging).
        self.forward_output = forward_output
        if isinstance(preload, str):
            preload = [preload]
        self.preload = [str(name) for name in preload]
        for name in self.preload:
            if not name or not all(part.isidentifier() for part in name.split(".")):
                raise ConfigError(f"preload: {name!r} is not a module name")
        self._host_daemons: dict[tuple[str, str], HostProcess] = {}  # (host name, folder) -> HostProcess
        self._hosts_lock = threading.Lock()
        self._host_starts: dict[tuple[str, str], threading.Lock] = {}  # held while a host daemon starts

    @abc.abstractmethod
    def command(self, specs: Sequence[SlotSpec]) -> list[str]:
        """The argument list that starts the host daemon for ``specs`` (slots of one host)."""

    def environment(self, spec: SlotSpec) -> dict[str, str] | None:
        """Environment for the host daemon's process; None inherits the driver's."""
        return None

    def workdir(self, spec: SlotSpec) -> str | None:
        """Folder the host daemon's process starts in; None: the driver's current folder."""
        return None

    def import_paths(self, spec: SlotSpec) -> list[str]:
        """Folders the daemons of ``spec`` put on ``sys.path`` (``--path``): the driver's folder."""
        return [driver_folder()]

    def gpu_argument(self, spec: SlotSpec) -> str:
        """What the host daemon's ``spawn`` gets for the slot's GPU ("-": leave it alone)."""
        return spec.gpu if spec.gpu is not None else "-"

    def start(self, specs: Sequence[SlotSpec], secret: str, timeout: float) -> list[DaemonHandle | LaunchError]:
        progress = Progress(len(specs))
        return self.start_processes(specs, secret, time.monotonic() + timeout, progress)

    def start_processes(
        self, specs: Sequence[SlotSpec], secret: str, deadline: float, progress: Progress | None = None
    ) -> list[DaemonHandle | LaunchError]:
        """Start ``specs`` at once and wait (until ``deadline``) for each worker's address.

        If anything interrupts it (Ctrl-C included), every host daemon it started is ended
        (with its workers) before the exception goes on: the caller never got their handles.
        """
        launched: list[HostProcess] = []
        try:
            return self._start_processes(specs, secret, deadline, progress, launched)
        except BaseException:
            for host in launched:
                host.close_stdin()
                with contextlib.suppress(OSError):
                    os.killpg(host.process.pid, signal.SIGTERM)
            for host in launched:
                self._end_host(host, time.monotonic() + self.stop_timeout + 1.0)
            raise

    def _host_daemon(
        self, specs: Sequence[SlotSpec], secret: str, launched: list[HostProcess]
    ) -> HostProcess | LaunchError:
        """The running host daemon for these slots' host, or a new one; a LaunchError if it cannot start."""
        spec = specs[0]
        key = (spec.host.name, spec.temp_path)
        with self._hosts_lock:
            starting = self._host_starts.setdefault(key, threading.Lock())
        # One start at a time per host: slots respawned at once after their host daemon died
        # all come back under the one new host daemon.
        with starting:
            return self._host_daemon_locked(key, specs, secret, launched)

    def _host_daemon_locked(self, key: tuple[str, str], specs: Sequence[SlotSpec], secret: str,
                            launched: list[HostProcess]) -> HostProcess | LaunchError:
        from .hostprocess import HostProcess

        spec = specs[0]
        with self._hosts_lock:
            host = self._host_daemons.get(key)
        if host is not None and host.alive():
            return host
        if host is not None:  # ended (or ending): its pipe to it goes; the output thread closes the other
            host.close_stdin()
        cmd = self.command(specs)
        try:
            with _sigint_held():  # a Ctrl-C comes once the process is on the list to end
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=self.environment(spec),
                    cwd=self.workdir(spec),
                    start_new_session=True,  # a Ctrl-C in the driver's terminal is the driver's alone
                )
                host = HostProcess(spec, proc, cmd, self.log_dir, self.forward_output)
                launched.append(host)
        except OSError as exc:
            return LaunchError(f"cannot run command: {exc}", host=spec.host.name, command=cmd)
        host.send(secret)
        with self._hosts_lock:
            self._host_daemons[key] = host
        return host

    def _start_processes(
        self,
        specs: Sequence[SlotSpec],
        secret: str,
        deadline: float,
        progress: Progress | None,
        launched: list[HostProcess],
    ) -> list[DaemonHandle | LaunchError]:
        groups: dict[tuple[str, str], list[int]] = {}
        for index, spec in enumerate(specs):
            groups.setdefault((spec.host.name, spec.temp_path), []).append(index)
        outcome: dict[int, DaemonHandle | LaunchError] = {}
        pending: list[tuple[int, HostProcess, SlotOutput, WorkerProcess]] = []
        for indexes in groups.values():
            host = self._host_daemon([specs[i] for i in indexes], secret, launched)
            for index in indexes:
                if isinstance(host, LaunchError):
                    outcome[index] = host
                    continue
                output, worker = host.spawn(specs[index], self.gpu_argument(specs[index]))
                pending.append((index, host, output, worker))
        timeout = max(0.0, deadline - time.monotonic())
        for index, host, output, worker in pending:
            spec = specs[index]
            uri = output.wait_uri(max(0.0, deadline - time.monotonic()))
            if uri is None:
                outcome[index] = self._start_failure(spec, host, output, worker, timeout)
                continue
            outcome[index] = DaemonHandle(spec, uri, worker, output, host.command, host_daemon=host)
            if progress is not None:
                progress.ready()
        return [outcome[i] for i in range(len(specs))]

    def _start_failure(self, spec: SlotSpec, host: HostProcess, output: SlotOutput, worker: WorkerProcess,
                       timeout: float) -> LaunchError:
        """The error of a slot whose worker did not report its address (it is ended)."""
        if worker.poll() is None and host.alive():
            host.stop_slot(spec.slot)
            wait_for_exit(worker, self.stop_timeout + 1.0)
        code = worker.poll()
        if code is None:
            reason = f"daemon did not report its address within {timeout:.0f} s"
        elif host.output.done() and worker.pid is None:  # the host daemon ended before it forked the slot
            wait_for_exit(host.process, 2.0)
            reason = f"host daemon exited with code {host.process.returncode} before serving"
        else:
            reason = f"daemon exited with code {code} before serving"
        lines = [*host.output.recent_lines, *output.early_lines]
        if host.output.done():
            self._end_host(host, time.monotonic() + 2.0)
        return LaunchError(reason, host=spec.host.name, command=host.command, output="\n".join(lines))

    def stop(self, handles: Sequence[DaemonHandle], timeout: float, *, retire: bool = False) -> None:
        """End these slots' workers; a host daemon left with none is ended too (bounded by ``timeout`` + 1 s).

        The host daemons end their workers' process groups (TERM, then KILL after the
        launcher's ``stop_timeout``); what is still there ``STOP_MARGIN`` (0.9 s) after
        ``timeout`` is killed from here.
        """
        # The host daemons KILL what is left at ``timeout``; 0.9 s later what has not ended is
        # killed from here, so a stop (and terminate) stays within ``timeout`` + 1 s.
        deadline = time.monotonic() + timeout + STOP_MARGIN
        ending = self._ask_to_end(handles, retire)
        for handle in handles:
            if (handle.process is not None and handle.host_daemon is not None
                    and not wait_for_exit(handle.process, max(0.0, deadline - time.monotonic()))):
                log.warning("%s: worker pid %s did not end; killing it", handle.label, handle.process.pid)
                self._kill_worker(handle)
        for host in ending:
            self._end_host(host, deadline)
        for handle in handles:
            self._reap(handle)

    def _ask_to_end(self, handles: Sequence[DaemonHandle], retire: bool) -> list[HostProcess]:
        """Ask for these slots' end: ``stop SLOT``, or the end of stdin of a host daemon left with none.

        Returns the host daemons asked to end (``retire`` first if the grid goes on).
        """
        hosts: dict[int, tuple[HostProcess, list[DaemonHandle]]] = {}
        for handle in handles:
            if handle.host_daemon is not None:
                hosts.setdefault(id(handle.host_daemon), (handle.host_daemon, []))[1].append(handle)
        ending = []
        for host, owned in hosts.values():
            if host.live_slots() <= {h.slot for h in owned} or not host.alive():
                host.close_stdin(retire)
                ending.append(host)
                if self.local_pids:  # a stopped host daemon (Ctrl-Z, a debugger) would not hear it
                    with contextlib.suppress(OSError):
                        os.kill(host.process.pid, signal.SIGCONT)
            else:
                for handle in owned:
                    host.stop_slot(handle.slot)
        return ending

    def _kill_worker(self, handle: DaemonHandle) -> None:
        """SIGKILL a worker's process group from here (a worker on this machine only)."""
        pid = getattr(handle.process, "pid", None)
        if self.local_pids and pid:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)

    def _end_host(self, host: HostProcess, deadline: float) -> None:
        """Wait (until ``deadline``) for a host daemon to end, then kill it; its output is read to the end."""
        proc = host.process
        if not wait_for_exit(proc, max(0.0, deadline - time.monotonic())):
            log.warning("host daemon of %s (pid %d) did not end in time; killing it", host.label, proc.pid)
            for sig in (signal.SIGKILL,):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
            if self.local_pids:
                for worker in host.workers.values():
                    if worker.pid and worker.returncode is None:
                        with contextlib.suppress(OSError):
                            os.killpg(worker.pid, signal.SIGKILL)
            if not wait_for_exit(proc, 5.0):
                log.error("host daemon pid %d survived SIGKILL", proc.pid)
        host.output.join(timeout=2.0)
        with self._hosts_lock:
            for key, known in list(self._host_daemons.items()):
                if known is host:
                    del self._host_daemons[key]
        host.close_stdin()  # its stdout is closed by the output thread, once it has read it to the end

    @staticmethod
    def _reap(handle: DaemonHandle) -> None:
        """After its worker ended: the rest of its output read."""
        if handle.output is not None:
            handle.output.join(timeout=0.5)

    def close(self) -> None:
        """End every host daemon still running (each with its workers)."""
        with self._hosts_lock:
            hosts = list(self._host_daemons.values())
        deadline = time.monotonic() + self.stop_timeout + 1.0
        for host in hosts:
            host.close_stdin()
        for host in hosts:
            self._end_host(host, deadline)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) back while a child process is created, then deliver it.

    Interrupted inside ``subprocess.Popen``, the driver would lose the child's handle while
    the child runs on; held for those milliseconds, the interrupt comes right after. Only
    the main thread can set a handler, and only it gets ``KeyboardInterrupt``.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    held: list[Any] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous):
            previous(signal.SIGINT, held[0])
        elif held and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)


def wait_for_exit(proc: Any, timeout: float) -> bool:
    """Wait at most ``timeout`` seconds for ``proc`` to end; True if it did."""
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False

