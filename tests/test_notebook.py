"""Jupyter: the tables of a grid (``_repr_html_``) and docs/ensembles.ipynb run in a real kernel.

The notebook runs in a real ipykernel started by nbclient (cwd: a tmp folder, this checkout
on PYTHONPATH), and its outputs are checked: the slot tables, the values, the remote
traceback, the progress widgets and the checkpoint files. The kernel and every process it
started are ended by the time the test is done (looked up by PID).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import require
from remote_objects import Recorder

from isdgrid import Grid, ServerStatus, Snapshot, StatusTable
from isdgrid.examples.run_checkpoint import RunCheckpoint
from isdgrid.table import slots_html

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "docs" / "ensembles.ipynb"
WIDGET = "application/vnd.jupyter.widget-view+json"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _rows(html: str) -> list[list[str]]:
    """The cells of each body row of an HTML table (as the tables of isdgrid.table draw it)."""
    body = html.split("<tbody>", 1)[1]
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


# -- the tables, in this process ----------------------------------------------------------
def test_status_is_a_list_that_shows_as_a_table(grid: Grid) -> None:
    sid = grid.publish(Recorder())
    grid.gather(grid.broadcast(sid, "ident", 1), timeout=60)
    grid.release_all(sid)
    status = grid.status()
    assert isinstance(status, StatusTable) and isinstance(status, list)
    assert all(isinstance(row, ServerStatus) for row in status) and len(status) == 4
    assert status == list(status)  # compares as the list it is
    lines = str(status).splitlines()
    assert lines[0].split()[:3] == ["SERVICE", "HOST", "SLOT"] and len(lines) == 1 + 4
    assert sorted(int(line.split()[2]) for line in lines[1:]) == [0, 1, 2, 3]
    rows = _rows(status._repr_html_())
    assert sorted((r[0], r[1], int(r[2]), int(r[5])) for r in rows) == [(sid, "localhost", i, 1) for i in range(4)]
    slot_rows = _rows(grid._repr_html_())
    assert [r[:3] for r in slot_rows] == [["localhost", str(i), "up"] for i in range(4)]
    assert all(r[3] == f"{sid} (free)" for r in slot_rows)
    assert "4 slots on 1 hosts, 1 services, running" in grid._repr_html_()


def test_tables_escape_what_users_named() -> None:
    row = ServerStatus(
        service_id="<script>alert(1)</script>", host="a&b", slot=0, state="free", busy=False, lost=False,
        calls=0, errors=0, pending=0, mean_call_time=0.0, respawns=0,
    )
    html = StatusTable([row])._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "a&amp;b" in html
    html = slots_html('Grid "x"', [("<b>host</b>", 0, "lost: <eof>", "-")])
    assert "<b>" not in html and "&lt;b&gt;host&lt;/b&gt;" in html and "lost: &lt;eof&gt;" in html
    assert "Grid &quot;x&quot;" in html
    assert str(StatusTable()) == "(no servers: nothing published)"


# -- docs/ensembles.ipynb in a real kernel ------------------------------------------------
@pytest.mark.timeout(600)  # a kernel start and nine cells of at most 120 s each, on a loaded machine
def test_the_notebook_runs_in_a_kernel_and_shows_what_it_says(tmp_path: Path) -> None:
    try:
        import ipykernel  # noqa: F401 - the kernel nbclient starts
        import nbformat
        from nbclient import NotebookClient
    except ImportError as exc:
        require(False, f"the notebook tools are not installed ({exc.name}): pip install -e '.[test]'")
        raise  # not reached: require skips or fails
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    seen: dict[int, psutil.Process] = {}  # the kernel and every process it started

    def watch(**_: Any) -> None:
        kernel = psutil.Process(client.km.provisioner.pid)
        for proc in [kernel, *kernel.children(recursive=True)]:
            seen.setdefault(proc.pid, proc)

    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
        on_notebook_start=watch, on_cell_executed=watch,
    )
    try:
        client.execute(env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    finally:
        gone, alive = psutil.wait_procs(list(seen.values()), timeout=30)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=10)
    assert len(seen) >= 3  # the kernel and the grid's two daemons
    assert not [p.pid for p in alive], "the kernel or a daemon outlived the notebook"

    cells = {cell.get("id"): cell for cell in notebook.cells if cell.cell_type == "code"}

    def outputs(cell_id: str, kind: str) -> list[Any]:
        return [o for o in cells[cell_id].outputs if o.output_type == kind]

    def html(cell_id: str) -> str:
        (result,) = outputs(cell_id, "execute_result")
        return str(result.data["text/html"])

    def stdout(cell_id: str) -> str:
        return "".join(o.text for o in outputs(cell_id, "stream") if o.name == "stdout")

    # The grid: a table of its two slots; at the end, the same slots stopped.
    assert "Grid: 2 slots on 1 hosts, 0 services, running" in html("grid")
    assert _rows(html("grid")) == [["localhost", "0", "up", "-"], ["localhost", "1", "up", "-"]]
    assert "terminated" in html("terminate")
    assert [r[2] for r in _rows(html("terminate"))] == ["stopped", "stopped"]

    sid = stdout("publish").split(":")[0]
    assert sid.startswith("Squarer-") and "2 servers, 2 processes, none of them this kernel: True" in stdout("publish")
    # The load-balanced loop: a progress widget, and the values in item order.
    assert any(WIDGET in o.data for o in outputs("squares", "display_data"))
    assert stdout("squares").strip() == str([x * x for x in range(20)])
    # The status table: one row per server, every call counted (a broadcast and 20 items).
    rows = _rows(html("status"))
    assert sorted((r[0], r[1], r[2]) for r in rows) == [(sid, "localhost", "0"), (sid, "localhost", "1")]
    assert sum(int(r[5]) for r in rows) == 2 + 20
    text = stdout("status-text").splitlines()
    assert text[0].split()[:3] == ["SERVICE", "HOST", "SLOT"] and all(sid in line for line in text[1:3])
    # The remote exception: its own type in the notebook, the remote traceback as its cause.
    (error,) = outputs("remote-error", "error")
    assert (error.ename, error.evalue) == ("ValueError", "negative temperature")
    traceback = ANSI.sub("", "\n".join(error.traceback))
    remote = traceback.split("--- remote traceback ---", 1)[1]
    assert "in fail" in remote and "ValueError: negative temperature" in remote
    # The checkpoint: the file is there, holds both servers, and restore brought the counts back.
    snapshot = Snapshot.load(tmp_path / "squarer.snapshot")
    assert snapshot.service_id == sid and snapshot.class_name == "Squarer" and len(snapshot.states) == 2
    at, after = re.findall(r"\[\d+, \d+\]", stdout("checkpoint"))
    assert at == after
    # The replica-exchange demo: a progress widget, its report, its run checkpoint.
    assert any(WIDGET in o.data for o in outputs("demo", "display_data"))
    assert "2 replicas on 2 slots" in stdout("demo") and "30 rounds x 200 steps" in stdout("demo")
    assert RunCheckpoint.load(tmp_path / "rex.ckpt").rounds == 30
