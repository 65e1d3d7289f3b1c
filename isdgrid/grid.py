"""Grid: start daemons on hosts, publish objects on every slot, hand out proxies."""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import enum
import functools
import itertools
import logging
import os
import secrets
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import codec
from .errors import (
    ConfigError,
    GridError,
    GridTerminatedError,
    HostLostError,
    LaunchError,
    PublishError,
    ServiceUnavailableError,
    UnknownServiceError,
)
from .files import DEFAULT_EXCLUDE, pack_files, select_files
from .hints import load_failure_hint, scatter_unpacking_hint
from .hold import Hold
from .hosts import Host
from .ioloop import get_loop
from .launchers import DaemonHandle, Launcher, make_launcher
from .launchers.auto import allocation_launcher
from .mapping import MapIterator
from .openfiles import ensure_open_files
from .proxy import ServiceProxy, cannot_send
from .result import Result
from .server import Server, ServerState
from .service import Service
from .slot import CONTROL, Slot
from .snapshot import Snapshot, restore_service, snapshot_service
from .statusfile import StatusFileWriter
from .table import SlotRow, StatusTable, slots_html
from .timeouts import check_timeout
from .transport import sends_through_loop
from .workers import Workers

__all__ = ["Grid", "GridState", "ServerStatus"]

log = logging.getLogger("isdgrid")

DEFAULT_MAX_MESSAGE_SIZE = 2 * 1024**3
# The longest single wait of gather. Nothing needs a shorter one: a failure (a lost host's
# included) ends the wait at once, and so does a Ctrl-C (a lock's wait is interrupted by a
# signal on POSIX); each wait puts a waiter on every result and takes it off again, which at
# 50 ms cost a 1,000-slot gather of 5 s calls 565 ms of driver CPU.
GATHER_SLICE = 1.0
GATHER_NAMED = 5  # a gather TimeoutError names at most this many of the results it waited for
RESPAWN_POLL = 0.05  # how often wait_for_respawn looks (a respawn takes a daemon start: ~1 s)
RESPAWN_FIRST_PAUSE = 1.0  # seconds between the first failed respawn attempts, doubled each time ...
RESPAWN_MAX_PAUSE = 30.0  # ... up to this
RESPAWN_MIN_ATTEMPTS = 3  # however short respawn_timeout is
WAIT_WARN_EVERY = 30.0  # a broadcast waiting this long for another broadcast's lock logs who holds what


class GridState(enum.Enum):
    """Lifecycle of a grid."""

    STARTING = "starting"
    RUNNING = "running"
    TERMINATED = "terminated"


@dataclass(frozen=True)
class ServerStatus:
    """A snapshot of one server: the original grid's ``jobs`` and ``add_time`` facts."""

    service_id: str
    host: str
    slot: int
    state: str
    busy: bool
    lost: bool
    calls: int
    errors: int
    pending: int
    mean_call_time: float
    respawns: int
    snapshot_age: float | None = None  # seconds since its latest snapshot (None: none taken)
    rank: int = 0  # the slot's index in the grid (its ISDGRID_RANK)
    gpu: str | None = None  # the CUDA_VISIBLE_DEVICES the grid gave the slot (from Host.gpus)
    gpu_shared: bool = False  # another slot of the host has the same GPU


class Grid:
    """A set of daemons on ``hosts`` and the services published on them.

    ``launcher`` is ``"auto"`` (default: this machine's own names, such as ``localhost``,
    start local daemons, any other name is reached over ssh), ``"local"``, ``"ssh"``,
    ``"slurm"``, ``"sge"`` or a :class:`~isdgrid.launchers.Launcher`; with ``hosts=None``
    the launcher supplies them (the nodes of a SLURM or SGE allocation: ``"auto"`` then
    picks ``"slurm"`` or ``"sge"`` inside such a job, and says so in the log).
    Daemons are watched with a heartbeat every ``heartbeat_interval`` seconds; a daemon
    silent for ``host_timeout`` seconds (or whose process ended) is lost, and every call
    on it fails with :class:`HostLostError`. With ``respawn=True`` a lost slot is started
    again (at most ``max_respawns`` times per slot; a start that fails is tried again, with
    pauses from 1 s doubling to 30 s, for ``respawn_timeout`` seconds) and every service
    re-published on it from each server's latest snapshot (:meth:`checkpoint`), else from
    the driver's copy, so its servers serve again. A daemon started by the grid exits by itself
    ``daemon_timeout`` seconds after the driver stops talking to it, or at once when the
    driver's end of its stdin closes. Use as a context manager, or call :meth:`terminate`.

    ``max_message_size`` (bytes, default 2 GiB) bounds one call and one reply: a call over it
    raises :class:`PayloadTooLargeError` at once, a reply over it fails that call alone.

    ``attribute_timeout`` (seconds, default 60; None: no limit) bounds how long reading
    ``proxy.attr`` waits for its value (it runs after the proxy's earlier calls).

    What the published objects print shows on the driver's stdout and stderr, each line
    prefixed ``[host/slot]``; ``forward_output=False`` sends it to the ``isdgrid.remote``
    logger instead. ``log_dir`` also keeps it in one file per slot.

    ``status_file`` (default True) keeps a JSON status file for ``isdgrid status`` in the
    run folder (see :mod:`isdgrid.statusfile`); a string is the file's path, False turns
    it off.

    A host whose Python minor version differs from the driver's is refused with a
    :class:`LaunchError` naming both versions: classes that travel by value (those of the
    driver's ``__main__``) cannot load there. ``allow_python_mismatch=True`` only logs a
    warning, for drivers that publish nothing by value.
    """

    def __init__(
        self,
        hosts: Sequence[Host] | None,
        launcher: str | Launcher = "auto",
        *,
        shared_temp_path: bool = False,
        debug: bool = False,
        verbose: bool | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 5.0,
        heartbeat_interval: float = 1.0,
        host_timeout: float = 10.0,
        daemon_timeout: float = 60.0,
        min_hosts: int | None = None,
        respawn: bool = False,
        max_respawns: int = 10,
        respawn_timeout: float = 600.0,
        log_dir: str | None = None,
        forward_output: bool = True,
        secret: str | None = None,
        launcher_options: Mapping[str, Any] | None = None,
        status_file: bool | str = True,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        attribute_timeout: float | None = 60.0,
        allow_python_mismatch: bool = False,
    ) -> None:
        if heartbeat_interval <= 0 or host_timeout <= heartbeat_interval:
            raise ConfigError("need 0 < heartbeat_interval < host_timeout")
        if max_message_size < 1024:
            raise ConfigError(f"max_message_size must be at least 1024 bytes, not {max_message_size}")
        self.max_message_size = int(max_message_size)
        if attribute_timeout is not None and not attribute_timeout > 0:
            raise ConfigError(f"attribute_timeout must be positive seconds or None, not {attribute_timeout}")
        self.attribute_timeout = attribute_timeout
        picked = allocation_launcher() if launcher == "auto" and hosts is None else None
        if picked is not None:
            log.info("no hosts given: inside a %s job, the grid uses the %s launcher", picked, picked)
            launcher = picked
        if isinstance(launcher, Launcher):
            self._launcher = launcher
        else:
            options = {
                "log_dir": log_dir,
                "forward_output": forward_output,
                "heartbeat_timeout": daemon_timeout,
                "stop_timeout": stop_timeout,  # the host daemons' TERM-to-KILL grace
                **(launcher_options or {}),
            }
            self._launcher = make_launcher(launcher, **options)
        self._launcher.shared_temp_path = shared_temp_path
        hosts = self._launcher.default_hosts() if hosts is None else list(hosts)
        if not hosts:
            raise ConfigError("a grid needs at least one host")
        if not all(isinstance(h, Host) for h in hosts):
            raise ConfigError("hosts must be isdgrid.Host objects (see create_host_list and load_hosts)")
        _refuse_duplicate_hosts(hosts)
        self.hosts: list[Host] = hosts
        self.shared_temp_path = shared_temp_path
        self.servers: dict[str, list[Server]] = {}
        self.queues: dict[str, Any] = {}
        self.debug = debug
        self.verbose = bool(verbose)
        if debug or verbose:  # otherwise the logging set up by the user stays as it is
            self.set_debug(debug, verbose)
        self._secret = secret or secrets.token_hex(32)
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._heartbeat_interval = heartbeat_interval
        self._host_timeout = host_timeout
        self._respawn = respawn
        self._max_respawns = max_respawns
        self._respawn_timeout = respawn_timeout
        self._terminated = threading.Event()  # wakes respawn threads that wait between attempts
        self._allow_python_mismatch = allow_python_mismatch
        self.respawn_count = 0
        self._services: dict[str, Service] = {}
        self._held: dict[str, Hold] = {}
        # Results of scatter calls made from an unpacked list or tuple: (name, index, item), for
        # gather's hint when such a call fails on its arguments.
        self._unpacked: weakref.WeakKeyDictionary[concurrent.futures.Future[Any], tuple[str, int, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._slots: list[Slot] = []
        self._given_up: set[Slot] = set()  # lost slots that will not be respawned
        self._copies: list[tuple[bytes, frozenset[str]]] = []  # copy_files archives, the hosts they went to
        self._files_generation: dict[str, int] = {}  # per host: the folder generation the copies are in
        self._files_lock = threading.Lock()
        self._lock = threading.RLock()
        self._state = GridState.STARTING
        self._status_writer: StatusFileWriter | None = None
        self._pid = os.getpid()  # the process that owns the daemons and connections
        self._forked = False  # set in a forked child (_mark_forked): the grid is the parent's
        _live_grids.add(self)
        try:
            self._start(min_hosts)
        except BaseException:
            self.terminate()
            raise
        self._state = GridState.RUNNING
        if status_file:
            self._status_writer = StatusFileWriter(self, status_file if isinstance(status_file, str) else None)
            self._status_writer.start()

    @classmethod
    def from_slurm(
        cls,
        hosts: Sequence[Host] | None = None,
        *,
        bind: str | None = None,
        gpus_per_slot: int | None = None,
        **kwargs: Any,
    ) -> Grid:
        """A grid on the nodes and tasks of the SLURM allocation it runs in (see docs/clusters.md).

        ``gpus_per_slot``: each node's ``srun`` step asks for that many GPUs per slot
        (``--gres=gpu:N*slots``), SLURM binds them (it sets ``CUDA_VISIBLE_DEVICES``) and
        the host daemon gives each slot its own N of them.
        """
        options = {
            **({"bind": bind} if bind else {}),
            **({"gpus_per_slot": gpus_per_slot} if gpus_per_slot is not None else {}),
            **kwargs.pop("launcher_options", {}),
        }
        return cls(hosts, "slurm", launcher_options=options, **kwargs)

    @classmethod
    def attach(
        cls,
        uris_or_nameserver: str | Sequence[str] | None = None,
        *,
        secret: str,
        nameserver: str | None = None,
        group: str = "default",
        **kwargs: Any,
    ) -> Grid:
        """A grid on daemons started by hand: a list of URIs, or a name server ``HOST:PORT``.

        The grid never ends these daemons; :meth:`terminate` unpublishes its services.
        """
        from .launchers.attach import AttachLauncher

        launcher = AttachLauncher.from_target(uris_or_nameserver, nameserver=nameserver, group=group)
        return cls(None, launcher, secret=secret, **kwargs)

    # -- start ---------------------------------------------------------------------------
    def _start(self, min_hosts: int | None) -> None:
        # A slot's rank is its index in the grid's order of slots (host by host), for good:
        # a respawn starts the same spec, and a host dropped by min_hosts leaves a gap.
        specs = self._launcher.slot_specs(self.hosts)
        specs = [dataclasses.replace(spec, rank=rank) for rank, spec in enumerate(specs)]
        ensure_open_files(OPEN_FILES_PER_SLOT * len(specs) + OPEN_FILES_SPARE)
        log.info("starting %d daemon slots on %d hosts (%s launcher)", len(specs), len(self.hosts), self._launcher.name)
        started = time.monotonic()
        outcomes = self._launcher.start(specs, self._secret, self._start_timeout)
        handles = [o for o in outcomes if isinstance(o, DaemonHandle)]
        failures = [o for o in outcomes if isinstance(o, LaunchError)]
        try:
            self._open_slots(handles)
        except BaseException:  # Ctrl-C included: daemons that are no slot yet are ended here
            added = {id(slot.handle) for slot in self._slots}
            self._launcher.stop([h for h in handles if id(h) not in added], self._stop_timeout)
            raise
        failures += self._check_python_versions()
        if failures:
            failed_hosts = {f.host for f in failures}
            good_hosts = [h for h in self.hosts if h.name not in failed_hosts]
            fatal = min_hosts is None or len(good_hosts) < min_hosts
            said: set[str | None] = set()
            for failure in failures:  # one line per host; the one raised is said once, by the raise
                log.debug("%s", failure.details())
                if failure.host not in said and not (fatal and failure.host == failures[0].host):
                    log.error("%s", failure)
                said.add(failure.host)
            if fatal:
                raise failures[0]
            log.warning("going on with %d of %d hosts (min_hosts=%d)", len(good_hosts), len(self.hosts), min_hosts)
            dropped = [s for s in self._slots if s.host.name in failed_hosts]
            for slot in dropped:
                slot.close()
            self._launcher.stop([s.handle for s in dropped], self._stop_timeout)
            self._slots = [s for s in self._slots if s.host.name not in failed_hosts]
            self.hosts = good_hosts
        log.info("%d slots ready in %.2f s", len(self._slots), time.monotonic() - started)

    def _open_slots(self, handles: Sequence[DaemonHandle]) -> None:
        """Connect to every started daemon, a few at a time (a thousand handshakes one by one take seconds).

        The slots join the grid in the order of ``handles``; the first that cannot be
        reached raises its :class:`LaunchError`, and whatever else was opened by then is
        closed again before it goes on.
        """
        futures = [CONTROL.submit(self._open_slot, handle) for handle in handles]
        try:
            for future in futures:
                slot = future.result()
                self._slots.append(slot)
                slot.start_monitor()
        except BaseException:
            for future in futures:
                if future.cancel():
                    continue
                try:
                    slot = future.result(timeout=self._start_timeout)
                except BaseException:  # noqa: BLE001 - its own error; the first one goes on
                    continue
                if slot not in self._slots:
                    slot.close()
            raise

    def _add_slot(self, handle: DaemonHandle) -> Slot:
        """Connect to one started daemon and make it a slot of the grid (a respawn's)."""
        slot = self._open_slot(handle)
        self._slots.append(slot)
        slot.start_monitor()
        return slot

    def _open_slot(self, handle: DaemonHandle) -> Slot:
        slot = Slot(
            handle,
            self._secret,
            heartbeat_interval=self._heartbeat_interval,
            host_timeout=self._host_timeout,
            on_lost=self._slot_lost,
        )
        try:
            slot.open()
        except (GridError, OSError) as exc:
            slot.close()
            raise LaunchError(f"cannot connect to the daemon at {handle.uri}: {exc}", host=handle.host.name) from exc
        except BaseException:
            slot.close()
            raise
        return slot

    def _check_python_versions(self) -> list[LaunchError]:
        """Ask one daemon per host for its Python; a host whose minor version differs is a failure.

        Classes pickled by value (cloudpickle: those of the driver's ``__main__``) hold code
        objects, which load only under the Python minor version that made them. With
        ``allow_python_mismatch`` a mismatch is only a warning.
        """
        first: dict[str, Slot] = {}
        for slot in self._slots:
            first.setdefault(slot.host.name, slot)
        mine = ".".join(map(str, sys.version_info[:3]))
        minor = ".".join(map(str, sys.version_info[:2]))
        failures = []
        for name, info in zip(first, self._fan_out(list(first.values()), "info"), strict=True):
            if isinstance(info, BaseException):
                failures.append(LaunchError(f"cannot ask the daemon for its Python version: {info}", host=name))
                continue
            theirs = str(info.get("python", "?"))
            if theirs.split(".")[:2] == minor.split("."):
                continue
            problem = (
                f"its Python is {theirs} ({info.get('executable', '?')}), the driver's is {mine}: "
                "classes that travel by value (those of the driver's __main__) cannot load there"
            )
            if self._allow_python_mismatch:
                log.warning("host %r: %s (allowed: allow_python_mismatch=True)", name, problem)
            else:
                failures.append(LaunchError(
                    f"{problem}; give it Python {minor} (Host(python=...)), or pass "
                    "Grid(allow_python_mismatch=True) if the driver publishes only classes the host can import",
                    host=name,
                ))
        return failures

    # -- publishing ----------------------------------------------------------------------
    def publish(self, instance: Any, *, check_names: bool = True) -> str:
        """Ship a copy of ``instance`` to every slot; returns the new service id.

        Classes defined in the driver's ``__main__`` travel by value. The names the
        instance has now (methods, attributes) are recorded: a proxy refuses any other
        at once with :class:`AttributeError`, unless ``check_names`` is False or the class
        defines ``__getattr__``. Raises
        :class:`PublishError` if the instance cannot be pickled or fails to load on a host
        (naming the host and carrying its traceback); then nothing stays published.
        """
        self._check_running()
        cls = type(instance)
        try:
            payload = codec.dumps(instance)
        except Exception as exc:
            raise PublishError(f"cannot pickle the {cls.__qualname__} instance: {exc}") from exc
        service_id = f"{cls.__name__}-{uuid.uuid4().hex[:8]}"
        slots = [s for s in self._slots if not s.lost.is_set()]
        if not slots:
            raise ServiceUnavailableError(service_id, "no live host to publish on")
        outcomes = self._publish_payload(slots, service_id, payload)
        failures = [(slot, out) for slot, out in zip(slots, outcomes, strict=True) if out]
        if failures:
            ok_slots = [slot for slot, out in zip(slots, outcomes, strict=True) if not out]
            self._fan_out(ok_slots, "unpublish", service_id)
            slot, out = failures[0]
            text = out if isinstance(out, str) else ""
            err = PublishError(
                f"{cls.__qualname__} failed to load on {len(failures)} of {len(slots)} slots"
                if text else f"{cls.__qualname__} could not be published: {out}",
                host=slot.host.name, slot=slot.index, remote_traceback=text, hint=load_failure_hint(text, slot),
            )
            if isinstance(out, BaseException):
                raise err from out
            raise err
        service = Service.of(
            service_id, instance, payload, check_names=check_names, attribute_timeout=self.attribute_timeout
        )
        with self._lock:
            self._check_running()
            service.servers = [
                Server(service, slot, i, max_message_size=self.max_message_size) for i, slot in enumerate(slots)
            ]
            for server in service.servers:
                service.queue.put(server)
            self._services[service_id] = service
            self.servers[service_id] = service.servers
            self.queues[service_id] = service.queue
        log.info("published %s on %d slots", service_id, len(slots))
        return service_id

    def _publish_payload(self, slots: Sequence[Slot], service_id: str, payload: bytes) -> list[Any]:
        """Publish ``payload`` on ``slots``; its bytes go once to each host folder with several slots.

        A payload of ``STAGE_MIN_BYTES`` or more is staged in each host's folder by one of
        its slots, and the host's other slots load it from there; a smaller one (or a host
        whose staging failed) goes to every slot, which costs less than a second round.
        """
        groups: dict[str, list[int]] = {}
        for index, slot in enumerate(slots):
            groups.setdefault(self._folder_key(slot), []).append(index)
        staged_groups = [g for g in groups.values() if len(g) > 1] if len(payload) >= STAGE_MIN_BYTES else []
        digests = self._fan_out([slots[g[0]] for g in staged_groups], "stage", payload)
        calls: list[tuple[str, tuple[Any, ...]]] = [("publish", (service_id, payload))] * len(slots)
        stagers: list[tuple[Slot, str]] = []
        for group, digest in zip(staged_groups, digests, strict=True):
            if isinstance(digest, str):
                stagers.append((slots[group[0]], digest))
                for index in group:
                    calls[index] = ("publish_staged", (service_id, digest))
            else:
                log.warning("%s: staging the payload failed (%s); sending it to each slot", slots[group[0]].label,
                            digest)
        futures = [slot.control_future(method, *args) for slot, (method, args) in zip(slots, calls, strict=True)]
        outcomes = self._outcomes(futures)
        # A slot that could not read what was staged (a folder not shared after all) gets the payload itself.
        again = [i for i, out in enumerate(outcomes) if calls[i][0] == "publish_staged" and isinstance(out, Exception)]
        for index, outcome in zip(again, self._fan_out([slots[i] for i in again], "publish", service_id, payload),
                                  strict=True):
            outcomes[index] = outcome
        self._outcomes([slot.control_future("unstage", digest) for slot, digest in stagers])
        return outcomes

    def _folder_key(self, slot: Slot) -> str:
        """Slots with the same key share a temp folder (one host daemon's, or a shared file system's)."""
        if not slot.handle.spec.temp_path:  # a daemon started by hand: a folder of its own, as far as we know
            return "@" + slot.label
        return "shared" if self.shared_temp_path else slot.handle.spec.temp_path + "@" + slot.host.name

    @staticmethod
    def _outcomes(futures: Sequence[Any]) -> list[Any]:
        """Each future's value or error, once all have ended (a lost slot ends its own)."""
        loop = get_loop()
        if loop.in_loop():  # a done-callback fanning out control calls: their answers land here
            loop.run_until(lambda: all(f.done() for f in futures), None)
        outcomes: list[Any] = []
        for future in futures:
            try:
                outcomes.append(future.result())
            except Exception as exc:  # noqa: BLE001 - each slot's outcome, host-side errors included
                outcomes.append(exc)
        return outcomes

    def _fan_out(self, slots: Sequence[Slot], method: str, *args: Any) -> list[Any]:
        """Call an agent method on every slot at once; each outcome is a value or an error.

        Every call is sent from this thread and answered in the I/O loop: no thread per slot.
        """
        return self._outcomes([slot.control_future(method, *args) for slot in slots])

    # -- acquire / release ---------------------------------------------------------------
    def acquire_service(self, service_id: str, timeout: float | None = None) -> ServiceProxy:
        """A proxy to a free server of ``service_id``; waits while all are busy.

        Servers are handed out first come, first served. The wait is never refused for who
        holds the servers (the calling thread included: another thread may release them,
        a lost one may be respawned); ``timeout`` (seconds, a number >= 0; None or
        ``math.inf``: no limit) bounds it. Raises :class:`UnknownServiceError` at once for
        an unknown id, ``TimeoutError`` after ``timeout`` seconds (saying which threads
        hold which servers; a wait without a limit logs that as a warning every 30 s),
        :class:`ServiceUnavailableError` when every server of the service is lost, and
        ``TypeError``/``ValueError`` at once for a timeout that is not a number >= 0.
        """
        timeout = check_timeout(timeout, "acquire_service")
        service = self._service(service_id)
        server = service.queue.get(timeout)
        server.state = ServerState.ACQUIRED
        server.holder = f"thread {threading.current_thread().name!r}"
        log.debug("acquired %r", server)
        return ServiceProxy(server, self)

    def release_service(self, proxy: ServiceProxy) -> None:
        """Give the proxy's server back once its last pending call has finished.

        The proxy cannot be used afterwards; releasing it again raises
        :class:`ServiceReleasedError`.
        """
        if not isinstance(proxy, ServiceProxy):
            raise TypeError(f"release_service needs a proxy from acquire_service, got {type(proxy).__name__}")
        self._check_process()
        if proxy._isdgrid_grid is not self:
            raise GridError(
                f"{proxy!r} belongs to another grid ({proxy._isdgrid_grid!r}): release it with that grid's "
                "release_service"
            )
        proxy._isdgrid_release()

    # -- collective calls ----------------------------------------------------------------
    def _hold(self, service_id: str, timeout: float | None) -> Hold:
        """Every server of the service, in server order, kept until release_all.

        Waits (at most ``timeout``) for each server in turn, whoever holds it.
        """
        service = self._service(service_id)
        with self._lock:
            held = self._held.get(service_id)
        if held is not None:
            return held
        me = f"a broadcast/scatter of thread {threading.current_thread().name!r} (until release_all)"
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._take_hold_lock(service, deadline):
            raise TimeoutError(
                f"broadcast/scatter on {service_id!r}: another thread was still taking its servers for a "
                f"broadcast after {timeout} s; {service.holders()}"
            )
        try:
            with self._lock:
                held = self._held.get(service_id)
            if held is not None:
                return held
            taken: list[Server] = []
            if service.queue.take_all(service.servers):  # all free (a round's hold, most often): at once
                for server in service.servers:
                    server.state = ServerState.ACQUIRED
                    server.holder = me
                taken = list(service.servers)
            try:
                for server in service.servers[len(taken):]:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if service.queue.take(server, lambda s=server: bool(s.lost), left) is not None:  # type: ignore[misc]
                        taken.append(server)
                        server.state = ServerState.ACQUIRED
                        server.holder = me
            except TimeoutError:
                waited = f"server {server.index} ({server.slot.label})"
                for server in taken:
                    server.submit_release()
                raise TimeoutError(
                    f"broadcast/scatter on {service_id!r}: {waited} not free within {timeout} s; {service.holders()}"
                ) from None
            except BaseException:
                for server in taken:
                    server.submit_release()
                raise
            held = Hold(list(service.servers))  # a lost one's calls fail at once
            with self._lock:
                self._check_running()
                self._held[service_id] = held
            return held
        finally:
            service.hold_lock.release()

    @staticmethod
    def _take_hold_lock(service: Service, deadline: float | None) -> bool:
        """Take the service's broadcast lock by ``deadline``, warning every 30 s of waiting."""
        started = time.monotonic()
        while True:
            left = WAIT_WARN_EVERY if deadline is None else min(WAIT_WARN_EVERY, deadline - time.monotonic())
            if service.hold_lock.acquire(timeout=max(0.0, left)):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            log.warning("broadcast/scatter on %r still waiting after %.0f s for another thread taking its "
                        "servers; %s", service.id, time.monotonic() - started, service.holders())

    def broadcast(
        self, service_id: str, name: str, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> list[Result]:
        """Call ``name(*args, **kwargs)`` on every server of the service; a Result each.

        A plain (non-callable) attribute named ``name`` is read when no arguments are given.
        The first broadcast or scatter takes every server of the service, in server order,
        and keeps them until :meth:`release_all`, so result ``i`` always comes from server ``i``.
        ``timeout`` bounds the wait for busy servers, whoever holds them (the calling thread
        included: another thread may release them); after it, ``TimeoutError`` says which
        threads hold which servers. It is the grid's, not passed on (give a remote
        ``timeout`` argument through :meth:`scatter`'s ``kwlist``); it is checked as for
        :meth:`acquire_service`.
        """
        timeout = check_timeout(timeout, "broadcast")
        self._check_process()
        service = self._service(service_id)
        service.check_name(name)
        held = self._hold(service_id, timeout)
        kind = codec.CALL if args or kwargs or name in service.methods else codec.GETATTR
        try:  # one pickle for every server: the operation is the same
            data, buffers = codec.encode_op(kind, name, args, kwargs if kind == codec.CALL else None, codec.OOB_MIN)
        except Exception as exc:
            raise cannot_send(f"{service.class_name}.{codec.describe(kind, name)} (broadcast to service "
                              f"{service_id!r})", exc) from exc
        with sends_through_loop(len(held.servers)):  # the I/O loop sends them all at once, then reads the replies
            return held.submit(kind, name, itertools.repeat((data, buffers), len(held.servers)))

    def scatter(
        self,
        service_id: str,
        name: str,
        arglist: Sequence[Any],
        kwlist: Sequence[Mapping[str, Any]] | None = None,
        timeout: float | None = None,
    ) -> list[Result]:
        """Call ``name`` on server ``i`` with ``arglist[i]`` (and ``kwlist[i]``).

        A tuple or list item is unpacked as positional arguments; any other item (a dict
        included) is passed as the one argument: to pass a list as one argument, wrap it in
        a 1-tuple (``[([0.1, 0.2],), ...]``). When an unpacked call fails on its arguments,
        :meth:`gather` says so in the ``TypeError`` it raises. ``timeout`` as for :meth:`broadcast`.
        """
        timeout = check_timeout(timeout, "scatter")
        self._check_process()
        service = self._service(service_id)
        service.check_name(name)
        n = len(service.servers)
        if len(arglist) != n:
            raise ValueError(f"scatter: {len(arglist)} argument items for {n} servers of {service_id!r}")
        if kwlist is not None and len(kwlist) != n:
            raise ValueError(f"scatter: {len(kwlist)} keyword items for {n} servers of {service_id!r}")
        held = self._hold(service_id, timeout)
        payloads = []  # every call pickled before any is sent
        for i, server in enumerate(held.servers):
            item = arglist[i]
            args = tuple(item) if isinstance(item, (tuple, list)) else (item,)
            kwargs = dict(kwlist[i]) if kwlist is not None else {}
            try:
                payloads.append(codec.encode_op(codec.CALL, name, args, kwargs, codec.OOB_MIN))
            except Exception as exc:
                raise cannot_send(f"{service.class_name}.{name}() on {server.slot.label}", exc) from exc
        with sends_through_loop(len(held.servers)):  # as broadcast
            results = held.submit(codec.CALL, name, payloads)
        for i, result in enumerate(results):
            if isinstance(arglist[i], (tuple, list)):
                self._unpacked[result] = (name, i, arglist[i])  # one dict operation: no lock needed
        return results

    def gather(self, results: Iterable[concurrent.futures.Future[Any]], timeout: float | None = None) -> list[Any]:
        """The values of ``results``, in order; raises the first error in that order.

        Waits for every result (at most ``timeout`` seconds, then ``TimeoutError``),
        except that a :class:`HostLostError` is raised as soon as it happens. ``timeout``
        is checked as for :meth:`acquire_service`.
        """
        self._check_process()
        timeout = check_timeout(timeout, "gather")
        results = list(results)
        deadline = None if timeout is None else time.monotonic() + timeout
        future = concurrent.futures.Future
        pending = [r for r in results if not future.done(r)]
        loop = get_loop()
        nested = bool(pending) and loop.in_loop()  # a done-callback: the replies land in this very thread
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                names = ", ".join(getattr(r, "description", repr(r)) for r in pending[:GATHER_NAMED])
                more = f", ... ({len(pending) - GATHER_NAMED} more)" if len(pending) > GATHER_NAMED else ""
                raise TimeoutError(
                    f"gather: {len(pending)} of {len(results)} results not ready within {timeout} s: {names}{more}"
                )
            # One wait for them all, woken once when the last lands (or by the first error:
            # a lost host is raised at once); in slices, each a bounded wait.
            step = GATHER_SLICE if left is None else min(GATHER_SLICE, left)
            if nested:  # serve the loop meanwhile, as Result.result does in a callback
                loop.run_until(functools.partial(_all_done, pending), time.monotonic() + step)
                pending = [r for r in pending if not future.done(r)]
            else:
                _, not_done = concurrent.futures.wait(pending, step, concurrent.futures.FIRST_EXCEPTION)
                pending = list(not_done)
            if pending:
                _raise_lost(results)
        # Every one is done: one pass, with the Future's own methods (nothing left to wait for);
        # a value is read with one call, an error or a cancel is looked at again.
        values: list[Any] = []
        lost: HostLostError | None = None
        error: tuple[BaseException, concurrent.futures.Future[Any]] | None = None
        cancelled = False
        for result in results:
            try:
                values.append(future.result(result, 0))
                continue
            except BaseException:  # noqa: BLE001 - the result's own error, or an interrupt (re-raised below)
                if future.cancelled(result):
                    cancelled = True
                    continue
                exc = future.exception(result, 0)
                if exc is None or exc is not sys.exc_info()[1]:
                    raise  # not this result's error: an interrupt while reading it
            if lost is None and isinstance(exc, HostLostError):
                lost = exc
            elif error is None:
                error = (exc, result)
        if lost is not None:
            raise lost
        if error is not None:
            exc, result = error
            unpacked = self._unpacked.get(result)  # type: ignore[call-overload]
            hint = scatter_unpacking_hint(exc, *unpacked) if unpacked is not None else ""
            if hint:
                raise TypeError(hint) from exc  # the remote TypeError, with its traceback, as the cause
            raise exc
        if cancelled:
            raise concurrent.futures.CancelledError()
        return values

    def map(
        self,
        service_id: str,
        method: str,
        *iterables: Iterable[Any],
        ordered: bool = True,
        timeout: float | None = None,
        progress: bool = False,
    ) -> MapIterator:
        """``method(*item)`` for each item of the zipped ``iterables``, load-balanced over the servers.

        As the builtin :func:`map`: one argument from each iterable, the shortest ends it,
        and an iterator of the values, in item order (``ordered=False``: as the calls
        finish). Each free server of the service takes the next item (one call each), so
        long and short items mix well; the service stays shared: other threads may acquire
        its servers meanwhile, first come, first served. Items are taken from the
        iterables only as servers become free (an endless generator works), while the
        iterator is read; those free when ``map`` is called start at once. While the calls
        running and the values ready to be read are twice as many as the servers, nothing
        more is sent until a value is read.

        A remote exception ends the map with that exception, in place of the item's value
        (calls already sent finish; their servers go back to the queue). An item whose
        server is lost while it runs is run again on another server (so such an item may
        run twice; after three losses its :class:`HostLostError` ends the map).
        ``timeout`` (checked as for :meth:`acquire_service`) bounds the whole map, from
        this call: a ``next()`` that would wait past it raises ``TimeoutError``. ``progress=True`` shows a
        progress bar (a widget in a notebook; :mod:`tqdm.auto`). Closing the iterator, or
        dropping it, ends the map; every server goes back to the queue once its call ends.
        Raises :class:`UnknownServiceError` and :class:`AttributeError` (a name the
        published class lacks) at once.
        """
        timeout = check_timeout(timeout, "map")
        if not iterables:
            raise TypeError("map needs at least one iterable of arguments")
        service = self._service(service_id)
        service.check_name(method)
        return MapIterator(
            self, service, method, iterables, ordered=ordered, timeout=timeout, progress=progress
        )

    def release_all(self, service_id: str | None = None) -> None:
        """Release the servers taken by broadcast/scatter (of one service, or of all)."""
        self._check_process()
        with self._lock:
            ids = [service_id] if service_id is not None else list(self._held)
            for sid in ids:
                held = self._held.pop(sid, None)
                if held is not None:
                    held.release()

    # -- files ---------------------------------------------------------------------------
    def copy_files(
        self,
        rootdir: str,
        filelist: Iterable[str],
        hosts: Sequence[Host] | Host | None = None,
        exclude: Sequence[str] = DEFAULT_EXCLUDE,
    ) -> int:
        """Copy files from ``rootdir`` into each host's temp path, folders kept.

        Patterns follow the original grid (see :func:`isdgrid.files.select_files`).
        Published objects can import what was copied. Returns the number of files.
        """
        self._check_running()
        relpaths = select_files(rootdir, filelist, exclude)
        if not relpaths:
            log.warning("copy_files: no file in %s matches %s", rootdir, list(filelist))
            return 0
        archive = pack_files(rootdir, relpaths)
        if isinstance(hosts, Host):
            hosts = [hosts]
        names = {h.name for h in (hosts or self.hosts)}
        targets: dict[str, Slot] = {}
        for slot in self._slots:
            if slot.host.name in names and not slot.lost.is_set():
                targets.setdefault(self._folder_key(slot), slot)
        outcomes = self._fan_out(list(targets.values()), "put_files", archive)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        with self._files_lock:
            self._copies.append((archive, frozenset(names)))
        log.info("copied %d files (%d bytes packed) to %d hosts", len(relpaths), len(archive), len(targets))
        return len(relpaths)

    def _copy_again(self, slot: Slot) -> None:
        """Send a respawned slot what copy_files sent its host, if its launcher made the host's folder anew.

        Once per new folder: the host's other respawning slots wait here until the files are
        in, so none of them imports from a half-written file.
        """
        name = slot.host.name
        with self._files_lock:
            if slot.handle.folder_generation == self._files_generation.get(name, 0):
                return
            archives = [archive for archive, hosts in self._copies if name in hosts]
            for archive in archives:
                slot.control("put_files", archive)
            self._files_generation[name] = slot.handle.folder_generation
        if archives:
            log.warning("%s: its temp folder was made anew; sent what copy_files had sent (%d archives) again",
                        slot.label, len(archives))

    # -- snapshots -----------------------------------------------------------------------
    def checkpoint(
        self, service_id: str, path: str | os.PathLike[str] | None = None, *, timeout: float | None = None
    ) -> Snapshot:
        """Snapshot every server's object of ``service_id``, in server order, between calls.

        Each server pickles its object after the calls made on it before this and before
        those made after (the object's ``__getstate__``/``__setstate__`` decide what goes
        in). Every server keeps its latest snapshot: with ``respawn=True`` a lost slot comes
        back with it instead of the object as published. ``path`` also saves the snapshot
        there, atomically. Raises :class:`CheckpointError` (naming the class and the host)
        for an object that cannot be pickled, :class:`HostLostError` for a lost server,
        ``TimeoutError`` after ``timeout`` seconds (checked as for :meth:`acquire_service`).
        """
        timeout = check_timeout(timeout, "checkpoint")
        snapshot = snapshot_service(self._service(service_id), timeout)
        if path is not None:
            snapshot.save(path)
        return snapshot

    def restore(self, service_id: str, snapshot: Snapshot, *, timeout: float | None = None) -> None:
        """Put server ``i`` of ``service_id`` back to ``snapshot``'s state ``i``, in call order.

        The snapshot may come from this grid or another (a resumed run: publish the same
        class on a grid with as many slots, then restore). Raises :class:`CheckpointError`
        for a snapshot of another class or number of servers, :class:`HostLostError`,
        ``TimeoutError`` (``timeout`` checked as for :meth:`acquire_service`).
        """
        timeout = check_timeout(timeout, "restore")
        restore_service(self._service(service_id), snapshot, timeout)

    def wait_for_respawn(self, service_id: str, timeout: float | None = None) -> None:
        """Wait until no server of ``service_id`` is lost (lost ones respawned).

        Returns at once when none is lost. Raises the :class:`HostLostError` of a server
        that will not come back (``respawn`` off, ``max_respawns`` reached, or its start
        failed), ``TimeoutError`` after ``timeout`` seconds (checked as for :meth:`acquire_service`).
        """
        timeout = check_timeout(timeout, "wait_for_respawn")
        service = self._service(service_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            lost = [server for server in service.servers if server.lost]
            if not lost:
                return
            with self._lock:
                gone = [server for server in lost if server.slot in self._given_up]
            if gone:
                raise gone[0].slot.lost_error("waiting for its respawn (it will not come back)")
            self._check_running()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(lost)} servers of {service_id!r} still lost after {timeout} s: "
                    + ", ".join(server.slot.label for server in lost)
                )
            time.sleep(RESPAWN_POLL)

    # -- status --------------------------------------------------------------------------
    def status(self) -> StatusTable:
        """One :class:`ServerStatus` per server of every service, in a list that shows as a table.

        ``print(grid.status())`` writes a text table; in Jupyter it shows as an HTML table.
        """
        self._check_process()
        with self._lock:
            services = list(self._services.values())
        rows = StatusTable()
        for service in services:
            for server in service.servers:
                spec = server.slot.handle.spec
                rows.append(
                    ServerStatus(
                        service_id=service.id,
                        host=server.host,
                        slot=server.slot_index,
                        state="lost" if server.lost else server.state.value,
                        busy=server.busy,
                        lost=server.lost,
                        calls=server.calls,
                        errors=server.errors,
                        pending=server.pending,
                        mean_call_time=server.mean_call_time,
                        respawns=server.respawns,
                        snapshot_age=server.snapshot_age,
                        rank=spec.rank,
                        gpu=spec.gpu,
                        gpu_shared=spec.host.gpu_shared(spec.slot),
                    )
                )
        return rows

    # -- loss ----------------------------------------------------------------------------
    def _slot_lost(self, slot: Slot) -> None:
        with self._lock:
            services = list(self._services.values())
            respawn = (
                self._respawn
                and self._state is GridState.RUNNING
                and slot.handle.respawns < self._max_respawns
            )
            if respawn:
                for service in services:
                    service.respawning += 1
            else:
                self._given_up.add(slot)
        for service in services:
            for server in service.servers:
                if server.slot is slot:
                    server.fail_queued(slot.lost_error("the call was queued"))
                    service.queue.discard(server)
            service.queue.wake()
        if respawn:
            try:
                _RESPAWNS.submit(self._respawn_slot, slot, services)
            except RuntimeError:  # no thread could be started: the interpreter is exiting
                self._respawn_done(services)

    def _respawn_done(self, services: list[Service]) -> None:
        with self._lock:
            for service in services:
                service.respawning -= 1
        for service in services:
            service.queue.wake()

    def _respawn_slot(self, old: Slot, services: list[Service]) -> None:
        """Start a lost slot again and re-publish its services there (a worker thread)."""
        try:
            # Reap what is left of it; "retire" tells a hung daemon that resumes later that
            # the driver lives on, so it leaves the (maybe shared) temp folder alone.
            self._launcher.stop([old.handle], self._stop_timeout, retire=True)
            old.close()
            outcome = self._start_again(old)
            if outcome is None:
                return
            outcome.respawns = old.handle.respawns + 1
            with self._lock:
                if self._state is not GridState.RUNNING:
                    self._launcher.stop([outcome], self._stop_timeout)
                    return
                new = self._add_slot(outcome)
                self._slots = [new if s is old else s for s in self._slots if s is not new]
            self._copy_again(new)
            for service in services:
                if service.terminated.is_set():
                    continue
                for server in service.servers:
                    if server.slot is not old:
                        continue
                    # its latest snapshot when one was taken, else the object as published
                    error = new.control("publish", service.id, server.snapshot or service.payload)
                    if error:
                        log.error("re-publishing %s on %s failed:\n%s", service.id, new.label, error)
                        with self._lock:
                            self._given_up.add(old)  # this server stays on the lost slot
                        continue
                    server.attach(new)
            self.respawn_count += 1
            log.warning("respawned %s (was lost: %s); services re-published: %s",
                        new.label, old.lost_reason, ", ".join(s.id for s in services) or "none")
        except GridError as exc:
            log.error("respawn of %s failed: %s", old.label, exc)
            with self._lock:
                self._given_up.add(old)
        except Exception:  # noqa: BLE001 - a respawn thread must never die silently
            log.exception("respawn of %s failed", old.label)
            with self._lock:
                self._given_up.add(old)
        finally:
            self._respawn_done(services)

    def _start_again(self, old: Slot) -> DaemonHandle | None:
        """Start a lost slot's daemon again, retrying with growing pauses; None if given up (or terminated)."""
        deadline = time.monotonic() + self._respawn_timeout
        pause = RESPAWN_FIRST_PAUSE
        for attempt in itertools.count(1):
            if self._state is not GridState.RUNNING:
                return None
            outcome = self._launcher.start([old.handle.spec], self._secret, self._start_timeout)[0]
            if isinstance(outcome, DaemonHandle):
                return outcome
            if attempt >= RESPAWN_MIN_ATTEMPTS and time.monotonic() + pause > deadline:
                log.error("giving up on %s after %d attempts in %.0f s: it stays lost (last: %s)",
                          old.label, attempt, self._respawn_timeout, outcome)
                with self._lock:
                    self._given_up.add(old)
                return None
            log.error("respawn of %s failed (attempt %d; next in %.0f s): %s", old.label, attempt, pause, outcome)
            if self._terminated.wait(pause):
                return None
            pause = min(2 * pause, RESPAWN_MAX_PAUSE)
        return None  # not reached: itertools.count never ends

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def state(self) -> GridState:
        """STARTING, RUNNING or TERMINATED."""
        return self._state

    def ishalted(self) -> bool:
        """True once the grid was terminated."""
        return self._state is GridState.TERMINATED

    def set_debug(self, debug: bool, verbose: bool | None = None) -> None:
        """Log grid events at DEBUG (``debug``) and daemon output at INFO (``verbose``)."""
        self.debug = bool(debug)
        if verbose is not None:
            self.verbose = bool(verbose)
        logging.getLogger("isdgrid").setLevel(logging.DEBUG if self.debug else logging.NOTSET)
        logging.getLogger("isdgrid.remote").setLevel(logging.INFO if self.verbose or self.debug else logging.NOTSET)

    def terminate(self, service_id: str | None = None) -> None:
        """End one service, or the whole grid (daemons stopped and reaped, temp dirs removed).

        Calls still pending fail with :class:`GridTerminatedError`. Idempotent.
        """
        self._check_process()
        if service_id is not None:
            self._terminate_service(self._service(service_id), unpublish=True)
            return
        with self._lock:
            if self._state is GridState.TERMINATED:
                return
            self._state = GridState.TERMINATED
            self._terminated.set()
            services = list(self._services.values())
            self._held.clear()
        if self._status_writer is not None:
            self._status_writer.close()
        for service in services:  # daemons the grid does not own outlive it: clean them up
            self._terminate_service(service, unpublish=not self._launcher.owns_daemons)
        for slot in self._slots:
            slot.close(GridTerminatedError("the grid was terminated"))
        self._launcher.stop([slot.handle for slot in self._slots], self._stop_timeout)
        for service in services:
            for server in service.servers:
                server.join(timeout=2.0)
        self._launcher.close()
        _live_grids.discard(self)
        log.info("grid terminated")

    def _terminate_service(self, service: Service, *, unpublish: bool) -> None:
        with self._lock:
            self._services.pop(service.id, None)
            self.servers.pop(service.id, None)
            self.queues.pop(service.id, None)
            held = self._held.pop(service.id, None)
        service.terminated.set()
        service.queue.close()
        if held is not None:
            held.drop()
        for server in service.servers:
            server.close()
        if unpublish:
            live = [s.slot for s in service.servers if not s.lost]
            self._fan_out(live, "unpublish", service.id)
            for server in service.servers:
                server.join(timeout=2.0)

    def _service(self, service_id: str) -> Service:
        self._check_running()
        with self._lock:
            service = self._services.get(service_id)
            if service is None:
                raise UnknownServiceError(service_id, list(self._services))
            return service

    def _check_running(self) -> None:
        self._check_process()
        if self._state is GridState.TERMINATED:
            raise GridTerminatedError("this grid was terminated")

    def _check_process(self) -> None:
        """Refuse use in a forked child: the daemons, connections and threads are the parent's."""
        if self._forked:
            raise GridError(
                f"this grid belongs to process {self._pid}; it cannot be used in a forked child "
                f"(this is process {os.getpid()}): make a new Grid in the child, or start children "
                "with multiprocessing's 'spawn' or 'forkserver' method"
            )

    def __enter__(self) -> Grid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return (
            f"<Grid {len(self._slots)} slots on {len(self.hosts)} hosts, "
            f"{len(self._services)} services, {self._state.value}>"
        )

    def _repr_html_(self) -> str:
        """Jupyter's view of the grid: one row per slot (host, slot, up or lost, its services)."""
        with self._lock:
            slots = list(self._slots)
            services = list(self._services.values())
            state = self._state
        rows: list[SlotRow] = []
        for slot in slots:
            on_slot = [
                f"{service.id} ({'lost' if server.lost else 'busy' if server.busy else 'free'})"
                for service in services
                for server in service.servers
                if server.slot is slot
            ]
            if state is GridState.TERMINATED:
                slot_state = "stopped"
            elif slot.lost.is_set():
                slot_state = f"lost: {slot.lost_reason or 'no answer'}"
            else:
                slot_state = "up"
            rows.append((slot.host.name, slot.index, slot_state, ", ".join(on_slot) or "-"))
        summary = (
            f"Grid: {len(slots)} slots on {len(self.hosts)} hosts, {len(services)} services, {state.value}"
        )
        return slots_html(summary, rows)

    @property
    def slots(self) -> list[Slot]:
        """The daemons of the grid (one per slot)."""
        return list(self._slots)


def _all_done(results: list[concurrent.futures.Future[Any]]) -> bool:
    return all(concurrent.futures.Future.done(r) for r in results)


def _raise_lost(results: list[concurrent.futures.Future[Any]]) -> None:
    """Raise the HostLostError of the first result (in order) that failed with one."""
    for result in results:
        if concurrent.futures.Future.done(result) and not result.cancelled():
            exc = result.exception()
            if isinstance(exc, HostLostError):
                raise exc


def _refuse_duplicate_hosts(hosts: Sequence[Host]) -> None:
    """A host listed twice would give two slots the same label (and share its temp folder)."""
    counts = collections.Counter(h.name for h in hosts)
    for name, count in counts.items():
        if count > 1:
            total = sum(h.n_cpu for h in hosts if h.name == name)
            raise ConfigError(
                f"host {name!r} is listed {count} times: list it once, with n_cpu for several slots "
                f"(Host({name!r}, n_cpu={total}))"
            )


_live_grids: weakref.WeakSet[Grid] = weakref.WeakSet()

OPEN_FILES_PER_SLOT = 2  # the driver's connection to the slot, and a reconnect under way
OPEN_FILES_SPARE = 256  # the host daemons' pipes, log files, the user's own
STAGE_MIN_BYTES = 1 << 16  # a published payload this large goes once to each host folder, not to each slot
# Respawns (which may wait minutes for a host) have threads of their own, so they never
# hold up control calls (slot.CONTROL) or user calls.
_RESPAWNS = Workers("isdgrid-respawn", 2)


def _mark_forked() -> None:
    """In a forked child: the parent's grids are not this process's to use or to end."""
    for grid in list(_live_grids):
        grid._forked = True


if hasattr(os, "register_at_fork"):  # POSIX: where os.fork exists
    os.register_at_fork(after_in_child=_mark_forked)


@atexit.register
def _terminate_live_grids() -> None:
    for grid in list(_live_grids):
        if grid._forked or grid._pid != os.getpid():
            continue  # the parent's grid (a forked child): the parent ends it
        try:
            grid.terminate()
        except Exception:  # noqa: BLE001 - interpreter exit: end what can be ended
            log.exception("terminating a grid at exit failed")


