"""Launchers: how a grid's daemons are started and ended (auto, local, ssh, slurm, sge, attach)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .attach import AttachLauncher
from .auto import AutoLauncher
from .base import DaemonHandle, Launcher, ProcessLauncher, SlotSpec
from .local import LocalLauncher
from .sge import SgeLauncher
from .slurm import SlurmLauncher
from .ssh import SshLauncher

__all__ = [
    "AttachLauncher",
    "AutoLauncher",
    "DaemonHandle",
    "Launcher",
    "LocalLauncher",
    "ProcessLauncher",
    "SgeLauncher",
    "SlotSpec",
    "SlurmLauncher",
    "SshLauncher",
    "make_launcher",
]

_LAUNCHERS: dict[str, type[Launcher]] = {
    "auto": AutoLauncher,
    "local": LocalLauncher,
    "ssh": SshLauncher,
    "slurm": SlurmLauncher,
    "sge": SgeLauncher,
    "attach": AttachLauncher,
}


def make_launcher(name: str, **options: Any) -> Launcher:
    """The launcher called ``name``, built with ``options``."""
    cls = _LAUNCHERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown launcher {name!r}; choose one of: {', '.join(_LAUNCHERS)}")
    return cls(**options)
