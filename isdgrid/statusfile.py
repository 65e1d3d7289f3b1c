"""Status files: how a running grid tells ``isdgrid status`` what it is doing.

Each :class:`~isdgrid.Grid` (unless made with ``status_file=False``) keeps one small JSON
file in the run folder, rewritten atomically about once a second by a background thread
(less often on a grid so large that writing it would take more than 2 % of a core) and
removed at ``terminate()``:

- ``$ISDGRID_RUN_DIR`` when set, else
- ``$XDG_RUNTIME_DIR/isdgrid`` when ``XDG_RUNTIME_DIR`` names a folder, else
- ``~/.cache/isdgrid/run``.

The folder is made with mode 0700 and every file with mode 0600. A file holds the driver's
pid and command line, the hosts, the slots (address, lost or not) and the rows of
``grid.status()``; never the grid's secret. :func:`read_status_files` returns the files of
living drivers and removes those whose driver is gone (killed with ``kill -9``, say).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from .snapshot import write_atomically

if TYPE_CHECKING:
    from .grid import Grid

__all__ = [
    "FORMAT",
    "RUN_DIR_ENV",
    "StatusFileWriter",
    "format_status",
    "pid_alive",
    "read_status_files",
    "run_dir",
    "snapshot",
]

log = logging.getLogger(__name__)

FORMAT = "isdgrid-status/1"
RUN_DIR_ENV = "ISDGRID_RUN_DIR"
INTERVAL = 1.0


def run_dir() -> str:
    """The folder that holds the status files of this user's running grids."""
    explicit = os.environ.get(RUN_DIR_ENV)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "isdgrid")
    return os.path.join(os.path.expanduser("~"), ".cache", "isdgrid", "run")


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (and is not a zombie we could see)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0); on Linux /proc tells
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def snapshot(grid: Grid, started: float, interval: float = INTERVAL) -> dict[str, Any]:
    """The status document of ``grid`` (what a status file holds); ``interval``: the seconds
    until the writer updates it again."""
    launcher = getattr(grid, "_launcher", None)
    slots = []
    for slot in grid.slots:
        process = slot.handle.process
        spec = slot.handle.spec
        slots.append(
            {
                "host": slot.host.name,
                "slot": slot.index,
                "rank": spec.rank,
                "gpu": spec.gpu,
                "gpu_shared": slot.host.gpu_shared(slot.index),
                "label": slot.label,
                "uri": slot.uri,
                "process": process.pid if process is not None else None,
                "lost": slot.lost.is_set(),
                "lost_reason": slot.lost_reason,
            }
        )
    return {
        "format": FORMAT,
        "pid": os.getpid(),
        "command": list(sys.argv),
        "launcher": getattr(launcher, "name", "?"),
        "gpus_per_slot": getattr(launcher, "gpus_per_slot", 0),
        "state": grid.state.value,
        "started": started,
        "updated": time.time(),
        "interval": interval,
        "hosts": [{"name": h.name, "n_cpu": h.n_cpu, "python": h.python} for h in grid.hosts],
        "slots": slots,
        # The fields are plain values: a shallow copy is what dataclasses.asdict gives, at a
        # third of its cost (1,000 servers: 13.5 ms a time).
        "servers": [dict(vars(row)) for row in grid.status()],
    }


class StatusFileWriter:
    """Keeps one grid's status file up to date until :meth:`close` removes it.

    Writing never disturbs the grid: if the file cannot be written, that is logged once
    and the writer stops. It waits ``interval`` seconds between writes, or longer on a grid
    so large that a write takes more than ``MAX_SHARE`` of that (about 1.2 s at 1,000 slots),
    and says so in the file (``isdgrid status`` calls a file stale by its own interval).
    """

    MAX_SHARE = 0.02  # of one core, at most, for the writer

    def __init__(self, grid: Grid, path: str | None = None, interval: float = INTERVAL) -> None:
        self.path = path or os.path.join(run_dir(), f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
        self.interval = interval
        self._pause = interval  # until the next write, as the file last written says
        self._next_pause = interval  # what the next file will say: longer when writes cost much
        self._grid = grid
        self._started = time.time()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Write the file now, then refresh it every ``interval`` seconds."""
        if not self.write():
            return
        self._thread = threading.Thread(target=self._loop, name="isdgrid-statusfile", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._pause):
            if not self.write():
                return

    def write(self) -> bool:
        """Replace the file with a fresh snapshot; False (after one warning) on failure."""
        with self._lock:
            if self._stop.is_set():
                return False
            folder = os.path.dirname(self.path) or "."
            cost = time.thread_time()
            try:
                os.makedirs(folder, mode=0o700, exist_ok=True)
                text = json.dumps(snapshot(self._grid, self._started, self._next_pause), separators=(",", ":"))
                write_atomically(self.path, text.encode("utf-8"), durable=False)
            except (OSError, TypeError, ValueError) as exc:
                log.warning(
                    "cannot write the grid status file %s (%s); isdgrid status will not see this grid", self.path, exc
                )
                self._stop.set()
                return False
            self._pause = self._next_pause
            self._next_pause = max(self.interval, (time.thread_time() - cost) / self.MAX_SHARE)
            return True

    def close(self) -> None:
        """Stop refreshing and remove the file (idempotent)."""
        with self._lock:
            self._stop.set()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 5.0)


def read_status_files(folder: str | None = None, *, clean: bool = True) -> list[dict[str, Any]]:
    """The status documents of living drivers in ``folder`` (default: :func:`run_dir`).

    Files that cannot be parsed are skipped; with ``clean``, files of drivers that are
    gone are removed. Each document gets a ``"file"`` key with its path.
    """
    folder = folder or run_dir()
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    documents = []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("pid"), int):
            continue
        if not pid_alive(doc["pid"]):
            if clean:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            continue
        doc["file"] = path
        documents.append(doc)
    return documents


def format_status(documents: list[dict[str, Any]], now: float | None = None) -> list[str]:
    """Status documents as a table for people: one block per driver, one row per server."""
    now = time.time() if now is None else now
    lines: list[str] = []
    for doc in documents:
        command = " ".join(str(a) for a in doc.get("command", [])) or "?"
        age = now - float(doc.get("updated", now))
        interval = float(doc.get("interval", INTERVAL))
        stale = f", NOT UPDATED FOR {age:.0f} s (driver busy or stuck?)" if age > 5 * interval + 2 else ""
        lines.append(
            f"driver pid {doc['pid']}: {command} ({doc.get('launcher', '?')} launcher, "
            f"up {now - float(doc.get('started', now)):.0f} s, {doc.get('state', '?')}{stale})"
        )
        hosts = ", ".join(
            f"{h['name']} ({h['n_cpu']} slot{'s' if h['n_cpu'] != 1 else ''})" for h in doc.get("hosts", [])
        )
        lines.append(f"  hosts: {hosts or '-'}")
        slots = doc.get("slots", [])
        with_gpus = bool(doc.get("gpus_per_slot")) or any(slot.get("gpu") is not None for slot in slots)
        header = (
            f"  {'HOST':<16} {'SLOT':>4}  {_gpu_cell(None, doc) if with_gpus else ''}{'SERVICE':<24} {'STATE':<9} "
            f"{'BUSY':<4} {'CALLS':>7} {'PENDING':>7} {'MEAN ms':>9} {'SNAPSHOT':>9}"
        )
        lines.append(header)
        rows_of: dict[tuple[Any, Any], list[dict[str, Any]]] = {}  # (host, slot) -> its rows, in order
        for row in doc.get("servers", []):
            rows_of.setdefault((row.get("host"), row.get("slot")), []).append(row)
        for slot in slots:
            rows = rows_of.get((slot["host"], slot["slot"]), [])
            where = f"  {slot['host']:<16} {slot['slot']:>4}  {_gpu_cell(slot, doc) if with_gpus else ''}"
            if slot.get("lost"):
                lines.append(f"{where}LOST: {slot.get('lost_reason') or 'no answer'}")
                continue
            if not rows:
                lines.append(f"{where}{'(no service)':<24} {'idle':<9} {'free':<4}")
                continue
            for row in rows:
                lines.append(
                    f"{where}{row['service_id']:<24} {row['state']:<9} "
                    f"{'busy' if row['busy'] else 'free':<4} {row['calls']:>7} {row['pending']:>7} "
                    f"{row['mean_call_time'] * 1e3:>9.2f} {_snapshot_age(row, age):>9}"
                )
        lines.append("")
    return lines


def _gpu_cell(slot: dict[str, Any] | None, doc: dict[str, Any]) -> str:
    """The GPU column of a slot (its header for None): the device, "shared", or SLURM's binding."""
    if slot is None:
        text = "GPU"
    elif slot.get("gpu") is not None:
        text = f"{slot['gpu']}{' shared' if slot.get('gpu_shared') else ''}"
    elif doc.get("gpus_per_slot"):
        text = f"slurm x{doc['gpus_per_slot']}"
    else:
        text = "-"
    return f"{text:<10} "


def _snapshot_age(row: dict[str, Any], since_update: float) -> str:
    """How old a server's latest snapshot is now, for people ("-": none taken)."""
    age = row.get("snapshot_age")
    if age is None:
        return "-"
    seconds = float(age) + max(0.0, since_update)
    return f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.1f} h"
