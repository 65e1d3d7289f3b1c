"""isdgrid: a Pyro5 remote object grid for simulation drivers (a rebuild of IMP.isd's grid).

>>> from isdgrid import Grid, Host
>>> from isdgrid.examples.replica_exchange import Replica  # a Metropolis sampler
>>> with Grid([Host("localhost", n_cpu=2)]) as grid:
...     sid = grid.publish(Replica())                     # a copy on every slot
...     proxy = grid.acquire_service(sid)                 # a free server
...     energy = proxy.reset(7, 1.0, False, 0.5, 0.0)     # a Result, at once
...     sampled = proxy.sample(100)                       # runs after reset(), in call order
...     grid.release_service(proxy)                       # back in the queue after sample()
...     temperatures = grid.gather(grid.scatter(sid, "set_temperature", [1.0, 2.5]), timeout=60)
...     grid.release_all()
...     print(energy.get(timeout=60), sorted(sampled.get(timeout=60)), temperatures)
3.75 ['acceptance', 'energy', 'xs'] [1.0, 2.5]
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

# Names are imported on first use (PEP 562): a daemon, which imports isdgrid.daemon, then
# never loads the driver's side (grid, launchers, click), and starts faster.
_LAZY = {
    "AuthenticationError": "errors",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "PayloadTooLargeError": "errors",
    "GridError": "errors",
    "GridTerminatedError": "errors",
    "HostLostError": "errors",
    "LaunchError": "errors",
    "PublishError": "errors",
    "RemoteError": "errors",
    "RemoteTraceback": "errors",
    "ServiceReleasedError": "errors",
    "ServiceUnavailableError": "errors",
    "UnknownServiceError": "errors",
    "Grid": "grid",
    "GridState": "grid",
    "ServerStatus": "grid",
    "Host": "hosts",
    "create_host_list": "hosts",
    "load_hosts": "hosts",
    "Launcher": "launchers",
    "RemoteMethod": "proxy",
    "ServiceProxy": "proxy",
    "read_attribute": "proxy",
    "Result": "result",
    "ServerQueue": "servicequeue",
    "Snapshot": "snapshot",
    "StatusTable": "table",
}

if _TYPE_CHECKING:
    from .errors import (
        AuthenticationError,
        CheckpointError,
        ConfigError,
        GridError,
        GridTerminatedError,
        HostLostError,
        LaunchError,
        PayloadTooLargeError,
        PublishError,
        RemoteError,
        RemoteTraceback,
        ServiceReleasedError,
        ServiceUnavailableError,
        UnknownServiceError,
    )
    from .grid import Grid, GridState, ServerStatus
    from .hosts import Host, create_host_list, load_hosts
    from .launchers import Launcher
    from .proxy import RemoteMethod, ServiceProxy, read_attribute
    from .result import Result
    from .servicequeue import ServerQueue
    from .snapshot import Snapshot
    from .table import StatusTable


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'isdgrid' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.2.0"

__all__ = [
    "AuthenticationError",
    "CheckpointError",
    "ConfigError",
    "Grid",
    "GridError",
    "GridState",
    "GridTerminatedError",
    "Host",
    "HostLostError",
    "LaunchError",
    "Launcher",
    "PayloadTooLargeError",
    "PublishError",
    "RemoteError",
    "RemoteMethod",
    "RemoteTraceback",
    "Result",
    "ServerQueue",
    "ServerStatus",
    "ServiceProxy",
    "ServiceReleasedError",
    "ServiceUnavailableError",
    "Snapshot",
    "StatusTable",
    "UnknownServiceError",
    "__version__",
    "create_host_list",
    "load_hosts",
    "read_attribute",
]
