"""What a daemon prints for its launcher: the line saying where it serves, and output marks.

A grid-started daemon (``--tag-output``) marks every line its published objects print once
it serves: :data:`STDOUT_MARK` or :data:`STDERR_MARK` in front, so the launcher can show it
on the driver's stdout or stderr. The daemon's own log lines stay unmarked.
"""

from __future__ import annotations

__all__ = ["STDERR_MARK", "STDOUT_MARK", "URI_PREFIX", "announcement", "parse_announcement", "split_output"]

URI_PREFIX = "ISDGRID-URI "

#: In front of a line written to the daemon's stdout / stderr (ASCII record separator + fd).
STDOUT_MARK = "\x1e1"
STDERR_MARK = "\x1e2"


def announcement(uri: str) -> str:
    """The line (without newline) a daemon prints once it serves at ``uri``."""
    return f"{URI_PREFIX}{uri}"


def parse_announcement(line: str) -> str | None:
    """The URI if ``line`` is a daemon's announcement, else None."""
    if line.startswith(URI_PREFIX):
        return line[len(URI_PREFIX):].strip()
    return None


def split_output(line: str) -> tuple[str | None, str]:
    """``("stdout" | "stderr", text)`` for a marked line; ``(None, line)`` for any other."""
    if line.startswith(STDOUT_MARK):
        return "stdout", line[len(STDOUT_MARK):]
    if line.startswith(STDERR_MARK):
        return "stderr", line[len(STDERR_MARK):]
    return None, line
