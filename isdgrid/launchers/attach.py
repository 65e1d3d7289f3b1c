"""Attaching to daemons started by hand (``isdgrid daemon``), by URI or through a name server.

Where the driver cannot start processes on the compute nodes, the user starts one
daemon per slot there (``isdgrid daemon --secret-file F [--nameserver HOST:PORT --group
G]``) and the grid attaches to them: from a list of ``PYRO:isdgrid.agent@HOST:PORT``
URIs, or from the name server entries ``isdgrid.<group>.*``. Each URI is one slot; its
Host is named after the URI's host. The daemons are the user's: the grid unpublishes
its services at terminate but never ends them. The secret is checked on every
connection, as for daemons the grid starts.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Sequence
from typing import Any

import Pyro5.core
import Pyro5.errors

from .. import nameserver as ns
from ..errors import AuthenticationError, ConfigError, LaunchError
from ..hosts import Host
from ..transport import ConnectionBroken, ControlChannel, address_of
from .base import DaemonHandle, Launcher, SlotSpec

__all__ = ["AttachLauncher", "uri_address"]

log = logging.getLogger(__name__)



def uri_address(uri: str) -> tuple[str, int]:
    """The (host, port) a daemon URI points to; ConfigError if it is not a PYRO: URI.

    A daemon on a Unix socket (``PYRO:isdgrid.agent@./u:PATH``) is on this machine:
    ``("localhost", 0)``.
    """
    try:
        parsed = Pyro5.core.URI(uri)
    except (Pyro5.errors.PyroError, TypeError) as exc:
        raise ConfigError(f"not a daemon URI: {uri!r} ({exc})") from None
    if parsed.protocol == "PYRO" and parsed.sockname:
        return "localhost", 0
    if parsed.protocol != "PYRO" or not parsed.host:
        raise ConfigError(
            f"not a daemon URI: {uri!r} (expected PYRO:isdgrid.agent@HOST:PORT or PYRO:isdgrid.agent@./u:PATH)"
        )
    return parsed.host, int(parsed.port)


def _answers(uri: str, timeout: float) -> bool:
    """True when something accepts connections where the daemon of ``uri`` listens."""
    address = address_of(uri)
    try:
        if isinstance(address, str):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
        else:
            with socket.create_connection(address, timeout=timeout):
                pass
        return True
    except OSError:
        return False


class AttachLauncher(Launcher):
    """Uses running daemons instead of starting any: ``uris``, or ``nameserver`` + ``group``.

    Name server entries whose daemon no longer accepts connections (it was killed before
    it could unregister) are skipped with a warning; a URI given explicitly that does
    not answer is a :class:`LaunchError`; a daemon that refuses the secret is an
    :class:`AuthenticationError`.
    """

    name = "attach"
    owns_daemons = False

    def __init__(
        self,
        uris: Sequence[str] | None = None,
        *,
        nameserver: str | None = None,
        group: str = ns.DEFAULT_GROUP,
        connect_timeout: float = 10.0,
        **_ignored: Any,  # log_dir, heartbeat_timeout: the daemons are not ours to configure
    ) -> None:
        if (uris is None) == (nameserver is None):
            raise ConfigError("attach needs either a list of daemon URIs or a name server HOST:PORT (not both)")
        if uris is not None:
            if isinstance(uris, str):
                uris = [uris]
            uris = [str(u).strip() for u in uris]
            if not uris:
                raise ConfigError("attach: the list of daemon URIs is empty")
            for uri in uris:
                uri_address(uri)
        else:
            assert nameserver is not None
            ns.parse_location(nameserver)
            ns.check_group(group)
        self.uris = list(uris) if uris is not None else None
        self.nameserver = nameserver
        self.group = group
        self.connect_timeout = connect_timeout
        self._found: list[str] | None = None
        self._assigned: dict[tuple[str, int], str] = {}

    @classmethod
    def from_target(
        cls,
        target: str | Sequence[str] | None,
        *,
        nameserver: str | None = None,
        group: str = ns.DEFAULT_GROUP,
    ) -> AttachLauncher:
        """Read :meth:`Grid.attach`'s first argument: URIs, one URI, or a name server location."""
        if isinstance(target, str) and not target.startswith("PYRO:"):
            if nameserver is not None:
                raise ConfigError("give the name server once (as the first argument or as nameserver=)")
            return cls(nameserver=target, group=group)
        if target is None:
            return cls(nameserver=nameserver, group=group)
        if nameserver is not None:
            raise ConfigError("attach: give daemon URIs or a name server, not both")
        return cls([target] if isinstance(target, str) else list(target))

    def daemon_uris(self) -> list[str]:
        """The URIs to attach to (the name server is asked once)."""
        if self._found is not None:
            return self._found
        if self.uris is not None:
            self._found = list(self.uris)
            return self._found
        assert self.nameserver is not None
        entries = ns.list_group(self.nameserver, self.group, timeout=self.connect_timeout)
        found = []
        for name, uri in entries.items():
            try:
                uri_address(uri)
            except ConfigError:
                log.warning("skipping name server entry %s: %s is not a daemon URI", name, uri)
                continue
            if _answers(uri, min(self.connect_timeout, 3.0)):
                found.append(uri)
            else:
                log.warning("skipping name server entry %s: nothing answers at %s (stale entry?)", name, uri)
        if not found:
            raise LaunchError(
                f"no running daemon registered as {ns.group_prefix(self.group)}* at the name server {self.nameserver}",
                host=self.nameserver,
            )
        log.info("found %d daemons of group %r at %s", len(found), self.group, self.nameserver)
        self._found = found
        return found

    def default_hosts(self) -> list[Host]:
        counts: dict[str, int] = {}
        for uri in self.daemon_uris():
            host, _ = uri_address(uri)
            counts[host] = counts.get(host, 0) + 1
        return [Host(host, n_cpu=count) for host, count in counts.items()]

    def slot_specs(self, hosts: Sequence[Host]) -> list[SlotSpec]:
        by_host: dict[str, list[str]] = {}
        for uri in self.daemon_uris():
            by_host.setdefault(uri_address(uri)[0], []).append(uri)
        specs = []
        for host in hosts:
            uris = by_host.get(host.name, [])
            if len(uris) < host.n_cpu:
                raise ConfigError(f"host {host.name!r} wants {host.n_cpu} slots but {len(uris)} daemons run there")
            for slot in range(host.n_cpu):
                self._assigned[(host.name, slot)] = uris[slot]
                specs.append(SlotSpec(host, slot, temp_path=""))
        return specs

    def start(self, specs: Sequence[SlotSpec], secret: str, timeout: float) -> list[DaemonHandle | LaunchError]:
        results: list[DaemonHandle | LaunchError] = []
        for spec in specs:
            uri = self._assigned[(spec.host.name, spec.slot)]
            try:
                info = self._info(uri, spec, secret, min(timeout, self.connect_timeout))
            except LaunchError as exc:
                results.append(exc)
                continue
            temp_path = str(info.get("temp_path", ""))
            log.info("attached to %s (%s, pid %s, %s)", uri, info.get("label"), info.get("pid"), temp_path)
            results.append(DaemonHandle(dataclasses.replace(spec, temp_path=temp_path), uri))
        return results

    @staticmethod
    def _info(uri: str, spec: SlotSpec, secret: str, timeout: float) -> dict[str, Any]:
        """The daemon's ``info``, once it has been told its place in this grid (``identify``)."""
        host, _ = uri_address(uri)
        try:
            channel = ControlChannel(address_of(uri), secret, timeout, None)
        except AuthenticationError as exc:
            raise AuthenticationError(f"the daemon at {uri} could not be authenticated: {exc}") from exc
        except ConnectionBroken as exc:
            raise LaunchError(f"cannot reach the daemon at {uri}: {exc}", host=host) from exc
        try:
            channel.call("identify", spec.host.name, spec.slot, spec.rank, spec.gpu, timeout=timeout)
            info: dict[str, Any] = channel.call("info", timeout=timeout)
            return info
        except ConnectionBroken as exc:
            raise LaunchError(f"cannot reach the daemon at {uri}: {exc}", host=host) from exc
        finally:
            channel.close()

    def stop(self, handles: Sequence[DaemonHandle], timeout: float, *, retire: bool = False) -> None:
        if handles:
            log.info("leaving %d attached daemons running (they were started by hand)", len(handles))
