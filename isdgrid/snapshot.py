"""Snapshots: the state of every server of a service, taken between calls.

A snapshot is taken by a *snapshot operation* that travels in each server's call stream
like any call: the agent runs it after the calls made before it and before those made
after it, pickles the published object there (as ``publish`` shipped it: the object's
``__getstate__`` decides what goes in) and sends the bytes back. The driver keeps the
latest bytes of each server (a respawned slot starts from them) and hands the whole set
back as a :class:`Snapshot`, which can be saved to a file and restored, in place or on
another grid, by a *restore operation* in the same call stream. A restore is all or
nothing (each host keeps the object it replaced until the grid says done or undo), and
what it restored is what a respawn brings back.

A file is a header (magic line, format, length, SHA-256) and the pickled record; loading
checks the checksum before unpickling and refuses files other users could have written.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import pickle
import pwd
import re
import socket
import stat
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import codec
from .errors import CheckpointError, GridError, RemoteError
from .result import Result

if TYPE_CHECKING:
    from .server import Server
    from .service import Service

__all__ = [
    "Snapshot",
    "check_fields",
    "read_record",
    "remove_stale_temps",
    "restore_service",
    "snapshot_service",
    "write_atomically",
    "write_record",
]

log = logging.getLogger(__name__)

_FORMAT = "isdgrid-snapshot"
_VERSION = 1

# A checkpoint file: this magic line, the header, then the pickled record (read_record).
_MAGIC = b"isdgrid checkpoint\n"
_HEADER = struct.Struct(">HQ32s")  # file format, payload length, SHA-256 of the payload
_FILE_VERSION = 2  # 1: the bare pickle that isdgrid wrote before
_order = itertools.count()  # places of snapshot and restore operations in call streams (_submit)
_order_lock = threading.Lock()
STALE_TEMP_AGE = 3600.0  # seconds after which a temp file of a save is left over whoever wrote it
_HOST = re.sub(r"[^\w.-]", "_", socket.gethostname())


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
        """Write the snapshot to ``path`` atomically (a crash leaves the old file or the new one).

        Raises :class:`CheckpointError` when it cannot (a missing folder, a full disk).
        """
        write_record(path, self.to_record(), "snapshot")

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, trust: bool = False) -> Snapshot:
        """Read a snapshot written by :meth:`save`.

        Loading unpickles the file, which runs any code it holds: a file another user owns
        or that others can write is refused unless ``trust`` is true (see :func:`read_record`).
        """
        return cls.from_record(read_record(path, "snapshot", trust=trust), repr(os.fspath(path)))

    @classmethod
    def from_record(cls, record: Any, where: str = "the record") -> Snapshot:
        """A snapshot from the dict :meth:`save` writes (embedded in a driver's own file)."""
        if not isinstance(record, dict) or record.get("format") != _FORMAT:
            raise CheckpointError(f"{where} is not an isdgrid snapshot")
        if record.get("version") != _VERSION:
            raise CheckpointError(f"{where} is a snapshot of format version {record.get('version')}, not {_VERSION}")
        check_fields(
            record, where, "snapshot",
            {"service_id": str, "class_name": str, "states": list, "taken_at": (int, float), "seconds": (int, float)},
        )  # fmt: skip
        if not all(isinstance(state, bytes) for state in record["states"]):
            raise CheckpointError(f"{where} is a damaged snapshot: its states are not all bytes")
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


def check_fields(record: dict[str, Any], where: str, what: str, types: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` unless ``record`` has every key of ``types``, of that type."""
    for key, kind in types.items():
        if key not in record:
            raise CheckpointError(f"{where} is a damaged {what}: it has no {key!r}")
        if not isinstance(record[key], kind):
            raise CheckpointError(f"{where} is a damaged {what}: its {key!r} is a {type(record[key]).__name__}")


def write_record(path: str | os.PathLike[str], record: Any, what: str) -> None:
    """Save ``record`` to ``path`` atomically, as a checkpoint file (see :func:`read_record`).

    Every failure (a missing folder, a full disk, a record that cannot be pickled) is a
    :class:`CheckpointError` naming the file.
    """
    where = repr(os.fspath(path))
    try:
        payload = pickle.dumps(record, protocol=codec.PROTOCOL)
    except Exception as exc:
        raise CheckpointError(f"cannot write {what} file {where}: {type(exc).__name__}: {exc}") from exc
    header = _MAGIC + _HEADER.pack(_FILE_VERSION, len(payload), hashlib.sha256(payload).digest())
    try:
        write_atomically(path, header + payload)
    except OSError as exc:
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        why = f"the folder {folder!r} does not exist" if not os.path.isdir(folder) else exc.strerror or str(exc)
        raise CheckpointError(f"cannot write {what} file {where}: {why}") from exc


def read_record(path: str | os.PathLike[str], what: str, *, trust: bool = False) -> Any:
    """Read what :func:`write_record` wrote to ``path``; a :class:`CheckpointError` naming the file if it cannot.

    The file is a header (a magic line, the format version, the length and the SHA-256 of
    the payload) and the pickled record: a damaged or cut file is refused before anything
    is unpickled. Unpickling runs whatever code the file holds, so unless ``trust`` is true
    a file another user owns, or that its group or others can write, is refused.
    """
    where = repr(os.fspath(path))
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not trust:
                _check_trusted(info, where, what)
            head = f.read(len(_MAGIC) + _HEADER.size)
            if not head.startswith(_MAGIC):
                raise CheckpointError(f"cannot read {what} file {where}: {_not_ours(head)}")
            if len(head) < len(_MAGIC) + _HEADER.size:
                raise CheckpointError(f"cannot read {what} file {where}: it is cut short (a damaged file)")
            version, length, digest = _HEADER.unpack_from(head, len(_MAGIC))
            if version != _FILE_VERSION:
                raise CheckpointError(
                    f"cannot read {what} file {where}: it has file format {version}; this isdgrid reads {_FILE_VERSION}"
                )
            if info.st_size != len(head) + length:
                raise CheckpointError(
                    f"cannot read {what} file {where}: it has {info.st_size - len(head)} bytes of data where its "
                    f"header says {length} (a damaged or cut file)"
                )
            payload = f.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"no {what} file {where}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} file {where}: {exc.strerror or exc}") from exc
    if len(payload) != length or not hmac.compare_digest(hashlib.sha256(payload).digest(), digest):
        raise CheckpointError(f"cannot read {what} file {where}: its checksum does not match (a damaged file)")
    try:
        return pickle.loads(payload)
    except Exception as exc:  # whatever the payload raises is the file's failure
        raise CheckpointError(f"cannot read {what} file {where}: {type(exc).__name__}: {exc}") from exc


def _not_ours(head: bytes) -> str:
    """Why a file without our magic line is refused."""
    if head[:1] == b"\x80":  # a bare pickle: what isdgrid wrote before its files had a header
        return (
            "it was written by an older isdgrid (a file without a checksum), which this version no longer "
            "reads; go on with the isdgrid that wrote it"
        )
    return "it is not an isdgrid checkpoint file"


def _check_trusted(info: os.stat_result, where: str, what: str) -> None:
    """Refuse a file another user owns or that its group or others can write (unpickling it runs its code)."""
    why = ""
    if info.st_uid not in (os.geteuid(), 0):
        try:
            owner = f"user {pwd.getpwuid(info.st_uid).pw_name!r}"
        except KeyError:
            owner = "another user"
        why = f"it belongs to {owner} (uid {info.st_uid}), not to you"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        why = f"its group or others can write it (mode {stat.S_IMODE(info.st_mode):04o}; chmod go-w fixes that)"
    if why:
        raise CheckpointError(
            f"refusing to load {what} file {where}: {why}; loading unpickles it, which runs any code it holds. "
            "Pass trust=True (isdgrid demo --trust-checkpoint) only if you trust whoever could write it"
        )


def write_atomically(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` by a rename: readers see the old file or the whole new one (mode 0600).

    ``durable``: the data is on disk (fsync) before the rename, and the rename before this
    returns; a file rewritten every second for readers on this machine can skip that.
    """
    target = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(target)
    remove_stale_temps(folder, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.isdgrid-{_HOST}-{os.getpid()}.", suffix=".tmp", dir=folder)
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


def remove_stale_temps(folder: str, name: str) -> list[str]:
    """Remove the temp files a killed writer of ``folder/name`` left; their names.

    Ours only: named ``.NAME.isdgrid-HOST-PID.XXXX.tmp`` (or ``.NAME.XXXX.tmp``, as older
    versions named them), owned by this user, and either written on this host by a
    process that is gone or untouched for ``STALE_TEMP_AGE`` seconds.
    """
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:isdgrid-(?P<host>[\w.-]*)-(?P<pid>\d+)\.)?[a-z0-9_]+\.tmp")
    try:
        entries = os.listdir(folder)
    except OSError:
        return []  # writing there will say why
    removed = []
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match is None:
            continue
        temp = os.path.join(folder, entry)
        try:
            info = os.lstat(temp)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            continue
        pid = int(match["pid"]) if match["pid"] else None
        dead = match["host"] == _HOST and pid is not None and pid != os.getpid() and not _alive(pid)
        if dead or time.time() - info.st_mtime > STALE_TEMP_AGE:
            with contextlib.suppress(OSError):
                os.unlink(temp)
                removed.append(temp)
                log.info("removed %s, left by a writer that was killed while saving", temp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def _submit(server: Server, kind: str, args: tuple[Any, ...]) -> tuple[Result, int]:
    """Queue a snapshot or restore operation in the server's call stream; its place among them.

    The place is taken under a lock with the submission, so on every server the places of
    these operations grow in the order they run (``Server.keep_snapshot`` relies on it).
    """
    data, buffers = codec.encode_op(kind, "", args, None, codec.OOB_MIN)
    result = Result(server, kind, "")
    with _order_lock:
        order = next(_order)
        server.submit(data, buffers, result, counted=False)
    return result, order


def _outcomes(results: list[Result], deadline: float | None) -> list[Any]:
    """Wait for every result (bounded); each outcome is its value or its error."""
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
    submitted = [_submit(server, codec.SNAPSHOT, ()) for server in servers]
    outcomes = _outcomes([result for result, _ in submitted], None if timeout is None else start + timeout)
    seconds = time.monotonic() - start
    for server, (_, order), outcome in zip(servers, submitted, outcomes, strict=True):
        if isinstance(outcome, bytes):
            server.keep_snapshot(outcome, taken_at, order)
    for server, outcome in zip(servers, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            raise _op_error(service, server, outcome, "checkpoint")
    snapshot = Snapshot(service.id, service.class_name, tuple(outcomes), taken_at, seconds)
    log.info("snapshot of %s: %d servers, %d bytes, %.1f ms", service.id, len(servers), snapshot.nbytes, seconds * 1e3)
    return snapshot


def _op_error(service: Service, server: Server, error: BaseException, verb: str, note: str = "") -> BaseException:
    """The error a failed snapshot or restore operation raises: lost, terminated as they are, else a CheckpointError."""
    if isinstance(error, GridError) and not isinstance(error, RemoteError):
        return error
    text = str(error)
    cause = error.__cause__
    remote_tb = getattr(cause, "tb", "") or getattr(error, "remote_traceback", "") or ""
    err = CheckpointError(
        f"cannot {verb} service {service.id!r} on {server.slot.label}: {text}{note}",
        host=server.host, slot=server.slot_index, class_name=service.class_name, remote_traceback=str(remote_tb),
    )
    err.__cause__ = error
    return err


def restore_service(service: Service, snapshot: Snapshot, timeout: float | None) -> None:
    """Put server ``i`` of ``service`` back to ``snapshot.states[i]``, in each call stream: all or nothing.

    Calls made on a server before this run before the restore; calls made after it run
    on the restored object. Each host keeps the object a restore replaced until every
    server has loaded its state: when one fails (or is lost, or the wait times out) every
    server is put back to its state from before, in its call stream. Once all have
    loaded, the restored states are what a respawn brings back. Raises
    :class:`CheckpointError` for a snapshot of another class or size, or a state that
    fails to load (naming the server), :class:`HostLostError` for a lost server,
    ``TimeoutError``.
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
    deadline = None if timeout is None else start + timeout
    restored_at = time.time()
    token = os.urandom(8).hex()  # pairs each host's undo (or done) with this restore
    submitted: list[tuple[Result, int]] = []
    try:
        for server, state in zip(servers, snapshot.states, strict=True):
            submitted.append(_submit(server, codec.RESTORE, (state, token)))
        outcomes = _outcomes([result for result, _ in submitted], deadline)
    except BaseException as exc:
        _follow_up(servers[: len(submitted)], codec.RESTORE_UNDO, token)  # not waited for: time is up
        if isinstance(exc, TimeoutError):
            raise TimeoutError(
                f"restore of {service.id!r}: {exc}; every server is put back to its state from before the "
                "restore, in its call order"
            ) from None
        raise
    failed = [(i, outcome) for i, outcome in enumerate(outcomes) if isinstance(outcome, BaseException)]
    if not failed:
        _follow_up(servers, codec.RESTORE_DONE, token)  # the hosts drop the replaced objects
        for server, state, (_, order) in zip(servers, snapshot.states, submitted, strict=True):
            server.keep_snapshot(state, restored_at, order)
        log.info("restored %s from the snapshot of %s (%d servers)", service.id, snapshot.service_id, len(servers))
        return
    undone = _follow_up(servers, codec.RESTORE_UNDO, token)
    try:
        _outcomes(undone, deadline)  # a host lost meanwhile respawns with its kept state, unchanged
    except TimeoutError:
        log.warning("restore of %s: not every server confirmed its undo in time", service.id)
    index, outcome = failed[0]
    note = (
        f" (server {index} of {len(servers)}, a {service.class_name}); every server is back to its state from "
        "before the restore"
    )
    raise _op_error(service, servers[index], outcome, "restore", note)


def _follow_up(servers: list[Server], kind: str, token: str) -> list[Result]:
    """Queue the undo or the end of restore ``token`` on each server that takes calls; their results."""
    results = []
    for server in servers:
        try:
            results.append(_submit(server, kind, (token,))[0])
        except GridError as exc:  # terminated: nothing left to put back
            log.debug("%s of a restore not queued on %s: %s", kind, server.slot.label, exc)
    return results
