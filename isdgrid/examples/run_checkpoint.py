"""The run checkpoint of a replica-exchange driver: what a killed run needs to go on.

A :class:`RunCheckpoint` holds, at one round boundary, the snapshot of every replica
(taken by the grid between calls) and the driver's own state: the settings, the exchange
bookkeeping, the random generator's state, the round number and the length of the
replica log. It is written with an atomic rename, so a driver killed at any moment
leaves the previous checkpoint or the new one, never half a file.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from .. import codec
from ..errors import CheckpointError, ConfigError, HostLostError
from ..snapshot import Snapshot, check_fields, read_record, write_record

if TYPE_CHECKING:
    from ..grid import Grid

__all__ = ["CheckpointedRun", "RunCheckpoint", "RunCheckpointer", "continue_log", "log_position"]

log = logging.getLogger(__name__)

_FORMAT = "isdgrid-replica-exchange-run"
_VERSION = 1


@dataclass(frozen=True)
class RunCheckpoint:
    """One consistent point of a replica-exchange run.

    ``snapshot`` holds the replicas (replica ``i`` on server ``i``); ``driver`` is the
    pickled driver state (see ``ReplicaExchange``); ``rounds`` the rounds done;
    ``log_offset`` the length of the replica log at that point (None: no seekable log),
    ``log_path`` its file (None: none).
    """

    snapshot: Snapshot
    driver: bytes
    rounds: int
    log_offset: int | None
    log_path: str | None
    written_at: float

    @property
    def nbytes(self) -> int:
        """Size of the checkpoint, replicas and driver state, in bytes."""
        return self.snapshot.nbytes + len(self.driver)

    def driver_state(self) -> dict[str, Any]:
        """A fresh copy of the driver state (each call unpickles it anew); :class:`CheckpointError` if it cannot."""
        try:
            state = pickle.loads(self.driver)
        except Exception as exc:  # whatever unpickling raises, the checkpoint is unusable
            why = f"{type(exc).__name__}: {exc}"
            raise CheckpointError(f"the driver state of the checkpoint cannot be loaded: {why}") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"the driver state of the checkpoint is a {type(state).__name__}, not a dict")
        return state

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the checkpoint to ``path`` atomically; :class:`CheckpointError` when it cannot."""
        record = {
            "format": _FORMAT,
            "version": _VERSION,
            "snapshot": self.snapshot.to_record(),
            "driver": self.driver,
            "rounds": self.rounds,
            "log_offset": self.log_offset,
            "log_path": self.log_path,
            "written_at": self.written_at,
        }
        write_record(path, record, "checkpoint")

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, trust: bool = False) -> RunCheckpoint:
        """Read a checkpoint written by :meth:`save`.

        Loading unpickles the file, which runs any code it holds: a file another user owns
        or that others can write is refused unless ``trust`` is true (``Snapshot.load``).
        """
        where = repr(os.fspath(path))
        record = read_record(path, "checkpoint", trust=trust)
        if not isinstance(record, dict) or record.get("format") != _FORMAT:
            raise CheckpointError(f"{where} is not a replica-exchange run checkpoint")
        if record.get("version") != _VERSION:
            raise CheckpointError(f"{where} has format version {record.get('version')}; this isdgrid reads {_VERSION}")
        check_fields(
            record, where, "run checkpoint",
            {"snapshot": dict, "driver": bytes, "rounds": int, "log_offset": (int, type(None)),
             "log_path": (str, type(None)), "written_at": (int, float)},
        )  # fmt: skip
        return cls(
            Snapshot.from_record(record["snapshot"], where),
            record["driver"],
            record["rounds"],
            record["log_offset"],
            record["log_path"],
            record["written_at"],
        )


class RunCheckpointer:
    """Takes the run checkpoints of a driver, and takes a run back to the last one after a loss.

    The driver calls :meth:`take` between rounds with its own state (anything picklable),
    and, when a call fails with :class:`HostLostError`, :meth:`back_to_last`: it waits for
    the lost slots' respawn (the grid needs ``respawn=True``), restores every server of
    ``service_id`` to the checkpoint, cuts the replica log back to it, and returns the
    checkpoint, whose :meth:`RunCheckpoint.driver_state` the driver then loads. Each
    checkpoint is also written to ``path`` when given. ``last`` starts a resumed run.
    """

    def __init__(
        self,
        grid: Grid,
        service_id: str,
        *,
        path: str | None = None,
        log: IO[str] | None = None,
        timeout: float | None = 300.0,
        last: RunCheckpoint | None = None,
    ) -> None:
        self.grid = grid
        self.service_id = service_id
        self.path = path
        self.log = log
        self.timeout = timeout
        self.last = last

    def take(self, rounds: int, driver_state: Any) -> RunCheckpoint:
        """Snapshot the servers (between calls), record ``driver_state`` and the log's length."""
        snapshot = self.grid.checkpoint(self.service_id, timeout=self.timeout)
        log_path = getattr(self.log, "name", None)
        checkpoint = RunCheckpoint(
            snapshot, pickle.dumps(driver_state, protocol=codec.PROTOCOL), rounds, log_position(self.log),
            log_path if isinstance(log_path, str) else None, time.time(),
        )
        if self.path is not None:
            checkpoint.save(self.path)
        self.last = checkpoint
        return checkpoint

    def back_to_last(self, error: HostLostError) -> RunCheckpoint:
        """Bring the servers and the log back to the last checkpoint, after ``error``; that checkpoint.

        Re-raises ``error`` when there is no checkpoint yet, or when a lost slot will not
        come back (respawn off, or given up) or not within ``timeout``.
        """
        last = self.last
        if last is None:
            raise error
        log.warning("%s; going back to round %d (the last checkpoint)", error, last.rounds)
        while True:  # bounded: each loss uses up a respawn, and wait_for_respawn raises when none is left
            try:
                self.grid.wait_for_respawn(self.service_id, timeout=self.timeout)
            except (HostLostError, TimeoutError) as exc:
                raise error from exc
            try:
                self.grid.restore(self.service_id, last.snapshot, timeout=self.timeout)
                break
            except HostLostError as again:  # lost again while restoring: wait for that one too
                log.warning("%s; restoring round %d again", again, last.rounds)
                error = again
        continue_log(self.log, last.log_offset)
        return last


class CheckpointedRun:
    """The round loop of a replica-exchange driver that survives lost hosts and resumes.

    A driver sets ``result`` (with ``rounds``, ``checkpoints``, ``rollbacks``),
    ``checkpoint_every`` (None: no checkpoints), ``target_rounds`` and ``_checkpointer``
    (a :class:`RunCheckpointer`, or None when it runs without a grid), and defines
    ``step()`` (one round), ``_state()`` (its part of a checkpoint) and ``_load(state)``.
    """

    result: Any
    checkpoint_every: int | None
    target_rounds: int
    _checkpointer: RunCheckpointer | None

    def step(self) -> Any:
        """One round."""
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def run_rounds(self, rounds: int, progress: Callable[[int], None] | None = None) -> None:
        """Step until ``rounds`` rounds are done in all (a resumed run counts those before).

        A checkpoint every ``checkpoint_every`` rounds and at the end; after a lost host,
        back to the last one (:meth:`recover`). ``progress(k)``: the rounds done since its
        last call (negative after a roll-back).
        """
        self.target_rounds = rounds
        shown = self.result.rounds
        while self.result.rounds < rounds:
            try:
                self.step()
                every = self.checkpoint_every
                if every is not None and self._checkpointer is not None and self.result.rounds % every == 0:
                    self.checkpoint()
            except HostLostError as exc:
                self.recover(exc)
            if progress is not None and self.result.rounds != shown:
                progress(self.result.rounds - shown)
            shown = self.result.rounds
        last = self._checkpointer.last if self._checkpointer is not None else None
        if self.checkpoint_every is not None and last is not None and last.rounds != self.result.rounds:
            self.checkpoint()  # the end: a longer run resumes from here

    def checkpoint(self) -> RunCheckpoint:
        """Take a run checkpoint now (between rounds); its cost goes to ``result.checkpoints``."""
        if self._checkpointer is None:
            raise ConfigError("this run takes no checkpoints (its replicas are not on a grid)")
        started = time.perf_counter()
        checkpoint = self._checkpointer.take(self.result.rounds, self._state())
        self.result.checkpoints.append((time.perf_counter() - started, checkpoint.nbytes))
        return checkpoint

    def recover(self, error: HostLostError) -> int:
        """After a lost host: wait for its respawn, go back to the last checkpoint; the rounds undone.

        Re-raises ``error`` when there is no checkpoint, or when the host will not come back.
        """
        if self._checkpointer is None:
            raise error
        failed_at = self.result.rounds
        last = self._checkpointer.back_to_last(error)
        kept = self.result.rollbacks, self.result.checkpoints
        self._load(last.driver_state())
        self.result.rollbacks, self.result.checkpoints = kept
        self.result.rollbacks.append((failed_at, last.rounds))
        return failed_at - last.rounds

    def _continue_from(self, checkpoint: RunCheckpoint, state: dict[str, Any]) -> None:
        """Start as the checkpointed run: its replicas restored, its state loaded, its log cut back."""
        checkpointer = self._checkpointer
        assert checkpointer is not None
        checkpointer.grid.restore(checkpointer.service_id, checkpoint.snapshot, timeout=checkpointer.timeout)
        self._load(state)
        self.result.checkpoints, self.result.rollbacks = [], []  # those of this process only
        continue_log(checkpointer.log, checkpoint.log_offset)


def log_position(log: IO[str] | None) -> int | None:
    """The replica log's length after a flush (None: no log, or one that cannot seek)."""
    if log is None:
        return None
    log.flush()
    try:
        return log.tell() if log.seekable() else None
    except (OSError, io.UnsupportedOperation):
        return None


def continue_log(log: IO[str] | None, offset: int | None) -> None:
    """Cut the replica log back to ``offset``, so the rounds after the checkpoint are written once.

    A log that cannot seek gets a comment line instead. Raises :class:`CheckpointError`
    for a log shorter than ``offset`` (not the log of that run).
    """
    if log is None:
        return
    if offset is None or not log.seekable():
        log.write("# rolled back to the last checkpoint; the rounds after it follow again\n")
        return
    log.flush()
    end = log.seek(0, io.SEEK_END)
    if end < offset:
        name = getattr(log, "name", "the replica log")
        raise CheckpointError(
            f"{name} has {end} bytes, the checkpoint expects at least {offset}: give the log of the run it checkpointed"
        )
    log.seek(offset)
    log.truncate()
