"""The daemon's side of output forwarding: every line on fds 1 and 2, marked stdout or stderr.

The daemon's launcher reads one pipe (the daemon's stdout; ssh, srun and qrsh merge stderr
into it anyway), so the daemon marks each line (:mod:`isdgrid.announce`) and the driver's
:class:`~isdgrid.launchers.base.SlotOutput` routes it to its own stdout or stderr with the
slot's prefix. The daemon's own log lines stay unmarked and go to the driver's logging.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
import threading
import time
from typing import Any

from .announce import STDERR_MARK, STDOUT_MARK

__all__ = ["TaggedOutput"]


class _LogWriter(io.TextIOBase):
    """The log handlers' stream while output is marked: unmarked, whole, to the launcher."""

    def __init__(self, sink: TaggedOutput) -> None:
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._sink.send(text.encode("utf-8", "backslashreplace"))
        return len(text)


class TaggedOutput(contextlib.AbstractContextManager["TaggedOutput"]):
    """Marks every line written to file descriptors 1 and 2 as stdout or stderr.

    Each of the two becomes a pipe read by a thread here, so what Python code, C code and
    child processes write is marked alike; the threads pass whole lines, marked, to the
    launcher's pipe (the original stdout), as do the root logger's stream handlers
    (unmarked), all under one lock, so no two lines mix. The threads always read on: when
    the launcher's pipe is gone their lines are dropped, and a writer never blocks for
    good. On exit the original descriptors come back and the threads are joined (bounded).
    """

    MAX_LINE = 1 << 16  # a longer line without a newline is passed on in pieces

    def __init__(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        self._lock = threading.Lock()
        self._broken = False
        self._saved = {fd: os.dup(fd) for fd in (1, 2)}
        self._out = self._saved[1]
        writer = _LogWriter(self)
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                self._handlers.append((handler, handler.setStream(writer)))
        self._pumps: list[threading.Thread] = []
        for fd, mark in ((1, STDOUT_MARK), (2, STDERR_MARK)):
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            pump = threading.Thread(target=self._pump, args=(read_end, mark.encode()), name=f"output-{fd}",
                                    daemon=True)
            pump.start()
            self._pumps.append(pump)

    def send(self, data: bytes) -> None:
        """Write ``data`` to the launcher's pipe, whole, or drop it once that pipe is gone."""
        with self._lock:
            if self._broken:
                return
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._out, view):]
            except OSError:
                self._broken = True  # the launcher is gone: read on, pass nothing

    def _pump(self, fd: int, mark: bytes) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                if len(pending) >= self.MAX_LINE:
                    lines.append(pending)
                    pending = b""
                if lines:
                    self.send(b"".join(mark + line + b"\n" for line in lines))
        except OSError:
            pass
        finally:
            if pending:
                self.send(mark + pending + b"\n")
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 1.0) -> None:
        """Give fds 1 and 2 back and pass on what is left (bounded: a child may hold a pipe)."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        with contextlib.suppress(Exception):  # C code's printf, held by the C library (we end with _exit)
            ctypes.CDLL(None).fflush(None)
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # closes our pipe's write end: its thread reads to the end
        deadline = time.monotonic() + timeout
        for pump in self._pumps:
            pump.join(max(0.0, deadline - time.monotonic()))
        for handler, stream in self._handlers:
            handler.setStream(stream)
