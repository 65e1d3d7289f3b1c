"""The line a daemon prints on stdout to tell its launcher where it serves."""

from __future__ import annotations

__all__ = ["URI_PREFIX", "announcement", "parse_announcement"]

URI_PREFIX = "ISDGRID-URI "


def announcement(uri: str) -> str:
    """The line (without newline) a daemon prints once it serves at ``uri``."""
    return f"{URI_PREFIX}{uri}"


def parse_announcement(line: str) -> str | None:
    """The URI if ``line`` is a daemon's announcement, else None."""
    if line.startswith(URI_PREFIX):
        return line[len(URI_PREFIX):].strip()
    return None
