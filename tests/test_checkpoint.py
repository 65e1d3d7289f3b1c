"""Snapshots of services, respawn from them, and a replica-exchange run that survives faults.

Real daemons in real processes; the faults are real: ``kill -9`` of daemons (from another
thread, while their calls run) and of a driver process.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest
from conftest import alive, child_pids, wait_until

from isdgrid import CheckpointError, Grid, Host, HostLostError, Snapshot, statusfile
from isdgrid.examples.boltzmann import check_boltzmann, exact_marginal
from isdgrid.examples.replica_exchange import ReplicaExchange, RuggedDoubleWell, geometric_ladder
from isdgrid.examples.run_checkpoint import RunCheckpoint
from isdgrid.statusfile import format_status

# The classes below travel by value, as those of a driver's __main__ do (snapshots included).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_LOSS = {"heartbeat_interval": 0.2, "host_timeout": 5.0}


class Tally:
    """A counter whose history says which calls it has seen."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def add(self, value: int) -> int:
        self.seen.append(value)
        return len(self.seen)

    def slow(self, seconds: float) -> None:
        time.sleep(seconds)


class HoldsALock:
    def __init__(self) -> None:
        self.value = 1

    def grab(self) -> None:
        self.lock = threading.Lock()


class Engine:
    """An object with a handle that cannot be pickled, left out by __getstate__ and rebuilt."""

    def __init__(self) -> None:
        self.position = 0
        self.handle: threading.Lock | None = threading.Lock()

    def move(self, by: int) -> int:
        assert self.handle is not None, "the handle was rebuilt by __setstate__"
        self.position += by
        return self.position

    def __getstate__(self) -> dict[str, int]:
        return {"position": self.position}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.position = state["position"]
        self.handle = threading.Lock()


def _pid(grid: Grid, index: int) -> int:
    process = grid.slots[index].handle.process
    assert process is not None
    return process.pid


def test_a_snapshot_is_taken_between_calls_and_restores_in_call_order(tmp_path: Path) -> None:
    with Grid([Host("localhost", n_cpu=2)]) as grid:
        sid = grid.publish(Tally())
        proxy = grid.acquire_service(sid)
        other = grid.acquire_service(sid)
        before = [proxy.add(i) for i in range(5)]
        snapshot = grid.checkpoint(sid, tmp_path / "tally.snap", timeout=60)
        after = proxy.add(99)  # made after the snapshot: not in it
        assert [r.get(timeout=30) for r in before] == [1, 2, 3, 4, 5]
        assert after.get(timeout=30) == 6
        other.add(7).get(timeout=30)
        assert isinstance(snapshot, Snapshot) and len(snapshot.states) == 2
        assert snapshot.nbytes == sum(len(s) for s in snapshot.states) > 0 and snapshot.seconds > 0

        grid.restore(sid, Snapshot.load(tmp_path / "tally.snap"), timeout=60)
        assert proxy.seen == [0, 1, 2, 3, 4]  # back to the snapshot: 99 is gone
        assert other.seen == []
        # The grid's own operations are not the user's calls.
        rows = {row.slot: row for row in grid.status()}
        assert sorted(row.calls for row in rows.values()) == [1 + 1, 5 + 1 + 1]  # calls and reads of .seen
        assert all(row.snapshot_age is not None and 0 <= row.snapshot_age < 60 for row in rows.values())
        table = format_status([statusfile.snapshot(grid, time.time())])  # what `isdgrid status` prints
        assert "SNAPSHOT" in table[2] and all(line.rstrip().endswith(" s") for line in table[3:5]), table
        grid.release_service(proxy)
        grid.release_service(other)


def test_getstate_decides_what_a_snapshot_holds() -> None:
    with Grid([Host("localhost", n_cpu=1)]) as grid:
        sid = grid.publish(Engine())
        proxy = grid.acquire_service(sid)
        assert proxy.move(5).get(timeout=30) == 5
        snapshot = grid.checkpoint(sid, timeout=60)
        assert proxy.move(10).get(timeout=30) == 15
        grid.restore(sid, snapshot, timeout=60)
        assert proxy.move(1).get(timeout=30) == 6  # the handle was rebuilt, the position restored
        grid.release_service(proxy)


def test_a_snapshot_of_an_unpicklable_object_names_the_class_and_the_host() -> None:
    with Grid([Host("localhost", n_cpu=2)]) as grid:
        sid = grid.publish(HoldsALock())
        grid.gather(grid.broadcast(sid, "grab"), timeout=30)
        grid.release_all(sid)
        with pytest.raises(CheckpointError) as info:
            grid.checkpoint(sid, timeout=60)
        err = info.value
        assert err.class_name == "HoldsALock" and err.host == "localhost" and err.slot in (0, 1)
        assert "HoldsALock" in str(err) and "lock" in str(err) and "__getstate__" in str(err)
        # The servers still serve.
        assert grid.gather(grid.broadcast(sid, "value"), timeout=30) == [1, 1]
        grid.release_all(sid)


def test_a_snapshot_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    with Grid([Host("localhost", n_cpu=2)]) as grid:
        tally = grid.publish(Tally())
        engine = grid.publish(Engine())
        snapshot = grid.checkpoint(tally, timeout=60)
        with pytest.raises(CheckpointError, match="Tally objects, service .* is a Engine"):
            grid.restore(engine, snapshot)
        small = Snapshot(snapshot.service_id, snapshot.class_name, snapshot.states[:1], snapshot.taken_at, 0.0)
        with pytest.raises(CheckpointError, match="has 1 servers, service .* has 2"):
            grid.restore(tally, small)
    (tmp_path / "junk").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read snapshot file"):
        Snapshot.load(tmp_path / "junk")


def test_a_respawned_slot_comes_back_with_its_latest_snapshot_and_pending_calls_fail() -> None:
    with Grid([Host("localhost", n_cpu=2)], respawn=True, **FAST_LOSS) as grid:
        sid = grid.publish(Tally())
        proxy = grid.acquire_service(sid)
        slot = proxy._isdgrid_server.slot.index
        grid.gather([proxy.add(i) for i in range(3)], timeout=30)
        grid.checkpoint(sid, timeout=60)
        proxy.add(3).get(timeout=30)  # after the snapshot: lost with the host
        running = proxy.slow(30)
        queued = [proxy.add(i) for i in range(4, 10)]
        time.sleep(0.2)
        os.kill(_pid(grid, slot), signal.SIGKILL)
        for result in [running, *queued]:
            with pytest.raises(HostLostError):
                result.get(timeout=30)  # never replayed silently
        grid.wait_for_respawn(sid, timeout=60)
        assert proxy.seen == [0, 1, 2]  # the snapshot, not the object as published, not later calls
        assert proxy.add(100).get(timeout=30) == 4
        assert [row.respawns for row in grid.status() if row.slot == slot] == [1]
        grid.release_service(proxy)


def test_wait_for_respawn_without_respawn_raises_at_once() -> None:
    with Grid([Host("localhost", n_cpu=2)], **FAST_LOSS) as grid:
        sid = grid.publish(Tally())
        grid.wait_for_respawn(sid, timeout=1)  # nothing lost: returns
        victim = grid.slots[0]  # a respawn (a fork) may replace it in grid.slots at once
        os.kill(_pid(grid, 0), signal.SIGKILL)
        assert wait_until(lambda: victim.lost.is_set(), 30)
        started = time.monotonic()
        with pytest.raises(HostLostError, match="will not come back"):
            grid.wait_for_respawn(sid, timeout=60)
        assert time.monotonic() - started < 10


# -- the replica-exchange driver ----------------------------------------------------------
def _exchange(
    grid: Grid, rounds: int, every: int, log: io.StringIO, killer: random.Random | None, killed: list[int] | None = None
) -> ReplicaExchange:
    rex = ReplicaExchange(grid, geometric_ladder(4, 1.0, 6.0), steps=200, seed=7, log=log, checkpoint_every=every)
    kills: list[threading.Timer] = []

    def progress(_: int) -> None:
        # About every 40 rounds, kill a random daemon a moment later: mid-round, its calls running.
        if killer is not None and killer.random() < 1 / 40:
            pid = _pid(grid, killer.randrange(len(grid.slots)))
            if killed is not None:
                killed.append(pid)
            timer = threading.Timer(killer.uniform(0.0, 0.01), _kill_quietly, (pid,))
            kills.append(timer)
            timer.start()

    rex.run(rounds, progress)
    for timer in kills:
        timer.join(5)
    return rex


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow  # a long stress test: the main pytest stage only
def test_replica_exchange_survives_killed_daemons_and_ends_as_an_undisturbed_run() -> None:
    rounds, every = 300, 10
    with Grid([Host("localhost", n_cpu=4)], **FAST_LOSS) as grid:
        calm_log = io.StringIO()
        calm = _exchange(grid, rounds, every, calm_log, None).result
    with Grid([Host("localhost", n_cpu=4)], respawn=True, max_respawns=50, **FAST_LOSS) as grid:
        log = io.StringIO()
        seed = int.from_bytes(os.urandom(4), "little")  # where the kills fall: another run, other places
        killed: list[int] = []
        rex = _exchange(grid, rounds, every, log, random.Random(seed), killed)
        result = rex.result
        assert result.rollbacks, f"no daemon was killed (killer seed {seed}): the test proves nothing"
        assert grid.respawn_count >= len(result.rollbacks)
        for failed_at, back in result.rollbacks:
            assert back % every == 0 and 0 <= failed_at - back <= every
        # A kill that fell after the last round is respawned too; then the grid serves on.
        assert wait_until(lambda: not set(killed) & {_pid(grid, i) for i in range(4)}, 60), "a slot never came back"
        grid.wait_for_respawn(rex.service_id, timeout=60)
        steps = grid.gather(grid.broadcast(rex.service_id, "steps_done"), timeout=30)
        assert len(steps) == 4 and all(n % 200 == 0 for n in steps), steps
        grid.release_all(rex.service_id)

    assert result.rounds == calm.rounds == rounds
    assert result.samples == calm.samples and result.accepted == calm.accepted, f"killer seed {seed}"
    assert result.round_trips == calm.round_trips and result.mc_acceptance == calm.mc_acceptance
    assert log.getvalue() == calm_log.getvalue()  # no gap, no repeated round
    check = check_boltzmann(result.lowest_samples(burn_in=0.1), exact_marginal(RuggedDoubleWell().energy, 1.0))
    assert check.passed, check.summary()


def test_restored_replicas_keep_their_step_counters() -> None:
    with Grid([Host("localhost", n_cpu=2)], respawn=True, **FAST_LOSS) as grid:
        rex = ReplicaExchange(grid, [1.0, 2.0], steps=50, seed=1, checkpoint_every=3)
        rex.run(4)  # checkpoints at rounds 0 and 3, and at the end (4)
        grid.gather(grid.broadcast(rex.service_id, "sample", 50), timeout=30)  # after the last checkpoint
        grid.release_all(rex.service_id)
        victim = grid.slots[1]  # a respawn (a fork) may replace it in grid.slots at once
        os.kill(_pid(grid, 1), signal.SIGKILL)
        assert wait_until(lambda: victim.lost.is_set(), 30)
        grid.wait_for_respawn(rex.service_id, timeout=60)
        steps = grid.gather(grid.broadcast(rex.service_id, "steps_done"), timeout=30)
        assert steps == [5 * 50, 4 * 50]  # the respawned one went back to its snapshot, no further
        grid.release_all(rex.service_id)


# -- a killed driver, resumed -------------------------------------------------------------
def _demo(*args: str, tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "ISDGRID_RUN_DIR": str(tmp_path / "run")}
    return subprocess.Popen(
        [sys.executable, "-m", "isdgrid", "demo", "--slots", "4", "--steps", "200", "--seed", "5",
         "--checkpoint-every", "10", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path),
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 180) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    return out


def _science(report: str) -> list[str]:
    """The report lines that depend on the sampling, not on timing."""
    keep = ("replica exchange:", "temperatures:", "  0-1", "  1-2", "  2-3", "replica round trips", "Metropolis",
            "Boltzmann")
    return [line for line in report.splitlines() if line.startswith(keep)]


def test_a_killed_driver_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path: Path) -> None:
    rounds = "300"
    whole = _finish(_demo("--rounds", rounds, "--log", "whole.log", "--checkpoint", "whole.ckpt", tmp_path=tmp_path))

    driver = _demo("--rounds", rounds, "--log", "cut.log", "--checkpoint", "cut.ckpt", tmp_path=tmp_path)
    ckpt = tmp_path / "cut.ckpt"
    try:
        def mid_run() -> bool:
            return ckpt.exists() and 20 <= RunCheckpoint.load(ckpt).rounds < 250

        assert wait_until(mid_run, 120, step=0.005), "the driver never wrote a checkpoint mid-run"
        daemons = psutil.Process(driver.pid).children(recursive=True)
        assert len(daemons) >= 3
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
        driver.stdout.close()  # type: ignore[union-attr]
        driver.stderr.close()  # type: ignore[union-attr]
    # The daemons see their driver gone (stdin closed) and exit: no orphan.
    assert wait_until(lambda: not alive(daemons), 60), "daemons outlived their killed driver"
    stopped_at = RunCheckpoint.load(ckpt).rounds
    assert stopped_at < int(rounds)

    resumed = _finish(_demo("--resume", "cut.ckpt", tmp_path=tmp_path))  # the same options: they agree
    assert f"{rounds} rounds x 200 steps" in resumed
    assert _science(resumed) == _science(whole)  # same exchanges, trips, acceptance, check
    assert "Boltzmann check at T=1: PASS" in resumed
    assert (tmp_path / "cut.log").read_text() == (tmp_path / "whole.log").read_text()
    assert RunCheckpoint.load(ckpt).rounds == int(rounds)
    assert not child_pids()


def test_resume_checks_its_input_before_starting(tmp_path: Path) -> None:
    _finish(_demo("--rounds", "5", "--seed", "5", "--checkpoint", "small.ckpt", tmp_path=tmp_path))
    for args, expected in [
        (["--resume", "small.ckpt", "--slots", "2"], "holds 4 replicas: give 4 slots in all, not 2"),
        (["--resume", "small.ckpt", "--seed", "9"], "--seed 9 (the run has 5): a resumed run keeps"),
        (["--resume", "missing.ckpt"], "no checkpoint file"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "isdgrid", "demo", *args], capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": REPO_ROOT}, cwd=str(tmp_path),
        )
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_resumes_on_other_hosts(tmp_path: Path) -> None:
    _finish(_demo("--rounds", "10", "--checkpoint", "moved.ckpt", tmp_path=tmp_path))
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[[host]]\nname = "localhost"\nn_cpu = 1\n\n[[host]]\nname = "127.0.0.1"\nn_cpu = 3\n')
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "ISDGRID_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.run(
        [sys.executable, "-m", "isdgrid", "demo", "--resume", "moved.ckpt", "--rounds", "15", "--hosts", str(hosts)],
        capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "resuming moved.ckpt at round 10" in proc.stderr
    assert "4 replicas on 4 slots of 2 host(s)" in proc.stdout and "15 rounds x 200 steps" in proc.stdout
    assert RunCheckpoint.load(tmp_path / "moved.ckpt").rounds == 15


@pytest.mark.slow  # a long stress test: the main pytest stage only
def test_snapshots_taken_while_many_threads_call_are_each_a_point_in_call_order() -> None:
    """8 threads call 4 servers while another thread checkpoints 30 times: each state is a prefix of the history."""
    with Grid([Host("localhost", n_cpu=4)]) as grid:
        sid = grid.publish(Tally())
        stop = threading.Event()
        errors: list[BaseException] = []

        def caller(k: int) -> None:
            try:
                while not stop.is_set():
                    proxy = grid.acquire_service(sid, timeout=30)
                    results = [proxy.add(k * 1_000_000 + i) for i in range(20)]
                    grid.release_service(proxy)
                    grid.gather(results, timeout=30)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        snapshots = []
        try:
            for _ in range(30):
                snapshots.append(grid.checkpoint(sid, timeout=60))
                time.sleep(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not errors and not any(t.is_alive() for t in threads)
        final = [grid.acquire_service(sid, timeout=30) for _ in range(4)]
        histories = {p._isdgrid_server.index: p.seen for p in final}
        for p in final:
            grid.release_service(p)
    grew = 0
    for snapshot in snapshots:
        for index, state in enumerate(snapshot.states):
            seen = pickle.loads(state).seen
            assert seen == histories[index][: len(seen)]  # a point between calls of that server's order
            grew += bool(seen)
    assert grew > 0 and len({tuple(len(pickle.loads(s).seen) for s in snap.states) for snap in snapshots}) > 5


def test_a_daemon_killed_during_checkpoints_fails_them_and_nothing_hangs() -> None:
    with Grid([Host("localhost", n_cpu=3)], respawn=True, **FAST_LOSS) as grid:
        sid = grid.publish(Tally())
        grid.gather(grid.broadcast(sid, "add", 1), timeout=30)
        grid.release_all(sid)
        outcomes: list[str] = []
        victim = _pid(grid, 2)
        timer = threading.Timer(0.05, _kill_quietly, (victim,))
        timer.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(outcomes) < 200:
            try:
                grid.checkpoint(sid, timeout=30)
                outcomes.append("ok")
            except HostLostError:
                outcomes.append("lost")
                grid.wait_for_respawn(sid, timeout=60)
        timer.join(5)
        assert "lost" in outcomes and outcomes[-1] == "ok", outcomes
        assert grid.gather(grid.broadcast(sid, "add", 2), timeout=30) == [2, 2, 2]  # the respawned one too
        grid.release_all(sid)


# -- restore: the respawn state, all or nothing ---------------------------------------------
def _explode(message: str) -> None:
    raise ValueError(message)


class WillNotLoad:
    """A state whose unpickling fails on the host (as a state of a class it cannot import would)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _explode, ("this state does not load",)


def test_a_respawn_brings_back_the_restored_snapshot_not_a_newer_one() -> None:
    with Grid([Host("localhost", n_cpu=1)], respawn=True, **FAST_LOSS) as grid:
        sid = grid.publish(Tally())
        proxy = grid.acquire_service(sid)
        proxy.add(1).get(timeout=30)
        old = grid.checkpoint(sid, timeout=60)
        proxy.add(2).get(timeout=30)
        grid.checkpoint(sid, timeout=60)  # newer than `old`, kept for a respawn until the restore
        grid.restore(sid, old, timeout=60)  # the driver rolls back
        assert proxy.seen == [1]
        victim = grid.slots[0]  # a respawn (a fork) may replace it in grid.slots at once
        os.kill(_pid(grid, 0), signal.SIGKILL)
        assert wait_until(lambda: victim.lost.is_set(), 30)
        grid.wait_for_respawn(sid, timeout=60)
        assert proxy.seen == [1]  # the restored state, not the newer snapshot [1, 2]
        grid.release_service(proxy)


def test_a_restore_that_fails_on_one_server_puts_every_server_back_and_names_it() -> None:
    with Grid([Host("localhost", n_cpu=3)], respawn=True, **FAST_LOSS) as grid:
        sid = grid.publish(Tally())
        grid.gather(grid.scatter(sid, "add", [10, 20, 30]), timeout=30)
        good = grid.checkpoint(sid, timeout=60)
        grid.gather(grid.scatter(sid, "add", [11, 21, 31]), timeout=30)
        before = grid.gather(grid.broadcast(sid, "seen"), timeout=30)
        assert before == [[10, 11], [20, 21], [30, 31]]
        servers = grid.servers[sid]
        bad = Snapshot(sid, good.class_name, (good.states[0], cloudpickle.dumps(WillNotLoad()), good.states[2]),
                       good.taken_at, 0.0)  # fmt: skip
        with pytest.raises(CheckpointError) as info:
            grid.restore(sid, bad, timeout=60)
        assert grid.gather(grid.broadcast(sid, "seen"), timeout=30) == before  # nothing half restored
        err = info.value
        assert (err.host, err.slot, err.class_name) == ("localhost", servers[1].slot_index, "Tally"), str(err)
        assert "server 1 of 3" in str(err) and "does not load" in str(err) and "back to its state" in str(err)
        # The failed restore changed no respawn state either: a lost server comes back with `good`.
        victim = servers[0].slot  # the server moves to a new slot as soon as the respawn (a fork) is done
        os.kill(victim.handle.process.pid, signal.SIGKILL)
        assert wait_until(lambda: victim.lost.is_set(), 30)
        grid.wait_for_respawn(sid, timeout=60)
        assert grid.gather(grid.broadcast(sid, "seen"), timeout=30) == [[10], [20, 21], [30, 31]]
        grid.restore(sid, good, timeout=60)  # and a good restore still works afterwards
        assert grid.gather(grid.broadcast(sid, "seen"), timeout=30) == [[10], [20], [30]]
        grid.release_all(sid)


# -- checkpoint files -----------------------------------------------------------------------
def _real_snapshot() -> Snapshot:
    with Grid([Host("localhost", n_cpu=2)]) as grid:
        sid = grid.publish(Tally())
        grid.gather(grid.scatter(sid, "add", [1, 2]), timeout=30)
        grid.release_all(sid)
        return grid.checkpoint(sid, timeout=60)


def _run_checkpoint(snapshot: Snapshot) -> RunCheckpoint:
    return RunCheckpoint(snapshot, pickle.dumps({"settings": {"seed": 1}}), 7, 120, "x.log", 1.5)


def test_every_damaged_checkpoint_file_is_refused_with_a_checkpoint_error(tmp_path: Path) -> None:
    """A byte flipped at every offset, files cut short or made longer: each load is a CheckpointError, nothing else."""
    snapshot = _real_snapshot()
    run = _run_checkpoint(snapshot)
    rng = random.Random(20)
    outcomes: dict[str, int] = {}
    for kind, save, load in [
        ("snapshot", snapshot.save, Snapshot.load),
        ("run", run.save, lambda p: RunCheckpoint.load(p).driver_state()),
    ]:
        path = tmp_path / f"{kind}.ckpt"
        save(path)
        data = path.read_bytes()
        flips = []
        for offset in range(len(data)):  # every offset, by 0xFF in the header, by a random byte after it
            flip = 0xFF if offset < 64 else rng.randrange(1, 256)
            flips.append(data[:offset] + bytes([data[offset] ^ flip]) + data[offset + 1 :])
        cuts = [data[:n] for n in [*range(64), *range(64, len(data), 7)]] + [data + b"\0", data + data]
        for mutant in flips + cuts:
            if len(mutant) == len(data):
                with open(path, "r+b") as f:  # an overwrite in place: cheaper than a new file on a busy disk
                    f.write(mutant)
            else:
                path.write_bytes(mutant)
            try:
                load(path)
            except CheckpointError:
                outcomes["refused"] = outcomes.get("refused", 0) + 1
            except BaseException as exc:  # noqa: BLE001 - the failure the test reports
                pytest.fail(f"a damaged {kind} file raised {type(exc).__name__}: {exc}")
            else:
                outcomes["loaded"] = outcomes.get("loaded", 0) + 1
        path.write_bytes(data)
        load(path)  # the undamaged file still loads
    # Every mutant differs from the file saved: none may load as if it were that file.
    assert outcomes.get("loaded", 0) == 0 and outcomes["refused"] > 1000, outcomes
    assert Snapshot.load(tmp_path / "snapshot.ckpt") == snapshot


def test_a_well_formed_file_with_a_damaged_record_is_a_checkpoint_error(tmp_path: Path) -> None:
    from isdgrid.snapshot import write_record

    snapshot = _real_snapshot()
    good = snapshot.to_record()
    records = [{k: v for k, v in good.items() if k != key} for key in good]  # each key missing
    records += [{**good, key: object()} for key in good if key not in ("format", "version")]  # each of a wrong type
    records += [{**good, "states": [b"x", 3]}, ["not", "a", "dict"], None]
    for record in records:
        write_record(tmp_path / "r.snap", record, "snapshot")
        with pytest.raises(CheckpointError):
            Snapshot.load(tmp_path / "r.snap")
    run = _run_checkpoint(snapshot)
    run.save(tmp_path / "run.ckpt")
    assert RunCheckpoint.load(tmp_path / "run.ckpt") == run
    for bad_driver in (b"garbage", pickle.dumps([1, 2])):
        _run_checkpoint(snapshot).__class__(snapshot, bad_driver, 7, None, None, 1.0).save(tmp_path / "run.ckpt")
        with pytest.raises(CheckpointError, match="driver state"):
            RunCheckpoint.load(tmp_path / "run.ckpt").driver_state()
    # A bare pickle, as isdgrid wrote before its files had a checksum: the error says so.
    (tmp_path / "old.snap").write_bytes(pickle.dumps(good))
    with pytest.raises(CheckpointError, match="older isdgrid"):
        Snapshot.load(tmp_path / "old.snap")


def test_saving_where_it_cannot_is_a_checkpoint_error(tmp_path: Path) -> None:
    snapshot = _real_snapshot()
    with pytest.raises(CheckpointError, match="folder .*nowhere.* does not exist"):
        snapshot.save(tmp_path / "nowhere" / "x.snap")
    with pytest.raises(CheckpointError, match="cannot write checkpoint file"):
        _run_checkpoint(snapshot).save(tmp_path / "nowhere" / "x.ckpt")
    # A disk that takes no more: a child process whose files may not grow past 4 KiB (RLIMIT_FSIZE;
    # with SIGXFSZ ignored the write fails with an OSError, as on a full disk).
    big = Snapshot("s-1", "Tally", (os.urandom(64 * 1024),), 1.0, 0.0)
    script = (
        "import pickle, resource, signal, sys\n"
        "from isdgrid import CheckpointError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "snapshot = pickle.loads(sys.stdin.buffer.read())\n"
        "try:\n"
        "    snapshot.save(sys.argv[1])\n"
        "except CheckpointError as exc:\n"
        "    print('CheckpointError', exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "full.snap")], input=pickle.dumps(big), capture_output=True,
        timeout=60, env={**os.environ, "PYTHONPATH": REPO_ROOT},
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith(b"CheckpointError cannot write snapshot file"), proc
    assert os.listdir(tmp_path) == []  # neither the file nor a temp file


def test_temp_files_of_a_driver_killed_while_saving_go_on_the_next_save(tmp_path: Path) -> None:
    snapshot = _real_snapshot()
    target = tmp_path / "run.snap"
    # A driver killed between writing the temp file and renaming it.
    script = (
        "import os, pickle, signal, sys\n"
        "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "pickle.loads(sys.stdin.buffer.read()).save(sys.argv[1])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(target)], input=pickle.dumps(snapshot), capture_output=True, timeout=60,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".run.snap.") and left[0].endswith(".tmp"), left
    old_style = tmp_path / ".run.snap.k3j9_x2a.tmp"  # as older versions named them: gone once an hour old
    old_style.write_bytes(b"x")
    os.utime(old_style, (time.time() - 7200, time.time() - 7200))
    recent = tmp_path / ".run.snap.abcd1234.tmp"  # perhaps another process saving now: stays
    recent.write_bytes(b"x")
    others = [tmp_path / ".other.snap.abcd1234.tmp", tmp_path / "run.snap.tmp"]  # not ours: stay
    for other in others:
        other.write_bytes(b"x")
        os.utime(other, (time.time() - 7200, time.time() - 7200))
    snapshot.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run.snap", recent.name, *(o.name for o in others)])
    assert Snapshot.load(target) == snapshot


def test_a_checkpoint_file_another_user_owns_or_can_write_is_refused_unless_trusted(tmp_path: Path) -> None:
    import pwd

    if os.geteuid() != 0:
        pytest.fail("this test gives a file to another user: run it as root (as CI does)")
    nobody = pwd.getpwnam("nobody").pw_uid
    snapshot = _real_snapshot()
    run = _run_checkpoint(snapshot)
    for kind, save, load in [("snapshot", snapshot.save, Snapshot.load), ("checkpoint", run.save, RunCheckpoint.load)]:
        path = tmp_path / f"{kind}.file"
        save(path)
        assert load(path) is not None  # ours, mode 0600
        os.chown(path, nobody, -1)
        with pytest.raises(CheckpointError, match=rf"refusing to load {kind} file .*belongs to user 'nobody'.*runs"):
            load(path)
        assert load(path, trust=True) is not None
        os.chown(path, os.geteuid(), -1)
        for mode in (0o620, 0o602):
            os.chmod(path, mode)
            with pytest.raises(CheckpointError, match=f"group or others can write it \\(mode 0{mode:o}; chmod go-w"):
                load(path)
            assert load(path, trust=True) is not None


def test_demo_resume_refuses_a_checkpoint_another_user_owns_unless_trusted(tmp_path: Path) -> None:
    import pwd

    if os.geteuid() != 0:
        pytest.fail("this test gives a file to another user: run it as root (as CI does)")
    _finish(_demo("--rounds", "3", "--checkpoint", "theirs.ckpt", tmp_path=tmp_path))
    os.chown(tmp_path / "theirs.ckpt", pwd.getpwnam("nobody").pw_uid, -1)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "ISDGRID_RUN_DIR": str(tmp_path / "run")}
    refused = subprocess.run(
        [sys.executable, "-m", "isdgrid", "demo", "--resume", "theirs.ckpt"], capture_output=True, text=True,
        timeout=60, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "belongs to user 'nobody'" in refused.stderr and "--trust-checkpoint" in refused.stderr
    trusted = subprocess.run(
        [sys.executable, "-m", "isdgrid", "demo", "--resume", "theirs.ckpt", "--trust-checkpoint",
         "--checkpoint", "mine.ckpt"], capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert trusted.returncode == 0, trusted.stderr
    assert "resuming theirs.ckpt at round 3" in trusted.stderr
