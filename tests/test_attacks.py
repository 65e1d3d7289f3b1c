"""Attacks on a grid's daemons, black-box, over 127.0.0.1 (issue 10).

1. Port squatting: a daemon is killed and another local user binds its port at once.
   The driver may knock (a hello of 37 bytes) but never sends the secret, an HMAC or a
   call there, and never takes what answers for its daemon (not even a relay to another
   daemon of the same grid).
2. Slow and idle clients on a daemon's port: the grid keeps serving, no slot is lost,
   every such connection is closed within the handshake deadline, and a new driver
   connection still gets in.
3. The handshake, byte by byte, checked with ``hmac``/``hashlib`` here (not with
   ``isdgrid.handshake``), against a daemon started with a known secret:

       client -> daemon  b"ISDG" + b"\\x01" + nonce_c(32)                    (37 bytes)
       daemon -> client  nonce_d(32) + u8 len + daemon_id + HMAC(secret, b"isdgrid-daemon"
                         + nonce_c + nonce_d + daemon_id)
       client -> daemon  HMAC(secret, b"isdgrid-client" + nonce_d + nonce_c + daemon_id)
                         + channel (b"C", the one kind of connection)
       daemon -> client  b"OK", or the connection closes

Every process started here is ended here, by its PID; every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import hmac
import marshal
import os
import pwd
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import require
from remote_objects import Recorder

from isdgrid import Grid, GridError, Host, HostLostError

REPO_ROOT = str(Path(__file__).resolve().parent.parent)

# The protocol of docs/security.md, spelled out here on purpose (not imported).
MAGIC = b"ISDG"
VERSION = 1
NONCE_SIZE = 32
MAC_SIZE = 32
HELLO_SIZE = len(MAGIC) + 1 + NONCE_SIZE  # 37
HANDSHAKE_TIMEOUT = 5.0  # the daemon's one deadline for a whole handshake
SLACK = 5.0  # scheduling, a loaded CI machine
HOST_TIMEOUT = 3.0  # of the grids the squatting tests make


def _key(secret: str) -> bytes:
    return secret.encode()


def daemon_mac(secret: str, nonce_c: bytes, nonce_d: bytes, daemon_id: bytes) -> bytes:
    return hmac.new(_key(secret), b"isdgrid-daemon" + nonce_c + nonce_d + daemon_id, hashlib.sha256).digest()


def client_mac(secret: str, nonce_c: bytes, nonce_d: bytes, daemon_id: bytes) -> bytes:
    return hmac.new(_key(secret), b"isdgrid-client" + nonce_d + nonce_c + daemon_id, hashlib.sha256).digest()


def hello(nonce_c: bytes | None = None) -> tuple[bytes, bytes]:
    nonce_c = os.urandom(NONCE_SIZE) if nonce_c is None else nonce_c
    return MAGIC + bytes([VERSION]) + nonce_c, nonce_c


def secret_forms(secret: str) -> dict[str, bytes]:
    """The ways the secret could appear on the wire (text, raw bytes, either half of the text)."""
    text = secret.encode()
    forms = {"secret text": text, "secret text (1st half)": text[: len(text) // 2],
             "secret text (2nd half)": text[len(text) // 2:]}
    with contextlib.suppress(ValueError):
        forms["secret bytes"] = bytes.fromhex(secret)
    return forms


def leaks(data: bytes, secret: str) -> list[str]:
    return [name for name, form in secret_forms(secret).items() if form in data]


def port_of(uri: str) -> int:
    return int(uri.rsplit(":", 1)[1])


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=REPO_ROOT)


def _end(proc: subprocess.Popen[bytes]) -> None:
    """End a process this module started, by its PID: TERM, then KILL, both bounded."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


# -- raw sockets ---------------------------------------------------------------------------


def recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Up to ``size`` bytes; fewer if the peer closes or the deadline passes."""
    data = b""
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            break
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data


def wait_closed(sock: socket.socket, deadline: float) -> tuple[bool, bytes]:
    """(closed by the peer before the deadline, every byte received meanwhile)."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, data
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return False, data
        except OSError:  # reset: closed with our bytes unread
            return True, data
        if not chunk:
            return True, data
        data += chunk


@dataclass
class Reply:
    nonce_d: bytes
    daemon_id: bytes
    mac: bytes
    raw: bytes


def read_reply(sock: socket.socket, deadline: float) -> Reply:
    head = recv_exact(sock, NONCE_SIZE + 1, deadline)
    assert len(head) == NONCE_SIZE + 1, f"the daemon answered a hello with {head!r} and stopped"
    rest = recv_exact(sock, head[-1] + MAC_SIZE, deadline)
    assert len(rest) == head[-1] + MAC_SIZE, f"short reply to a hello: {head + rest!r}"
    return Reply(head[:NONCE_SIZE], rest[: head[-1]], rest[head[-1]:], head + rest)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


# -- daemons started by hand ---------------------------------------------------------------


@dataclass
class HandDaemon:
    proc: subprocess.Popen[bytes]
    uri: str
    log: Path

    @property
    def port(self) -> int:
        return port_of(self.uri)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:]
        return ""


@contextlib.contextmanager
def hand_daemons(tmp: Path, secret: str, count: int) -> Iterator[list[HandDaemon]]:
    """``count`` daemons started as ``python -m isdgrid.daemon --secret-file F``, ended by PID."""
    tmp.mkdir(parents=True, exist_ok=True)
    secret_file = tmp / "secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    started: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    try:
        for k in range(count):
            uri_file, log = tmp / f"d{k}.uri", tmp / f"d{k}.log"
            with open(log, "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "isdgrid.daemon", "--secret-file", str(secret_file),
                     "--host", "127.0.0.1", "--uri-file", str(uri_file), "--temp-path", str(tmp / f"d{k}")],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=_env(),
                )
            started.append((proc, uri_file, log))
        daemons = []
        deadline = time.monotonic() + 30
        for proc, uri_file, log in started:
            while not uri_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"daemon pid {proc.pid} did not start:\n{log.read_text(errors='replace')}")
                time.sleep(0.02)
            daemons.append(HandDaemon(proc, uri_file.read_text().strip(), log))
        yield daemons
    finally:
        for proc, _, _ in started:
            _end(proc)


# -- the squatter: another local user on a dead daemon's port ------------------------------

SQUATTER = r"""
import os, selectors, socket, sys, time

port, mode, out, relay_port = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
limit = time.monotonic() + float(sys.argv[5])
print("READY", os.getuid(), flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(2)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
give_up = time.monotonic() + 5.0
while True:
    try:
        srv.bind(("127.0.0.1", port))
        break
    except OSError as exc:
        if time.monotonic() > give_up:
            print("NOBIND", exc, flush=True)
            sys.exit(3)
        time.sleep(0.001)
srv.listen(128)
print("BOUND", flush=True)
sel = selectors.DefaultSelector()
sel.register(srv, selectors.EVENT_READ, "accept")
sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
records, peers, replied = {}, {}, set()


def close(sock):
    partner = peers.pop(sock, None)
    for s in (sock, partner):
        if s is None:
            continue
        peers.pop(s, None)
        record = records.pop(s, None)
        if record is not None:
            record.close()
        try:
            sel.unregister(s)
        except (KeyError, ValueError):
            pass
        s.close()


def send(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


count = 0
running = True
while running and time.monotonic() < limit:
    for key, _ in sel.select(timeout=0.1):
        sock, kind = key.fileobj, key.data
        if kind == "stdin":
            running = False
            break
        if kind == "accept":
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            records[conn] = open(os.path.join(out, "conn-%04d.bin" % count), "wb")
            count += 1
            sel.register(conn, selectors.EVENT_READ, "client")
            if mode == "relay":  # to another daemon of the same grid
                try:
                    up = socket.create_connection(("127.0.0.1", relay_port), timeout=2)
                except OSError:
                    close(conn)
                    continue
                peers[conn], peers[up] = up, conn
                sel.register(up, selectors.EVENT_READ, "upstream")
            continue
        if sock not in records and sock not in peers:
            continue
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            close(sock)
            continue
        if kind == "upstream":
            send(peers[sock], data)
            continue
        records[sock].write(data)
        records[sock].flush()
        if mode == "random":  # first a reply shaped like a daemon's, then noise
            if sock in replied:
                send(sock, os.urandom(64))
            else:
                replied.add(sock)
                send(sock, os.urandom(32) + bytes([8]) + b"squatter" + os.urandom(32))
        elif mode == "relay":
            send(peers[sock], data)
for s in list(records) + list(peers):
    close(s)
srv.close()
print("DONE", count, flush=True)
"""


@dataclass
class SquatUser:
    name: str
    uid: int
    gid: int
    python: str


def _squat_python() -> str | None:
    """A python3 another user can run (the driver's may live under root's home)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.path.exists(candidate) and os.stat(candidate).st_mode & 0o001:
            return candidate
    return None


@pytest.fixture(scope="module")
def squat_user() -> Iterator[SquatUser]:
    tools = {t: shutil.which(t) for t in ("useradd", "userdel", "setpriv")}
    require(os.geteuid() == 0, "port squatting by another user needs root (to create that user)")
    require(all(tools.values()), f"port squatting needs useradd, userdel and setpriv: {tools}")
    python = _squat_python()
    require(python is not None, "no python3 outside root's home for the squatting user")
    assert python is not None
    name = f"isdgrid-squat-{secrets.token_hex(4)}"
    made = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True, text=True, timeout=60,
    )
    assert made.returncode == 0, f"useradd {name}: {made.stderr}"
    try:
        entry = pwd.getpwnam(name)
        assert entry.pw_uid != 0
        yield SquatUser(name, entry.pw_uid, entry.pw_gid, python)
    finally:
        gone = subprocess.run(["userdel", name], capture_output=True, text=True, timeout=60)
        assert gone.returncode == 0, f"userdel {name}: {gone.stderr}"


class Squatter:
    """A listener of the squatting user on ``port``: records every byte, answers per ``mode``.

    ``random``: a reply shaped like a daemon's (random nonce, id, HMAC), then noise;
    ``silent``: never a byte; ``relay``: a transparent relay to ``relay_port``.
    """

    def __init__(self, user: SquatUser, port: int, mode: str, relay_port: int = 0) -> None:
        self.user, self.port, self.mode = user, port, mode
        self.out = tempfile.mkdtemp(prefix="isdgrid-squat-")
        os.chown(self.out, user.uid, user.gid)
        os.chmod(self.out, 0o700)
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
             user.python, "-I", "-c", SQUATTER, str(port), mode, self.out, str(relay_port), "60"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/",
        )

    def _expect(self, prefix: str, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    break
                line = self.proc.stdout.readline().decode(errors="replace")
                if not line:
                    break
                self.lines.append(line.rstrip())
                if line.startswith(prefix):
                    return line
        raise AssertionError(f"squatter on port {self.port} did not say {prefix}: {self.lines}")

    def ready(self) -> None:
        uid = int(self._expect("READY", 30).split()[1])
        assert uid == self.user.uid and uid != 0

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def bound(self) -> None:
        self._expect("BOUND", 10)

    def stop(self) -> list[bytes]:
        """Stop listening; the bytes each connection brought, in order of arrival."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.close()
        with contextlib.suppress(AssertionError):
            self._expect("DONE", 10)
        _end(self.proc)
        return [p.read_bytes() for p in sorted(Path(self.out).glob("conn-*.bin"))]

    def cleanup(self) -> None:
        _end(self.proc)
        shutil.rmtree(self.out, ignore_errors=True)


def squat_problems(label: str, received: list[bytes], secret: str) -> list[str]:
    """What the squatter should never have seen: anything but 37-byte hellos, the secret."""
    problems = []
    for i, data in enumerate(received):
        found = leaks(data, secret)
        if found:
            what = ", ".join(found)
            problems.append(f"{label}: connection {i} carried the {what} ({len(data)} bytes: {data[:80]!r})")
        elif data and not (len(data) == HELLO_SIZE and data.startswith(MAGIC + bytes([VERSION]))):
            problems.append(f"{label}: connection {i} got {len(data)} bytes, not one {HELLO_SIZE}-byte hello: "
                            f"{data[:80]!r}")
    joined = b"".join(received)
    if not any(leaks(d, secret) for d in received) and leaks(joined, secret):
        problems.append(f"{label}: the secret arrived split over connections")
    nonces = [d[len(MAGIC) + 1:] for d in received if len(d) == HELLO_SIZE]
    if len(set(nonces)) != len(nonces):
        problems.append(f"{label}: the driver reused a hello nonce")
    return problems


@dataclass
class Drive:
    """The calls made on one dead daemon's server after the kill."""

    label: str
    values: list[Any] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    lost_after: float | None = None
    finished: bool = False


def drive(label: str, proxy: Any, slot: Any, killed_at: float, bound: float) -> Drive:
    """Call ``proxy`` until a call fails with HostLostError and the slot is lost, or ``bound`` s."""
    out = Drive(label)
    deadline = killed_at + bound
    i = 0
    while time.monotonic() < deadline:
        try:
            out.values.append(proxy.add((label, i)).get(timeout=max(1.0, deadline - time.monotonic() + 5)))
        except BaseException as exc:  # noqa: BLE001 - every outcome is recorded and judged
            out.errors.append(exc)
            if isinstance(exc, HostLostError) and slot.lost.is_set():
                out.lost_after = time.monotonic() - killed_at
                break
        i += 1
        time.sleep(0.05)
    return out


def drive_all(jobs: list[tuple[str, Any, Any]], killed_at: float, bound: float) -> list[Drive]:
    """:func:`drive` each (label, proxy, slot) in a thread of its own, joined within a bound.

    A call that hangs past its own timeout (a client waiting forever on a silent squatter)
    is reported as such instead of hanging the test.
    """
    runs = [Drive(label) for label, _, _ in jobs]

    def run(k: int) -> None:
        label, proxy, slot = jobs[k]
        runs[k] = drive(label, proxy, slot, killed_at, bound)
        runs[k].finished = True

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, killed_at + bound + 10 - time.monotonic()))
    return runs


def drive_problems(run: Drive, bound: float) -> list[str]:
    if not run.finished:
        return [f"{run.label}: a call on the dead daemon hung past its timeout"]
    problems = []
    if run.values:
        problems.append(f"{run.label}: {len(run.values)} calls on the dead daemon returned values, e.g. "
                        f"{run.values[:3]} (the grid took the squatter for its daemon)")
    strange = [e for e in run.errors if not isinstance(e, GridError)]
    if strange:
        problems.append(f"{run.label}: calls failed with non-grid errors: {strange[:3]!r}")
    if run.lost_after is None:
        problems.append(f"{run.label}: no HostLostError with the slot lost within {bound:.0f} s "
                        f"(errors: {[type(e).__name__ for e in run.errors][:5]})")
    return problems


def shown_lost(grid: Grid, slot: Any) -> bool:
    """``grid.status()`` has rows for ``slot`` and every one says lost."""
    rows = [row.lost for row in grid.status() if row.host == slot.host.name and row.slot == slot.index]
    return bool(rows) and all(rows)


def keeper_problems(proxy: Any, slot: Any) -> list[str]:
    """The relay target ran only its own calls, and still serves."""
    try:
        history = proxy.history().get(timeout=30)
    except Exception as exc:  # noqa: BLE001 - reported with the other findings
        return [f"the relay target (a live daemon of the grid) was disturbed: {exc!r}"]
    problems = []
    if [item for item in history if item[0] != "before"]:
        problems.append(f"the relay target ran calls meant for a dead slot: {history[:6]}")
    if slot.lost.is_set():
        problems.append("the relay target's slot was declared lost")
    return problems


# -- 1. port squatting ---------------------------------------------------------------------


def test_squatters_on_dead_attached_daemons_get_only_hellos(squat_user: SquatUser, tmp_path: Path) -> None:
    """Three daemons started by hand are killed; squatters answer with noise, silence, a relay."""
    secret = secrets.token_hex(32)
    modes = ["random", "silent", "relay"]
    squatters: list[Squatter] = []
    problems: list[str] = []
    with hand_daemons(tmp_path / "daemons", secret, 4) as daemons:
        victims, keeper = daemons[:3], daemons[3]
        grid = Grid.attach([d.uri for d in daemons], secret=secret, heartbeat_interval=0.5, host_timeout=HOST_TIMEOUT)
        try:
            sid = grid.publish(Recorder())
            proxies = [grid.acquire_service(sid, timeout=30) for _ in daemons]
            by_pid = {p.pid().get(timeout=30): p for p in proxies}
            assert set(by_pid) == {d.proc.pid for d in daemons}
            for k, proxy in enumerate(proxies):
                assert proxy.add(("before", k)).get(timeout=30) == 1
            slot_of = {s.uri: s for s in grid.slots}
            for daemon, mode in zip(victims, modes, strict=True):
                squatters.append(Squatter(squat_user, daemon.port, mode, relay_port=keeper.port))
            for squatter in squatters:
                squatter.ready()
            for daemon in victims:
                os.kill(daemon.proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            for squatter in squatters:
                squatter.go()
            for squatter in squatters:
                squatter.bound()
            for daemon in victims:
                daemon.proc.wait(timeout=10)
            bound = HOST_TIMEOUT + 6.0
            jobs = [(f"{mode} squatter", by_pid[daemon.proc.pid], slot_of[daemon.uri])
                    for daemon, mode in zip(victims, modes, strict=True)]
            runs = drive_all(jobs, killed_at, bound)
            for run in runs:
                problems += drive_problems(run, bound)
            for daemon, mode in zip(victims, modes, strict=True):
                if not shown_lost(grid, slot_of[daemon.uri]):
                    problems.append(f"{mode} squatter: grid.status() does not show the slot lost")
            # the keeper never ran a call meant for another slot (a relay would have brought them)
            problems += keeper_problems(by_pid[keeper.proc.pid], slot_of[keeper.uri])
        finally:
            grid.terminate()  # with the squatters still listening: terminate must not talk to them either
            try:
                for squatter in squatters:
                    problems += squat_problems(f"{squatter.mode} squatter", squatter.stop(), secret)
            finally:
                for squatter in squatters:
                    squatter.cleanup()
        assert keeper.proc.poll() is None
    assert not problems, "\n".join(problems)


def test_squatter_after_kill_of_a_grid_started_daemon_gets_only_hellos(squat_user: SquatUser) -> None:
    """Local launcher: after kill -9 the driver knows the process is gone; no secret leaves."""
    secret = secrets.token_hex(32)
    problems: list[str] = []
    squatter: Squatter | None = None
    grid = Grid([Host("localhost", n_cpu=2)], secret=secret, heartbeat_interval=0.5, host_timeout=HOST_TIMEOUT)
    try:
        sid = grid.publish(Recorder())
        proxies = [grid.acquire_service(sid, timeout=30) for _ in grid.slots]
        by_pid = {p.pid().get(timeout=30): p for p in proxies}
        slots = {s.handle.process.pid: s for s in grid.slots}  # type: ignore[union-attr]
        assert set(by_pid) == set(slots)
        victim_pid, keeper_pid = sorted(slots)
        victim, keeper = slots[victim_pid], slots[keeper_pid]
        for proxy in proxies:
            assert proxy.add(("before", 0)).get(timeout=30) == 1
        squatter = Squatter(squat_user, port_of(victim.uri), "relay", relay_port=port_of(keeper.uri))
        squatter.ready()
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        squatter.go()
        squatter.bound()
        bound = HOST_TIMEOUT + 6.0
        (run,) = drive_all([("local relay squatter", by_pid[victim_pid], victim)], killed_at, bound)
        problems += drive_problems(run, bound)
        if not shown_lost(grid, victim):
            problems.append("grid.status() does not show the killed slot lost")
        problems += keeper_problems(by_pid[keeper_pid], keeper)
    finally:
        grid.terminate()
        if squatter is not None:
            try:
                problems += squat_problems("local relay squatter", squatter.stop(), secret)
            finally:
                squatter.cleanup()
    assert not problems, "\n".join(problems)


# -- 2. slow and idle clients --------------------------------------------------------------


class Crowd:
    """``n`` unauthenticated clients on ``port``, run by one selector thread.

    ``slow``: even clients dribble a hello, one byte a second; odd ones send a whole
    hello at once and then dribble their proof, one byte a second (only a deadline for
    the whole handshake, not one per read, ends them in time). ``idle``: connect, send
    nothing. Records when each connection was established and when the daemon closed it.
    """

    def __init__(self, port: int, n: int, kind: str, max_seconds: float) -> None:
        self.port, self.n, self.kind, self.max_seconds = port, n, kind, max_seconds
        self.opened: dict[int, float] = {}
        self.closed: dict[int, float] = {}
        self.refused: dict[int, str] = {}
        self.from_daemon: dict[int, int] = {}
        self.all_connected = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"crowd-{kind}", daemon=True)

    def start(self) -> Crowd:
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join(timeout=self.max_seconds + 10)
        assert not self.thread.is_alive(), "the crowd thread did not end"

    def still_open(self) -> list[int]:
        return [i for i in self.opened if i not in self.closed]

    def _script(self, i: int) -> tuple[bytes, bytes]:
        """(sent at once on connect, then dribbled one byte a second)."""
        if self.kind == "idle":
            return b"", b""
        first, _ = hello()
        if i % 2 == 0:
            return b"", first
        return first, os.urandom(MAC_SIZE) + b"C"

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        socks: dict[int, socket.socket] = {}
        scripts: dict[int, bytes] = {}
        end = time.monotonic() + self.max_seconds

        def close(i: int, why: str | None = None) -> None:
            sock = socks.pop(i)
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(sock)
            sock.close()
            if why is not None:
                self.refused[i] = why
            elif i in self.opened:
                self.closed[i] = time.monotonic()

        try:
            for i in range(self.n):
                sock = socket.socket()
                sock.setblocking(False)
                code = sock.connect_ex(("127.0.0.1", self.port))
                socks[i] = sock
                if code not in (0, errno.EINPROGRESS):
                    close(i, os.strerror(code))
                    continue
                sel.register(sock, selectors.EVENT_WRITE, i)
            next_tick = time.monotonic() + 1.0
            while socks and time.monotonic() < end:
                for key, _ in sel.select(timeout=max(0.0, min(next_tick, end) - time.monotonic())):
                    i = key.data
                    sock = socks[i]
                    if i not in self.opened:
                        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if code:
                            close(i, os.strerror(code))
                            continue
                        self.opened[i] = time.monotonic()
                        at_once, scripts[i] = self._script(i)
                        sel.modify(sock, selectors.EVENT_READ, i)
                        if at_once:
                            try:
                                sock.send(at_once)
                            except OSError:
                                close(i)
                        if len(self.opened) + len(self.refused) == self.n:
                            self.all_connected.set()
                        continue
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        close(i)
                    else:
                        self.from_daemon[i] = self.from_daemon.get(i, 0) + len(data)
                if time.monotonic() >= next_tick:
                    next_tick += 1.0
                    for i in [i for i in socks if i in self.opened and scripts.get(i)]:
                        byte, scripts[i] = scripts[i][:1], scripts[i][1:]
                        try:
                            socks[i].send(byte)
                        except BlockingIOError:
                            pass
                        except OSError:
                            close(i)
                if len(self.opened) + len(self.refused) == self.n:
                    self.all_connected.set()
        finally:
            self.all_connected.set()
            for i in list(socks):
                sock = socks.pop(i)
                with contextlib.suppress(KeyError, ValueError):
                    sel.unregister(sock)
                sock.close()
            sel.close()

    def problems(self, bound: float) -> list[str]:
        out = []
        late = {i: self.closed[i] - self.opened[i] for i in self.closed if self.closed[i] - self.opened[i] > bound}
        if late:
            out.append(f"{len(late)} {self.kind} clients stayed open longer than {bound:.0f} s "
                       f"(longest {max(late.values()):.1f} s)")
        never = self.still_open()
        if never:
            out.append(f"{len(never)} {self.kind} clients were never closed by the daemon "
                       f"(watched {self.max_seconds:.0f} s)")
        pending = self.n - len(self.opened) - len(self.refused)
        if pending:
            out.append(f"{pending} {self.kind} clients never got a connection (the accept queue stalled?)")
        return out


# The grids below keep the default host_timeout (10 s): one wave of attackers holds the
# daemon's handshake places for at most HANDSHAKE_TIMEOUT, so a heartbeat that needs a new
# connection during the wave gets in well before the slot could be declared lost.


def test_slow_clients_do_not_stall_the_grid() -> None:
    with Grid([Host("localhost", n_cpu=1)], heartbeat_interval=0.5) as grid:
        sid = grid.publish(Recorder())
        proxy = grid.acquire_service(sid, timeout=30)
        assert proxy.ident(-1).get(timeout=30) == -1
        slot = grid.slots[0]
        bound = HANDSHAKE_TIMEOUT + SLACK
        crowd = Crowd(port_of(slot.uri), 300, "slow", max_seconds=bound + 5).start()
        t0 = time.monotonic()
        calls, failures = 0, []
        lost_seen = []
        while time.monotonic() - t0 < 10.0:
            try:
                assert proxy.ident(calls).get(timeout=10) == calls
            except BaseException as exc:  # noqa: BLE001
                failures.append(exc)
                break
            calls += 1
            if slot.lost.is_set() or any(row.lost for row in grid.status()):
                lost_seen.append(time.monotonic() - t0)
        crowd.join()
        assert not failures, f"a call failed during the slow-client attack: {failures[0]!r}"
        assert not lost_seen, f"the slot was declared lost {lost_seen[0]:.1f} s into the attack"
        assert calls > 20
        assert len(crowd.opened) > 0
        problems = crowd.problems(bound)
        assert not problems, "\n".join(problems)
        assert not slot.lost.is_set() and not any(row.lost for row in grid.status())
        assert slot.handle.process.poll() is None  # type: ignore[union-attr]
        assert proxy.ident("after").get(timeout=10) == "after"
        grid.release_service(proxy)


def test_idle_flood_does_not_lock_out_a_new_driver(tmp_path: Path) -> None:
    secret = secrets.token_hex(32)
    bound = HANDSHAKE_TIMEOUT + SLACK
    with hand_daemons(tmp_path / "daemons", secret, 1) as (daemon,):
        grid = Grid.attach([daemon.uri], secret=secret, heartbeat_interval=0.5)
        try:
            sid = grid.publish(Recorder())
            proxy = grid.acquire_service(sid, timeout=30)
            assert proxy.ident(-1).get(timeout=30) == -1
            crowd = Crowd(daemon.port, 200, "idle", max_seconds=bound + 5).start()
            t0 = time.monotonic()
            assert crowd.all_connected.wait(timeout=10)
            # the grid that is in keeps serving
            for i in range(20):
                assert proxy.ident(i).get(timeout=10) == i
            # a new driver gets in (at worst once the idle ones reach the handshake deadline)
            errors: list[BaseException] = []
            fresh: Grid | None = None
            while fresh is None:
                try:
                    fresh = Grid.attach([daemon.uri], secret=secret, heartbeat_interval=0.5)
                except GridError as exc:
                    errors.append(exc)
                    assert time.monotonic() - t0 < bound, f"no new driver got in for {bound:.0f} s: {errors[-1]!r}"
                    time.sleep(0.2)
            took = time.monotonic() - t0
            try:
                fresh_sid = fresh.publish(Recorder())
                assert fresh.gather(fresh.broadcast(fresh_sid, "ident", 7), timeout=30) == [7]
                fresh.release_all()
            finally:
                fresh.terminate()
            print(f"new driver in after {took:.2f} s of the flood ({len(errors)} refused attempts)")
            crowd.join()
            problems = crowd.problems(bound)
            assert not problems, "\n".join(problems)
            assert not grid.slots[0].lost.is_set() and not any(row.lost for row in grid.status())
            assert proxy.ident("after").get(timeout=10) == "after"
            grid.release_service(proxy)
        finally:
            grid.terminate()
        assert daemon.proc.poll() is None


# -- 3. the handshake, byte by byte --------------------------------------------------------


@dataclass
class KnownDaemon:
    daemon: HandDaemon
    secret: str

    @property
    def port(self) -> int:
        return self.daemon.port


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnownDaemon]:
    secret = secrets.token_hex(32)
    with hand_daemons(tmp_path_factory.mktemp("known"), secret, 1) as (daemon,):
        yield KnownDaemon(daemon, secret)
        assert daemon.proc.poll() is None, daemon.log_tail()


def handshake(port: int, secret: str, channel: bytes = b"C") -> tuple[Reply, bytes, bytes]:
    """A full client handshake: (the daemon's reply, nonce_c, what came after the proof)."""
    with connect(port) as sock:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        first, nonce_c = hello()
        sock.sendall(first)
        reply = read_reply(sock, deadline)
        sock.sendall(client_mac(secret, nonce_c, reply.nonce_d, reply.daemon_id) + channel)
        return reply, nonce_c, recv_exact(sock, 2, deadline)


def test_a_correct_hello_gets_a_reply_that_verifies(known: KnownDaemon) -> None:
    ids, nonces = set(), set()
    for channel in (b"C", b"C", b"C"):
        with connect(known.port) as sock:
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            first, nonce_c = hello()
            sock.sendall(first)
            reply = read_reply(sock, deadline)
            assert 1 <= len(reply.daemon_id) <= 255 and reply.daemon_id.isascii()
            assert hmac.compare_digest(reply.mac, daemon_mac(known.secret, nonce_c, reply.nonce_d, reply.daemon_id))
            assert reply.nonce_d != nonce_c
            # the daemon says nothing more until the client has proved itself
            assert recv_exact(sock, 1, time.monotonic() + 0.3) == b""
            sock.sendall(client_mac(known.secret, nonce_c, reply.nonce_d, reply.daemon_id) + channel)
            assert recv_exact(sock, 2, deadline) == b"OK"
            ids.add(reply.daemon_id)
            nonces.add(reply.nonce_d)
    assert len(ids) == 1, f"one daemon, one id: {ids}"
    assert len(nonces) == 3, "the daemon's nonce must be fresh on every connection"


def _refused_after_reply(port: int, secret: str, proof: Any, channel: bytes = b"C") -> tuple[bool, bytes, Reply]:
    """Hello, reply, then ``proof(nonce_c, reply)`` + channel; (closed in time, bytes after)."""
    with connect(port) as sock:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        first, nonce_c = hello()
        sock.sendall(first)
        reply = read_reply(sock, deadline)
        sock.sendall(proof(nonce_c, reply) + channel)
        closed, after = wait_closed(sock, time.monotonic() + HANDSHAKE_TIMEOUT + SLACK)
        return closed, after, reply


def test_a_wrong_client_hmac_is_closed_without_a_byte(known: KnownDaemon) -> None:
    secret = known.secret
    wrong_secret = secrets.token_hex(32)
    cases = {
        "random": lambda nc, r: os.urandom(MAC_SIZE),
        "zeros": lambda nc, r: bytes(MAC_SIZE),
        "the daemon's own HMAC reflected": lambda nc, r: r.mac,
        "HMAC with a wrong secret": lambda nc, r: client_mac(wrong_secret, nc, r.nonce_d, r.daemon_id),
        "HMAC over the daemon's label": lambda nc, r: hmac.new(
            _key(secret), b"isdgrid-daemon" + r.nonce_d + nc + r.daemon_id, hashlib.sha256).digest(),
        "HMAC with another daemon id": lambda nc, r: client_mac(secret, nc, r.nonce_d, r.daemon_id + b"x"),
        "HMAC with the nonces swapped": lambda nc, r: client_mac(secret, r.nonce_d, nc, r.daemon_id),
    }
    failures = []
    for name, proof in cases.items():
        closed, after, _ = _refused_after_reply(known.port, secret, proof)
        if not closed or after:
            failures.append(f"{name}: closed={closed}, daemon sent {after!r}")
    # a right HMAC with an unknown channel byte gets no OK either (b"P": the Pyro5 control channel that was)
    for channel in (b"X", b"P"):
        closed, after, _ = _refused_after_reply(
            known.port, secret, lambda nc, r: client_mac(secret, nc, r.nonce_d, r.daemon_id), channel=channel)
        if not closed or b"OK" in after:
            failures.append(f"unknown channel {channel!r}: closed={closed}, daemon sent {after!r}")
    # replay: a proof from an earlier session, with the same client nonce
    reply1, nonce_c, ok = handshake(known.port, secret)
    assert ok == b"OK"
    old_proof = client_mac(secret, nonce_c, reply1.nonce_d, reply1.daemon_id)
    with connect(known.port) as sock:
        sock.sendall(hello(nonce_c)[0])
        reply2 = read_reply(sock, time.monotonic() + HANDSHAKE_TIMEOUT)
        assert reply2.nonce_d != reply1.nonce_d
        sock.sendall(old_proof + b"C")
        closed, after = wait_closed(sock, time.monotonic() + HANDSHAKE_TIMEOUT + SLACK)
        if not closed or after:
            failures.append(f"replayed proof: closed={closed}, daemon sent {after!r}")
    assert not failures, "\n".join(failures)
    assert handshake(known.port, secret)[2] == b"OK"  # still open to the right client


def _old_pyro_connect(secret: str) -> bytes:
    """What the old driver sent first: a Pyro5 connect message carrying the secret."""
    from Pyro5 import protocol

    payload = marshal.dumps({"handshake": secret, "object": "isdgrid.agent"})
    return protocol.SendingMessage(protocol.MSG_CONNECT, 0, 1, 2, payload).data


def test_the_raw_secret_is_refused(known: KnownDaemon) -> None:
    secret = known.secret
    failures = []
    for name, proof in {
        "secret bytes as the proof": lambda nc, r: bytes.fromhex(secret),
        "secret text as the proof": lambda nc, r: secret.encode(),
    }.items():
        closed, after, _ = _refused_after_reply(known.port, secret, proof)
        if not closed or b"OK" in after:
            failures.append(f"{name}: closed={closed}, daemon sent {after!r}")
    old_bulk = b"ISDB" + len(secret).to_bytes(2, "big") + secret.encode()
    for name, first in {
        "old Pyro5 connect with the secret": _old_pyro_connect(secret),
        "old bulk hello with the secret": old_bulk,
        "the secret text alone": secret.encode() + b"\n",
    }.items():
        with connect(known.port) as sock:
            sock.sendall(first)
            closed, after = wait_closed(sock, time.monotonic() + HANDSHAKE_TIMEOUT + SLACK)
        if not closed or after:
            failures.append(f"{name}: closed={closed}, daemon sent {after[:80]!r}")
    assert not failures, "\n".join(failures)


def _hostile(port: int, first: bytes, then_wait_reply: bool = False, more: bytes = b"") -> tuple[float, bool, bytes]:
    """Send ``first`` (and ``more`` after the reply); (seconds until closed, closed, bytes got)."""
    with connect(port) as sock:
        t0 = time.monotonic()
        got = b""
        try:
            if first:
                sock.settimeout(HANDSHAKE_TIMEOUT + SLACK)
                sock.sendall(first)
            if then_wait_reply:
                got = recv_exact(sock, NONCE_SIZE + 1 + 255 + MAC_SIZE, time.monotonic() + 1.0)
                if more:
                    sock.sendall(more)
        except OSError:
            pass
        closed, after = wait_closed(sock, t0 + HANDSHAKE_TIMEOUT + SLACK)
        return time.monotonic() - t0, closed, got + after


def test_garbage_truncated_and_oversized_input_is_closed_in_time(known: KnownDaemon) -> None:
    secret = known.secret
    good, _ = hello()
    cases: list[tuple[str, bytes, bool, bytes]] = [
        ("nothing", b"", False, b""),
        ("http", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", False, b""),
        ("wrong magic", b"ISDX\x01" + os.urandom(NONCE_SIZE), False, b""),
        ("version 0", MAGIC + b"\x00" + os.urandom(NONCE_SIZE), False, b""),
        ("version 2", MAGIC + b"\x02" + os.urandom(NONCE_SIZE), False, b""),
        ("oversized garbage", os.urandom(8 << 20), False, b""),
        ("hello, then nothing", good, True, b""),
        ("hello, then half a proof", hello()[0], True, os.urandom(16)),
        ("hello, then 8 MiB", hello()[0], True, os.urandom(8 << 20)),
    ]
    cases += [(f"{n} random bytes", os.urandom(n), False, b"") for n in (1, 5, 36, 37, 38, 4096)]
    cases += [(f"hello cut at {n}", hello()[0][:n], False, b"") for n in (1, 4, 5, 20, 36)]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        outcomes = list(pool.map(lambda c: (c[0], *_hostile(known.port, c[1], c[2], c[3])), cases))
    failures = []
    for name, took, closed, got in outcomes:
        if not closed or took > HANDSHAKE_TIMEOUT + SLACK:
            failures.append(f"{name}: still open after {took:.1f} s")
        if leaks(got, secret):
            failures.append(f"{name}: the daemon sent the secret")
        if not name.startswith("hello,"):
            if got:
                failures.append(f"{name}: the daemon answered a bad hello with {got[:40]!r}")
        elif len(got) > NONCE_SIZE:
            extra = got[NONCE_SIZE + 1 + got[NONCE_SIZE] + MAC_SIZE:]
            if extra:
                failures.append(f"{name}: after its reply the daemon sent {extra[:40]!r} to a client without proof")
    assert not failures, "\n".join(failures)
    # the daemon still serves a grid and a raw client
    assert handshake(known.port, secret)[2] == b"OK"
    with Grid.attach([known.daemon.uri], secret=secret) as grid:
        sid = grid.publish(Recorder())
        assert grid.gather(grid.broadcast(sid, "ident", 3), timeout=30) == [3]
        grid.release_all()


def test_the_daemon_never_sends_the_secret(known: KnownDaemon) -> None:
    secret = known.secret
    seen = b""
    for channel in (b"C",) * 10:
        reply, _, ok = handshake(known.port, secret, channel)
        assert ok == b"OK"
        assert len(reply.raw) == NONCE_SIZE + 1 + len(reply.daemon_id) + MAC_SIZE
        seen += reply.raw + ok
        assert not leaks(reply.raw + reply.daemon_id, secret)
    for _ in range(5):  # and to a client that fails its proof
        _, after, reply = _refused_after_reply(known.port, secret, lambda nc, r: os.urandom(MAC_SIZE))
        seen += reply.raw + after
    assert not leaks(seen, secret), leaks(seen, secret)
