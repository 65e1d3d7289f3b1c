"""Network namespaces as separate hosts for the tests, made and removed by the test run.

Each namespace is joined to the root namespace (where the driver runs) by a veth pair with
a /30 of its own, out of ``10.231.N.0/24`` where ``N`` is free on this machine (chosen
under a lock file, so concurrent runs do not clash). No namespace gets a default route,
and the root namespace gets only the /30 routes of its veth ends, each backed by a
blackhole route for the same /30: whatever state a link is in, a packet for a namespace
never falls through to the machine's default route. Cutting a host off sets both ends
of its veth pair down, as a pulled cable would (:meth:`NsHost.cut`): the host's packets
are dropped, and the driver's fail (blackhole route); healing sets them up again.

:func:`ns_hosts` also runs an OpenSSH server in each namespace (``sshd -D``, root login
with a key made for the run) and writes an ssh config naming the hosts, for the ssh
launcher. Everything is undone at exit, failure or not: the sshds and any process left
in a namespace are killed by PID, then the links and namespaces are deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from isdgrid.launchers import SlotSpec
from isdgrid.launchers.batch import BatchLauncher

SUBNET = "10.231"  # 10.231.N.0/24; only on the veth pairs the tests make
LOCK_FILE = "/tmp/isdgrid-netns.lock"
SSHD = "/usr/sbin/sshd"


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (bounded); its completed process."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def ip_ok(*args: str) -> str:
    """Run ``ip ARGS`` and fail the test with its error output unless it succeeds."""
    done = ip(*args)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


def netns_usable() -> bool:
    """Whether this process may make network namespaces (root, iproute2)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        return False
    probe = f"isdgp{os.getpid() % 100000}"
    ok = ip("netns", "add", probe).returncode == 0
    if ok:
        ip("netns", "del", probe)
    return ok


def sshd_usable() -> bool:
    """Whether an OpenSSH server and client are installed."""
    return os.access(SSHD, os.X_OK) and shutil.which("ssh") is not None and shutil.which("ssh-keygen") is not None


def namespace_pids(ns: str) -> set[int]:
    """PIDs of the processes in network namespace ``ns``."""
    done = ip("netns", "pids", ns)
    return {int(word) for word in done.stdout.split() if word.isdigit()}


def kill_pids(pids: set[int], grace: float = 3.0) -> None:
    """SIGTERM ``pids``, then SIGKILL those still there after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = {pid for pid in pids if _alive(pid)}
            if not pids:
                return
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def _subnet_lock() -> Iterator[None]:
    with open(LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _free_subnet() -> str:
    """A ``10.231.N`` that no route of the root namespace uses yet."""
    used = ip_ok("-4", "route", "show", "table", "all")
    start = os.getpid() % 200
    for k in range(250):
        candidate = f"{SUBNET}.{(start + k) % 250 + 1}"
        if f"{candidate}." not in used:
            return candidate
    raise AssertionError(f"no free {SUBNET}.N.0/24 left on this machine")


@dataclass
class NsHost:
    """One namespace host: its name (ssh alias, and its name inside), namespace, veth ends, address."""

    alias: str
    ns: str
    outer: str  # the veth end in the root namespace
    inner: str  # the veth end in the host's namespace
    address: str  # the host's address (on ``inner``)
    sshd: subprocess.Popen[bytes] | None = None

    def cut(self) -> None:
        """Cut the host off: both ends of its veth pair go down."""
        ip_ok("-n", self.ns, "link", "set", self.inner, "down")
        ip_ok("link", "set", self.outer, "down")

    def heal(self) -> None:
        """Join the host again."""
        ip_ok("link", "set", self.outer, "up")
        ip_ok("-n", self.ns, "link", "set", self.inner, "up")

    def pids(self) -> set[int]:
        """PIDs of the processes in the host's namespace (its sshd included)."""
        return namespace_pids(self.ns)

    def listeners(self) -> list[tuple[str, int, set[int]]]:
        """TCP listening sockets in the namespace: (address, port, PIDs of their owners)."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns, "ss", "-Hltnp"], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        rows = []
        for line in done.stdout.splitlines():
            fields = line.split()
            address, _, port = fields[3].rpartition(":")
            users = line.split("users:", 1)[1] if "users:" in line else ""
            pids = {int(p.split(",")[0]) for p in users.split("pid=")[1:]}
            rows.append((address.strip("[]"), int(port), pids))
        return rows

    def routes(self) -> str:
        """The namespace's routing table."""
        return ip_ok("-n", self.ns, "route", "show", "table", "all")


def _veth_namespace(stack: contextlib.ExitStack, host: NsHost, outer_cidr: str) -> None:
    """Make ``host``'s namespace and veth pair; ``stack`` undoes it (processes left in it killed)."""
    network = str(ipaddress.ip_interface(outer_cidr).network)
    blackhole = ("blackhole", network, "metric", "4294967295")  # under the veth route, never instead of it
    ip_ok("route", "add", *blackhole)
    stack.callback(ip, "route", "del", *blackhole)
    ip_ok("netns", "add", host.ns)
    stack.callback(ip, "netns", "del", host.ns)
    # What runs under `ip netns exec` sees this as /etc/hosts: the host's name is its address.
    etc = Path("/etc/netns") / host.ns
    etc.mkdir(parents=True, exist_ok=True)
    stack.callback(shutil.rmtree, etc, True)
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n{host.address} {host.alias}\n")
    ip_ok("link", "add", host.outer, "type", "veth", "peer", "name", host.inner)
    stack.callback(ip, "link", "del", host.outer)
    stack.callback(lambda: kill_pids(namespace_pids(host.ns)))
    for step in [
        ("link", "set", host.inner, "netns", host.ns),
        ("addr", "add", outer_cidr, "dev", host.outer),
        ("link", "set", host.outer, "up"),
        ("-n", host.ns, "addr", "add", f"{host.address}/30", "dev", host.inner),
        ("-n", host.ns, "link", "set", host.inner, "up"),
        ("-n", host.ns, "link", "set", "lo", "up"),
    ]:
        ip_ok(*step)


@contextlib.contextmanager
def namespaces(count: int) -> Iterator[list[NsHost]]:
    """``count`` network namespaces, each joined to this one by a veth pair with its own /30.

    Inside namespace ``i`` (under ``ip netns exec``) the name ``nshostI`` resolves to its address.

    At exit every process still in them is killed (by PID) and everything made is removed.
    """
    tag = os.getpid()
    with contextlib.ExitStack() as stack:
        hosts = []
        with _subnet_lock():
            net = _free_subnet()
            for i in range(count):
                host = NsHost(alias=f"nshost{i}", ns=f"isdgh{tag}x{i}", outer=f"isdo{tag}x{i}",
                              inner=f"isdi{tag}x{i}", address=f"{net}.{4 * i + 2}")
                _veth_namespace(stack, host, f"{net}.{4 * i + 1}/30")
                hosts.append(host)
        yield hosts


class NamespaceLauncher(BatchLauncher):
    """Starts each host's host daemon inside its namespace, as srun or qrsh start it on a node.

    The daemons bind what a batch launcher binds by default: the host's name, resolved on
    the host (in its namespace, to its address).
    """

    name = "netns"

    def __init__(self, hosts: Sequence[NsHost], temp_root: str) -> None:
        super().__init__(job_id="netns", temp_root=temp_root)
        self.ns_of = {h.alias: h.ns for h in hosts}

    def command(self, specs: Sequence[SlotSpec]) -> list[str]:
        return ["ip", "netns", "exec", self.ns_of[specs[0].host.name], *self.daemon_command(specs)]

    def environment(self, spec: SlotSpec) -> dict[str, str]:
        return {**self.environ, "PYTHONPATH": self.python_path(spec)}


def _start_sshd(host: NsHost, folder: Path) -> subprocess.Popen[bytes]:
    config = folder / f"sshd_config-{host.alias}"
    config.write_text(
        textwrap.dedent(
            f"""\
            ListenAddress {host.address}
            Port 22
            HostKey {folder}/host_ed25519
            PidFile {folder}/sshd-{host.alias}.pid
            AuthorizedKeysFile {folder}/authorized_keys
            PermitRootLogin prohibit-password
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            """
        )
    )
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder
    return subprocess.Popen(
        ["ip", "netns", "exec", host.ns, SSHD, "-D", "-f", str(config), "-E", str(folder / f"sshd-{host.alias}.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def _wait_listening(address: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((address, port)) == 0:
                return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def ns_hosts(count: int, folder: Path) -> Iterator[tuple[list[NsHost], str]]:
    """``count`` namespace hosts, each with an sshd; the hosts and an ssh config for them.

    ``folder`` (the caller's temporary folder) gets the keys, sshd configs and logs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("host_ed25519", "client_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True, timeout=30)
    shutil.copy(folder / "client_ed25519.pub", folder / "authorized_keys")
    with contextlib.ExitStack() as stack:
        hosts = stack.enter_context(namespaces(count))
        for host in hosts:
            host.sshd = _start_sshd(host, folder)
            stack.callback(_stop, host.sshd)
        for host in hosts:
            log = folder / f"sshd-{host.alias}.log"
            assert _wait_listening(host.address, 22, 15.0), f"sshd in {host.ns} did not start: " + (
                log.read_text() if log.exists() else "no log"
            )
        entries = "".join(f"Host {h.alias}\n    HostName {h.address}\n" for h in hosts)
        config = folder / "ssh_config"
        config.write_text(
            entries + textwrap.dedent(
                f"""\
                Host nshost*
                    User root
                    Port 22
                    IdentityFile {folder}/client_ed25519
                    IdentitiesOnly yes
                    StrictHostKeyChecking no
                    UserKnownHostsFile /dev/null
                    LogLevel ERROR
                """
            )
        )
        yield hosts, str(config)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    kill_pids({proc.pid})
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
