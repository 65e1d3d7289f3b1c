"""isdgrid: a Pyro5 remote object grid for simulation drivers (a rebuild of IMP.isd's grid).

>>> from isdgrid import Grid, Host
>>> with Grid([Host("localhost", n_cpu=4)]) as grid:      # doctest: +SKIP
...     sid = grid.publish(Replica(T=1.0))
...     proxy = grid.acquire_service(sid)
...     result = proxy.sample(100)                          # a Result, at once
...     grid.release_service(proxy)
...     print(result.get(timeout=60))
"""

from __future__ import annotations

from .errors import (
    AuthenticationError,
    ConfigError,
    GridError,
    GridTerminatedError,
    HostLostError,
    LaunchError,
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
from .proxy import RemoteMethod, ServiceProxy
from .result import Result
from .servicequeue import ServerQueue

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "Grid",
    "GridError",
    "GridState",
    "GridTerminatedError",
    "Host",
    "HostLostError",
    "LaunchError",
    "Launcher",
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
    "UnknownServiceError",
    "__version__",
    "create_host_list",
    "load_hosts",
]
