"""The agent: the one Pyro5 object of a host daemon, which hosts the published copies.

The driver never talks to a published object directly: it sends batches of operations
to the agent (``run``), which applies them in order to the object of that service and
returns one reply item per operation. Each batch carries a sequence number; the agent
keeps the reply of the last batch of each service, so a batch resent after a broken
connection is answered from that record instead of being run twice.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from typing import Any

import Pyro5.server

from . import codec
from .bulk import BulkStore

__all__ = ["AGENT_ID", "Agent"]

AGENT_ID = "isdgrid.agent"
BULK_WAIT = 30.0  # a call's bulk buffers are put before the call is sent; this bounds a lost one

log = logging.getLogger(__name__)


@dataclass
class _Service:
    obj: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_seq: int = 0
    # The replies of the last MAX_FLIGHTS batches, for resends: seq -> (reply, bulk keys of its buffers)
    replies: dict[int, tuple[list[Any], list[str]]] = field(default_factory=dict)


@Pyro5.server.behavior(instance_mode="single")
class Agent:
    """Loads shipped objects, runs operation batches on them, and receives files."""

    def __init__(self, temp_path: str, label: str, bulk: BulkStore | None = None, bulk_port: int | None = None) -> None:
        self.temp_path = temp_path
        self.label = label
        self.bulk = bulk
        self.bulk_port = bulk_port if bulk is not None else None
        self.last_contact = time.monotonic()
        self.started = time.time()
        self._services: dict[str, _Service] = {}
        self._lock = threading.Lock()

    def _touch(self) -> None:
        self.last_contact = time.monotonic()

    @Pyro5.server.expose
    def ping(self) -> float:
        """Heartbeat: returns the daemon's wall clock."""
        self._touch()
        return time.time()

    @Pyro5.server.expose
    def info(self) -> dict[str, Any]:
        """Who this daemon is: pid, host name, python, temp path and services."""
        self._touch()
        with self._lock:
            services = sorted(self._services)
        return {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "temp_path": self.temp_path,
            "label": self.label,
            "services": services,
            "started": self.started,
            "bulk_port": self.bulk_port,
        }

    @Pyro5.server.expose
    def publish(self, service_id: str, payload: bytes) -> str:
        """Load a pickled instance as ``service_id``; '' on success, else the traceback."""
        self._touch()
        importlib.invalidate_caches()  # files copied since start must be importable
        try:
            obj = codec.loads(payload)
        except BaseException:  # noqa: BLE001 - the traceback goes back to the driver
            tb = traceback.format_exc()
            log.warning("%s: could not load service %s:\n%s", self.label, service_id, tb)
            return tb or "unknown error"
        with self._lock:
            self._services[service_id] = _Service(obj)
        log.info("%s: published %s (%s)", self.label, service_id, type(obj).__qualname__)
        return ""

    @Pyro5.server.expose
    def unpublish(self, service_id: str) -> bool:
        """Forget ``service_id``; True when it was there."""
        self._touch()
        with self._lock:
            service = self._services.pop(service_id, None)
        found = service is not None
        if service is not None and self.bulk is not None:
            for _, staged in service.replies.values():
                self.bulk.drop(staged)
            self.bulk.drop_where(f"q/{service_id}/", lambda rest: False)
        if found:
            log.info("%s: unpublished %s", self.label, service_id)
        return found

    @Pyro5.server.expose
    def run(self, service_id: str, seq: int, ops: list[Any], bulk: bool = False) -> list[Any]:
        """Apply pickled operations in order to the object of ``service_id``.

        ``seq`` numbers the batches of one service; a batch with the number of one of the
        last ``codec.MAX_FLIGHTS`` is a resend after a lost reply and gets that reply again
        (the driver never has more batches out at once). With ``bulk`` the
        driver reads the bulk port, so large buffers of the results wait there under a key.
        """
        self.last_contact = time.monotonic()
        service = self._services.get(service_id)  # a dict read is atomic
        if service is None:
            self._drop_requests(service_id, lambda s: False)
            err = LookupError(f"service {service_id!r} is not published on {self.label}")
            return [codec.encode_error(err, 0.0, "") for _ in ops]
        with service.lock:
            record = service.replies.get(seq)
            if record is not None:
                log.info("%s: batch %d of %s resent; answering from record", self.label, seq, service_id)
                self._drop_requests(service_id, lambda s: s > seq)
                return record[0]
            if seq <= service.last_seq:
                self._drop_requests(service_id, lambda s: s > service.last_seq)
                err = LookupError(f"stale batch {seq} for {service_id} (last was {service.last_seq})")
                return [codec.encode_error(err, 0.0, "") for _ in ops]
            oob_min = codec.OOB_MIN if bulk and self.bulk is not None else None
            reply: list[Any] = []
            staged: list[str] = []
            for data in ops:
                item, buffers = self._apply(service.obj, data, oob_min)
                if buffers:
                    assert self.bulk is not None
                    key = f"r/{service_id}/{seq}/{len(reply)}"
                    self.bulk.put(key, buffers)
                    staged.append(key)
                    item = (*item, key, [b.nbytes for b in buffers])
                reply.append(item)
            service.replies[seq] = (reply, staged)
            for old in [s for s in service.replies if s <= seq - codec.MAX_FLIGHTS]:
                _, old_staged = service.replies.pop(old)  # the driver has read it: it sent this batch after
                if old_staged and self.bulk is not None:
                    self.bulk.drop(old_staged)
            if self.bulk is not None and self.bulk.has_requests:
                self._drop_requests(service_id, lambda s: s > seq)
            service.last_seq = seq
            self.last_contact = time.monotonic()
            return reply

    def _drop_requests(self, service_id: str, keep: Any) -> None:
        """Forget bulk buffers put for batches of ``service_id`` whose number fails ``keep``."""
        if self.bulk is not None:
            self.bulk.drop_where(f"q/{service_id}/", lambda rest: keep(int(rest.split("/", 1)[0])))

    def _apply(self, obj: Any, data: Any, oob_min: int | None) -> tuple[Any, codec.Buffers]:
        start = time.perf_counter()
        try:
            kind, name, args, kwargs = self._decode(data)
        except BaseException as exc:  # noqa: BLE001
            return codec.encode_error(exc, 0.0, traceback.format_exc()), codec.Buffers()
        try:
            if kind == codec.CALL:
                value = getattr(obj, name)(*args, **(kwargs or {}))
            elif kind == codec.GETATTR:
                value = getattr(obj, name)
            elif kind == codec.SETATTR:
                setattr(obj, name, args[0])
                value = None
            else:
                raise ValueError(f"unknown operation kind {kind!r}")
        except BaseException as exc:  # noqa: BLE001 - a remote error is a reply, not a crash
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                log.warning(
                    "remote %s raised %s; reported to the driver", codec.describe(kind, name), type(exc).__name__
                )
            return codec.encode_error(exc, time.perf_counter() - start), codec.Buffers()
        return codec.encode_value(value, time.perf_counter() - start, (kind, name), oob_min)

    def _decode(self, data: Any) -> Any:
        """The ``(kind, name, args, kwargs)`` of one wire operation (see :mod:`isdgrid.codec`)."""
        if isinstance(data, bytes):
            return codec.loads(data)
        payload, key, extra, *kinds = data
        buffers: list[Any] | None
        if key:
            if self.bulk is None:
                raise LookupError("this daemon has no bulk port")
            buffers = self.bulk.take(key, BULK_WAIT)
            if buffers is None:
                raise LookupError(f"the bulk data {key} of this call did not arrive within {BULK_WAIT:g} s")
        else:
            buffers = codec.inline_buffers(extra, kinds[0])  # writable, like arrays unpickled in band
        return codec.loads(payload, buffers)

    @Pyro5.server.expose
    def put_files(self, archive: bytes) -> int:
        """Unpack a tar archive into the temp path (folders kept); returns the file count."""
        self._touch()
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
            for member in members:
                if member.name.startswith(("/", "..")) or ".." in member.name.split("/"):
                    raise ValueError(f"refusing unsafe path in archive: {member.name!r}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(self.temp_path, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(self.temp_path, members=members)
        count = sum(1 for m in members if m.isfile())
        log.info("%s: received %d files into %s", self.label, count, self.temp_path)
        return count
