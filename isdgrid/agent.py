"""The agent: the published copies of one daemon, and the exactly-once record of batches.

The driver never talks to a published object directly: it sends batches of operations
(over the calls channel, :mod:`isdgrid.wire`), which the agent applies in order to the
object of that service, one reply item per operation. The batches of one service run
one after the other, in the thread that :meth:`Agent.submit` hands the work to (the
daemon's connection thread, which saves a thread switch per call; see
:mod:`isdgrid.daemon` for how a long call does not hold up other services).
Each batch carries a sequence number; the agent keeps the replies of the last
``codec.MAX_FLIGHTS`` batches of each service, so a batch resent after a broken connection
is answered from that record instead of being run twice.

The control methods (``ping``, ``info``, ``identify``, ``publish``, ``unpublish``, ``put_files``,
``stage``...) come over the same connection as the batches (``wire.CONTROL`` frames) and
run through :meth:`Agent.control`.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
import socket
import sys
import tarfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import codec
from .errors import PayloadTooLargeError

__all__ = ["AGENT_ID", "CONTROL_METHODS", "Agent", "Reply"]

AGENT_ID = "isdgrid.agent"

STAGE_FOLDER = ".isdgrid-stage"  # in the host's folder: payloads staged once for all its slots

log = logging.getLogger(__name__)

# The reply of one batch: one ``(reply item, out-of-band buffers)`` per operation.
Reply = list[tuple[Any, codec.Buffers]]
Op = tuple[bytes, codec.Buffers]


@dataclass
class _Service:
    obj: Any
    last_seq: int = 0
    replies: dict[int, Reply] = field(default_factory=dict)  # the last MAX_FLIGHTS batches, for resends
    pending: deque[Any] = field(default_factory=deque)  # batches waiting to run, in order
    busy: bool = False  # a thread is running this service's batches
    queue_lock: threading.Lock = field(default_factory=threading.Lock)
    replaced: tuple[str, Any] | None = None  # (token, object) a restore replaced, until its done or undo


class Agent:
    """Loads shipped objects, runs operation batches on them, and receives files."""

    def __init__(self, temp_path: str, label: str) -> None:
        self.temp_path = temp_path
        self.label = label
        self.last_contact = time.monotonic()
        self.started = time.time()
        self.port: int | None = None
        self._services: dict[str, _Service] = {}
        self._lock = threading.Lock()

    def touch(self) -> None:
        """Note that the driver was heard from (the daemon's heartbeat watch reads it)."""
        self.last_contact = time.monotonic()

    def ping(self) -> float:
        """Heartbeat: returns the daemon's wall clock."""
        self.touch()
        return time.time()

    def control(self, method: str, args: tuple[Any, ...] | list[Any]) -> tuple[bool, Any]:
        """Run the control ``method``: ``(True, value)``, or ``(False, reply item of the error)``.

        An error raised on the host (a folder in the way of a copied file, say) reaches the
        driver as its own type, never mistaken for a broken connection.
        """
        if method not in CONTROL_METHODS:
            return False, codec.encode_error(AttributeError(f"no control method {method!r}"), 0.0, "")
        try:
            return True, getattr(self, method)(*args)
        except BaseException as exc:  # noqa: BLE001 - the error is the caller's to see
            log.warning("%s: %s failed: %s", self.label, method, exc)
            return False, codec.encode_error(exc, 0.0)

    def info(self) -> dict[str, Any]:
        """Who this daemon is: pid, host name, python, temp path and services."""
        self.touch()
        with self._lock:
            services = sorted(self._services)
        return {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "temp_path": self.temp_path,
            "sys_path": list(sys.path),  # where it imports from (publish errors show it)
            "label": self.label,
            "services": services,
            "started": self.started,
            "port": self.port,
        }

    def identify(self, host: str, slot: int, rank: int, gpu: str | None = None) -> None:
        """Take the place a grid that attached gives this daemon (``ISDGRID_HOST/SLOT/RANK``).

        A daemon the grid starts gets these on its command line; one started by hand gets
        them here, when a grid attaches, before anything is published.
        """
        self.touch()
        if not isinstance(host, str) or not all(isinstance(n, int) and not isinstance(n, bool) for n in (slot, rank)):
            raise TypeError("identify(host: str, slot: int, rank: int, gpu: str | None)")
        os.environ.update({"ISDGRID_HOST": host, "ISDGRID_SLOT": str(slot), "ISDGRID_RANK": str(rank)})
        if gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        log.info("%s: attached as %s/%d, rank %d", self.label, host, slot, rank)

    def publish(self, service_id: str, payload: bytes) -> str:
        """Load a pickled instance as ``service_id``; '' on success, else the traceback."""
        self.touch()
        try:
            obj = codec.loads(payload)
        except BaseException:  # noqa: BLE001 - the traceback goes back to the driver
            tb = traceback.format_exc()
            log.warning("%s: could not load service %s:\n%s", self.label, service_id, tb)
            return tb or "unknown error"
        service = _Service(obj)
        with self._lock:
            self._services[service_id] = service
        log.info("%s: published %s (%s)", self.label, service_id, type(obj).__qualname__)
        return ""

    def stage(self, payload: bytes) -> str:
        """Keep ``payload`` in the host's folder, for the host's other slots; returns its SHA-256.

        The folder is private to the grid's user (the daemon checked it at start), so a
        staged payload is as trustworthy as one received; its digest is checked again when
        it is read.
        """
        self.touch()
        digest = hashlib.sha256(payload).hexdigest()
        folder = os.path.join(self.temp_path, STAGE_FOLDER)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        path = os.path.join(folder, digest)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
        log.info("%s: staged %d bytes for the host's slots (%s)", self.label, len(payload), digest[:12])
        return digest

    def publish_staged(self, service_id: str, digest: str) -> str:
        """:meth:`publish` the payload another slot of this host staged; '' on success, else the traceback.

        Raises ``OSError`` or ``ValueError`` when the staged payload cannot be read or is
        damaged (its SHA-256 differs): the driver then sends the payload itself.
        """
        with open(self._staged_path(digest), "rb") as fh:
            payload = fh.read()
        if hashlib.sha256(payload).hexdigest() != digest:
            raise ValueError(f"the staged payload {digest[:12]} in {self.temp_path} is damaged")
        return self.publish(service_id, payload)

    def unstage(self, digest: str) -> bool:
        """Remove a staged payload; True if it was there."""
        try:
            os.unlink(self._staged_path(digest))
            return True
        except FileNotFoundError:
            return False

    def _staged_path(self, digest: str) -> str:
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ValueError(f"not a SHA-256 digest: {digest!r}")
        return os.path.join(self.temp_path, STAGE_FOLDER, digest)

    def unpublish(self, service_id: str) -> bool:
        """Forget ``service_id``; True when it was there."""
        self.touch()
        with self._lock:
            service = self._services.pop(service_id, None)
        if service is None:
            return False
        log.info("%s: unpublished %s", self.label, service_id)
        return True

    def submit(
        self,
        service_id: str,
        seq: int,
        ops: list[Op],
        max_reply: int,
        send: Callable[[str, int, Reply | BaseException], None],
    ) -> Callable[[], None] | None:
        """Queue a batch; ``send(service_id, seq, reply)`` gets its reply (or the error that stopped it).

        Returns the work to run now in the calling thread (the service was idle: run its
        batches until none is left), or None when a thread is already running them.
        """
        self.touch()
        service = self._services.get(service_id)  # a dict read is atomic
        if service is None:
            err = LookupError(f"service {service_id!r} is not published on {self.label}")
            send(service_id, seq, _failed(err, ops))
            return None
        with service.queue_lock:
            service.pending.append((seq, ops, max_reply, send))
            if service.busy:
                return None
            service.busy = True
        return lambda: self._drain(service_id, service)

    def _drain(self, service_id: str, service: _Service) -> None:
        """Run the service's waiting batches in order until none is left."""
        while True:
            with service.queue_lock:
                if not service.pending:
                    service.busy = False
                    return
                seq, ops, max_reply, send = service.pending.popleft()
            try:
                reply: Reply | BaseException = self._run(service, seq, ops, max_reply)
            except BaseException as exc:  # noqa: BLE001 - the service outlives any batch
                log.exception("%s: batch %d of %s failed", self.label, seq, service_id)
                reply = exc
            try:
                send(service_id, seq, reply)
            except BaseException:  # noqa: BLE001 - a dead connection: the driver resends
                log.debug("%s: reply of batch %d of %s not sent", self.label, seq, service_id, exc_info=True)

    def _run(self, service: _Service, seq: int, ops: list[Op], max_reply: int) -> Reply:
        """Apply operations in order to the object of ``service``; one reply item each.

        ``seq`` numbers the batches of one service; a batch with the number of one of the
        last ``codec.MAX_FLIGHTS`` is a resend after a lost reply and gets that reply again
        (the driver never has more batches out at once). Only :meth:`_drain` calls it, one
        thread per service at a time, so the record needs no lock of its own.
        """
        record = service.replies.get(seq)
        if record is not None:
            log.info("%s: batch %d resent; answering from record", self.label, seq)
            return record
        if seq <= service.last_seq:
            err = LookupError(f"stale batch {seq} (last was {service.last_seq})")
            return _failed(err, ops)
        reply: Reply = [self._apply(service, data, buffers, max_reply) for data, buffers in ops]
        service.replies[seq] = reply
        # The driver has read the replies of batches MAX_FLIGHTS or more before this one: it
        # sent this one after. Numbers follow each other: the one due out is the one to drop.
        service.replies.pop(seq - codec.MAX_FLIGHTS, None)
        if len(service.replies) > codec.MAX_FLIGHTS:
            for old in [s for s in service.replies if s <= seq - codec.MAX_FLIGHTS]:
                del service.replies[old]
        service.last_seq = seq
        self.touch()
        return reply

    def _apply(
        self, service: _Service, data: bytes, buffers: codec.Buffers, max_reply: int
    ) -> tuple[Any, codec.Buffers]:
        obj = service.obj  # read per operation: a restore replaces it for the operations after it
        start = time.perf_counter()
        try:
            kind, name, args, kwargs = codec.loads(data, buffers)
        except BaseException as exc:  # noqa: BLE001
            return codec.encode_error(exc, 0.0, traceback.format_exc()), codec.Buffers()
        try:
            if kind == codec.CALL:
                value = getattr(obj, name)(*args, **kwargs) if kwargs else getattr(obj, name)(*args)
            elif kind == codec.GETATTR:
                value = getattr(obj, name)
            elif kind == codec.SETATTR:
                setattr(obj, name, args[0])
                value = None
            elif kind == codec.SNAPSHOT:
                value = _snapshot(obj)
            elif kind == codec.RESTORE:
                restored = codec.loads(args[0])
                if len(args) > 1:  # a token: the grid may undo it (a restore is all or nothing)
                    service.replaced = (args[1], obj)
                service.obj = restored
                value = None
            elif kind in (codec.RESTORE_UNDO, codec.RESTORE_DONE):
                replaced, value = service.replaced, False
                if replaced is not None and replaced[0] == args[0]:
                    service.replaced = None
                    if kind == codec.RESTORE_UNDO:
                        service.obj, value = replaced[1], True
            else:
                raise ValueError(f"unknown operation kind {kind!r}")
        except BaseException as exc:  # noqa: BLE001 - a remote error is a reply, not a crash
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                log.warning(
                    "remote %s raised %s; reported to the driver", codec.describe(kind, name), type(exc).__name__
                )
            return codec.encode_error(exc, time.perf_counter() - start), codec.Buffers()
        seconds = time.perf_counter() - start
        item, out = codec.encode_value(value, seconds, (kind, name), codec.OOB_MIN)
        size = (len(item[1]) + (sum(memoryview(b).nbytes for b in out) if out else 0)) if item[0] else 0
        if size > max_reply:
            err = PayloadTooLargeError(
                f"the result of {codec.describe(kind, name)} is {size} bytes, more than the grid's "
                f"max_message_size of {max_reply} bytes", size=size, limit=max_reply,
            )
            return codec.encode_error(err, seconds, ""), codec.Buffers()
        return item, out

    def put_files(self, archive: bytes) -> int:
        """Unpack a tar archive into the temp path (folders kept); returns the file count."""
        self.touch()
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
            for member in members:
                if member.name.startswith(("/", "..")) or ".." in member.name.split("/"):
                    raise ValueError(f"refusing unsafe path in archive: {member.name!r}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(self.temp_path, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(self.temp_path, members=members)
        # The files are importable at once: the import system's folder listings are dropped
        # here (not at every publish: that writes to every finder of sys.path, in every worker).
        importlib.invalidate_caches()
        count = sum(1 for m in members if m.isfile())
        log.info("%s: received %d files into %s", self.label, count, self.temp_path)
        return count


def _snapshot(obj: Any) -> bytes:
    """The published object pickled as ``publish`` ships it (its ``__getstate__`` decides what goes in)."""
    try:
        return codec.dumps(obj)
    except Exception as exc:
        cls = type(obj).__qualname__
        raise TypeError(
            f"cannot snapshot the {cls} object: {type(exc).__name__}: {exc} (give {cls} a __getstate__ that "
            "leaves out what cannot be pickled, such as open files, locks or engine handles, and a "
            "__setstate__ that rebuilds it)"
        ) from exc


def _failed(error: BaseException, ops: list[Op]) -> Reply:
    """The reply of a batch none of whose operations could run."""
    item = codec.encode_error(error, 0.0, "")
    return [(item, codec.Buffers()) for _ in ops]


CONTROL_METHODS = frozenset(
    {"ping", "info", "identify", "publish", "unpublish", "put_files", "stage", "publish_staged", "unstage"}
)
