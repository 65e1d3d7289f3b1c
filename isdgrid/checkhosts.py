"""Checking hosts: start one daemon on each host, ping it, stop it (``isdgrid check``)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import GridError, LaunchError
from .grid import Grid
from .hosts import Host

__all__ = ["HostCheck", "check_host", "check_hosts", "describe_error"]


@dataclass(frozen=True)
class HostCheck:
    """The outcome of checking one host: what runs there and how fast it answers, or why not."""

    host: str
    ok: bool
    hostname: str = ""
    python: str = ""
    start_time: float = 0.0
    latency: float = 0.0
    error: str = ""

    def line(self) -> str:
        """One line for people."""
        if self.ok:
            return (
                f"ok    {self.host}: python {self.python} on {self.hostname}, "
                f"ping {self.latency * 1e3:.2f} ms, started in {self.start_time:.2f} s"
            )
        return f"FAIL  {self.host}: {self.error}"


def describe_error(exc: BaseException) -> str:
    """One line saying why a host failed: the error's first line (for a :class:`LaunchError`,
    what went wrong and the host's last words), without the host's name."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    if isinstance(exc, LaunchError) and exc.host is not None:
        first = first.removeprefix(f"host {exc.host!r}: ")
    return first


def check_host(
    host: Host,
    launcher: str = "auto",
    *,
    start_timeout: float = 30.0,
    pings: int = 5,
    launcher_options: Mapping[str, Any] | None = None,
) -> HostCheck:
    """Start one daemon on ``host`` with ``launcher``, ask who it is, time ``pings`` pings, stop it."""
    one = dataclasses.replace(host, n_cpu=1)
    started = time.monotonic()
    try:
        with Grid(
            [one], launcher, start_timeout=start_timeout, status_file=False, launcher_options=launcher_options
        ) as grid:
            start_time = time.monotonic() - started
            slot = grid.slots[0]
            info = slot.control("info")
            times = []
            for _ in range(max(1, pings)):
                t0 = time.perf_counter()
                slot.control("ping")
                times.append(time.perf_counter() - t0)
    except GridError as exc:
        return HostCheck(host.name, False, error=describe_error(exc))
    return HostCheck(
        host.name,
        True,
        hostname=str(info.get("hostname", "?")),
        python=str(info.get("python", "?")),
        start_time=start_time,
        latency=statistics.median(times),
    )


def check_hosts(
    hosts: Sequence[Host],
    launcher: str = "auto",
    *,
    start_timeout: float = 30.0,
    pings: int = 5,
    parallel: int = 8,
    launcher_options: Mapping[str, Any] | None = None,
) -> list[HostCheck]:
    """:func:`check_host` for every host (``parallel`` at a time), in the order given."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(parallel, len(hosts)))) as pool:
        futures = [
            pool.submit(
                check_host, host, launcher, start_timeout=start_timeout, pings=pings, launcher_options=launcher_options
            )
            for host in hosts
        ]
        return [f.result() for f in futures]
