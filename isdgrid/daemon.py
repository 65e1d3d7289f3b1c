"""The host daemon: one Pyro5 daemon process per slot, hosting an :class:`Agent`.

Started by a launcher as ``python -u -m isdgrid.daemon --secret-stdin --watch-stdin ...``
or by hand with ``isdgrid daemon``. It prints one line ``ISDGRID-URI <uri>`` on stdout
once it serves, then logs to stderr. It refuses every Pyro5 connection whose handshake
does not carry the grid's secret, before any object is reached. When started by a grid
it exits on its own once the driver is gone: its stdin closes, or no request arrives for
``--heartbeat-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import Pyro5.errors
import Pyro5.server
from Pyro5 import config as pyro_config
from Pyro5 import core, protocol, serializers

from .agent import AGENT_ID, Agent
from .announce import announcement
from .bulk import BulkServer, BulkStore
from .errors import GridError
from .nameserver import DEFAULT_GROUP, check_group, entry_name, registered

__all__ = ["GridDaemon", "main", "serve"]

HANDSHAKE_TIMEOUT = 5.0
MAX_HANDSHAKE_SIZE = 64 * 1024
THREADPOOL_SIZE = 256

log = logging.getLogger(__name__)


class GridDaemon(Pyro5.server.Daemon):
    """A Pyro5 daemon that admits only clients presenting the grid's secret."""

    def __init__(self, secret: str, host: str, port: int = 0, unix_socket: str | None = None) -> None:
        if not secret:
            raise ValueError("a grid daemon needs a non-empty secret")
        self._secret = secret.encode()
        super().__init__(host=host, port=port, unixsocket=unix_socket)

    def _handshake(self, conn: Any, denied_reason: str | None = None) -> bool:
        """Admit a client only if its connect message carries the secret.

        Replaces Pyro5's handshake so that nothing from an unauthenticated client reaches
        a deserializer (marshal is not safe on hostile bytes) and so that a client that
        sends too little, too much or nothing is dropped within ``HANDSHAKE_TIMEOUT``.
        """
        if denied_reason:
            # Pyro5 calls this from its accept loop when the pool is full: waiting for the
            # client's message there would stall every other client, so just hang up.
            log.warning("refused a client from %s: %s", _peer(conn), denied_reason)
            return False
        conn.timeout = HANDSHAKE_TIMEOUT
        msg = None
        try:
            header = conn.recv(6)
            protocol.ReceivingMessage.validate(header)
            header += conn.recv(protocol._header_size - 6)
            msg = protocol.ReceivingMessage(header)
            if msg.type != protocol.MSG_CONNECT:
                raise Pyro5.errors.ProtocolError(f"expected a connect message, got type {msg.type}")
            size = msg.annotations_size + msg.data_size
            if size > MAX_HANDSHAKE_SIZE:
                raise Pyro5.errors.ProtocolError(f"connect message of {size} bytes is too large")
            payload = conn.recv(size) if size else b""
            if self._secret not in bytes(payload):  # before any deserializer sees it
                raise Pyro5.errors.SecurityError("access denied: wrong or missing grid secret")
            msg.add_payload(payload)
            serializer = serializers.serializers_by_id[msg.serializer_id]
            data = serializer.loads(msg.data)
            self.validateHandshake(conn, data["handshake"])
            response = {
                "handshake": "isdgrid",
                "meta": self.objectsById[core.DAEMON_NAME].get_metadata(data["object"]),
            }
            reply = protocol.SendingMessage(
                protocol.MSG_CONNECTOK, 0, msg.seq, msg.serializer_id, serializer.dumps(response)
            )
            conn.send(reply.data)
        except Pyro5.errors.SecurityError as exc:
            log.warning("refused a client from %s: %s", _peer(conn), exc)
            self._refuse(conn, msg, str(exc))
            return False
        except (Pyro5.errors.PyroError, OSError, KeyError, TypeError, ValueError, EOFError) as exc:
            log.debug("dropped a client from %s during the handshake: %s", _peer(conn), exc)
            return False
        conn.timeout = None
        return True

    @staticmethod
    def _refuse(conn: Any, msg: Any, reason: str) -> None:
        """Tell a well-formed but unauthorised Pyro5 client why it is refused."""
        if msg is None:
            return
        marshal_id = serializers.MarshalSerializer.serializer_id
        reply = protocol.SendingMessage(
            protocol.MSG_CONNECTFAIL, 0, msg.seq, marshal_id, serializers.serializers_by_id[marshal_id].dumps(reason)
        )
        try:
            conn.send(reply.data)
        except (OSError, Pyro5.errors.PyroError):
            pass

    def validateHandshake(self, conn: Any, data: Any) -> str:  # noqa: N802 - Pyro5's name
        offered = data.encode() if isinstance(data, str) else data
        if not isinstance(offered, bytes) or not hmac.compare_digest(offered, self._secret):
            log.warning("refused a client from %s: wrong or missing grid secret", _peer(conn))
            raise Pyro5.errors.SecurityError("access denied: wrong or missing grid secret")
        return "isdgrid"


def _peer(conn: Any) -> str:
    try:
        host, port = conn.sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, TypeError, AttributeError):
        return "?"


def serve(
    secret: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    unix_socket: str | None = None,
    temp_path: str | None = None,
    remove_temp: bool = False,
    label: str = "",
    watch_stdin: bool = False,
    heartbeat_timeout: float = 0.0,
    uri_file: str | None = None,
    on_ready: Any = None,
    nameserver: str | None = None,
    group: str = DEFAULT_GROUP,
) -> None:
    """Run a grid daemon until it is shut down or its driver is gone.

    With ``unix_socket`` the daemon listens on that Unix socket instead of ``host:port``
    (the ssh launcher's tunnel forwards a socket of the driver's machine to it).

    With ``nameserver`` (``HOST:PORT``) the agent URI is registered there under
    ``isdgrid.<group>.<label or host-pid>`` while the daemon serves.
    """
    pyro_config.THREADPOOL_SIZE = max(pyro_config.THREADPOOL_SIZE, THREADPOOL_SIZE)
    temp_path = os.path.abspath(temp_path or os.getcwd())
    os.makedirs(temp_path, exist_ok=True)
    os.chdir(temp_path)
    if temp_path not in sys.path:
        sys.path.insert(0, temp_path)
    daemon = GridDaemon(secret, host=host, port=port, unix_socket=unix_socket)
    # The bulk side channel listens on the same interface; a Unix-socket daemon (ssh
    # tunnel) has none, nor one started with ISDGRID_BULK=0: large payloads then travel inline.
    use_bulk = not unix_socket and os.environ.get("ISDGRID_BULK", "1") != "0"
    bulk = BulkServer(secret, BulkStore(), host=daemon.sock.getsockname()[0]).start() if use_bulk else None
    agent = Agent(
        temp_path, label or f"{host}:{daemon.locationStr}",
        bulk=bulk.store if bulk else None, bulk_port=bulk.port if bulk else None,
    )
    uri = daemon.register(agent, AGENT_ID)
    stop = threading.Event()

    def shut(reason: str) -> None:
        if not stop.is_set():
            stop.set()
            log.info("%s: %s; shutting down", agent.label, reason)
            daemon.shutdown()

    if watch_stdin:
        threading.Thread(target=_watch_stdin, args=(shut,), name="stdin-watch", daemon=True).start()
    if heartbeat_timeout > 0:
        threading.Thread(
            target=_watch_heartbeat, args=(agent, heartbeat_timeout, stop, shut), name="heartbeat-watch", daemon=True
        ).start()
    if uri_file:
        tmp = uri_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{uri}\n")
        os.replace(tmp, uri_file)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(daemon.close)
        if bulk is not None:
            cleanup.callback(bulk.close)
        if remove_temp:
            # Only once the driver is gone (stdin closed, heartbeat silence): a daemon that
            # crashes must not pull the folder from under the other slots of its host.
            cleanup.callback(_remove_if_driver_gone, stop, temp_path)
        if nameserver:
            member = label or f"{socket.gethostname()}-{os.getpid()}"
            cleanup.enter_context(registered(nameserver, entry_name(group, member), str(uri)))
        if on_ready is not None:
            on_ready(str(uri))
        sys.stdout.write(announcement(str(uri)) + "\n")
        sys.stdout.flush()
        log.info("%s: serving %s (pid %d)", agent.label, uri, os.getpid())
        daemon.requestLoop(loopCondition=lambda: not stop.is_set())


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _remove_if_driver_gone(stop: threading.Event, path: str) -> None:
    if stop.is_set():
        shutil.rmtree(path, ignore_errors=True)


def _watch_stdin(shut: Any) -> None:
    try:
        while os.read(sys.stdin.fileno(), 65536):
            pass
    except (OSError, ValueError):
        pass
    shut("stdin closed (the driver is gone)")


def _watch_heartbeat(agent: Agent, timeout: float, stop: threading.Event, shut: Any) -> None:
    step = max(0.2, min(1.0, timeout / 4))
    while not stop.wait(step):
        silent = time.monotonic() - agent.last_contact
        if silent > timeout:
            shut(f"no heartbeat for {silent:.1f} s")
            return


def _read_secret(args: argparse.Namespace) -> str:
    if args.secret_stdin:
        line = sys.stdin.readline().strip()
        if not line:
            raise SystemExit("isdgrid daemon: no secret on stdin")
        return line
    if args.secret_file:
        try:
            with open(args.secret_file) as fh:
                secret = fh.read().strip()
        except OSError as exc:
            raise SystemExit(f"isdgrid daemon: cannot read secret file {args.secret_file}: {exc.strerror}") from None
        if not secret:
            raise SystemExit(f"isdgrid daemon: secret file {args.secret_file} is empty")
        return secret
    raise SystemExit("isdgrid daemon: give --secret-stdin or --secret-file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m isdgrid.daemon", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    parser.add_argument("--unix-socket", help="listen on this Unix socket instead of host:port")
    parser.add_argument("--secret-stdin", action="store_true", help="read the secret from the first line of stdin")
    parser.add_argument("--secret-file", help="read the secret from this file")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes")
    parser.add_argument("--heartbeat-timeout", type=float, default=0.0, help="exit after this many silent seconds")
    parser.add_argument("--temp-path", help="working folder, put on sys.path")
    parser.add_argument("--remove-temp", action="store_true", help="remove the temp path at exit")
    parser.add_argument("--label", default="", help="name used in logs (host/slot)")
    parser.add_argument("--uri-file", help="also write the URI to this file")
    parser.add_argument("--nameserver", help="register the URI at this Pyro5 name server (HOST:PORT)")
    parser.add_argument("--group", default=DEFAULT_GROUP, help="name server group (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    secret = _read_secret(args)
    if args.nameserver:
        try:
            check_group(args.group)
        except GridError as exc:
            raise SystemExit(f"isdgrid daemon: {exc}") from None
    # SIGTERM ends the request loop like Ctrl-C, so the exit is clean (name server entry removed).
    signal.signal(signal.SIGTERM, _interrupt)
    code = 0
    try:
        serve(
            secret,
            host=args.host,
            port=args.port,
            unix_socket=args.unix_socket,
            temp_path=args.temp_path,
            remove_temp=args.remove_temp,
            label=args.label,
            watch_stdin=args.watch_stdin,
            heartbeat_timeout=args.heartbeat_timeout,
            uri_file=args.uri_file,
            nameserver=args.nameserver,
            group=args.group,
        )
    except KeyboardInterrupt:
        log.info("interrupted; exiting")
    except GridError as exc:
        log.error("isdgrid daemon failed: %s", exc)
        code = 1
    except Exception as exc:  # noqa: BLE001 - reported, then the process ends with 1
        log.error("isdgrid daemon failed: %s", exc, exc_info=True)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    # Calls still running in pool threads must not keep a stopped daemon alive.
    os._exit(code)


if __name__ == "__main__":
    main()
