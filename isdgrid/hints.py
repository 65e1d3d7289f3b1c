"""Hints that say how to fix a published object's failure to load on a host."""

from __future__ import annotations

import os
import re
import reprlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .slot import Slot

__all__ = ["load_failure_hint", "missing_module_hint", "scatter_unpacking_hint"]

_MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")
# CPython's messages for a call with the wrong arguments ("f() takes 2 positional arguments but 4
# were given", "f() missing 1 required positional argument: 'y'", "f() takes no arguments (3 given)").
_WRONG_ARGUMENTS = re.compile(r"\(\) (takes|missing|got|expected)\b.*\bargument")
_INSTALLED = re.compile(r"[/\\](site|dist)-packages([/\\]|$)|[/\\]lib[/\\]python\d[^/\\]*([/\\]lib-dynload)?$|\.zip$")


def load_failure_hint(traceback_text: str, slot: Slot) -> str:
    """How to fix a published object's failure to load on ``slot``, when its traceback tells.

    For a module the host cannot import: the ways to make it importable, and where the
    daemon looks for modules (it is asked, when it still answers). Otherwise ''.
    """
    found = _MISSING_MODULE.findall(traceback_text)
    if not found:
        return ""
    try:
        info = slot.control("info")
    except Exception:  # noqa: BLE001 - the hint does without the daemon's facts
        info = {}
    return missing_module_hint(found[-1], slot.host.name, info if isinstance(info, dict) else {})


def missing_module_hint(module: str, host: str, info: dict[str, Any]) -> str:
    """The advice for ``No module named <module>`` on ``host`` (``info``: the daemon's ``info()``)."""
    top = module.split(".")[0]
    paths = [p for p in info.get("sys_path", []) if p and not _INSTALLED.search(p)]
    if not paths and info.get("temp_path"):
        paths = [info["temp_path"]]
    where = ", ".join(paths) if paths else "its temp path"
    install = (
        f"install it on every host for the daemons' Python, or put it in a folder they import from; "
        f"the daemon on {host} imports from {where} (and its installed packages)"
    )
    local = sys.modules.get(top)
    origin = getattr(local, "__file__", None)
    if origin and _INSTALLED.search(os.path.dirname(os.path.dirname(origin))):
        return f"How to fix it: {top!r} is an installed package in the driver; {install}"
    copy = f"grid.copy_files(<the folder holding {top}.py>, [{top + '.py'!r}])"
    if origin:
        if getattr(local, "__path__", None) is not None:  # a package: its folder, every .py in it
            copy = f"grid.copy_files({os.path.dirname(os.path.dirname(origin))!r}, [{top + '/*.py'!r}])"
        else:
            copy = f"grid.copy_files({os.path.dirname(origin)!r}, [{os.path.basename(origin)!r}])"
    return (
        f"How to fix it: the daemons cannot import {module!r}. Make it importable there, any one of:\n"
        f"  - copy it to every host's temp path before publish: {copy}\n"
        f"  - ship it by value with the instance: in the driver, import cloudpickle, {top}; "
        f"cloudpickle.register_pickle_by_value({top})\n"
        f"  - {install}"
    )


def scatter_unpacking_hint(error: BaseException, name: str, index: int, item: list[Any] | tuple[Any, ...]) -> str:
    """What to say when ``scatter`` unpacked ``item`` into ``name(*item)`` and the call failed on its arguments.

    '' unless ``error`` is a :class:`TypeError` about the arguments of ``name`` itself.
    """
    text = str(error)
    if not isinstance(error, TypeError) or f"{name}()" not in text or not _WRONG_ARGUMENTS.search(text):
        return ""
    shown = reprlib.repr(item)
    return (
        f"{text} (scatter unpacks a list or tuple item as positional arguments: item {index}, {shown}, "
        f"became {len(item)} arguments of {name}(); to pass a list or tuple as one argument, wrap each item "
        f"in a 1-tuple: [({shown},), ...])"
    )
