"""Room for a large grid's file descriptors: the soft ``RLIMIT_NOFILE`` raised when it is short.

A driver keeps about one descriptor per slot (its connection; two while it reconnects)
and a few per host; a host daemon four per slot (a pipe to each worker and three from it). Many
systems start a process with a soft limit of 1,024, which a grid of a few hundred slots
passes; the hard limit is usually far higher, and any process may raise its soft limit up
to it.
"""

from __future__ import annotations

import logging

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]

__all__ = ["ensure_open_files", "out_of_files"]

log = logging.getLogger(__name__)


def ensure_open_files(needed: int, who: str = "the driver") -> int:
    """Raise this process's soft limit of open files to at least ``needed`` (up to the hard limit).

    Returns the soft limit now in force; logs a warning, saying what to do, when the hard
    limit is below ``needed``. The limit is never lowered.
    """
    if resource is None:
        return needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft if soft != resource.RLIM_INFINITY else needed
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("%s: cannot raise the open-files limit from %d to %d: %s", who, soft, target, exc)
        return soft
    if target < needed:
        log.warning("%s needs about %d open files, but the hard limit is %d: raise it (ulimit -Hn, or "
                    "/etc/security/limits.conf) or use fewer slots", who, needed, hard)
    else:
        log.info("%s: open-files limit raised from %d to %d", who, soft, target)
    return target


def out_of_files(exc: OSError) -> str:
    """What to say when the driver could not open a descriptor (``EMFILE``/``ENFILE``)."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource is not None else "?"
    return (f"the driver is out of file descriptors ({exc.strerror}; its limit of open files is {limit}): "
            "a grid needs about 3 per slot; raise the limit (ulimit -n) or use fewer slots")
