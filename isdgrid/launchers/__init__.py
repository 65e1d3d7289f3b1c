"""Launchers: how a grid's daemons are started and ended (local, ssh, slurm, sge, attach)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import DaemonHandle, Launcher, ProcessLauncher, SlotSpec
from .local import LocalLauncher
from .ssh import SshLauncher

__all__ = ["DaemonHandle", "Launcher", "LocalLauncher", "ProcessLauncher", "SlotSpec", "SshLauncher", "make_launcher"]

_NAMES = ("local", "ssh")


def make_launcher(name: str, **options: Any) -> Launcher:
    """The launcher called ``name``, built with ``options``."""
    if name == "local":
        return LocalLauncher(**options)
    if name == "ssh":
        return SshLauncher(**options)
    raise ConfigError(f"unknown launcher {name!r}; choose one of: {', '.join(_NAMES)}")
