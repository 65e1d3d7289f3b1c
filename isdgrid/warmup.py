"""Warm-up: the host daemon serves one loopback session itself before it forks any worker.

A worker forked from the host daemon shares its memory until it writes to it, and Python
writes to more than data: the first run of a function specialises its code in place, a
first import fills module objects, a first thread fills the interpreter's tables. Done
after the fork, each worker pays for that in pages of its own; done once here, before the
first fork, the workers share it. The session is what a worker's first minutes are: the
listener accepting, a handshake, control calls (ping, info, publish), batches
of calls, a heartbeat, the end of the connection. Every thread it starts has ended when it
returns (a fork must not copy a thread that holds a lock), and it binds only 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import socket
import threading
import time

from . import codec, handshake, wire
from .agent import Agent
from .daemon import Listener
from .transport import address_of

__all__ = ["serve_once"]

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 5.0


class WarmUp:
    """The object the warm-up session publishes and calls."""

    def noop(self) -> None:
        return None

    def echo(self, value: object) -> object:
        return value


def serve_once(temp_path: str) -> None:
    """Serve one loopback session in this process, then end its threads (bounded)."""
    before = set(threading.enumerate())
    secret = secrets.token_hex(16)
    listener = Listener(Agent(temp_path, "warm-up"), secret)
    sock = None
    try:
        sock = socket.create_connection(address_of(listener.uri), timeout=JOIN_TIMEOUT)  # type: ignore[arg-type]
        # as a worker's main thread does, here in this one
        if not (select.select([listener.sock], [], [], JOIN_TIMEOUT)[0] and listener.accept_ready()):
            raise RuntimeError("the warm-up listener accepted no connection")
        handshake.prove(sock, secret, handshake.CHANNEL_CALLS, JOIN_TIMEOUT)
        sock.settimeout(JOIN_TIMEOUT)
        frames = wire.FrameReader(sock)
        for number, (method, args) in enumerate(
            [("ping", ()), ("info", ()), ("publish", ("warm-up", codec.dumps(WarmUp())))], start=1
        ):
            wire.send_frame(sock, wire.CONTROL, *wire.control_frame(number, method, args))
            frames.read()
        for seq in range(1, 9):
            data, buffers = codec.encode_op(codec.CALL, "echo", ([seq, "x", 1.0],))
            wire.send_frame(sock, wire.BATCH, ("warm-up", seq, [(data, len(buffers))], 1 << 20), buffers)
            frames.read()
        wire.send_frame(sock, wire.PING, (1,))
        frames.read()
    finally:
        if sock is not None:
            wire.close_quietly(sock)
        listener.close()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for thread in set(threading.enumerate()) - before:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in set(threading.enumerate()) - before]
    if left:
        raise RuntimeError(f"the warm-up session left threads running: {left}")
    log.debug("warm-up session served in %s (pid %d)", temp_path, os.getpid())
