"""A host daemon started by hand: ``isdgrid daemon --slots N``.

Where the driver cannot start processes on the compute nodes, the user starts one of these
per node. It is the host daemon of :mod:`isdgrid.hostd` without a grid behind its stdin:
it forks its N slot workers at once, each serving on a port of its own, and a grid attaches
to them (``Grid.attach``) by their URIs or through a Pyro5 name server.

- stdout: one ``ISDGRID-URI PYRO:isdgrid.agent@HOST:PORT`` line per worker, as each serves;
  ``--uri-file F`` gets the N URIs (one a line, slot order) once all serve.
- ``--nameserver HOST:PORT --group G``: worker i registers as ``isdgrid.G.<label>_<i>``
  (label: ``--label``, else ``<hostname>-<pid>``) and unregisters when it ends.
- stderr: its log, and what the published objects print, prefixed ``[label/slot]``.
- Ctrl-C or SIGTERM ends every worker (its stdin closed, its process group killed if it
  is still there after ``--stop-timeout``); it also ends once no worker is left. A worker that ends is not
  started again: a grid attached to it sees its slot lost.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from . import daemon
from .announce import STDERR_MARK, STDOUT_MARK, parse_announcement
from .errors import GridError
from .hostd import HostDaemon, _LineHandler, _Pipe, _write_all, build_parser
from .nameserver import check_group

__all__ = ["HandStartedHostDaemon", "main"]

log = logging.getLogger("isdgrid.hostd")


class HandStartedHostDaemon(HostDaemon):
    """A host daemon that forks ``--slots`` workers itself and takes no commands."""

    commands_on_stdin = False
    # No TERM: a worker whose stdin closes unregisters from the name server and ends; a TERM
    # could cut that short (KeyboardInterrupt). CONT wakes a stopped one; KILL comes at the deadline.
    stop_signals = (signal.SIGCONT,)

    def __init__(self, secret: str, args: argparse.Namespace) -> None:
        super().__init__(secret, args)
        self.uris: dict[int, str] = {}

    def run(self, pending_stdin: bytes = b"") -> int:
        spawns = "".join(f"spawn {slot} {slot} -\n" for slot in range(self.args.slots))
        return super().run(spawns.encode())

    def _serve_options(self, slot: int) -> dict[str, Any]:
        options: dict[str, Any] = {"port": self.args.port + slot if self.args.port else 0}
        if self.args.nameserver:
            options.update(nameserver=self.args.nameserver, group=self.args.group)
        return options

    def _tell(self, report: str) -> None:
        log.debug("%s: %s", self.label, report)

    def _relay(self, pipe: _Pipe, lines: list[bytes]) -> None:
        slot = pipe.worker.slot
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            uri = parse_announcement(line) if not pipe.mark and slot not in self.uris else None
            if uri is not None:
                self._served(slot, uri, line)
                continue
            for mark in (STDOUT_MARK, STDERR_MARK):
                if line.startswith(mark):
                    line = line[len(mark):]
            _write_all(2, f"[{self.label}/{slot}] {line}\n".encode("utf-8", "replace"))

    def _served(self, slot: int, uri: str, line: str) -> None:
        self.uris[slot] = uri
        _write_all(1, f"{line}\n".encode())
        if self.args.uri_file and len(self.uris) == self.args.slots:
            tmp = self.args.uri_file + ".tmp"
            with open(tmp, "w") as fh:
                fh.writelines(f"{self.uris[i]}\n" for i in sorted(self.uris))
            os.replace(tmp, self.args.uri_file)
            log.info("%s: the %d URIs are in %s", self.label, len(self.uris), self.args.uri_file)

    def _reap(self) -> None:
        super()._reap()
        if not self.workers and not self.queued and self.stopping_at is None:
            log.info("%s: no worker is left; ending", self.label)
            self._stop_all()


def build_hand_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    parser.prog = "isdgrid daemon --slots N"
    parser.add_argument("--slots", type=int, required=True, help="number of slot workers to fork")
    parser.add_argument("--port", type=int, default=0, help="slot i listens on PORT+i (default 0: any free port)")
    parser.add_argument("--secret-file", help="file holding the grid secret (mode 600)")
    parser.add_argument("--uri-file", help="write the workers' URIs to this file, one a line")
    parser.add_argument("--nameserver", metavar="HOST:PORT", help="register the workers at this Pyro5 name server")
    parser.add_argument("--group", default="default", help="name server group the grid attaches to")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run a hand-started host daemon until Ctrl-C, SIGTERM, or the end of its last worker."""
    args = build_hand_parser().parse_args(argv)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_LineHandler(2))
    root.setLevel(getattr(logging, str(args.log_level).upper(), logging.INFO))
    if args.slots < 1:
        raise SystemExit(f"isdgrid daemon: --slots must be at least 1, not {args.slots}")
    if args.nameserver:
        try:
            check_group(args.group)
        except GridError as exc:
            raise SystemExit(f"isdgrid daemon: {exc}") from None
    secret = daemon._read_secret(args)
    args.label = args.label or f"{socket.gethostname()}-{os.getpid()}"
    code = 0
    try:
        host = HandStartedHostDaemon(secret, args)
        host.load()
        code = host.run()
    except KeyboardInterrupt:
        code = 0
    except (GridError, ImportError, OSError) as exc:
        sys.stderr.write(f"isdgrid daemon: {exc}\n")
        code = 1
    os._exit(code)
