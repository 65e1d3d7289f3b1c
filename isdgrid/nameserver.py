"""The Pyro5 name server as a meeting point for daemons started by hand.

A daemon started with ``isdgrid daemon --nameserver HOST:PORT --group NAME`` registers
its agent URI under ``isdgrid.<group>.<member>``; a grid made with
``Grid.attach(nameserver="HOST:PORT", group=NAME, secret=...)`` lists that prefix to find
them. The name server only stores URIs: it has no secret, and every connection to a
daemon still needs the grid's secret.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

import Pyro5.client
import Pyro5.core
import Pyro5.errors

from .errors import ConfigError, LaunchError

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_PORT",
    "entry_name",
    "group_prefix",
    "list_group",
    "locate",
    "parse_location",
    "registered",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9090
DEFAULT_GROUP = "default"
NAMESPACE = "isdgrid"
_GROUP_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_location(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``, or ``[IPv6]:PORT``) as a (host, port) pair."""
    text = text.strip()
    if not text:
        raise ConfigError("name server location is empty; give HOST:PORT")
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"bad name server location {text!r}: unclosed '['")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"bad name server location {text!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise ConfigError(f"bad name server location {text!r}: no host")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"bad name server location {text!r}: port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise ConfigError(f"bad name server location {text!r}: port out of range")
    return host, number


def check_group(group: str) -> str:
    """The group name, checked: letters, digits, ``_`` and ``-`` only (no dots)."""
    if not isinstance(group, str) or not _GROUP_RE.match(group):
        raise ConfigError(f"bad group name {group!r}: use letters, digits, '_' and '-' only")
    return group


def group_prefix(group: str) -> str:
    """The name server prefix under which the members of ``group`` are registered."""
    return f"{NAMESPACE}.{check_group(group)}."


def entry_name(group: str, member: str) -> str:
    """The name server entry of one daemon (``member``: its label, or host-pid)."""
    member = re.sub(r"[^A-Za-z0-9_.-]+", "_", member).strip("._") or "daemon"
    return group_prefix(group) + member


# The only underscored Pyro5 name isdgrid uses: _pyroTimeout, Pyro5's per-proxy API for a
# bound on each call (underscored so as not to clash with remote method names; Pyro5 has no
# other way to bound one proxy's calls rather than the whole process's through
# Pyro5.config). Pinned by tests/test_attach.py::test_a_name_server_that_stops_answering_is_an_error_within_the_timeout.
def set_call_timeout(proxy: Pyro5.client.Proxy, timeout: float | None) -> None:
    """Bound each call of ``proxy`` to ``timeout`` seconds (None: no bound)."""
    proxy._pyroTimeout = timeout


def locate(location: str, timeout: float = 10.0) -> Pyro5.client.Proxy:
    """A connected proxy to the name server at ``HOST:PORT`` (LaunchError if unreachable)."""
    host, port = parse_location(location)
    where = f"[{host}]" if ":" in host else host
    try:
        # Not Pyro5.core.locate_ns: it connects with no bound (Pyro5's COMMTIMEOUT, 0 by
        # default), so a name server that stops answering would hang the driver there.
        ns = Pyro5.client.Proxy(f"PYRO:{Pyro5.core.NAMESERVER_NAME}@{where}:{port}")
        set_call_timeout(ns, timeout)
        ns.ping()  # connects, bounded by the timeout
    except (Pyro5.errors.PyroError, OSError) as exc:
        raise LaunchError(f"no Pyro5 name server at {host}:{port}: {exc}", host=host) from exc
    return ns


def list_group(location: str, group: str, timeout: float = 10.0) -> dict[str, str]:
    """Every entry (name -> URI) registered under ``group`` at the name server."""
    prefix = group_prefix(group)
    with locate(location, timeout) as ns:
        try:
            entries: dict[str, str] = ns.list(prefix=prefix)
        except Pyro5.errors.PyroError as exc:
            raise LaunchError(f"cannot list {prefix}* at the name server {location}: {exc}") from exc
    return {name: str(uri) for name, uri in sorted(entries.items())}


@contextlib.contextmanager
def registered(location: str, name: str, uri: str, timeout: float = 10.0) -> Iterator[None]:
    """Keep ``name -> uri`` registered at the name server while the block runs."""
    with locate(location, timeout) as ns:
        try:
            if name in ns.list(prefix=name):
                log.warning("replacing the name server entry %s (a daemon with this label ended uncleanly?)", name)
            ns.register(name, uri, safe=False)
        except Pyro5.errors.PyroError as exc:
            raise LaunchError(f"cannot register {name!r} at the name server {location}: {exc}") from exc
        log.info("registered %s at the name server %s", name, location)
    try:
        yield
    finally:
        try:
            with locate(location, timeout) as ns:
                ns.remove(name)
            log.info("unregistered %s from the name server %s", name, location)
        except (LaunchError, Pyro5.errors.PyroError, OSError) as exc:
            log.warning("could not unregister %s from the name server %s: %s", name, location, exc)
