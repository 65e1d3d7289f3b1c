"""Tables of a grid for people: as text on a terminal, as HTML in Jupyter (``_repr_html_``).

:class:`StatusTable` is what :meth:`Grid.status` returns: a plain list of
:class:`~isdgrid.grid.ServerStatus` that also shows itself as a table. :func:`slots_html`
draws the grid's own table (one row per slot) for ``Grid._repr_html_``. Every string a
user chose (host names, service ids, loss reasons) is escaped before it goes into HTML.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .grid import ServerStatus

__all__ = ["SlotRow", "StatusTable", "slots_html"]

#: (host, slot index, state, services on the slot) for the grid's table.
SlotRow = tuple[str, int, str, str]

_COLUMNS = ("service", "host", "slot", "state", "busy", "calls", "errors", "pending", "mean ms", "respawns", "snapshot")
_NUMERIC = frozenset({"slot", "calls", "errors", "pending", "mean ms", "respawns", "snapshot"})


class StatusTable(list["ServerStatus"]):
    """The rows of :meth:`Grid.status`: a list of ``ServerStatus``, shown as a table.

    ``print(grid.status())`` writes a text table; in Jupyter the last expression of a cell
    shows as an HTML table. Everything a list does (index, iterate, filter) works as before.
    """

    def cells(self) -> list[tuple[str, ...]]:
        """One tuple of display strings per row, in the order of the table's columns."""
        return [
            (
                row.service_id,
                row.host,
                str(row.slot),
                row.state,
                "busy" if row.busy else "free",
                str(row.calls),
                str(row.errors),
                str(row.pending),
                f"{row.mean_call_time * 1e3:.2f}",
                str(row.respawns),
                _age(row.snapshot_age),
            )
            for row in self
        ]

    def __str__(self) -> str:
        if not self:
            return "(no servers: nothing published)"
        rows = [tuple(c.upper() for c in _COLUMNS), *self.cells()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
        lines = []
        for r in rows:
            parts = [
                cell.rjust(width) if name in _NUMERIC else cell.ljust(width)
                for cell, width, name in zip(r, widths, _COLUMNS, strict=True)
            ]
            lines.append("  ".join(parts).rstrip())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        caption = f"{len(self)} server{'' if len(self) == 1 else 's'}"
        return _html_table(caption, _COLUMNS, self.cells())


def slots_html(summary: str, rows: Sequence[SlotRow]) -> str:
    """The grid's table: ``summary`` as the caption, one row per slot."""
    cells = [(host, str(slot), state, services) for host, slot, state, services in rows]
    return _html_table(summary, ("host", "slot", "state", "services"), cells)


def _html_table(caption: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return (
        f'<table class="isdgrid"><caption>{esc(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _age(seconds: float | None) -> str:
    """How old a snapshot is, for people ("-": none taken)."""
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.1f} h"
