"""Slots know where they are (ISDGRID_HOST/SLOT/RANK) and which GPU they have (Host.gpus).

Through real grids: a published object reports the environment it was loaded in and the
one its calls see. This machine has no GPU: what is tested is the mapping (which
``CUDA_VISIBLE_DEVICES`` each slot gets), the OpenMM platform properties a replica asks
for, and the one-line failure on a machine without the asked platform.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from conftest import require, wait_until
from test_attach import SECRET, _end, _start_daemon

from isdgrid import ConfigError, Grid, Host, load_hosts
from isdgrid.launchers.base import SlotSpec
from isdgrid.launchers.local import LocalLauncher, daemon_args
from isdgrid.statusfile import format_status, snapshot

REPO_ROOT = Path(__file__).resolve().parent.parent
NAMES = ("ISDGRID_HOST", "ISDGRID_SLOT", "ISDGRID_RANK", "CUDA_VISIBLE_DEVICES")

# The daemons cannot import this module: its classes travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Whereabouts:
    """Reports the slot's variables: as the object was loaded, and as a call sees them."""

    def __init__(self) -> None:
        self.at_load: dict[str, str | None] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.at_load = {name: os.environ.get(name) for name in NAMES}

    def where(self) -> dict[str, Any]:
        now = {name: os.environ.get(name) for name in NAMES}
        return {"now": now, "at_load": self.at_load, "pid": os.getpid(), "cores": sorted(os.sched_getaffinity(0))}


def _by_rank(grid: Grid, sid: str) -> dict[int, dict[str, Any]]:
    reports = grid.gather(grid.broadcast(sid, "where"), timeout=60)
    return {int(r["now"]["ISDGRID_RANK"]): r for r in reports}


def test_every_slot_knows_its_host_slot_rank_and_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # the driver's: kept by a slot the grid gives no GPU
    hosts = [Host("localhost", n_cpu=3, gpus=[0, "GPU-4c1b"]), Host("127.0.0.1", n_cpu=2)]
    with Grid(hosts, "local") as grid:
        sid = grid.publish(Whereabouts())
        reports = _by_rank(grid, sid)
        expected = {
            0: ("localhost", "0", "0"), 1: ("localhost", "1", "GPU-4c1b"), 2: ("localhost", "2", "0"),
            3: ("127.0.0.1", "0", "7"), 4: ("127.0.0.1", "1", "7"),
        }
        assert sorted(reports) == sorted(expected)
        for rank, (host, slot, gpu) in expected.items():
            want = {"ISDGRID_HOST": host, "ISDGRID_SLOT": slot, "ISDGRID_RANK": str(rank), "CUDA_VISIBLE_DEVICES": gpu}
            assert reports[rank]["at_load"] == want  # set before the published object was loaded
            assert reports[rank]["now"] == want
        rows = {(r.host, r.slot): r for r in grid.status()}
        assert [(rows[h, int(s)].rank, rows[h, int(s)].gpu, rows[h, int(s)].gpu_shared)
                for h, s, _ in expected.values()] == [
            (0, "0", True), (1, "GPU-4c1b", False), (2, "0", True), (3, None, False), (4, None, False),
        ]
        table = "\n".join(format_status([snapshot(grid, time.time())]))  # what `isdgrid status` prints
        assert "GPU" in table.splitlines()[2]
        assert [line.split()[:4] for line in table.splitlines()[3:8]] == [
            ["localhost", "0", "0", "shared"], ["localhost", "1", "GPU-4c1b", sid],
            ["localhost", "2", "0", "shared"], ["127.0.0.1", "0", "-", sid], ["127.0.0.1", "1", "-", sid],
        ]


def test_a_respawned_slot_keeps_its_rank_and_gpu() -> None:
    hosts = [Host("localhost", n_cpu=2, gpus=[3]), Host("127.0.0.1", n_cpu=2, gpus=[5, 6])]
    with Grid(hosts, "local", respawn=True, heartbeat_interval=0.2, host_timeout=5.0) as grid:
        sid = grid.publish(Whereabouts())
        before = _by_rank(grid, sid)
        victim = grid.slots[2]  # 127.0.0.1/0: rank 2, GPU 5
        assert victim.handle.process is not None
        os.kill(victim.handle.process.pid, signal.SIGKILL)
        assert wait_until(lambda: grid.respawn_count == 1, 60), "the killed slot was not respawned"
        grid.wait_for_respawn(sid, timeout=60)
        after = _by_rank(grid, sid)
        assert after[2]["pid"] != before[2]["pid"]
        assert {rank: r["at_load"] for rank, r in after.items()} == {rank: r["at_load"] for rank, r in before.items()}
        assert after[2]["at_load"] == {
            "ISDGRID_HOST": "127.0.0.1", "ISDGRID_SLOT": "0", "ISDGRID_RANK": "2", "CUDA_VISIBLE_DEVICES": "5",
        }


def test_an_attached_daemon_is_told_its_place_when_the_grid_attaches(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    args = [sys.executable, "-m", "isdgrid.daemon", "--secret-file", str(secret_file)]
    daemons = [_start_daemon(tmp_path, f"d{i}", [*args, "--label", f"byhand{i}"]) for i in range(2)]
    try:
        with Grid.attach([d.uri for d in daemons], secret=SECRET) as grid:
            sid = grid.publish(Whereabouts())
            reports = _by_rank(grid, sid)
            for rank in (0, 1):
                assert reports[rank]["at_load"]["ISDGRID_HOST"] == "127.0.0.1"
                assert reports[rank]["at_load"]["ISDGRID_SLOT"] == str(rank)
                assert reports[rank]["at_load"]["ISDGRID_RANK"] == str(rank)
            assert [r.rank for r in sorted(grid.status(), key=lambda r: r.slot)] == [0, 1]
    finally:
        for daemon in daemons:
            _end(daemon.proc)


def test_the_host_daemon_gets_each_slots_gpu_when_it_forks_the_slot() -> None:
    # One host daemon serves all slots of a host: its command line names none of them; each
    # slot's identity and GPU go with its spawn command.
    spec = SlotSpec(Host("node7", n_cpu=4, gpus=[2, 3]), 3, "/tmp/x", rank=11)
    args = daemon_args(spec, "python3")
    assert args[1:4] == ["-u", "-m", "isdgrid.hostd"]
    assert "--slot-env" not in args and "--gpu" not in args
    launcher = LocalLauncher()
    assert launcher.gpu_argument(spec) == "3"
    assert launcher.gpu_argument(dataclasses.replace(spec, host=Host("node7", n_cpu=4))) == "-"


def test_cpu_bind_pins_each_slot_to_a_core_of_its_own() -> None:
    cores = sorted(os.sched_getaffinity(0))
    with Grid([Host("localhost", n_cpu=3, cpu_bind=True)]) as grid:
        sid = grid.publish(Whereabouts())
        pinned = {int(r["now"]["ISDGRID_SLOT"]): r["cores"] for r in grid.gather(grid.broadcast(sid, "where"),
                                                                                  timeout=60)}
        assert pinned == {slot: [cores[slot % len(cores)]] for slot in range(3)}
        grid.release_all(sid)
    with Grid([Host("localhost", n_cpu=2)]) as grid:  # without cpu_bind: every core, as the driver has
        sid = grid.publish(Whereabouts())
        assert all(r["cores"] == cores for r in grid.gather(grid.broadcast(sid, "where"), timeout=60))
        grid.release_all(sid)


def test_cpu_bind_in_a_hosts_file_must_be_a_boolean(tmp_path: Path) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text('[[host]]\nname = "n1"\ncpu_bind = true\n')
    assert load_hosts(path)[0].cpu_bind is True
    path.write_text('[[host]]\nname = "n1"\ncpu_bind = "yes"\n')
    with pytest.raises(ConfigError, match="cpu_bind"):
        load_hosts(path)


def test_host_gpus_map_slots_round_robin_and_say_when_shared() -> None:
    host = Host("gpu1", n_cpu=6, gpus=[0, 1, 2, 3])
    assert host.gpus == (0, 1, 2, 3)
    assert [host.gpu(i) for i in range(6)] == ["0", "1", "2", "3", "0", "1"]
    assert [host.gpu_shared(i) for i in range(6)] == [True, True, False, False, True, True]
    two = Host("gpu2", n_cpu=2, gpus=[0, 1, 2, 3])
    assert [two.gpu(i) for i in range(2)] == ["0", "1"] and not any(two.gpu_shared(i) for i in range(2))
    assert Host("cpu").gpu(0) is None and not Host("cpu").gpu_shared(0)
    hash(host)  # still a frozen, hashable Host


@pytest.mark.parametrize(
    ("gpus", "message"),
    [
        ([], "gpus is empty"),
        ("0,1", "must be a list"),
        (3, "must be a list"),
        ([-1], "must be >= 0"),
        ([True], "index"),
        ([1.5], "index"),
        (["0,1"], "one word"),
        ([""], "one word"),
    ],
)
def test_bad_gpus_are_config_errors(gpus: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Host("gpu1", n_cpu=2, gpus=gpus)


def test_gpus_in_a_hosts_file(tmp_path: Path) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text('[[host]]\nname = "gpu1"\nn_cpu = 4\ngpus = [0, 1]\n\n[[host]]\nname = "cpu1"\n')
    gpu1, cpu1 = load_hosts(path)
    assert gpu1.gpus == (0, 1) and cpu1.gpus is None
    path.write_text('[[host]]\nname = "gpu1"\ngpus = 0\n')
    with pytest.raises(ConfigError, match=r"host 'gpu1': key 'gpus' must be list"):
        load_hosts(path)
    path.write_text('[[host]]\nname = "gpu1"\ngpus = [-2]\n')
    with pytest.raises(ConfigError, match=r"hosts.toml: host 'gpu1': a GPU index must be >= 0"):
        load_hosts(path)


# -- OpenMM: the platform a replica asks for ----------------------------------------------
def _openmm() -> None:
    try:
        importlib.import_module("openmm")
    except ImportError:
        require(False, "openmm is not installed: pip install 'isdgrid[openmm]'")


def _missing_gpu_platform() -> str:
    from isdgrid.examples.openmm_tempering import available_platforms

    have = available_platforms()
    missing = [p for p in ("CUDA", "OpenCL") if p not in have]
    if not missing:
        pytest.skip(f"OpenMM has every GPU platform here ({', '.join(have)})")
    return missing[0]


def test_platform_properties_follow_the_slots_visible_devices() -> None:
    from isdgrid.examples.openmm_tempering import DETERMINISTIC_CPU, platform_properties

    for platform in ("CUDA", "OpenCL"):
        assert platform_properties(platform, {"CUDA_VISIBLE_DEVICES": "3"}) == {"DeviceIndex": "0"}
        assert platform_properties(platform, {"CUDA_VISIBLE_DEVICES": "GPU-4c1b"}) == {"DeviceIndex": "0"}
        assert platform_properties(platform, {"CUDA_VISIBLE_DEVICES": "2,5"}) == {"DeviceIndex": "0,1"}  # SLURM: 2
        assert platform_properties(platform, {}) == {}  # no GPU given: OpenMM picks
    assert platform_properties("CPU", {"CUDA_VISIBLE_DEVICES": "1"}) == DETERMINISTIC_CPU
    assert platform_properties("Reference", {"CUDA_VISIBLE_DEVICES": "1"}) == {}


def test_a_replica_asks_for_its_slots_gpu_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The properties are worked out where the replica runs, from that slot's environment."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with Grid([Host("localhost", n_cpu=2, gpus=[4, 5]), Host("127.0.0.1", n_cpu=1)], "local") as grid:
        sid = grid.publish(PlatformAsk())
        asked = grid.gather(grid.broadcast(sid, "asked", "CUDA"), timeout=60)
        assert asked == [{"DeviceIndex": "0"}, {"DeviceIndex": "0"}, {}]  # the slot's one GPU; none given


class PlatformAsk:
    """What a replica on this slot would ask OpenMM for."""

    def asked(self, platform: str) -> dict[str, str]:
        from isdgrid.examples.openmm_tempering import platform_properties

        return platform_properties(platform)


def test_demo_with_a_platform_this_machine_lacks_fails_at_once_in_one_line() -> None:
    _openmm()
    from isdgrid.examples.openmm_tempering import available_platforms

    missing = _missing_gpu_platform()
    proc = subprocess.run(
        [sys.executable, "-m", "isdgrid", "demo", "--engine", "openmm", "--platform", missing, "--slots", "2"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"isdgrid: error: OpenMM has no {missing} platform on this machine")
    assert lines[0].endswith(", ".join(available_platforms()))


def test_a_host_without_the_platform_says_so_in_one_line_before_the_run() -> None:
    """The check on the host (as the replica is published), for hosts the driver cannot check itself."""
    _openmm()
    from isdgrid.examples.openmm_demo import run_demo
    from isdgrid.examples.openmm_tempering import available_platforms

    missing = _missing_gpu_platform()
    with Grid([Host("localhost", n_cpu=2, gpus=[0])], "local") as grid:
        with pytest.raises(ConfigError) as info:
            run_demo(grid, rounds=1, steps=1, platform=missing, checkpoint_every=None)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"OpenMM has no {missing} platform on ")
        assert message.endswith(", ".join(available_platforms()))
        assert grid.status() == []  # nothing stays published
