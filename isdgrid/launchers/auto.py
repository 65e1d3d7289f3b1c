"""The auto launcher (the default): this machine's own names run here, every other name over ssh.

As the original grid did, a host name decides where its slots run: ``localhost``, a
loopback address (127.0.0.0/8, ``::1``) and this machine's own host name and FQDN start
local daemons (:class:`~isdgrid.launchers.local.LocalLauncher`); any other name is a
remote machine, reached with :class:`~isdgrid.launchers.ssh.SshLauncher`. A remote name
is never run on this machine, so ``status()`` never names a host a slot is not on.

Given no hosts (``Grid(None)``), it picks the launcher of the allocation it runs in:
``slurm`` inside a SLURM job, ``sge`` inside a Grid Engine parallel job (and says so).
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError, LaunchError
from ..hosts import Host
from .base import DaemonHandle, Launcher, SlotSpec
from .local import LocalLauncher
from .ssh import SshLauncher

__all__ = ["AutoLauncher", "allocation_launcher", "is_this_machine"]

log = logging.getLogger("isdgrid.launcher")

_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


@functools.lru_cache(maxsize=1)
def _own_names() -> frozenset[str]:
    names = {socket.gethostname()}
    try:
        names.add(socket.getfqdn())
    except OSError:  # pragma: no cover - a resolver that fails outright
        pass
    names |= {name.split(".", 1)[0] for name in names}
    return frozenset(n.lower() for n in names if n)


def is_this_machine(name: str) -> bool:
    """True for this machine's own names: localhost, loopback addresses, its host name and FQDN."""
    lowered = name.strip().lower().rstrip(".")
    if lowered in _LOCAL_NAMES or lowered in _own_names():
        return True
    try:
        return ipaddress.ip_address(lowered.strip("[]")).is_loopback
    except ValueError:
        return False


def allocation_launcher(environ: Mapping[str, str] | None = None) -> str | None:
    """``"slurm"`` or ``"sge"`` when running inside such an allocation, else None."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_ID") and env.get("SLURM_JOB_NODELIST"):
        return "slurm"
    if env.get("PE_HOSTFILE") and env.get("JOB_ID"):
        return "sge"
    return None


def _accepted(cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    return {k: v for k, v in options.items() if k in params}


class AutoLauncher(Launcher):
    """Local daemons for this machine's names, ssh for every other name (see the module doc).

    ``launcher_options`` go to the launcher that takes them (``ssh_config``, ``tunnel``... to
    ssh; ``log_dir``, ``forward_output`` to both); an option neither takes is refused.
    """

    name = "auto"

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(inspect.signature(SshLauncher.__init__).parameters) \
            - set(inspect.signature(LocalLauncher.__init__).parameters)
        if unknown:
            raise ConfigError(f"auto launcher: unknown option(s) {sorted(unknown)}")
        self.local = LocalLauncher(**_accepted(LocalLauncher, options))
        self.ssh = SshLauncher(**_accepted(SshLauncher, options))
        self._told = False

    def default_hosts(self) -> list[Host]:
        where = allocation_launcher()
        hint = f" (inside this {where} job, use launcher={where!r})" if where else ""
        raise ConfigError(f"the auto launcher needs a list of hosts{hint}")

    def _route(self, host: Host) -> Launcher:
        return self.local if is_this_machine(host.name) else self.ssh

    def slot_specs(self, hosts: Sequence[Host]) -> list[SlotSpec]:
        self.local.shared_temp_path = self.ssh.shared_temp_path = self.shared_temp_path
        local = [h for h in hosts if self._route(h) is self.local]
        remote = [h for h in hosts if self._route(h) is self.ssh]
        if not self._told:
            self._told = True
            if remote:
                log.info("auto launcher: %s over ssh%s", ", ".join(h.name for h in remote),
                         f"; {', '.join(h.name for h in local)} on this machine" if local else "")
            where = allocation_launcher()
            if where:
                log.info("inside a %s job the auto launcher starts daemons locally and over ssh; "
                         "launcher=%r starts them with the scheduler", where, where)
        by_host: dict[str, list[SlotSpec]] = {}
        for spec in [*self.local.slot_specs(local), *self.ssh.slot_specs(remote)]:
            by_host.setdefault(spec.host.name, []).append(spec)
        return [spec for host in hosts for spec in by_host.get(host.name, [])]

    def start(self, specs: Sequence[SlotSpec], secret: str, timeout: float) -> list[DaemonHandle | LaunchError]:
        outcomes: list[DaemonHandle | LaunchError | None] = [None] * len(specs)
        errors: list[BaseException] = []

        def run(launcher: Launcher, indexes: list[int]) -> None:
            try:
                results = launcher.start([specs[i] for i in indexes], secret, timeout)
                for i, result in zip(indexes, results, strict=True):
                    outcomes[i] = result
            except BaseException as exc:  # noqa: BLE001 - raised again in the calling thread
                errors.append(exc)

        parts = [(launcher, [i for i, spec in enumerate(specs) if self._route(spec.host) is launcher])
                 for launcher in (self.local, self.ssh)]
        parts = [(launcher, indexes) for launcher, indexes in parts if indexes]
        helper = None
        if len(parts) > 1:  # the ssh hosts start while the local daemons do
            helper = threading.Thread(target=run, args=parts[1], name="isdgrid-auto-start", daemon=True)
            helper.start()
        try:
            if parts:
                run(*parts[0])
        finally:
            if helper is not None:
                helper.join()
        if errors:
            self.stop([o for o in outcomes if isinstance(o, DaemonHandle)], self.local.stop_timeout)
            raise errors[0]
        return [o for o in outcomes if o is not None]

    def stop(self, handles: Sequence[DaemonHandle], timeout: float, *, retire: bool = False) -> None:
        for launcher in (self.local, self.ssh):
            mine = [h for h in handles if self._route(h.host) is launcher]
            if mine:
                launcher.stop(mine, timeout, retire=retire)

    def close(self) -> None:
        self.local.close()
        self.ssh.close()
