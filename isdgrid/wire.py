"""Framing of a daemon's connection: one message = a small marshal header and raw buffers.

Used by both ends of an authenticated connection (:mod:`isdgrid.handshake` runs first).
A frame is::

    kind (1 byte) | buffer count (u32) | meta length (u64)
    one (size u64, kind byte) per buffer
    meta: marshal bytes (the batch or reply: service id, number, pickles)
    the buffers, raw

Out-of-band buffers of pickle protocol 5 (numpy arrays, ``PickleBuffer``) travel raw after
the meta: they are sent from the caller's memory and received straight into uninitialised
memory of their kind, with no copy in between. ``meta`` is only ever unmarshalled after the
peer proved it holds the grid's secret.
"""

from __future__ import annotations

import contextlib
import marshal
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from .codec import NO_BUFFERS, Buffers, receive_buffer

__all__ = [
    "ANSWER", "BATCH", "CONTROL", "ERROR", "NO_LIMIT", "PING", "PONG", "REPLY", "Frame", "FrameError", "FrameParser",
    "FrameReader", "close_quietly", "control_args", "control_frame", "drain_and_close", "send_frame",
    "shutdown_quietly",
]

NO_LIMIT = 1 << 62  # frames between authenticated peers: each side bounds what it sends

BATCH = b"B"  # driver -> daemon: (service id, number, [(pickle, buffer count), ...])
REPLY = b"R"  # daemon -> driver: (service id, number, [(reply item, buffer count), ...])
ERROR = b"E"  # daemon -> driver: (service id, number, type name, message): the batch could not run
PING = b"P"  # driver -> daemon: (number,): the heartbeat; answered at once, even while calls run
PONG = b"Q"  # daemon -> driver: (number,)
CONTROL = b"K"  # driver -> daemon: (number, method, args, where the buffers go): the agent's control methods
ANSWER = b"A"  # daemon -> driver: (number, ok, value or error reply item)
KINDS = (BATCH, REPLY, ERROR, PING, PONG, CONTROL, ANSWER)

_HEADER = struct.Struct("!cIQ")
_HEADER_SIZE = _HEADER.size
_MAX_BUFFERS = 1 << 20


def control_frame(number: int, method: str, args: tuple[Any, ...]) -> tuple[Any, Buffers]:
    """The meta and buffers of a ``CONTROL`` frame: its bytes arguments (a payload, an archive)
    travel as buffers, sent chunk by chunk and received without a copy."""
    inline = list(args)
    places = [i for i, arg in enumerate(args) if isinstance(arg, (bytes, bytearray))]
    buffers = Buffers([args[i] for i in places], b"b" * len(places))
    for i in places:
        inline[i] = None
    return (number, method, inline, places), buffers


def control_args(meta: Any, buffers: Sequence[Any]) -> tuple[int, str, tuple[Any, ...]]:
    """The number, method and arguments of a ``CONTROL`` frame (:func:`control_frame`'s inverse)."""
    number, method, inline, places = meta
    args = list(inline)
    if len(places) != len(buffers):
        raise ValueError(f"a control frame of {len(places)} bytes arguments carries {len(buffers)} buffers")
    for i, buf in zip(places, buffers, strict=True):
        args[i] = buf
    return number, method, tuple(args)


class FrameError(OSError):
    """The peer closed the connection or broke the framing."""


Frame = tuple[bytes, Any, Buffers]


SEND_CHUNK = 1024 * 1024  # a large buffer goes out in pieces of this size when progress is watched


def send_frame(
    sock: socket.socket, kind: bytes, meta: Any, buffers: Sequence[Any] = (), progress: Callable[[], None] | None = None
) -> None:
    """Send one frame (the caller serialises senders); ``progress()`` after each piece of a large buffer."""
    data = marshal.dumps(meta)
    if not buffers:
        sock.sendall(_HEADER.pack(kind, 0, len(data)) + data)
        return
    kinds = buffers.kinds if isinstance(buffers, Buffers) else b"b" * len(buffers)
    head = [_HEADER.pack(kind, len(buffers), len(data))]
    for buf, buf_kind in zip(buffers, kinds, strict=True):
        head.append(struct.pack("!Qc", memoryview(buf).nbytes, bytes((buf_kind,))))
    head.append(data)
    sock.sendall(b"".join(head))
    for buf in buffers:
        view = memoryview(buf).cast("B")
        if progress is None or view.nbytes <= SEND_CHUNK:
            sock.sendall(view)
            continue
        for at in range(0, view.nbytes, SEND_CHUNK):
            sock.sendall(view[at: at + SEND_CHUNK])
            progress()


class FrameReader:
    """Reads frames from one socket, a whole small frame per ``recv`` where it can.

    Bytes read ahead stay in the reader: check :attr:`buffered` before waiting for the
    socket to become readable. Large buffers are received straight into their memory.
    """

    CHUNK = 16 * 1024  # each connection keeps this much: 64 KiB cost a thousand workers 48 MB more

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._pos = 0
        self._scratch = memoryview(bytearray(self.CHUNK))

    @property
    def buffered(self) -> bool:
        """True when bytes of a next frame were already read."""
        return self._pos < len(self._buf)

    def _take(self, n: int) -> bytes | bytearray:
        have = len(self._buf) - self._pos
        if n - have > self.CHUNK:  # large: straight into its own memory, no growing buffer
            out = bytearray(n)
            out[:have] = self._buf[self._pos:]
            self._buf.clear()
            self._pos = 0
            _recv_into(self.sock, memoryview(out)[have:])
            return out
        while len(self._buf) - self._pos < n:
            got = self.sock.recv_into(self._scratch)  # into memory kept for it: no allocation per read
            if not got:
                raise FrameError("connection closed by the peer")
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0
            self._buf += self._scratch[:got]
        data = bytes(self._buf[self._pos: self._pos + n])
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        return data

    def _take_into(self, target: Any) -> None:
        view = memoryview(target).cast("B")
        have = min(len(self._buf) - self._pos, view.nbytes)
        if have:
            view[:have] = self._buf[self._pos: self._pos + have]
            self._pos += have
            if self._pos == len(self._buf):
                self._buf.clear()
                self._pos = 0
        if have < view.nbytes:
            _recv_into(self.sock, view[have:])

    def read(self, max_size: int = NO_LIMIT) -> Frame:
        """Read one whole frame: ``(kind, meta, buffers)``.

        Raises :class:`FrameError` when the peer closes or sends a frame larger than
        ``max_size`` or of an unknown kind; whatever was read of the frame is then lost,
        so the caller must drop the connection.
        """
        buf = self._buf
        if self._pos == len(buf):  # nothing read ahead: one recv (a small frame comes whole)
            got = self.sock.recv_into(self._scratch)
            if not got:
                raise FrameError("connection closed by the peer")
            buf += self._scratch[:got]
        frames: list[Frame] = []  # a whole frame without buffers (most are): taken at once
        stop = _plain_frames(buf, self._pos, len(buf), max_size, frames, most=1)
        if frames:
            if stop == len(buf):
                buf.clear()
                self._pos = 0
            else:
                self._pos = stop
            return frames[0]
        kind, count, meta_len = _HEADER.unpack(self._take(_HEADER.size))
        if kind not in KINDS:
            raise FrameError(f"unknown frame kind {kind!r}")
        if count > _MAX_BUFFERS:
            raise FrameError(f"frame with {count} buffers")
        layout = self._take(9 * count) if count else b""
        sizes = [struct.unpack_from("!Q", layout, 9 * i)[0] for i in range(count)]
        if meta_len + sum(sizes) > max_size:
            raise FrameError(f"frame of {meta_len + sum(sizes)} bytes exceeds the limit of {max_size}")
        meta = marshal.loads(self._take(meta_len))
        buffers = Buffers([], bytes(layout[9 * i + 8] for i in range(count)))
        for i, size in enumerate(sizes):
            buf = receive_buffer(size, layout[9 * i + 8])
            self._take_into(buf)
            buffers.append(buf)
        return kind, meta, buffers


class FrameParser:
    """Reads frames from a socket without ever blocking: the driver's I/O loop reads with it.

    Only one thread may read with FrameParsers (they share the memory they receive into).

    :meth:`read_from` takes what the socket holds now (``MSG_DONTWAIT``: the socket itself
    stays blocking for the threads that send on it) and returns the frames it completed;
    a part of a frame stays here for the next call. Large buffers are received straight
    into their own memory, as :class:`FrameReader` does.
    """

    CHUNK = 256 * 1024
    MAX_PER_CALL = 8 * 1024 * 1024  # then return, so one busy connection does not starve the others

    def __init__(self, max_size: int = NO_LIMIT) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0
        self._head: tuple[bytes, int, int] | None = None  # kind, buffer count, meta length
        self._sizes: list[int] = []
        self._kinds = b""
        self._meta: Any = None
        self._have_meta = False
        self._buffers = Buffers()
        self._target: memoryview | None = None  # a large buffer being received in place
        self._got = 0

    def read_from(self, sock: socket.socket) -> list[Frame]:
        """The frames completed by what ``sock`` holds now; raises FrameError at its end."""
        frames: list[Frame] = []
        taken = 0
        while taken < self.MAX_PER_CALL:
            if self._target is not None:
                try:
                    n = sock.recv_into(self._target[self._got:], 0, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    return frames
                if not n:
                    raise FrameError("connection closed by the peer")
                taken += n
                self._got += n
                if self._got == self._target.nbytes:
                    self._target = None
                    self._parse(frames)
                continue
            try:
                # Into memory kept for it: recv(n) would allocate (and free) n bytes per call.
                n = sock.recv_into(_SCRATCH, self.CHUNK, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return frames
            if not n:
                raise FrameError("connection closed by the peer")
            taken += n
            at = 0
            if self._pos == len(self._buf):  # everything received before is parsed
                self._buf.clear()
                self._pos = 0
                if self._head is None:  # and no frame begun (most reads): whole frames without
                    # buffers are parsed straight from what was received; only the rest is kept
                    at = _plain_frames(_SCRATCH, 0, n, self.max_size, frames)
            if at < n:
                self._buf += _SCRATCH[at:n]
                self._parse(frames)
            if n < self.CHUNK:
                return frames  # drained for now; the loop calls again when more comes
        return frames

    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[self._pos: self._pos + n])
        self._pos += n
        return data

    def _parse(self, frames: list[Frame]) -> None:
        if self._head is None:  # the whole frames without buffers at the front (most are), at once
            self._pos = _plain_frames(self._buf, self._pos, len(self._buf), self.max_size, frames)
        while self._target is None:
            if self._head is None:
                if len(self._buf) - self._pos < _HEADER.size:
                    break
                kind, count, meta_len = _HEADER.unpack_from(self._buf, self._pos)
                self._pos += _HEADER.size
                if kind not in KINDS:
                    raise FrameError(f"unknown frame kind {kind!r}")
                if count > _MAX_BUFFERS:
                    raise FrameError(f"frame with {count} buffers")
                if meta_len > self.max_size:
                    raise FrameError(f"frame of {meta_len} bytes exceeds the limit of {self.max_size}")
                self._head = (kind, count, meta_len)
                self._sizes = []
            kind, count, meta_len = self._head
            if count and not self._sizes:
                if self._avail() < 9 * count:
                    break
                layout = self._take(9 * count)
                self._sizes = [struct.unpack_from("!Q", layout, 9 * i)[0] for i in range(count)]
                self._kinds = bytes(layout[9 * i + 8] for i in range(count))
                total = meta_len + sum(self._sizes)
                if total > self.max_size:
                    raise FrameError(f"frame of {total} bytes exceeds the limit of {self.max_size}")
            if not self._have_meta:
                if len(self._buf) - self._pos < meta_len:
                    break
                self._meta = marshal.loads(self._take(meta_len))
                self._have_meta = True
                if not count:  # most frames: no buffers
                    frames.append((kind, self._meta, NO_BUFFERS))
                    self._head, self._meta, self._have_meta = None, None, False
                    continue
                self._buffers = Buffers([], self._kinds)
            while len(self._buffers) < count:
                i = len(self._buffers)
                size = self._sizes[i]
                buf = receive_buffer(size, self._kinds[i])
                view = memoryview(buf).cast("B")
                have = min(self._avail(), size)
                view[:have] = self._buf[self._pos: self._pos + have]
                self._pos += have
                self._buffers.append(buf)
                if have < size:
                    self._target, self._got = view, have
                    return
            frames.append((kind, self._meta, self._buffers))
            self._head, self._meta, self._have_meta, self._sizes = None, None, False, []
        if self._pos > self.CHUNK and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0


def _plain_frames(buf: Any, pos: int, end: int, max_size: int, frames: list[Frame], most: int = 1 << 62) -> int:
    """Append the whole frames without buffers in ``buf[pos:end]`` to ``frames`` (at most
    ``most``); where they end.

    Stops at the first frame that is not whole, has buffers, or is wrong (the general
    parser then takes it, or says what is wrong with it).
    """
    while end - pos >= _HEADER_SIZE and most > 0:
        most -= 1
        kind, count, meta_len = _HEADER.unpack_from(buf, pos)
        start = pos + _HEADER_SIZE
        if count or end - start < meta_len or kind not in KINDS or meta_len > max_size:
            break
        meta = marshal.loads(buf[start: start + meta_len])
        pos = start + meta_len
        frames.append((kind, meta, NO_BUFFERS))
    return pos


# What FrameParser.read_from receives into, one for the process: only the driver's one I/O
# loop thread reads with a FrameParser, and it copies the bytes out before it does more.
_SCRATCH = memoryview(bytearray(FrameParser.CHUNK))


def _recv_into(sock: socket.socket, target: Any) -> None:
    view = memoryview(target).cast("B")
    got = 0
    size = view.nbytes
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise FrameError("connection closed by the peer")
        got += n


def shutdown_quietly(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways (wakes a thread blocked on it); an error means it is gone already."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def drain_and_close(sock: socket.socket) -> None:
    """Close ``sock`` after reading away what it holds.

    A TCP socket closed with unread data sends a reset instead of a plain end, and a reset
    makes the peer's kernel drop what the peer has not read yet: a batch the daemon had
    received in full would be lost, and resent with whatever its caller's buffers hold now.
    """
    with contextlib.suppress(OSError):
        while sock.recv(65536, socket.MSG_DONTWAIT):
            pass
    close_quietly(sock)


def close_quietly(sock: socket.socket) -> None:
    """Close ``sock``; an error means it is gone already."""
    with contextlib.suppress(OSError):
        sock.close()
