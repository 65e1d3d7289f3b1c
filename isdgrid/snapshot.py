"""Snapshots: the state of every server of a service, taken between calls.

A snapshot is taken by a *snapshot operation* that travels in each server's call stream
like any call: the agent runs it after the calls made before it and before those made
after it, pickles the published object there (as ``publish`` shipped it: the object's
``__getstate__`` decides what goes in) and sends the bytes back. The driver keeps the
latest bytes of each server (a respawned slot starts from them) and hands the whole set
back as a :class:`Snapshot`, which can be saved to a file and restored, in place or on
another grid, by a *restore operation* in the same call stream.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import pickle
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import codec
from .errors import CheckpointError, GridError, RemoteError
from .result import Result

if TYPE_CHECKING:
    from .server import Server
    from .service import Service

__all__ = ["Snapshot", "read_record", "restore_service", "snapshot_service", "write_atomically"]

log = logging.getLogger(__name__)

_FORMAT = "isdgrid-snapshot"
_VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    """The pickled objects of every server of one service, in server order.

    ``states[i]`` is server ``i``'s object as its host pickled it; ``taken_at`` is the
    wall-clock time (``time.time()``) the snapshot was asked for, ``seconds`` how long it
    took until every server had answered.
    """

    service_id: str
    class_name: str
    states: tuple[bytes, ...]
    taken_at: float
    seconds: float

    @property
    def nbytes(self) -> int:
        """Size of all states, in bytes."""
        return sum(len(s) for s in self.states)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the snapshot to ``path`` atomically (a crash leaves the old file or the new one)."""
        write_atomically(path, pickle.dumps(self.to_record(), protocol=codec.PROTOCOL))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Snapshot:
        """Read a snapshot written by :meth:`save` (a pickle: load only files you wrote)."""
        return cls.from_record(read_record(path, "snapshot"), str(os.fspath(path)))

    @classmethod
    def from_record(cls, record: Any, where: str = "the record") -> Snapshot:
        """A snapshot from the dict :meth:`save` writes (embedded in a driver's own file)."""
        if not isinstance(record, dict) or record.get("format") != _FORMAT:
            raise CheckpointError(f"{where} is not an isdgrid snapshot")
        if record.get("version") != _VERSION:
            raise CheckpointError(f"{where} is a snapshot of format version {record.get('version')}, not {_VERSION}")
        return cls(
            record["service_id"], record["class_name"], tuple(record["states"]), record["taken_at"], record["seconds"]
        )

    def to_record(self) -> dict[str, Any]:
        """The plain dict :meth:`save` writes (for drivers that keep it inside their own file)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "service_id": self.service_id,
            "class_name": self.class_name,
            "states": list(self.states),
            "taken_at": self.taken_at,
            "seconds": self.seconds,
        }

    def __repr__(self) -> str:
        return (
            f"<Snapshot of {self.service_id}: {len(self.states)} servers, {self.nbytes} bytes, "
            f"taken in {self.seconds * 1e3:.1f} ms>"
        )


def read_record(path: str | os.PathLike[str], what: str) -> Any:
    """Unpickle what a ``save`` wrote to ``path``; a :class:`CheckpointError` naming the file if it cannot."""
    where = repr(os.fspath(path))
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no {what} file {where}") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as exc:
        raise CheckpointError(f"cannot read {what} file {where}: {exc}") from exc


def write_atomically(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` by a rename: readers see the old file or the whole new one (mode 0600).

    ``durable``: the data is on disk (fsync) before the rename, and the rename before this
    returns; a file rewritten every second for readers on this machine can skip that.
    """
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    with contextlib.suppress(OSError):  # the rename itself on disk; not every file system allows it
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _submit(server: Server, kind: str, args: tuple[Any, ...]) -> Result:
    """Queue a snapshot or restore operation in the server's call stream."""
    data, buffers = codec.encode_op(kind, "", args, None, codec.OOB_MIN)
    result = Result(server, kind, "")
    server.submit(data, buffers, result, counted=False)
    return result


def _outcomes(results: list[Result], deadline: float | None) -> list[Any]:
    """Wait for every result (bounded); each outcome is its value or its error.

    Each is waited for with its own ``exception()``, which reads replies in this thread
    (as ``gather`` does), rather than ``concurrent.futures.wait``, which leaves that to the
    slot's reader thread and the sweeper (about 2 ms later).
    """
    outcomes: list[Any] = []
    for i, result in enumerate(results):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            exc = result.exception(left)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{len(results) - i} of {len(results)} servers did not answer in time") from None
        outcomes.append(exc if exc is not None else result.result())
    return outcomes


def snapshot_service(service: Service, timeout: float | None) -> Snapshot:
    """Take a snapshot of every server of ``service`` (see the module docstring).

    Each server that answers keeps its new state (for a respawn) even when another fails.
    Raises :class:`CheckpointError` naming the class and the host for an object that
    cannot be pickled, :class:`HostLostError` for a lost server, ``TimeoutError``.
    """
    servers = list(service.servers)
    taken_at = time.time()
    start = time.monotonic()
    results = [_submit(server, codec.SNAPSHOT, ()) for server in servers]
    outcomes = _outcomes(results, None if timeout is None else start + timeout)
    seconds = time.monotonic() - start
    for server, outcome in zip(servers, outcomes, strict=True):
        if isinstance(outcome, bytes):
            server.keep_snapshot(outcome, taken_at)
    for server, outcome in zip(servers, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            raise _op_error(service, server, outcome, "checkpoint")
    snapshot = Snapshot(service.id, service.class_name, tuple(outcomes), taken_at, seconds)
    log.info("snapshot of %s: %d servers, %d bytes, %.1f ms", service.id, len(servers), snapshot.nbytes, seconds * 1e3)
    return snapshot


def _op_error(service: Service, server: Server, error: BaseException, verb: str) -> BaseException:
    """The error a failed snapshot or restore operation raises: lost, terminated as they are, else a CheckpointError."""
    if isinstance(error, GridError) and not isinstance(error, RemoteError):
        return error
    text = str(error)
    cause = error.__cause__
    remote_tb = getattr(cause, "tb", "") or getattr(error, "remote_traceback", "") or ""
    err = CheckpointError(
        f"cannot {verb} service {service.id!r} on {server.slot.label}: {text}",
        host=server.host, slot=server.slot_index, class_name=service.class_name, remote_traceback=str(remote_tb),
    )
    err.__cause__ = error
    return err


def restore_service(service: Service, snapshot: Snapshot, timeout: float | None) -> None:
    """Put server ``i`` of ``service`` back to ``snapshot.states[i]``, in each call stream.

    Calls made on a server before this run before the restore; calls made after it run
    on the restored object. Raises :class:`CheckpointError` for a snapshot of another
    class or size, :class:`HostLostError` for a lost server, ``TimeoutError``.
    """
    servers = list(service.servers)
    if len(snapshot.states) != len(servers):
        raise CheckpointError(
            f"the snapshot of {snapshot.service_id!r} has {len(snapshot.states)} servers, service {service.id!r} "
            f"has {len(servers)}: restore it on a grid with as many slots"
        )
    if snapshot.class_name != service.class_name:
        raise CheckpointError(
            f"the snapshot holds {snapshot.class_name} objects, service {service.id!r} is a {service.class_name}"
        )
    start = time.monotonic()
    results = [_submit(server, codec.RESTORE, (state,)) for server, state in zip(servers, snapshot.states, strict=True)]
    outcomes = _outcomes(results, None if timeout is None else start + timeout)
    for server, state, outcome in zip(servers, snapshot.states, outcomes, strict=True):
        if not isinstance(outcome, BaseException):
            server.keep_snapshot(state, snapshot.taken_at)
    for server, outcome in zip(servers, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            raise _op_error(service, server, outcome, "restore")
    log.info("restored %s from the snapshot of %s (%d servers)", service.id, snapshot.service_id, len(servers))
