"""The driver's side of a host daemon (:mod:`isdgrid.hostd`): its process, output and workers.

A :class:`HostProcess` is one host daemon a launcher started (locally, or the ``ssh``,
``srun`` or ``qrsh`` process that runs it elsewhere). It forks the host's slot workers on
request; each worker is a :class:`WorkerProcess` (a pid on that host and, once it ends, its
exit code, which the host daemon reports the moment it reaps it). :class:`HostOutput` reads
the host daemon's one pipe (in the driver's one output thread) and routes each line: a
worker's lines to that slot's :class:`~isdgrid.launchers.base.SlotOutput`, the host
daemon's own to ``logging`` and its log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
from typing import IO

from ..hostd import EXIT_PREFIX, HOST_PREFIX, WORKER_MARK, WORKER_PREFIX
from .base import SlotOutput, SlotSpec, open_log, output_reader

__all__ = ["HostOutput", "HostProcess", "WorkerProcess"]

log = logging.getLogger("isdgrid.launcher")
remote_log = logging.getLogger("isdgrid.remote")


class WorkerProcess:
    """A slot worker of a host daemon, as the driver knows it: ``pid``, ``poll()``, ``wait()``.

    ``pid`` is the worker's process id on its host. Its exit code comes from the host
    daemon's report; if the host daemon itself ended first (its workers end with it), the
    host daemon's exit code (or -1) stands for it.
    """

    def __init__(self, host: HostProcess) -> None:
        self.host = host
        self.pid: int | None = None
        self.returncode: int | None = None
        self._ended = threading.Event()

    def _exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._ended.set()

    def poll(self) -> int | None:
        """The exit code if the worker has ended, else None."""
        if self.returncode is None and self.host.output.done():
            host_code = self.host.process.poll()
            self._exited(host_code if host_code is not None else -1)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the worker's end (as ``Popen.wait``: ``TimeoutExpired`` after ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"slot worker {self.pid}", timeout or 0.0)
            self._ended.wait(0.05 if left is None else min(0.05, left))
        assert self.returncode is not None
        return self.returncode

    def __repr__(self) -> str:
        return f"<WorkerProcess pid={self.pid} returncode={self.returncode} on {self.host.label}>"


class HostOutput:
    """A host daemon's output pipe, read in the driver's output thread and routed by worker."""

    def __init__(self, label: str, stream: IO[bytes], log_dir: str | None) -> None:
        self.label = label
        self.name = f"isdgrid-output-{label}"
        self._stream = stream
        self._partial = b""
        self._lock = threading.Lock()
        self._expected: dict[int, tuple[SlotOutput, WorkerProcess]] = {}  # by slot, until the fork is reported
        self._workers: dict[int, tuple[SlotOutput, WorkerProcess]] = {}  # by pid
        self._done = threading.Event()
        self.recent_lines: list[str] = []
        self._log_file: IO[str] | None = None
        if log_dir:
            self._log_file = open_log(log_dir, f"{label}-hostd.log".replace(os.sep, "_"))

    # -- the launcher's side ---------------------------------------------------------------
    def expect(self, slot: int, output: SlotOutput, worker: WorkerProcess) -> None:
        """Route the next worker started for ``slot`` to ``output``."""
        with self._lock:
            if not self._done.is_set():
                self._expected[slot] = (output, worker)
                return
        output.finish()  # the host daemon is gone: no worker will come

    def forget(self, slot: int) -> None:
        """No worker will come for ``slot`` (its spawn could not be sent)."""
        with self._lock:
            entry = self._expected.pop(slot, None)
        if entry is not None:
            entry[0].finish()

    def done(self) -> bool:
        """True once the host daemon's output has ended and been read."""
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def start(self) -> None:
        output_reader().add(self)

    # -- the output thread's side ----------------------------------------------------------
    def fileno(self) -> int:
        return self._stream.fileno()

    def read_some(self) -> bool:
        """Read what the pipe holds now and route its whole lines; False at its end."""
        try:
            data = os.read(self._stream.fileno(), 65536)
        except (BlockingIOError, InterruptedError):
            return True
        except (OSError, ValueError):
            data = b""
        if not data:
            if self._partial:
                self._line(self._partial)
                self._partial = b""
            return False
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            self._line(raw)
        return True

    def _line(self, raw: bytes) -> None:
        if raw.startswith(WORKER_MARK.encode()):
            head, _, rest = raw[1:].partition(b" ")
            with self._lock:
                entry = self._workers.get(int(head)) if head.isdigit() else None
            if entry is not None:
                entry[0].line(rest)
            else:
                self._own(rest.decode("utf-8", "replace"))
            return
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith(WORKER_PREFIX):
            self._forked(line[len(WORKER_PREFIX):].split())
        elif line.startswith(EXIT_PREFIX):
            self._ended(line[len(EXIT_PREFIX):].split())
        elif not line.startswith(HOST_PREFIX):  # the host daemon's "ready" says nothing the slots will not
            self._own(line)

    def _forked(self, words: list[str]) -> None:
        slot, pid = int(words[0]), int(words[1])
        with self._lock:
            entry = self._expected.pop(slot, None)
            if entry is None:
                return
            entry[1].pid = pid
            self._workers[pid] = entry

    def _ended(self, words: list[str]) -> None:
        slot, pid, code = int(words[0]), int(words[1]), int(words[2])
        with self._lock:
            entry = self._workers.pop(pid, None) if pid else self._expected.pop(slot, None)
        if entry is not None:
            entry[1]._exited(code)
            entry[0].finish()

    def _own(self, text: str) -> None:
        """A line of the host daemon itself (its log, or what ssh/srun/qrsh said)."""
        self.recent_lines.append(text)  # the latest ones: what a failed start shows
        del self.recent_lines[:-200]
        if self._log_file is not None:
            try:
                self._log_file.write(text + "\n")
            except (OSError, ValueError):
                pass
        remote_log.info("[%s] %s", self.label, text)

    def finish(self) -> None:
        """The host daemon's output ended: every worker it had ends with it."""
        with self._lock:
            entries = [*self._expected.values(), *self._workers.values()]
            self._expected.clear()
            self._workers.clear()
            self._done.set()
        for output, _ in entries:
            output.finish()
        if self._log_file is not None:
            self._log_file.close()
        with contextlib.suppress(OSError, ValueError):
            self._stream.close()  # here, once the output thread no longer watches it (its number may come again)


class HostProcess:
    """One host daemon started by a launcher: its process, its output, the workers it forked."""

    def __init__(self, spec: SlotSpec, process: subprocess.Popen[bytes], command: list[str],
                 log_dir: str | None, forward: bool) -> None:
        assert process.stdout is not None
        self.spec = spec
        self.label = spec.host.name
        self.process = process
        self.command = command
        self.forward = forward
        self.log_dir = log_dir
        self.output = HostOutput(self.label, process.stdout, log_dir)
        self._stdin_lock = threading.Lock()
        self.closing = False
        self.workers: dict[int, WorkerProcess] = {}  # the current worker of each slot
        self.output.start()

    def alive(self) -> bool:
        """True while the host daemon runs and takes commands."""
        return not self.closing and self.process.poll() is None and not self.output.done()

    def send(self, line: str) -> bool:
        """Write one command line to the host daemon; False if it is gone."""
        with self._stdin_lock:
            if self.process.stdin is None or self.process.stdin.closed:
                return False
            try:
                self.process.stdin.write(line.encode() + b"\n")
                self.process.stdin.flush()
                return True
            except (OSError, ValueError):
                return False

    def spawn(self, spec: SlotSpec, gpu: str) -> tuple[SlotOutput, WorkerProcess]:
        """Ask for a worker for ``spec``; its output (the URI first) comes to the returned SlotOutput."""
        output = SlotOutput(spec, self.log_dir, self.forward)
        worker = WorkerProcess(self)
        self.output.expect(spec.slot, output, worker)
        self.workers[spec.slot] = worker
        if not self.send(f"spawn {spec.slot} {spec.rank} {gpu}"):
            self.output.forget(spec.slot)
        return output, worker

    def stop_slot(self, slot: int) -> None:
        """Ask the host daemon to end ``slot``'s worker (its process group)."""
        self.send(f"stop {slot}")

    def live_slots(self) -> set[int]:
        return {slot for slot, worker in self.workers.items() if worker.poll() is None}

    def close_stdin(self, retire: bool = False) -> None:
        """End the host daemon: ``retire`` first if the grid goes on, then the end of its stdin."""
        self.closing = True
        with self._stdin_lock:
            stdin = self.process.stdin
            if stdin is None:
                return
            try:
                if retire:
                    stdin.write(b"retire\n")
                    stdin.flush()
            except (OSError, ValueError):
                pass
            try:
                stdin.close()
            except (OSError, ValueError):
                pass
