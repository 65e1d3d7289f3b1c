"""A large published object goes once to each host folder; the host's slots load it from there."""

from __future__ import annotations

import hashlib
import logging
import os
import sys

import cloudpickle
import pytest
from conftest import wait_until

from isdgrid import Grid, Host
from isdgrid.grid import STAGE_MIN_BYTES

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Blob:
    """A published object of ``size`` bytes that tells which slot loaded it and what it holds."""

    def __init__(self, size: int) -> None:
        self.data = os.urandom(size)

    def digest(self) -> tuple[str, int]:
        import hashlib

        return hashlib.sha256(self.data).hexdigest(), os.getpid()


def _staged_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "staged" in r.getMessage() and "bytes" in r.getMessage()]


def test_a_large_object_is_staged_once_per_host_and_every_slot_loads_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="isdgrid.remote")
    blob = Blob(4 * STAGE_MIN_BYTES)
    want = hashlib.sha256(blob.data).hexdigest()
    with Grid([Host("localhost", n_cpu=3), Host("127.0.0.1", n_cpu=2)]) as grid:
        sid = grid.publish(blob)
        replies = grid.gather(grid.broadcast(sid, "digest"), timeout=60)
        assert [digest for digest, _ in replies] == [want] * 5
        assert len({pid for _, pid in replies}) == 5
        # the daemons' log lines reach the driver through its output thread: wait for them (bounded)
        wait_until(lambda: len(_staged_lines(caplog)) >= 2, 30)
        staged = _staged_lines(caplog)
        assert len(staged) == 2, staged  # one per host, not one per slot
        for slot in grid.slots:  # nothing staged is left behind
            folder = os.path.join(slot.handle.spec.temp_path, ".isdgrid-stage")
            assert not os.path.exists(folder) or os.listdir(folder) == []
        grid.release_all(sid)


def test_a_small_object_goes_to_each_slot_without_staging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="isdgrid.remote")
    with Grid([Host("localhost", n_cpu=3)]) as grid:
        sid = grid.publish(Blob(16))
        assert len(grid.gather(grid.broadcast(sid, "digest"), timeout=60)) == 3
        assert _staged_lines(caplog) == []
        grid.release_all(sid)
