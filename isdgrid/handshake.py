"""Mutual challenge-response on every connection to a daemon; the secret never crosses.

Both sides prove they hold the grid's secret with an HMAC over fresh random nonces from
both sides, as :mod:`multiprocessing.connection` does, but the daemon proves itself
first, so the driver sends nothing but its nonce to a peer it has not authenticated (a
process that took over a dead daemon's port learns nothing)::

    client -> daemon   b"ISDG" + version + nonce_c                       (37 bytes)
    daemon -> client   nonce_d + u8 len + daemon_id
                       + HMAC(secret, "isdgrid-daemon" | nonce_c | nonce_d | daemon_id)
    client -> daemon   HMAC(secret, "isdgrid-client" | nonce_d | nonce_c | daemon_id)
                       + channel byte (b"C": the one kind of connection there is)
    daemon -> client   b"OK"                                        (or it hangs up)

``daemon_id`` is random per daemon process: a driver that reconnects to a slot insists on
the id it saw first, so a relay to another daemon of the same grid is refused too. Digests
are compared with :func:`hmac.compare_digest`; nothing is deserialised before the end.
The daemon gives the whole exchange one deadline (:data:`HANDSHAKE_TIMEOUT`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import time

from .errors import AuthenticationError

__all__ = [
    "CHANNEL_CALLS",
    "HANDSHAKE_TIMEOUT",
    "MAX_UNAUTHENTICATED",
    "HandshakeError",
    "answer",
    "new_daemon_id",
    "prove",
]

MAGIC = b"ISDG"
VERSION = b"\x01"
NONCE = 32
DIGEST = 32
HANDSHAKE_TIMEOUT = 5.0
MAX_UNAUTHENTICATED = 64
CHANNEL_CALLS = b"C"
CHANNELS = (CHANNEL_CALLS,)
_OK = b"OK"


class HandshakeError(OSError):
    """The peer broke off or broke the handshake (not a proof failure)."""


def new_daemon_id() -> bytes:
    """A random identity for one daemon process."""
    return os.urandom(12).hex().encode()


def _mac(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, label + b"".join(parts), hashlib.sha256).digest()


def _recv(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandshakeError("handshake deadline passed")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(data))
        except TimeoutError as exc:
            raise HandshakeError("handshake deadline passed") from exc
        if not chunk:
            raise HandshakeError("peer closed the connection during the handshake")
        data += chunk
    return bytes(data)


def prove(
    sock: socket.socket, secret: str, channel: bytes, timeout: float, expected_id: bytes | None = None
) -> bytes:
    """The driver's side: authenticate the daemon, then prove ourselves; returns its id.

    Raises :class:`~isdgrid.AuthenticationError` when the daemon cannot prove it holds the
    secret, is not the daemon ``expected_id`` names, or refuses our proof; ``OSError``
    when the connection fails. Leaves the socket blocking, with no timeout.
    """
    deadline = time.monotonic() + timeout
    key = secret.encode()
    nonce_c = os.urandom(NONCE)
    sock.settimeout(timeout)
    sock.sendall(MAGIC + VERSION + nonce_c)
    nonce_d = _recv(sock, NONCE + 1, deadline)
    daemon_id = _recv(sock, nonce_d[-1], deadline)
    nonce_d = nonce_d[:NONCE]
    proof = _recv(sock, DIGEST, deadline)
    if not hmac.compare_digest(proof, _mac(key, b"isdgrid-daemon", nonce_c, nonce_d, daemon_id)):
        raise AuthenticationError("the peer could not prove it holds the grid's secret (not a daemon of this grid)")
    if expected_id is not None and not hmac.compare_digest(daemon_id, expected_id):
        raise AuthenticationError("another daemon of the grid answers at this address (the slot's daemon is gone)")
    sock.sendall(_mac(key, b"isdgrid-client", nonce_d, nonce_c, daemon_id) + channel)
    try:
        ok = _recv(sock, len(_OK), deadline)
    except HandshakeError as exc:
        raise AuthenticationError("the daemon refused the grid's secret") from exc
    if ok != _OK:
        raise AuthenticationError("the daemon refused the grid's secret")
    sock.settimeout(None)
    return daemon_id


def answer(sock: socket.socket, secret: bytes, daemon_id: bytes, deadline: float) -> bytes:
    """The daemon's side: prove ourselves, check the client's proof; returns the channel.

    Raises :class:`HandshakeError` (or ``OSError``) for anything but a client that proves
    it holds ``secret`` before ``deadline``; the caller then closes the connection.
    """
    hello = _recv(sock, len(MAGIC) + 1 + NONCE, deadline)
    if hello[: len(MAGIC)] != MAGIC or hello[len(MAGIC): len(MAGIC) + 1] != VERSION:
        raise HandshakeError("not an isdgrid client hello")
    nonce_c = hello[len(MAGIC) + 1:]
    nonce_d = os.urandom(NONCE)
    proof = _mac(secret, b"isdgrid-daemon", nonce_c, nonce_d, daemon_id)
    sock.sendall(nonce_d + bytes((len(daemon_id),)) + daemon_id + proof)
    reply = _recv(sock, DIGEST + 1, deadline)
    if not hmac.compare_digest(reply[:DIGEST], _mac(secret, b"isdgrid-client", nonce_d, nonce_c, daemon_id)):
        raise HandshakeError("the client could not prove it holds the grid's secret")
    channel = reply[DIGEST:]
    if channel not in CHANNELS:
        raise HandshakeError(f"unknown channel {channel!r}")
    sock.sendall(_OK)
    sock.settimeout(None)
    return channel
