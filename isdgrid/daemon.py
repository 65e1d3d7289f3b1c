"""The slot daemon: one slot's server, on one authenticated port.

A grid's slots run it in the workers its host daemons fork (:mod:`isdgrid.hostd` calls
:func:`serve`); it also runs as a process of its own, one slot, started by hand with
``isdgrid daemon`` or ``python -u -m isdgrid.daemon --secret-stdin ...`` (attach, the
name server, Unix sockets). As a process, it prints one line ``ISDGRID-URI <uri>`` on stdout
once it serves, then logs to stderr. With ``--tag-output`` what is written to its stdout
and stderr after that line (by the published objects, C code or child processes) reaches
whoever started it line by line, marked stdout or stderr (:mod:`isdgrid.announce`); its own
log lines stay unmarked. (A worker's output goes to its host daemon through pipes, and the
host daemon marks it.) ``--path DIR`` (the driver script's folder) goes on ``sys.path`` in
place of the folder the daemon started in.

Every connection first passes the mutual challenge-response of :mod:`isdgrid.handshake`
(one deadline, at most ``MAX_UNAUTHENTICATED`` at once; nothing is deserialised before it
succeeds), then carries frames (:mod:`isdgrid.wire`): batches of operations, run by the
agent's runner of each service, replies framed back; the agent's control methods
(ping, info, publish, files: ``CONTROL`` frames, answered by ``ANSWER`` frames); and the
driver's heartbeat (``PING``, answered at once). The driver keeps one such connection per
slot.

When started for a grid it exits on its own once the driver is gone: its stdin closes (a
worker's stdin is its host daemon's life pipe), or no request arrives for
``--heartbeat-timeout`` seconds. A line ``retire`` on stdin ends it
without the cleanup of a gone driver (the grid replaces this slot; the folder stays).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from . import codec, handshake, importpath, wire
from .agent import AGENT_ID, Agent, Reply
from .announce import announcement
from .codec import Buffers
from .errors import GridError
from .folderusers import FolderUsers
from .nameserver import DEFAULT_GROUP, check_group, entry_name, registered
from .output import TaggedOutput
from .takeover import TAKEOVER, Takeover, start_thread

__all__ = ["Listener", "enter_folder", "main", "serve", "set_slot_environment"]

LAST_USER_WAIT = 5.0  # how long slot 0 waits for the host's other daemons to end before it leaves the folder
MIN_SECRET_BYTES = 16  # a shorter secret file is refused (a guessable secret opens the daemon to anyone)

log = logging.getLogger(__name__)


class Listener:
    """The daemon's one port: accepts, authenticates and serves connections.

    A thread per connection: at most ``MAX_UNAUTHENTICATED`` in the handshake (a new one
    beyond that pushes out the oldest), and after it the driver's one connection (a second
    while it reconnects).
    """

    def __init__(self, agent: Agent, secret: str, *, host: str = "127.0.0.1", port: int = 0,
                 unix_socket: str | None = None) -> None:
        if not secret:
            raise ValueError("a grid daemon needs a non-empty secret")
        self.agent = agent
        self._secret = secret.encode()
        self.daemon_id = handshake.new_daemon_id()
        if unix_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(unix_socket)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_socket)
            location = f"./u:{unix_socket}"
        else:
            self.sock = socket.create_server((host, port), reuse_port=False)
            bound = self.sock.getsockname()
            agent.port = bound[1]
            location = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        self.sock.listen(128)
        self.sock.setblocking(False)  # accepted when a select says a connection waits
        self.uri = f"PYRO:{AGENT_ID}@{location}"
        self._unauthenticated: dict[socket.socket, None] = {}  # in the handshake, oldest first
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def accept_ready(self) -> bool:
        """Accept a connection (one waits: the caller's select said so) and serve it in a thread.

        False when none could be accepted (none waiting, the listener closed, no file
        descriptor). The daemon's main thread calls it from its watch (:func:`serve`).
        """
        try:
            conn, _ = self.sock.accept()
            conn.setblocking(True)
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies go out at once
        except OSError:
            return False
        with self._lock:
            if len(self._unauthenticated) >= handshake.MAX_UNAUTHENTICATED:
                # Drop the oldest, not the newest: a flood that keeps every place taken
                # cannot lock the driver out, whose handshake takes a millisecond.
                oldest = next(iter(self._unauthenticated))
                del self._unauthenticated[oldest]
                log.warning("%d handshakes under way: dropped the oldest", handshake.MAX_UNAUTHENTICATED)
                wire.shutdown_quietly(oldest)
            self._unauthenticated[conn] = None
        try:
            start_thread(functools.partial(self._serve, conn), "conn")
        except BaseException:  # noqa: BLE001 - no thread: drop the connection, keep accepting
            with self._lock:
                self._unauthenticated.pop(conn, None)
            wire.close_quietly(conn)
        return True

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
        try:
            try:
                handshake.answer(conn, self._secret, self.daemon_id, time.monotonic() + handshake.HANDSHAKE_TIMEOUT)
            except (OSError, ValueError) as exc:
                log.info("dropped a connection from %s during the handshake: %s", _peer(conn), exc)
                return
            finally:
                with self._lock:
                    self._unauthenticated.pop(conn, None)
            _CallsChannel(self.agent, conn).serve()
        except BaseException:  # noqa: BLE001 - one connection's end never ends the daemon
            log.exception("connection from %s failed", _peer(conn))
        finally:
            with self._lock:
                self._conns.discard(conn)
            wire.close_quietly(conn)

    def close(self) -> None:
        """Stop accepting and cut every connection."""
        wire.close_quietly(self.sock)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            wire.shutdown_quietly(conn)


class _CallsChannel:
    """One calls connection: frames in, batches run, reply frames out.

    The thread that reads a batch of an idle service runs it itself (no thread switch
    per call), having first given up the connection's read role. Should the batch run
    longer than ``TAKEOVER`` seconds, :mod:`isdgrid.takeover` starts another thread to read on, so
    the other services of the slot are never held up behind a long call.
    """

    def __init__(self, agent: Agent, sock: socket.socket) -> None:
        self.agent = agent
        self.sock = sock
        self._frames = wire.FrameReader(sock)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._reading = False
        self.free_since: float | None = None  # when the read role was left free for a batch
        self.closed = threading.Event()

    def serve(self) -> None:
        """Read and run batches until the connection ends (the connection's own thread)."""
        self.read_loop()
        self.closed.wait()

    def read_loop(self) -> None:
        with self._lock:
            if self._reading or self.closed.is_set():
                return
            self._reading = True
            self.free_since = None
        try:
            while True:
                try:
                    kind, meta, buffers = self._frames.read()
                except OSError:
                    self.closed.set()
                    return
                if kind == wire.PING:  # the driver's heartbeat: answered at once
                    self.agent.touch()
                    try:
                        with self._send_lock:
                            wire.send_frame(self.sock, wire.PONG, meta)
                    except OSError:
                        self.closed.set()
                        return
                    continue
                if kind == wire.BATCH:
                    service_id, seq, items, max_reply = meta
                    ops = []
                    at = 0
                    for data, count in items:
                        if count:
                            ops.append((data, Buffers(buffers[at: at + count], buffers.kinds[at: at + count])))
                            at += count
                        else:
                            ops.append((data, codec.NO_BUFFERS))
                    work = self.agent.submit(service_id, seq, ops, max_reply, self._send_reply)
                    if work is None:
                        continue
                elif kind == wire.CONTROL:
                    work = self._control_work(*wire.control_args(meta, buffers))
                else:
                    log.warning("unexpected frame %r on a calls connection; closing it", kind)
                    self.closed.set()
                    return
                with self._lock:
                    self._reading = False
                    self.free_since = time.monotonic()
                _takeover.started(self)
                try:
                    work()
                finally:
                    _takeover.ended(self)
                with self._lock:
                    if self._reading or self.closed.is_set():
                        return  # another thread reads on: this one is done
                    self._reading = True
                    self.free_since = None
        except BaseException:
            self.closed.set()
            raise

    def take_over_due(self, now: float) -> float | None:
        """0 (once) when the read role has been left free too long: a reader is due; else
        the seconds until it is, or None when the read role is not free."""
        with self._lock:
            if self._reading or self.free_since is None or self.closed.is_set():
                return None
            left = TAKEOVER - (now - self.free_since)
            if left > 0:
                return left
            self.free_since = None
            return 0.0

    def _control_work(self, number: int, method: str, args: tuple[Any, ...]) -> Callable[[], None]:
        """The work of one control call: run it, send its answer (like a batch, in this thread)."""

        def work() -> None:
            self.agent.touch()
            ok, value = self.agent.control(method, args)
            try:
                with self._send_lock:
                    wire.send_frame(self.sock, wire.ANSWER, (number, ok, value))
            except ValueError as exc:  # marshal cannot carry the value: its own error, not a broken connection
                item = codec.encode_error(TypeError(f"{method}: the daemon cannot send its answer: {exc}"), 0.0, "")
                with self._send_lock:
                    wire.send_frame(self.sock, wire.ANSWER, (number, False, item))

        return work

    def _send_reply(self, service_id: str, seq: int, reply: Reply | BaseException) -> None:
        """Send the reply of batch ``seq`` of a service (or the error that stopped it)."""
        if isinstance(reply, BaseException):
            meta: Any = (service_id, seq, type(reply).__name__, str(reply))
            with self._send_lock:
                wire.send_frame(self.sock, wire.ERROR, meta)
            return
        if len(reply) == 1 and not reply[0][1]:  # one call, no buffers (most batches)
            with self._send_lock:
                wire.send_frame(self.sock, wire.REPLY, (service_id, seq, [(reply[0][0], 0)]))
            return
        out = Buffers([], b"".join(buffers.kinds for _, buffers in reply))
        items = []
        for item, buffers in reply:
            items.append((item, len(buffers)))
            out.extend(buffers)
        with self._send_lock:
            wire.send_frame(self.sock, wire.REPLY, (service_id, seq, items), out)


# Starts a new reader for a calls connection whose batch runs longer than TAKEOVER
# (installed by serve(); a kernel timer, no thread per call).
_takeover = Takeover()


def _peer(conn: socket.socket) -> str:
    try:
        peer = conn.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return str(peer) or "a local socket"


def enter_folder(temp_path: str | None, import_paths: Sequence[str] = ()) -> str:
    """Work in ``temp_path`` (default: the current folder) and import from there first.

    The folder must be private (only this user can write it); then ``import_paths`` (the
    driver script's folder), the standard library and site-packages follow on ``sys.path``
    (:mod:`isdgrid.importpath`). Returns the folder's absolute path.
    """
    start_folder = os.getcwd()
    temp_path = os.path.abspath(temp_path or start_folder)
    os.makedirs(temp_path, mode=0o700, exist_ok=True)
    problem = importpath.private_problem(temp_path)
    if problem is not None:
        raise GridError(
            f"the daemon's folder {temp_path} is not private: {problem}; its files would be imported, so "
            "give --temp-path a folder only you can write (a grid makes one of its own under a host's temp_path)"
        )
    arranged = (temp_path, tuple(import_paths))
    if _entered.get(arranged) == sys.path and start_folder == temp_path:
        return temp_path  # a slot worker: its host daemon entered this folder before the fork
    os.chdir(temp_path)
    importpath.arrange(temp_path, import_paths, start_folder)
    _entered.clear()
    _entered[arranged] = list(sys.path)
    return temp_path


# The folder and driver folders entered last, and the sys.path that gave. A worker forked by
# the host daemon enters the same folder again: arranging sys.path anew would only write to
# pages it shares with the host daemon (sysconfig's tables: 1.4 MB of each worker).
_entered: dict[tuple[str, tuple[str, ...]], list[str]] = {}


def serve(
    secret: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    unix_socket: str | None = None,
    temp_path: str | None = None,
    remove_temp: bool = False,
    import_paths: Sequence[str] = (),
    label: str = "",
    watch_stdin: bool = False,
    heartbeat_timeout: float = 0.0,
    uri_file: str | None = None,
    on_ready: Any = None,
    nameserver: str | None = None,
    group: str = DEFAULT_GROUP,
    tag_output: bool = False,
    announce_to: IO[str] | None = None,
    users: FolderUsers | None = None,
) -> bool:
    """Run a grid daemon until it is shut down or its driver is gone; True if the driver is gone.

    The daemon works in ``temp_path`` (default: the current folder), which must be a folder
    only this user can write; it imports from there first, then from ``import_paths`` (the
    driver script's folder), then the standard library, then site-packages
    (:mod:`isdgrid.importpath`).

    With ``unix_socket`` the daemon listens on that Unix socket instead of ``host:port``
    (the ssh launcher's tunnel forwards a socket of the driver's machine to it).
    The ``ISDGRID-URI`` line goes to ``announce_to`` (default ``sys.stdout``). A slot worker
    of a host daemon gets the host's ``users`` share of the folder (it removes no folder).

    With ``nameserver`` (``HOST:PORT``) the agent URI is registered there under
    ``isdgrid.<group>.<label or host-pid>`` while the daemon serves.
    """
    temp_path = enter_folder(temp_path, import_paths)
    agent = Agent(temp_path, label)
    listener = Listener(agent, secret, host=host, port=port, unix_socket=unix_socket)
    if not label:
        agent.label = listener.uri.split("@", 1)[1]
    uri = listener.uri
    stop = threading.Event()
    driver_gone = threading.Event()
    retired = threading.Event()  # the grid replaced this slot: it lives on

    def shut(reason: str, gone: bool = True) -> None:
        if not gone:
            retired.set()
        if not stop.is_set():
            if gone:
                driver_gone.set()
            stop.set()
            log.info("%s: %s; shutting down", agent.label, reason)

    if uri_file:
        tmp = uri_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{uri}\n")
        os.replace(tmp, uri_file)
    own_users = users is None
    users = users or FolderUsers(temp_path)
    with contextlib.ExitStack() as cleanup:
        if own_users:
            cleanup.callback(users.close)
        cleanup.callback(listener.close)
        _takeover.install()
        cleanup.callback(_takeover.uninstall)
        if remove_temp:
            # Only once the driver is gone (stdin closed, heartbeat silence): not when a
            # daemon crashes or the grid retires it, and not while another daemon uses the
            # folder: either would pull it from under the other slots of its host.
            cleanup.callback(_remove_if_driver_gone, driver_gone, retired, users, watch_stdin)
        if unix_socket:
            cleanup.callback(_unlink, unix_socket)
        if nameserver:
            member = label or f"{socket.gethostname()}-{os.getpid()}"
            cleanup.enter_context(registered(nameserver, entry_name(group, member), uri))
        if on_ready is not None:
            on_ready(uri)
        out = announce_to or sys.stdout
        out.write(announcement(uri) + "\n")
        out.flush()
        if tag_output:
            cleanup.enter_context(TaggedOutput())
        log.info("%s: serving %s (pid %d)", agent.label, uri, os.getpid())
        _watch(agent, listener, stop, shut, watch_stdin, heartbeat_timeout)
    return driver_gone.is_set() and not retired.is_set()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _remove_if_driver_gone(
    driver_gone: threading.Event, retired: threading.Event, users: FolderUsers, watch_stdin: bool
) -> None:
    # A hung daemon that resumes may see heartbeat silence before it reads the grid's
    # "retire" on stdin: look at what stdin holds before taking the driver for gone.
    if driver_gone.is_set() and not retired.is_set() and not (watch_stdin and _stdin_says_retire()):
        users.remove_if_last(wait=LAST_USER_WAIT)


def _stdin_says_retire() -> bool:
    try:
        fd = sys.stdin.fileno()
        data = b""
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
        return b"retire\n" in data
    except (OSError, ValueError):
        return False


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _watch(agent: Agent, listener: Listener, stop: threading.Event, shut: Any, watch_stdin: bool,
           heartbeat_timeout: float) -> None:
    """The main thread's watch until the daemon stops: new connections, stdin, heartbeat silence.

    It accepts the connections (a thread each from there). With ``watch_stdin``, the end
    of stdin means the driver is gone and a line ``retire`` that the grid replaced this
    slot; with ``heartbeat_timeout``, that long without a request means the driver is gone.
    One thread for all of it (a host runs hundreds of these).
    """
    step = max(0.2, min(1.0, heartbeat_timeout / 4)) if heartbeat_timeout > 0 else 1.0
    fd: int | None = None
    if watch_stdin:
        try:
            fd = sys.stdin.fileno()
        except (OSError, ValueError, AttributeError):
            shut("no stdin to watch (the driver is gone)")
            return
    accepting = listener.sock.fileno()
    watched = [accepting] if fd is None else [accepting, fd]
    seen = b""
    while not stop.is_set():
        try:
            ready = select.select(watched, [], [], step)[0]
        except (OSError, ValueError):  # the listener was closed under us
            ready = []
            stop.wait(step)
        if accepting in ready:
            accepted = 0
            while listener.accept_ready():  # every connection waiting
                accepted += 1
            if not accepted:
                stop.wait(0.05)  # readable, yet nothing accepted (out of file descriptors?): do not spin
        if fd is not None and fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                shut("stdin closed (the driver is gone)")
                return
            seen = (seen + data)[-64:]
            if b"retire\n" in seen:
                shut("retired by the grid (the slot is replaced)", gone=False)
                return
        if heartbeat_timeout > 0:
            silent = time.monotonic() - agent.last_contact
            if silent > heartbeat_timeout:
                shut(f"no heartbeat for {silent:.1f} s")
                return


def _read_secret(args: argparse.Namespace) -> str:
    if args.secret_stdin:
        line = sys.stdin.readline().strip()
        if not line:
            raise SystemExit("isdgrid daemon: no secret on stdin")
        return line
    if args.secret_file:
        path = args.secret_file
        make = f"python -c \"import secrets; print(secrets.token_hex(32))\" > {path} && chmod 600 {path}"
        try:
            with open(path) as fh:
                mode = os.fstat(fh.fileno()).st_mode
                secret = fh.read().strip()
        except OSError as exc:
            raise SystemExit(f"isdgrid daemon: cannot read secret file {path}: {exc.strerror}") from None
        if mode & 0o077:
            raise SystemExit(
                f"isdgrid daemon: secret file {path} is open to group or others (mode {mode & 0o777:04o}): "
                f"chmod 600 {path}"
            )
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise SystemExit(
                f"isdgrid daemon: secret file {path} holds {len(secret.encode())} bytes, fewer than "
                f"{MIN_SECRET_BYTES}: make a new secret with: {make}"
            )
        return secret
    raise SystemExit("isdgrid daemon: give --secret-stdin or --secret-file")


def _os_error_line(exc: OSError, args: argparse.Namespace) -> str:
    """One line for a daemon that could not start: what failed and what to do (no traceback)."""
    where = args.unix_socket or (f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}")
    if exc.errno == errno.EADDRINUSE:
        return (
            f"isdgrid daemon: cannot listen on {where}: the address is already in use (another daemon?); "
            "stop what listens there, or give another --port (--port 0: any free port)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"isdgrid daemon: cannot listen on {where}: {args.host} is not an address of this machine; "
            "give --host one of its addresses (or 127.0.0.1)"
        )
    if exc.errno == errno.EACCES and exc.filename is None:
        return f"isdgrid daemon: cannot listen on {where}: permission denied; give a --port above 1023"
    return f"isdgrid daemon failed: {exc}"


def set_slot_environment(slot_env: Sequence[str] | None, gpu: str | None) -> None:
    """Put the slot's identity and GPU in the environment, before anything is published.

    What the published objects import (CUDA, OpenMM) and the processes they start read it
    from there; a variable the grid does not give is left as the daemon found it.
    """
    if slot_env:
        host, slot, rank = slot_env
        os.environ.update({"ISDGRID_HOST": host, "ISDGRID_SLOT": slot, "ISDGRID_RANK": rank})
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m isdgrid.daemon", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    parser.add_argument("--unix-socket", help="listen on this Unix socket instead of host:port")
    parser.add_argument("--secret-stdin", action="store_true", help="read the secret from the first line of stdin")
    parser.add_argument("--secret-file", help="read the secret from this file")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes")
    parser.add_argument("--heartbeat-timeout", type=float, default=0.0, help="exit after this many silent seconds")
    parser.add_argument("--temp-path", help="working folder (only you may write it), first on sys.path")
    parser.add_argument("--remove-temp", action="store_true", help="remove the temp path at exit")
    parser.add_argument("--label", default="", help="name used in logs (host/slot)")
    parser.add_argument("--slot-env", nargs=3, metavar=("HOST", "SLOT", "RANK"),
                        help="set ISDGRID_HOST, ISDGRID_SLOT and ISDGRID_RANK (set by the grid's launchers)")
    parser.add_argument("--gpu", metavar="ID", help="set CUDA_VISIBLE_DEVICES=ID (from the host's gpus)")
    parser.add_argument("--uri-file", help="also write the URI to this file")
    parser.add_argument("--nameserver", help="register the URI at this Pyro5 name server (HOST:PORT)")
    parser.add_argument("--group", default=DEFAULT_GROUP, help="name server group (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--tag-output", action="store_true",
                        help="once serving, mark each line written to stdout/stderr for the grid's launcher")
    parser.add_argument("--path", action="append", metavar="DIR",
                        help="import from DIR after the working folder, before the standard library (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    set_slot_environment(args.slot_env, args.gpu)
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
            import_paths=args.path or (),
            label=args.label,
            watch_stdin=args.watch_stdin,
            heartbeat_timeout=args.heartbeat_timeout,
            uri_file=args.uri_file,
            nameserver=args.nameserver,
            group=args.group,
            tag_output=args.tag_output,
        )
    except KeyboardInterrupt:
        log.info("interrupted; exiting")
    except GridError as exc:
        log.error("isdgrid daemon failed: %s", exc)
        code = 1
    except OSError as exc:
        sys.stderr.write(_os_error_line(exc, args) + "\n")
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
