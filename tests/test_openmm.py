"""The OpenMM tempering example: a real MD engine under the grid (needs ``isdgrid[openmm]``)."""

from __future__ import annotations

import ast
import importlib
import io
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import require
from test_replica_exchange import _round_trips_from_log

from isdgrid import Grid, Host, PublishError
from isdgrid.cli import cli
from isdgrid.examples.openmm_demo import INSTALL_HINT, basin_populations, dipeptide_replica
from isdgrid.examples.openmm_peptide import PHI_ATOMS, PSI_ATOMS, backbone_basin, build_dipeptide, dihedral
from isdgrid.examples.openmm_tempering import GridReplicas, SerialReplicas, Tempering
from isdgrid.examples.replica_exchange import geometric_ladder
from isdgrid.examples.run_checkpoint import RunCheckpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


@pytest.fixture
def openmm() -> None:
    """Skip without openmm; fail in CI, which installs the extra."""
    require(_importable("openmm"), "openmm is not installed: pip install 'isdgrid[openmm]'")


def test_built_dipeptide_has_the_asked_backbone_and_l_chirality(openmm: None) -> None:
    for phi, psi in ((-60.0, -45.0), (-150.0, 150.0), (60.0, 40.0)):
        pos = build_dipeptide(phi, psi).positions
        assert dihedral(*(pos[a] for a in PHI_ATOMS)) == pytest.approx(phi)
        assert dihedral(*(pos[a] for a in PSI_ATOMS)) == pytest.approx(psi)
    peptide = build_dipeptide()
    assert [r.name for r in peptide.topology.residues()] == ["ACE", "ALA", "NME"]
    assert peptide.topology.getNumAtoms() == 22 and peptide.topology.getNumBonds() == 21
    atoms = {(a.residue.name, a.name): a.index for a in peptide.topology.atoms()}
    n, ca, c, cb = (peptide.positions[atoms["ALA", name]] for name in ("N", "CA", "C", "CB"))
    # L-alanine: the chirality dihedral zeta = CA-N-C-CB is about +34 degrees (PROCHECK), -34 for D.
    assert 25 < dihedral(ca, n, c, cb) < 45
    assert "ATOM" in peptide.to_pdb() and "NME" in peptide.to_pdb()


def test_basins() -> None:
    assert backbone_basin(-63, -42) == "alpha_R"
    assert backbone_basin(-150, 155) == "beta"
    assert backbone_basin(-75, 145) == "PPII"
    assert backbone_basin(60, 40) == "alpha_L/C7ax"
    assert backbone_basin(-80, -170) == "other"
    assert basin_populations([(-63, -42), (-150, 155)]) == {
        "alpha_R": 0.5, "beta": 0.5, "PPII": 0.0, "alpha_L/C7ax": 0.0, "other": 0.0,
    }  # fmt: skip


def test_a_copy_of_a_replica_resumes_where_it_was(openmm: None) -> None:
    replica = dipeptide_replica()
    replica.reset(seed=11, temperature=300.0)
    replica.sample(20, 350.0)
    copy = pickle.loads(pickle.dumps(replica))  # what a snapshot of the published object holds
    assert copy._context is None  # the Context stays behind; the copy builds its own
    assert (copy.temperature, copy.steps_done, copy.seed) == (350.0, 20, 11)
    assert copy.positions == replica.positions and copy.velocities == replica.velocities
    assert copy.energy() == replica.energy()
    after = copy.sample(10, 350.0)
    assert after["energy"] != replica.energy() and copy.steps_done == 30


def test_grid_run_equals_the_serial_run(openmm: None, grid: Grid) -> None:
    """CPU platform, one thread, deterministic forces: the same energies and swaps, bit for bit."""
    replica = dipeptide_replica(platform="CPU")
    ladder = geometric_ladder(4, 300.0, 500.0)
    runs = []
    for replicas in (GridReplicas(grid, replica), SerialReplicas(replica, 4)):
        try:
            tempering = Tempering(replicas, ladder, steps=20, thin=5, seed=5)
            result = tempering.run(12)
        finally:
            replicas.close()
        runs.append((tempering.start_energies, result))
    (start_grid, on_grid), (start_serial, serial) = runs
    assert start_grid == start_serial
    assert on_grid.energies == serial.energies and len(serial.energies) == 12
    assert on_grid.swaps == serial.swaps
    assert {s.accepted for s in serial.swaps} == {True, False}  # the seed exercises both outcomes
    assert on_grid.angles == serial.angles and len(serial.lowest_angles(0.0)) == 12 * 4
    assert on_grid.round_trips == serial.round_trips


def test_swap_acceptance_is_what_the_ladder_predicts(openmm: None, grid: Grid) -> None:
    """300 rounds on the (fast) Reference platform: acceptance against the coin and the energy distributions."""
    log = io.StringIO()
    replicas = GridReplicas(grid, dipeptide_replica(platform="Reference"))
    try:
        result = Tempering(replicas, geometric_ladder(4, 300.0, 500.0), steps=25, thin=0, seed=1, log=log).run(300)
    finally:
        replicas.close()
    assert result.attempts == [150, 150, 150]
    lines = [line for line in log.getvalue().splitlines() if not line.startswith("#")]
    assert len(lines) == 300 and result.round_trips == _round_trips_from_log(lines, 4)
    observed, coin, ladder = result.acceptance, result.expected_acceptance(), result.predicted_acceptance()
    for s in range(3):
        rate, expected, predicted = observed[s], coin[s], ladder[s]
        assert rate is not None and expected is not None and predicted is not None
        sigma = (expected * (1 - expected) / 150) ** 0.5
        assert abs(rate - expected) < 4 * sigma + 0.02, (s, rate, expected)  # the Metropolis coin is fair
        assert 0.15 < predicted < 0.95 and abs(rate - predicted) < 0.2, (s, rate, predicted)  # 5 sigma


def test_demo_command_runs_openmm(openmm: None, tmp_path: Path) -> None:
    log = tmp_path / "replicas.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "isdgrid", "demo", "--engine", "openmm", "--slots", "2", "--rounds", "4",
         "--steps", "50", "--log", str(log)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO_ROOT}, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "OpenMM tempering of alanine dipeptide (obc, CPU platform): 2 replicas on 2 slots" in out
    assert "temperatures (K): 300 500" in out and "  0-1 " in out
    assert "backbone basins at 300 K (4 samples" in out and "alpha_R" in out
    assert "time per round:" in out and "OpenMM tempering" in proc.stderr  # the progress bar
    rows = [line.split() for line in log.read_text().splitlines() if not line.startswith("#")]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]


def test_without_openmm_the_demo_says_how_to_install() -> None:
    code = "import sys; sys.modules['openmm'] = None; from isdgrid.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "demo", "--engine", "openmm", "--slots", "1", "--rounds", "1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO_ROOT}, cwd=REPO_ROOT,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert INSTALL_HINT in lines[0] and "pip install 'isdgrid[openmm]'" in lines[0]


def test_publishing_on_a_host_without_openmm_fails_at_once(openmm: None, tmp_path: Path) -> None:
    """The replica imports openmm as it loads: a PublishError naming the host, not a failure at the first call."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "openmm.py").write_text("raise ImportError('No module named openmm (this host has none)')\n")
    python = tmp_path / "python-without-openmm"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{fake}:$PYTHONPATH" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    replica = dipeptide_replica()
    with Grid([Host("localhost", n_cpu=1, python=str(python))]) as grid:
        with pytest.raises(PublishError, match="OpenMMReplica") as caught:
            grid.publish(replica)
        assert caught.value.host == "localhost"
        assert "No module named openmm" in caught.value.remote_traceback


def test_bad_openmm_demo_options_are_refused_before_anything_starts(openmm: None, tmp_path: Path) -> None:
    log = tmp_path / "replicas.txt"
    runner = CliRunner()
    low = runner.invoke(cli, ["demo", "--engine", "openmm", "--tmax", "250", "--log", str(log)])
    assert low.exit_code == 2 and "250 K is below the lowest temperature, 300 K" in low.output
    both = runner.invoke(cli, ["demo", "--engine", "openmm", "--slots", "2", "--hosts", "h.toml", "--log", str(log)])
    assert both.exit_code == 2 and "give --slots or --hosts, not both" in both.output
    assert not log.exists()  # no stray log file


def test_the_replica_of_docs_openmm_md_runs(openmm: None, tmp_path: Path) -> None:
    """The page's example (not run by test_docs, which runs without the extra) runs as a script."""
    text = Path(REPO_ROOT, "docs", "openmm.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) == 1
    (tmp_path / "block.py").write_text(blocks[0])
    proc = subprocess.run(
        [sys.executable, "block.py"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": REPO_ROOT}, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    energies = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert len(energies) == 2 and all(-400.0 < e < 100.0 for e in energies)  # kJ/mol, a peptide near its minimum


def test_a_tempering_run_survives_a_killed_daemon(openmm: None) -> None:
    """A daemon killed mid-run: the run goes back to its last checkpoint and completes."""
    with Grid([Host("localhost", n_cpu=3)], respawn=True, heartbeat_interval=0.2, host_timeout=5.0) as grid:
        replicas = GridReplicas(grid, dipeptide_replica(platform="Reference"))
        log = io.StringIO()
        killed: list[int] = []

        def progress(_: int) -> None:
            if tempering.result.rounds == 13 and not killed:  # a round after the checkpoint of round 10
                process = grid.slots[1].handle.process
                assert process is not None
                killed.append(process.pid)
                os.kill(process.pid, signal.SIGKILL)

        try:
            tempering = Tempering(replicas, geometric_ladder(3, 300.0, 450.0), steps=20, thin=0, seed=2, log=log,
                                  checkpoint_every=5)  # fmt: skip
            result = tempering.run(25, progress)
            steps = grid.gather(grid.broadcast(replicas.service_id, "steps_done"), timeout=60)
        finally:
            replicas.close()
    assert killed and result.rounds == 25
    assert len(result.rollbacks) == 1 and result.rollbacks[0][1] == 10 and 10 < result.rollbacks[0][0] <= 15
    assert steps == [25 * 20] * 3  # every replica, the restored one too, did the run's steps exactly once
    lines = [line for line in log.getvalue().splitlines() if not line.startswith("#")]
    assert [int(line.split()[0]) for line in lines] == list(range(1, 26))  # the log was cut back: no repeat
    assert sum(result.attempts) == 25 * 1 and len(result.energies) == 25


def test_an_openmm_demo_run_resumes_from_its_checkpoint_file(openmm: None, tmp_path: Path) -> None:
    def demo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "isdgrid", "demo", *args], capture_output=True, text=True, timeout=180,
            env={**os.environ, "PYTHONPATH": REPO_ROOT, "ISDGRID_RUN_DIR": str(tmp_path / "run")}, cwd=str(tmp_path),
        )

    first = demo("--engine", "openmm", "--slots", "2", "--rounds", "6", "--steps", "20", "--checkpoint", "md.ckpt",
                 "--checkpoint-every", "4", "--log", "md.log")  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert RunCheckpoint.load(tmp_path / "md.ckpt").rounds == 6  # the run's end is checkpointed too
    wrong = demo("--resume", "md.ckpt", "--engine", "toy")
    assert wrong.returncode == 2 and "the checkpointed run is a openmm run" in wrong.stderr
    resumed = demo("--resume", "md.ckpt", "--rounds", "10")  # the engine, steps, log come from the checkpoint
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming md.ckpt at round 6" in resumed.stderr and "10 rounds x 20 steps" in resumed.stdout
    rows = [line.split() for line in (tmp_path / "md.log").read_text().splitlines() if not line.startswith("#")]
    assert [int(r[0]) for r in rows] == list(range(1, 11))  # continued, no gap, no repeat
    assert RunCheckpoint.load(tmp_path / "md.ckpt").rounds == 10
