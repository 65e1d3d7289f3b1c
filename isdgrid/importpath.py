"""Where a daemon imports from, and which folders it may trust to import from.

A daemon imports, in order, from: its slot's folder (where ``copy_files`` puts files), the
driver script's folder (when the host sees it), the standard library, then everything
else it had on ``sys.path`` (site-packages, ``PYTHONPATH``, a shipped copy of isdgrid), in
the order it had them. So a module copied to the hosts wins over the driver's own file of
that name, and no installed package shadows the standard library.

A folder on ``sys.path`` runs the code of whoever can write it: a folder owned by another
user, or writable by the group or by others, is never put there (:func:`private_problem`).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import sysconfig
from collections.abc import Sequence

__all__ = ["arrange", "is_stdlib", "private_problem"]

log = logging.getLogger(__name__)


def private_problem(path: str) -> str | None:
    """Why ``path`` is not a folder only this user can write (None when it is)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"cannot look at it: {exc.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a folder"
    if info.st_uid != os.geteuid():
        return f"it belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"other users can write it (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _stdlib_roots() -> list[str]:
    paths = sysconfig.get_paths()
    roots = {os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib") if paths.get(key)}
    return sorted(roots)


def is_stdlib(entry: str) -> bool:
    """True for a ``sys.path`` entry of the standard library (its folder, zip, lib-dynload)."""
    if not entry:
        return False
    real = os.path.realpath(entry)
    if "site-packages" in real or "dist-packages" in real:
        return False
    for root in _stdlib_roots():
        if real == root or real.startswith(root + os.sep):
            return True
    # the zipped standard library (python311.zip) sits beside the stdlib folder
    return real.endswith(".zip") and any(os.path.dirname(real) == os.path.dirname(root) for root in _stdlib_roots())


def arrange(slot_folder: str, driver_folders: Sequence[str], start_folder: str | None = None) -> list[str]:
    """Set ``sys.path`` to: slot folder, driver folders, standard library, the rest.

    ``start_folder`` (the folder ``python -m`` or ``-c`` put first) is dropped. A driver
    folder that is not private (:func:`private_problem`) is left out, with a warning; the
    slot folder is checked by the daemon before it serves. Returns the folders left out.
    """
    skipped = []
    trusted = []
    for folder in driver_folders:
        problem = private_problem(folder) if os.path.isdir(folder) else None
        if problem is not None:
            log.warning("not importing from the driver's folder %s: %s", folder, problem)
            skipped.append(folder)
        elif folder not in trusted and folder != slot_folder:
            trusted.append(folder)
    front = [slot_folder, *trusted]
    drop = {*front, "", start_folder or ""}
    rest = [p for p in sys.path if p not in drop]
    stdlib = [p for p in rest if is_stdlib(p)]
    others = [p for p in rest if not is_stdlib(p)]
    sys.path[:] = [*front, *stdlib, *others]
    return skipped
