"""The ssh launcher across hosts that are really apart: network namespaces made by the test.

Three namespaces, each joined to the driver's (root) namespace by a veth pair with an
address of its own and running its own sshd (tests/netns.py). Every host's ``python`` is a
fresh venv that has numpy and nothing of isdgrid, Pyro5, serpent or cloudpickle, so each
host is zero-installed into its own folder. The namespaces share the file system, so each
host gets its own ``temp_path``: "per host" is then checked on the files themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import numpy as np
import psutil
import pytest
from conftest import child_pids, require, wait_until
from netns import NamespaceLauncher, NsHost, netns_usable, ns_hosts, sshd_usable
from Pyro5.core import URI

from isdgrid import Grid, Host, HostLostError
from isdgrid.launchers.ssh import LIB_FOLDER

pytestmark = pytest.mark.timeout(180)

# The daemons cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MB = 1 << 20
PARTITION = 16.0  # seconds the cut host stays cut off (a respawn used to give up after about 10)


class Node:
    """Published on every slot: where it runs, what it imported from where, echo, files."""

    def where(self) -> dict[str, object]:
        import cloudpickle
        import Pyro5
        import serpent

        import isdgrid

        return {
            "pid": os.getpid(),
            "cwd": os.getcwd(),
            "netns": os.readlink("/proc/self/ns/net"),
            "modules": [m.__file__ for m in (isdgrid, Pyro5, serpent, cloudpickle)],
        }

    def pid(self) -> int:
        return os.getpid()

    def echo(self, value: object) -> object:
        return value

    def sleep(self, seconds: float) -> int:
        time.sleep(seconds)
        return os.getpid()

    def use_copied(self) -> str:
        import nsmod  # copied by copy_files into this host's folder

        return str(nsmod.NAME)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[NsHost], str, str]]:
    """Three namespace hosts with sshds, their ssh config, and the hosts' python."""
    require(netns_usable(), "network namespaces are not permitted here (needs root and iproute2)")
    require(sshd_usable(), "no OpenSSH server (/usr/sbin/sshd) and client installed")
    folder = tmp_path_factory.mktemp("netns")
    python = _numpy_only_python(folder / "venv")
    with ns_hosts(3, folder / "ssh") as (hosts, config):
        for host in hosts:  # nothing routes anywhere but the veth pair
            assert "default" not in host.routes()
        yield hosts, config, python


def _numpy_only_python(venv: Path) -> str:
    """A venv without pip or site-packages, numpy linked in: a node where isdgrid is not installed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = next((venv / "lib").glob("python3*/site-packages"))
    source = Path(np.__file__).parent
    for name in ("numpy", "numpy.libs"):
        if (source.parent / name).exists():
            (site / name).symlink_to(source.parent / name)
    return str(venv / "bin" / "python")


def _hosts(cluster: tuple[list[NsHost], str, str], tmp_path: Path, n_cpu: tuple[int, ...]) -> list[Host]:
    hosts, _, python = cluster
    return [
        Host(h.alias, n_cpu=n, python=python, temp_path=str(tmp_path / h.alias))
        for h, n in zip(hosts, n_cpu, strict=True)
    ]


def _grid(cluster: tuple[list[NsHost], str, str], hosts: list[Host], **kwargs: object) -> Grid:
    options = {"ssh_config": cluster[1], "connect_timeout": 5, **kwargs.pop("launcher_options", {})}  # type: ignore[dict-item]
    return Grid(hosts, launcher="ssh", launcher_options=options, start_timeout=60, **kwargs)  # type: ignore[arg-type]


def _copy_tree(root: Path) -> Path:
    (root / "nsmod").mkdir(parents=True)
    (root / "nsmod" / "__init__.py").write_text(
        "import os\nNAME = open(os.path.join(os.path.dirname(__file__), 'name.txt')).read()\n"
    )
    (root / "nsmod" / "name.txt").write_text("copied")
    return root


def _ns_inode(host: NsHost) -> str:
    return f"net:[{os.stat(f'/run/netns/{host.ns}').st_ino}]"


def _settled(cluster: tuple[list[NsHost], str, str], before: set[int]) -> None:
    """After terminate: only the sshds are left in the namespaces, no ssh client here."""
    hosts = cluster[0]

    def only_sshd() -> bool:
        return all(h.pids() == {h.sshd.pid} for h in hosts if h.sshd is not None)

    assert wait_until(only_sshd, 20.0), {h.alias: h.pids() for h in hosts}
    assert wait_until(lambda: child_pids() <= before, 10.0), child_pids() - before


def test_daemons_bind_the_address_the_driver_reaches_and_each_host_gets_its_own_files(
    cluster: tuple[list[NsHost], str, str], tmp_path: Path
) -> None:
    nshosts = cluster[0]
    before = child_pids()
    hosts = _hosts(cluster, tmp_path, (2, 1, 1))
    tree = _copy_tree(tmp_path / "src")
    with _grid(cluster, hosts) as grid:
        # The default bind: the address ssh reached on each host, in its URI and in its socket.
        by_alias = {h.alias: h for h in nshosts}
        for slot in grid.slots:
            assert URI(slot.uri).host == by_alias[slot.host.name].address
        sid = grid.publish(Node())
        where = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        grid.release_all()
        for slot, w in zip(grid.slots, where, strict=True):
            host = by_alias[slot.host.name]
            assert w["netns"] == _ns_inode(host)  # the daemon runs in its host's namespace
            bound = {(addr, port) for addr, port, pids in host.listeners() if w["pid"] in pids}
            assert bound == {(host.address, URI(slot.uri).port)}, host.listeners()
        # Zero-install: each host's daemons import isdgrid & co from that host's own folder.
        folders = {}
        for slot, w in zip(grid.slots, where, strict=True):
            cwd = str(w["cwd"])
            assert cwd.startswith(str(tmp_path / slot.host.name) + "/isdgrid-")
            folders.setdefault(slot.host.name, cwd)
            assert folders[slot.host.name] == cwd
            lib = os.path.join(cwd, LIB_FOLDER)
            assert all(str(path).startswith(lib + "/") for path in w["modules"]), w  # type: ignore[attr-defined]
        assert len(set(folders.values())) == 3

        # copy_files: once per host, into that host's folder.
        assert grid.copy_files(str(tree), ["nsmod/*"]) == 2
        for cwd in folders.values():
            assert (Path(cwd) / "nsmod" / "name.txt").read_text() == "copied"
        assert grid.gather(grid.broadcast(sid, "use_copied"), timeout=60) == ["copied"] * 4
        grid.release_all()

        # Large payloads on each daemon's one port: out-of-band numpy buffers and plain bytes.
        rng = np.random.default_rng(7)
        for size in (4 * MB, 16 * MB):
            array = rng.random(size // 8)
            blob = rng.bytes(size)
            t0 = time.monotonic()
            echoed = grid.gather(grid.scatter(sid, "echo", [(array,)] * 4), timeout=120)
            t_array = time.monotonic() - t0
            t0 = time.monotonic()
            blobs = grid.gather(grid.scatter(sid, "echo", [(blob,)] * 4), timeout=120)
            t_bytes = time.monotonic() - t0
            grid.release_all()
            assert all(np.array_equal(e, array) for e in echoed)
            assert all(b == blob for b in blobs)
            print(f"\n{size // MB} MB to 4 daemons on 3 namespace hosts and back: "
                  f"numpy {t_array:.2f} s, bytes {t_bytes:.2f} s")
    assert not any(os.path.exists(cwd) for cwd in folders.values())
    _settled(cluster, before)


def test_every_interface_only_when_asked(cluster: tuple[list[NsHost], str, str], tmp_path: Path) -> None:
    host = cluster[0][1]
    before = child_pids()
    with _grid(cluster, _hosts(cluster, tmp_path, (1, 1, 1))[1:2], launcher_options={"bind": "0.0.0.0"}) as grid:
        slot = grid.slots[0]
        assert URI(slot.uri).host == host.address  # the driver still uses the address ssh reached
        sid = grid.publish(Node())
        proxy = grid.acquire_service(sid)
        pid = proxy.pid().get(timeout=30)
        grid.release_service(proxy)
        bound = {(addr, port) for addr, port, pids in host.listeners() if pid in pids}
        assert bound == {("0.0.0.0", URI(slot.uri).port)}
    _settled(cluster, before)


def test_batch_launchers_bind_the_node_name_as_the_node_resolves_it(
    cluster: tuple[list[NsHost], str, str], tmp_path: Path
) -> None:
    """SLURM and SGE daemons bind the node's name by default (here: resolved in its namespace)."""
    nshosts = cluster[0][:2]
    before = child_pids()
    launcher = NamespaceLauncher(nshosts, str(tmp_path))
    with Grid([Host(h.alias) for h in nshosts], launcher=launcher) as grid:
        sid = grid.publish(Node())
        where = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        grid.release_all()
        for host, slot, w in zip(nshosts, grid.slots, where, strict=True):
            assert URI(slot.uri).host == host.address and w["netns"] == _ns_inode(host)
            bound = {(addr, port) for addr, port, pids in host.listeners() if w["pid"] in pids}
            assert bound == {(host.address, URI(slot.uri).port)}
    assert wait_until(lambda: child_pids() <= before, 10.0)


def test_a_cut_host_loses_only_its_slots_and_comes_back_when_healed(
    cluster: tuple[list[NsHost], str, str], tmp_path: Path
) -> None:
    nshosts = cluster[0]
    victim = nshosts[2]
    before = child_pids()
    hosts = _hosts(cluster, tmp_path, (1, 1, 2))
    grid = _grid(cluster, hosts, heartbeat_interval=0.5, host_timeout=3.0, respawn=True)
    served: dict[int, list[float]] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic(sid: str) -> None:  # small calls on whatever server is free, all along
        while not stop.is_set():
            try:
                proxy = grid.acquire_service(sid, timeout=5)
            except TimeoutError:
                continue
            try:
                served.setdefault(proxy.pid().get(timeout=30), []).append(time.monotonic())
            except BaseException as exc:  # noqa: BLE001 - the test looks at them
                errors.append(exc)
            finally:
                grid.release_service(proxy)
            stop.wait(0.005)  # leave the 2 cores to the rest

    try:
        labels = [s.label for s in grid.slots]
        assert labels == ["nshost0/0", "nshost1/0", "nshost2/0", "nshost2/1"]
        old_slots = list(grid.slots)
        sid = grid.publish(Node())
        first = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        grid.release_all()
        victim_folder = str(first[2]["cwd"])
        assert grid.copy_files(str(_copy_tree(tmp_path / "src")), ["nsmod/*"]) == 2

        # The victim's two servers are busy with a long call; the others serve the traffic.
        pending = grid.scatter(sid, "sleep", [0.0, 0.0, 60.0, 60.0])
        grid.release_all()
        thread = threading.Thread(target=traffic, args=(sid,), daemon=True)
        thread.start()
        assert wait_until(lambda: len(served) == 2, 30.0)

        victim.cut()
        t_cut = time.monotonic()
        for result in pending[2:]:
            with pytest.raises(HostLostError) as info:
                result.result(timeout=60)
            assert info.value.host == victim.alias
        t_lost = time.monotonic() - t_cut
        assert [s.lost.is_set() for s in old_slots] == [False, False, True, True]
        assert [r.result(timeout=5) for r in pending[:2]] == [first[0]["pid"], first[1]["pid"]]

        time.sleep(max(0.0, t_cut + PARTITION - time.monotonic()))  # respawns cannot reach it meanwhile
        others = {int(first[0]["pid"]), int(first[1]["pid"])}  # type: ignore[call-overload]
        during = sum(1 for pid in others for t in served.get(pid, []) if t > t_cut)
        assert during > 0 and set(served) == others
        victim.heal()
        t_heal = time.monotonic()
        came_back = wait_until(
            lambda: grid.respawn_count >= 2 and not any(s.lost.is_set() for s in grid.slots), 60.0, step=0.1
        )
        t_back = time.monotonic() - t_heal
        assert came_back, f"the cut host's slots did not come back: {[s.lost_reason for s in grid.slots]}"
        assert not errors, errors

        after = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        grid.release_all()
        assert [a["pid"] for a in after[:2]] == [first[0]["pid"], first[1]["pid"]]  # never restarted
        assert {a["pid"] for a in after[2:]}.isdisjoint({f["pid"] for f in first[2:]})
        assert [a["cwd"] for a in after[2:]] == [victim_folder] * 2
        assert [a["netns"] for a in after[2:]] == [_ns_inode(victim)] * 2
        # The replaced daemons end, and leave the host's folder (and its files) to the new ones.
        old_pids = {int(f["pid"]) for f in first[2:]}  # type: ignore[call-overload]
        assert wait_until(lambda: not any(psutil.pid_exists(p) for p in old_pids), 30.0)
        assert grid.gather(grid.broadcast(sid, "use_copied"), timeout=60) == ["copied"] * 4
        grid.release_all()
        print(f"\nlink cut -> HostLostError {t_lost:.2f} s; healed -> slots back {t_back:.2f} s; "
              f"the other hosts served {during} calls meanwhile")
    finally:
        stop.set()
        grid.terminate()
    thread.join(timeout=30)
    _settled(cluster, before)


def test_a_partition_longer_than_the_daemon_timeout_gets_the_host_a_new_folder(
    cluster: tuple[list[NsHost], str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The host's daemons take the driver for gone and remove their folder; healed, it is made again."""
    host = cluster[0][0]
    before = child_pids()
    hosts = _hosts(cluster, tmp_path, (2, 1, 1))[:1]
    with _grid(cluster, hosts, heartbeat_interval=0.5, host_timeout=3.0, daemon_timeout=4.0, respawn=True) as grid:
        sid = grid.publish(Node())
        first = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        grid.release_all()
        folder = str(first[0]["cwd"])
        old_pids = {int(w["pid"]) for w in first}  # type: ignore[call-overload]
        (tmp_path / "inputs").mkdir()
        (tmp_path / "inputs" / "table.txt").write_text("the host needs this\n")
        assert grid.copy_files(str(tmp_path / "inputs"), ["table.txt"]) == 1
        assert os.path.exists(os.path.join(folder, "table.txt"))
        host.cut()
        try:
            assert wait_until(lambda: not any(psutil.pid_exists(p) for p in old_pids), 30.0)
            # the host daemon took the driver for gone: its workers ended, then it removed the folder
            assert wait_until(lambda: not os.path.exists(folder), 15.0)
        finally:
            host.heal()
        assert wait_until(
            lambda: grid.respawn_count >= 2 and not any(s.lost.is_set() for s in grid.slots), 60.0, step=0.1
        ), [s.lost_reason for s in grid.slots]
        after = grid.gather(grid.broadcast(sid, "where"), timeout=60)
        grid.release_all()
        assert [a["cwd"] for a in after] == [folder] * 2  # made again, modules shipped again
        assert all(str(m).startswith(os.path.join(folder, LIB_FOLDER)) for a in after for m in a["modules"])  # type: ignore[attr-defined]
        with open(os.path.join(folder, "table.txt")) as f:  # the new folder has the copied files again
            assert f.read() == "the host needs this\n"
        assert any("sent what copy_files had sent (1 archives) again" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(folder)
    _settled(cluster, before)
