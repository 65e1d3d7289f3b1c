"""The host daemon: one process per host that forks the host's slot workers from itself.

A launcher starts it once per host (``python -u -m isdgrid.hostd --secret-stdin ...``:
locally, in one ssh session, one ``srun`` step, one ``qrsh -inherit``). It imports isdgrid
(and what ``--preload`` names), enters the host's private folder, and then waits, single
threaded, for the grid's commands on stdin. Each slot is a *worker* forked from it: a
process that has everything imported already, so it serves within milliseconds and shares
its memory with the host daemon until it writes it. The host daemon never starts a thread,
so no worker inherits a lock another thread held at the fork.

On stdin, after the secret line::

    spawn SLOT RANK GPU   fork a worker for SLOT (GPU: "-" none, "@K" the K-th share of
                          --gpus-per-slot devices of this process's CUDA_VISIBLE_DEVICES,
                          else the CUDA_VISIBLE_DEVICES to set)
    stop SLOT             end SLOT's worker (its process group: TERM, KILL after --stop-timeout)
    retire                the next end of stdin leaves the folder in place (the grid goes on)
    (end of stdin)        end every worker the same way, remove the folder (--remove-temp), exit

On stdout, one line each::

    ISDGRID-HOST PID             ready (after the imports)
    ISDGRID-WORKER SLOT PID      a worker was forked
    \\x1dPID LINE                 a line of worker PID: its log (the first one its URI line),
                                 or, marked (isdgrid.announce), what its objects print
    ISDGRID-EXIT SLOT PID CODE   a worker ended (CODE < 0: by that signal)
    other lines                  the host daemon's own log

Each worker runs in a process group of its own, so what a published object starts ends
with its slot. Its stdin is a pipe from the host daemon: when the host daemon dies, the
worker sees its end and exits, ending its process group on the way out (no one else
will). A worker that finds its driver silent for ``--heartbeat-timeout`` seconds exits
with :data:`EXIT_DRIVER_GONE`; when the last one does, the host daemon takes the driver
for gone and ends too.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import importlib
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import daemon
from .announce import STDERR_MARK, STDOUT_MARK
from .errors import GridError
from .folderusers import FolderUsers
from .openfiles import ensure_open_files

__all__ = ["EXIT_DRIVER_GONE", "HostDaemon", "WORKER_MARK", "main"]

#: A worker that took its driver for gone (heartbeat silence) exits with this code.
EXIT_DRIVER_GONE = 75
#: In front of a line the host daemon relays from one of its workers: ``\x1dPID ``.
WORKER_MARK = "\x1d"
HOST_PREFIX = "ISDGRID-HOST "
WORKER_PREFIX = "ISDGRID-WORKER "
EXIT_PREFIX = "ISDGRID-EXIT "
MAX_LINE = 1 << 16  # a longer line without a newline is relayed in pieces
OPEN_FILES_PER_WORKER = 4  # its stdin and its three output pipes
COMMANDS_PER_STEP = 8  # spawns between two looks at the workers' pipes (a worker's address goes out at once)
DRAIN_AFTER_EXIT = 0.5  # seconds the host daemon keeps reading its workers' pipes once they all ended

log = logging.getLogger("isdgrid.hostd")


@dataclass
class _Pipe:
    """A read end of one worker's output: its objects' stdout or stderr, or its log."""

    worker: Worker
    mark: str
    partial: bytes = b""


@dataclass
class Worker:
    """The host daemon's record of one forked slot worker."""

    slot: int
    pid: int
    life: int | None  # write end of the worker's stdin; closed: the worker ends
    pipes: list[int] = field(default_factory=list)
    kill_at: float | None = None  # SIGKILL its group then, if it has not ended
    code: int | None = None


class _LineHandler(logging.Handler):
    """Logs a whole line at a time, in one write, to a file descriptor."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_all(self.fd, (self.format(record).replace("\n", "\n  ") + "\n").encode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - a log line must never end the host daemon
            self.handleError(record)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except InterruptedError:
            continue
        except BrokenPipeError:  # nobody reads (the driver or its ssh is gone): the workers still end, the folder goes
            return


class HostDaemon:
    """The host daemon's state and its one loop (see the module's documentation)."""

    #: The grid's commands come on stdin (a daemon started by hand takes none: :mod:`isdgrid.handstarted`).
    commands_on_stdin = True
    #: Sent to a worker's process group when it is to end (with its stdin closed; KILL at the deadline).
    stop_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGCONT)

    def __init__(self, secret: str, args: argparse.Namespace) -> None:
        self.secret = secret
        self.args = args
        self.label = args.label or socket.gethostname()
        self.temp_path = daemon.enter_folder(args.temp_path, args.path or ())
        self.users = FolderUsers(self.temp_path)
        self.workers: dict[int, Worker] = {}  # by pid, until reaped
        self.by_slot: dict[int, Worker] = {}  # the slot's current worker
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.signals: list[int] = []
        self.stdin_buffer = b""
        self.queued: deque[bytes] = deque()  # command lines read, not yet run
        self.retired = False
        self.stopping_at: float | None = None  # when the host daemon began to end
        self.driver_gone = False
        self.gpus = _gpu_shares(os.environ.get("CUDA_VISIBLE_DEVICES"), args.gpus_per_slot)
        self.open_files = 0  # the open-files limit known to be in force (0: not looked at yet)
        self.pipe_fds = (1 << 30, -1)  # lowest and highest descriptor of a worker's pipe so far

    def load(self) -> None:
        """Before the first fork: the warm-up, then the ``--preload`` modules (each imported once, for all workers)."""
        _warm_up(self.label)
        for name in self.args.preload:
            started = time.monotonic()
            importlib.import_module(name)
            log.info("%s: preloaded %s in %.2f s", self.label, name, time.monotonic() - started)

    # -- the loop --------------------------------------------------------------------------
    def run(self, pending_stdin: bytes) -> int:
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "signal")
        if self.commands_on_stdin:
            os.set_blocking(0, False)
            self.selector.register(0, selectors.EVENT_READ, "stdin")
        self._tell(f"{HOST_PREFIX}{os.getpid()}")
        log.info("%s: host daemon ready in %s (pid %d)", self.label, self.temp_path, os.getpid())
        self._commands(pending_stdin)
        while True:
            self._step()
            if self.stopping_at is not None and self._finished():
                break
        self._leave()
        return 0

    def _step(self) -> None:
        timeout = 0.0 if self.queued else self._next_timeout()
        for key, _ in self.selector.select(timeout):
            if key.data == "signal":
                self._read_signals()
            elif key.data == "stdin":
                self._read_stdin()
            else:
                self._read_pipe(key.fd, key.data)
        self._handle_signals()
        self._enforce_deadlines()
        self._run_queued(COMMANDS_PER_STEP)

    def _next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [w.kill_at for w in self.workers.values() if w.kill_at is not None]
        if self.stopping_at is not None:
            deadlines.append(self.stopping_at + self.args.stop_timeout + DRAIN_AFTER_EXIT)
        if not deadlines:
            return 1.0
        return max(0.0, min(1.0, min(deadlines) - now))

    def _finished(self) -> bool:
        if self.workers:
            return time.monotonic() > self.stopping_at + self.args.stop_timeout + DRAIN_AFTER_EXIT + 1.0  # type: ignore[operator]
        pipes_open = any(isinstance(key.data, _Pipe) for key in self.selector.get_map().values())
        return not pipes_open or time.monotonic() > self.stopping_at + DRAIN_AFTER_EXIT  # type: ignore[operator]

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _read_signals(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self.wake_r.recv(4096):
                pass

    def _handle_signals(self) -> None:
        signals, self.signals = self.signals, []
        if any(s != signal.SIGCHLD for s in signals) and self.stopping_at is None:
            names = ", ".join(sorted({signal.Signals(s).name for s in signals if s != signal.SIGCHLD}))
            log.info("%s: %s; ending every worker", self.label, names)
            self.driver_gone = True
            self._stop_all()
        self._reap()

    # -- commands --------------------------------------------------------------------------
    def _read_stdin(self) -> None:
        try:
            data = os.read(0, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._run_queued(len(self.queued))  # a "retire" before the end counts
            self.selector.unregister(0)
            if self.stopping_at is None:
                log.info("%s: stdin closed (%s); ending every worker", self.label,
                         "retired by the grid" if self.retired else "the driver is gone or done")
                self.driver_gone = not self.retired
                self._stop_all()
            return
        self._commands(data)

    def _commands(self, data: bytes) -> None:
        lines = (self.stdin_buffer + data).split(b"\n")
        self.stdin_buffer = lines.pop()
        self.queued.extend(lines)

    def _run_queued(self, limit: int) -> None:
        """Run at most ``limit`` queued commands: between them the loop relays what the workers say."""
        for _ in range(min(limit, len(self.queued))):
            raw = self.queued.popleft()
            words = raw.decode("utf-8", "replace").split()
            try:
                self._command(words)
            except Exception:  # noqa: BLE001 - a bad line must not end the host daemon
                log.exception("%s: command %r failed", self.label, " ".join(words))

    def _command(self, words: list[str]) -> None:
        if not words:
            return
        if words[0] == "spawn" and len(words) == 4:
            self._spawn(int(words[1]), int(words[2]), words[3])
        elif words[0] == "stop" and len(words) == 2:
            worker = self.by_slot.get(int(words[1]))
            if worker is not None:
                self._stop(worker)
        elif words[0] == "retire":
            self.retired = True
        else:
            log.warning("%s: unknown command %r", self.label, " ".join(words))

    # -- workers ---------------------------------------------------------------------------
    def _spawn(self, slot: int, rank: int, gpu: str) -> None:
        if self.stopping_at is not None:
            return
        needed = OPEN_FILES_PER_WORKER * (len(self.workers) + 1) + 64
        if needed > self.open_files:  # not a getrlimit per fork: only when the limit may be short
            self.open_files = ensure_open_files(max(needed, 2 * self.open_files), f"the host daemon of {self.label}")
            if self.open_files < needed:  # the hard limit is short: said once now, not at every fork
                self.open_files = 2 * needed
        old = self.by_slot.get(slot)
        if old is not None and old.code is None:
            self._stop(old)  # the grid starts this slot again: the old worker goes first
        if gpu.startswith("@"):
            share = int(gpu[1:])
            gpu = self.gpus[share % len(self.gpus)] if self.gpus else "-"
        fds: list[int] = []
        try:
            life_r, life_w = os.pipe()
            fds += [life_r, life_w]
            ends = [os.pipe() for _ in range(3)]  # stdout, stderr, log
            fds += [fd for pair in ends for fd in pair]
            self.pipe_fds = (min(self.pipe_fds[0], *fds), max(self.pipe_fds[1], *fds))
            gc.freeze()  # what the template holds stays shared: the workers' collections never touch it
            host_pid = os.getpid()
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            log.error("%s: cannot start slot %d: %s", self.label, slot, exc)
            self._tell(f"{EXIT_PREFIX}{slot} 0 255")
            return
        if pid == 0:
            code = 1
            try:
                code = self._worker_main(slot, rank, gpu, (life_r, life_w), ends)
            except BaseException:  # noqa: BLE001 - the worker ends here, whatever happened
                with contextlib.suppress(BaseException):
                    logging.getLogger("isdgrid.daemon").exception("slot %d failed", slot)
            finally:
                with contextlib.suppress(BaseException):
                    # What its objects started ends with the slot: TERM now; the host daemon
                    # KILLs the group once it has reaped the worker. If the host daemon is gone
                    # (killed: qdel, scancel, the OOM killer), no one will: KILL it here (the
                    # worker with it). Its end may reach the worker before its parent changes,
                    # so the TERM does not wait for that.
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    if os.getpgrp() == os.getpid():  # never the host daemon's group
                        os.killpg(0, signal.SIGTERM)
                        if os.getppid() != host_pid:
                            os.killpg(0, signal.SIGKILL)
                os._exit(code)
        os.close(life_r)
        for _, write_end in ends:
            os.close(write_end)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # the worker does it too: whichever comes first
        worker = Worker(slot, pid, life_w)
        for (read_end, _), mark in zip(ends, (STDOUT_MARK, STDERR_MARK, ""), strict=True):
            os.set_blocking(read_end, False)
            worker.pipes.append(read_end)
            self.selector.register(read_end, selectors.EVENT_READ, _Pipe(worker, mark))
        self.workers[pid] = worker
        self.by_slot[slot] = worker
        self._tell(f"{WORKER_PREFIX}{slot} {pid}")

    def _worker_main(self, slot: int, rank: int, gpu: str, life: tuple[int, int], ends: list[tuple[int, int]]) -> int:
        """The forked worker: its own process group and descriptors, then the slot's daemon."""
        life_r = life[0]
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, daemon._interrupt)
        os.dup2(life_r, 0)
        os.dup2(ends[0][1], 1)
        os.dup2(ends[1][1], 2)
        log_fd = ends[2][1]
        # Only the descriptor: closing the selector object would free its key for every pipe of
        # every worker forked so far, writing to as many pages this worker shares with the
        # host daemon (a worker forked late in a thousand would pay 0.2 MB for it).
        os.close(self.selector.fileno())
        self.wake_r.close()
        self.wake_w.close()
        # Every pipe of this and the other workers: all of them were made after the template's
        # own descriptors (preloaded modules' included), so they lie in one range; closed in two
        # calls (close_range), not one call per descriptor of a thousand workers.
        low, high = self.pipe_fds
        for start, stop in ((max(low, 3), log_fd), (max(log_fd + 1, 3), high + 1)):
            if start < stop:
                os.closerange(start, stop)
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        # closefd=False: when this frame ends, the stream's collection must not close the log
        # descriptor under a thread still logging its way out (os._exit follows).
        log_stream = open(log_fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        root.addHandler(_LineHandler(log_fd))
        daemon.set_slot_environment((self.label, str(slot), str(rank)), None if gpu == "-" else gpu)
        if self.args.cpu_bind:
            cores = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cores[slot % len(cores)]})
        unix_socket = None
        if self.args.unix_socket_dir:
            unix_socket = os.path.join(self.args.unix_socket_dir, f".isdgrid-{slot}.sock")
        gone = False
        options = self._serve_options(slot)
        try:
            gone = daemon.serve(
                self.secret,
                host=self.args.bind,
                unix_socket=unix_socket,
                temp_path=self.temp_path,
                import_paths=self.args.path or (),
                label=f"{self.label}/{slot}",
                watch_stdin=True,
                heartbeat_timeout=self.args.heartbeat_timeout,
                announce_to=log_stream,
                users=self.users,
                **options,
            )
        except KeyboardInterrupt:
            pass
        except OSError as exc:  # it cannot listen (a port in use, a socket path too long): one line, no traceback
            where = unix_socket or f"{self.args.bind}:{options.get('port', 0)}"
            log.error("%s/%d: cannot listen on %s: %s%s", self.label, slot, where, exc.strerror or exc,
                      " (another daemon?); give another --port" if exc.errno == errno.EADDRINUSE else "")
            return 1
        return EXIT_DRIVER_GONE if gone else 0

    def _serve_options(self, slot: int) -> dict[str, Any]:
        """More keyword arguments of the worker's :func:`isdgrid.daemon.serve` (port, name server)."""
        return {}

    def _tell(self, report: str) -> None:
        """One report line (``ISDGRID-HOST``, ``-WORKER``, ``-EXIT``) to the driver."""
        _write_all(1, f"{report}\n".encode())

    def _stop(self, worker: Worker) -> None:
        """End a worker's process group: its stdin closed, TERM (and CONT), KILL at the deadline."""
        if worker.life is not None:
            with contextlib.suppress(OSError):
                if self.retired or self.stopping_at is None:
                    os.write(worker.life, b"retire\n")
            with contextlib.suppress(OSError):
                os.close(worker.life)
            worker.life = None
        if worker.kill_at is None:
            worker.kill_at = time.monotonic() + self.args.stop_timeout
        for sig in self.stop_signals:
            with contextlib.suppress(OSError):
                os.killpg(worker.pid, sig)

    def _stop_all(self) -> None:
        self.stopping_at = time.monotonic()
        for worker in list(self.workers.values()):
            self._stop(worker)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.kill_at is not None and now >= worker.kill_at:
                log.warning("%s: slot %d (pid %d) did not end within %.1f s; killing its process group",
                            self.label, worker.slot, worker.pid, self.args.stop_timeout)
                with contextlib.suppress(OSError):
                    os.killpg(worker.pid, signal.SIGKILL)
                worker.kill_at = now + 3600.0  # once
        self._reap()

    def _reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            worker.code = os.waitstatus_to_exitcode(status)
            # What the slot's objects started ends with it (its process group).
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            if worker.life is not None:
                with contextlib.suppress(OSError):
                    os.close(worker.life)
                worker.life = None
            for fd in list(worker.pipes):
                key = self.selector.get_map().get(fd)
                if key is not None:
                    self._read_pipe(fd, key.data, drain=True)
            if self.by_slot.get(worker.slot) is worker:
                del self.by_slot[worker.slot]
            self._tell(f"{EXIT_PREFIX}{worker.slot} {pid} {worker.code}")
            if worker.code == EXIT_DRIVER_GONE and not self.workers and self.stopping_at is None:
                log.info("%s: its last worker took the driver for gone; ending", self.label)
                self.driver_gone = True
                self._stop_all()

    def _read_pipe(self, fd: int, pipe: _Pipe, drain: bool = False) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                if pipe.partial:
                    self._relay(pipe, [pipe.partial])
                    pipe.partial = b""
                self.selector.unregister(fd)
                os.close(fd)
                pipe.worker.pipes.remove(fd)
                return
            lines = (pipe.partial + data).split(b"\n")
            pipe.partial = lines.pop()
            if len(pipe.partial) > MAX_LINE:
                lines.append(pipe.partial)
                pipe.partial = b""
            self._relay(pipe, lines)
            if not drain:
                return

    def _relay(self, pipe: _Pipe, lines: list[bytes]) -> None:
        if not lines:
            return
        head = f"{WORKER_MARK}{pipe.worker.pid} {pipe.mark}".encode()
        _write_all(1, b"".join(head + line + b"\n" for line in lines))

    def _leave(self) -> None:
        for worker in self.workers.values():  # still there after the deadline: a process we cannot end
            log.error("%s: slot %d (pid %d) survived SIGKILL", self.label, worker.slot, worker.pid)
        if self.args.remove_temp and self.driver_gone and not self.retired:
            self.users.remove_if_last(wait=daemon.LAST_USER_WAIT)
        self.users.close()
        log.info("%s: host daemon ends", self.label)


def _warm_up(label: str) -> None:
    """Run once, in the template, what every worker's first minutes would (:mod:`isdgrid.warmup`)."""
    import locale  # noqa: F401 - imported by the workers' text streams

    from . import warmup

    started = time.monotonic()
    try:
        warmup.serve_once(os.getcwd())
    except Exception as exc:  # noqa: BLE001 - the workers only share less memory without it
        log.warning("%s: warm-up session failed (%s); the workers will each use more memory", label, exc)
    else:
        log.debug("%s: warm-up session in %.3f s", label, time.monotonic() - started)


def _gpu_shares(visible: str | None, per_slot: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` cut into shares of ``per_slot`` devices (one share per slot)."""
    if not per_slot or not visible:
        return []
    devices = [d for d in visible.split(",") if d]
    return [",".join(devices[i: i + per_slot]) for i in range(0, len(devices) - per_slot + 1, per_slot)]


def _read_secret_line() -> tuple[str, bytes]:
    """The first line of stdin (the secret) and what came after it, read without a buffer."""
    data = b""
    while b"\n" not in data:
        chunk = os.read(0, 4096)
        if not chunk:
            break
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line.decode().strip(), rest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m isdgrid.hostd", description=__doc__.split("\n")[0])
    parser.add_argument("--secret-stdin", action="store_true", help="read the secret from the first line of stdin")
    parser.add_argument("--bind", default="127.0.0.1", help="address the workers listen on (default 127.0.0.1)")
    parser.add_argument("--unix-socket-dir", help="workers listen on DIR/.isdgrid-SLOT.sock instead")
    parser.add_argument("--temp-path", help="working folder (only you may write it), first on sys.path")
    parser.add_argument("--remove-temp", action="store_true", help="remove the temp path when the driver is gone")
    parser.add_argument("--label", default="", help="the host's name in logs and ISDGRID_HOST")
    parser.add_argument("--heartbeat-timeout", type=float, default=0.0, help="a worker exits after this many silent s")
    parser.add_argument("--stop-timeout", type=float, default=5.0, help="seconds from TERM to KILL (default 5)")
    parser.add_argument("--gpus-per-slot", type=int, default=0, help="split CUDA_VISIBLE_DEVICES into shares")
    parser.add_argument("--cpu-bind", action="store_true", help="pin slot i to the i-th core this process may use")
    parser.add_argument("--preload", action="append", default=[], metavar="MODULE",
                        help="import MODULE once, before the workers are forked (repeatable)")
    parser.add_argument("--path", action="append", metavar="DIR",
                        help="import from DIR after the working folder, before the standard library (repeatable)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    root = logging.getLogger()
    root.addHandler(_LineHandler(1))
    root.setLevel(getattr(logging, str(args.log_level).upper(), logging.INFO))
    if not args.secret_stdin:
        raise SystemExit("isdgrid host daemon: give --secret-stdin")
    secret, rest = _read_secret_line()
    if not secret:
        raise SystemExit("isdgrid host daemon: no secret on stdin")
    code = 0
    try:
        host = HostDaemon(secret, args)
        host.load()
        code = host.run(rest)
    except KeyboardInterrupt:
        code = 0
    except GridError as exc:
        log.error("isdgrid host daemon failed: %s", exc)
        code = 1
    except ImportError as exc:
        log.error("isdgrid host daemon: cannot preload %s: %s", exc.name or "a module", exc)
        code = 1
    except OSError as exc:
        if exc.errno == errno.EMFILE:
            log.error("isdgrid host daemon: out of file descriptors (ulimit -n): %s", exc)
        else:
            log.error("isdgrid host daemon failed: %s", exc)
        code = 1
    except Exception as exc:  # noqa: BLE001 - reported, then the process ends with 1
        log.error("isdgrid host daemon failed: %s", exc, exc_info=True)
        code = 1
    os._exit(code)


if __name__ == "__main__":
    main()
