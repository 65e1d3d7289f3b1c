"""Hosts: the machines a grid runs on, and the hosts file that lists them.

A hosts file is TOML, one ``[[host]]`` table per machine, with optional ``[defaults]``
applied to every host::

    [defaults]
    python = "python3"
    temp_path = "/scratch/isdgrid"

    [[host]]
    name = "localhost"
    n_cpu = 4

    [[host]]
    name = "node7"          # an ssh host alias: user, port, key come from ~/.ssh/config
    n_cpu = 8
    niceness = 5
    init_cmd = "module load python/3.11"
    gpus = [0, 1, 2, 3]     # slot i sees CUDA_VISIBLE_DEVICES=gpus[i % 4]
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = ["Host", "create_host_list", "load_hosts"]

#: One GPU as ``CUDA_VISIBLE_DEVICES`` names it: an index, or a ``GPU-...``/``MIG-...`` UUID.
GpuId = int | str


@dataclass(frozen=True)
class Host:
    """One machine of the grid.

    ``n_cpu`` is the number of daemon slots started on it (one published copy each);
    ``temp_path`` is where copied files go and the daemons run (a fresh temporary folder,
    removed at terminate, when None); ``niceness`` is applied with ``nice``; ``python`` is
    the interpreter that runs the daemon; ``init_cmd`` is a shell command run before it
    (for example ``module load python``). ``gpus`` (device indexes or UUIDs, as
    ``CUDA_VISIBLE_DEVICES`` takes them) spreads the host's slots over its GPUs: slot ``i``
    runs with ``CUDA_VISIBLE_DEVICES=gpus[i % len(gpus)]`` (more slots than GPUs share them).
    ``cpu_bind`` pins slot ``i`` to one core of its own, the ``i``-th (modulo their number)
    of the cores the host daemon may use, as ``srun --cpu-bind=cores`` does.
    """

    name: str
    temp_path: str | None = None
    n_cpu: int = 1
    niceness: int = 0
    python: str = "python3"
    init_cmd: str = ""
    gpus: Sequence[GpuId] | None = None  # kept as a tuple
    cpu_bind: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"host name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.n_cpu, int) or isinstance(self.n_cpu, bool) or self.n_cpu < 1:
            raise ConfigError(f"host {self.name!r}: n_cpu must be an integer >= 1, got {self.n_cpu!r}")
        if not isinstance(self.niceness, int) or not 0 <= self.niceness <= 19:
            raise ConfigError(f"host {self.name!r}: niceness must be an integer 0..19, got {self.niceness!r}")
        if not isinstance(self.python, str) or not self.python.strip():
            raise ConfigError(f"host {self.name!r}: python must be a non-empty string")
        if self.temp_path is not None and not isinstance(self.temp_path, str):
            raise ConfigError(f"host {self.name!r}: temp_path must be a string")
        if not isinstance(self.init_cmd, str):
            raise ConfigError(f"host {self.name!r}: init_cmd must be a string")
        if not isinstance(self.cpu_bind, bool):
            raise ConfigError(f"host {self.name!r}: cpu_bind must be True or False, got {self.cpu_bind!r}")
        if self.gpus is not None:
            object.__setattr__(self, "gpus", _check_gpus(self.name, self.gpus))

    def gpu(self, slot: int) -> str | None:
        """The ``CUDA_VISIBLE_DEVICES`` of slot ``slot`` (None: the grid sets none)."""
        if not self.gpus:
            return None
        return str(self.gpus[slot % len(self.gpus)])

    def gpu_shared(self, slot: int) -> bool:
        """True when another slot of this host is given the same GPU."""
        gpu = self.gpu(slot)
        if gpu is None or self.gpus is None:
            return False
        width = len(self.gpus)
        return sum(len(range(j, self.n_cpu, width)) for j, g in enumerate(self.gpus) if str(g) == gpu) > 1


def _check_gpus(host: str, gpus: object) -> tuple[GpuId, ...]:
    """``gpus`` as a tuple of device indexes (int >= 0) or UUID strings; a ConfigError otherwise."""
    if isinstance(gpus, (str, bytes)) or not isinstance(gpus, Iterable):
        raise ConfigError(f"host {host!r}: gpus must be a list of GPU indexes or UUIDs, got {gpus!r}")
    checked: list[GpuId] = []
    for gpu in gpus:
        if isinstance(gpu, bool) or not isinstance(gpu, (int, str)):
            raise ConfigError(f"host {host!r}: a GPU must be an index (int >= 0) or a UUID string, got {gpu!r}")
        if isinstance(gpu, int) and gpu < 0:
            raise ConfigError(f"host {host!r}: a GPU index must be >= 0, got {gpu}")
        if isinstance(gpu, str) and (not gpu.strip() or any(c in gpu for c in ", \t\n")):
            raise ConfigError(f"host {host!r}: a GPU UUID must be one word without commas, got {gpu!r}")
        checked.append(gpu)
    if not checked:
        raise ConfigError(f"host {host!r}: gpus is empty; give at least one GPU, or leave gpus out")
    return tuple(checked)


_HOST_FIELDS = {f.name for f in dataclasses.fields(Host)}


def create_host_list(
    names: Iterable[str],
    temp_path: str | None = None,
    niceness: int = 0,
    python: str = "python3",
    init_cmd: str = "",
    n_cpu: int = 1,
) -> list[Host]:
    """A :class:`Host` per name, all with the same settings.

    A name repeated ``k`` times gives one host with ``n_cpu = k`` slots, as a machine
    listed once per processor did in the original grid.
    """
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [
        Host(name, temp_path=temp_path, n_cpu=count * n_cpu, niceness=niceness, python=python, init_cmd=init_cmd)
        for name, count in counts.items()
    ]


def hosts_from_mapping(data: Mapping[str, Any], source: str = "<hosts>") -> list[Host]:
    """Hosts from an already parsed hosts document (the structure of a hosts file)."""
    unknown_top = set(data) - {"host", "hosts", "defaults"}
    if unknown_top:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {sorted(unknown_top)}; expected [[host]] tables and [defaults]"
        )
    defaults = data.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise ConfigError(f"{source}: [defaults] must be a table")
    _check_keys(defaults, f"{source}: [defaults]")
    entries = data.get("host", data.get("hosts", []))
    if isinstance(entries, Mapping):  # [hosts.NAME] tables
        entries = [{"name": name, **table} for name, table in entries.items()]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: no hosts; add at least one [[host]] table with a name")
    hosts: list[Host] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries, start=1):
        where = f"{source}: host #{index}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a table")
        if "name" in entry:
            where = f"{source}: host {entry['name']!r}"
        _check_keys(entry, where)
        merged = {**defaults, **entry}
        if "name" not in merged:
            raise ConfigError(f"{where}: missing key 'name'")
        try:
            host = Host(**merged)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if host.name in seen:
            raise ConfigError(f"{where}: host listed twice (use n_cpu for several slots)")
        seen.add(host.name)
        hosts.append(host)
    return hosts


def load_hosts(path: str | os.PathLike[str]) -> list[Host]:
    """Read hosts from a TOML hosts file (see the module docstring for the format).

    Raises :class:`ConfigError` naming the file and the line (TOML syntax) or the key
    (unknown key, wrong type or value) that is wrong.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{source}: hosts file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read hosts file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return hosts_from_mapping(data, source)


def _check_keys(table: Mapping[str, Any], where: str) -> None:
    unknown = set(table) - _HOST_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_HOST_FIELDS)}")
    types: dict[str, type | tuple[type, ...]] = {
        "name": str, "temp_path": str, "n_cpu": int, "niceness": int, "python": str, "init_cmd": str, "gpus": list,
        "cpu_bind": bool,
    }
    for key, value in table.items():
        expected = types[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            name = expected.__name__ if isinstance(expected, type) else "value"
            raise ConfigError(f"{where}: key {key!r} must be {name}, got {value!r}")
