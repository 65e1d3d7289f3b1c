"""Every isdgrid module imports on its own, and no module imports one above it.

The call path runs one way (docs/design.md, STYLE.md): grid -> service / servicequeue ->
proxy -> server -> transport -> codec / wire / handshake / errors; on the daemon side
daemon -> agent, which never load the driver's side. ``LAYERS`` below states that as a
table; the check reads the import statements with ``ast`` (nothing is imported), so a
lazy import inside a function counts too, but one under ``if TYPE_CHECKING:`` only where
the table allows it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pkgutil
import subprocess
import sys
from collections.abc import Iterable, Iterator

import pytest
from conftest import require
from packaging.requirements import Requirement


def _package_dir() -> str:
    # find_spec locates the package without running isdgrid/__init__.py, so a broken
    # module fails its own test below rather than the collection of this file.
    spec = importlib.util.find_spec("isdgrid")
    assert spec is not None and spec.submodule_search_locations, "isdgrid is not importable"
    return list(spec.submodule_search_locations)[0]


PACKAGE_DIR = _package_dir()
ROOT = os.path.dirname(PACKAGE_DIR)


def _walk_modules(path: str, prefix: str) -> Iterator[str]:
    # pkgutil.walk_packages would import every subpackage into this process to find its
    # modules; iter_modules on each folder finds the same names without importing them.
    for info in pkgutil.iter_modules([path], prefix):
        yield info.name
        if info.ispkg:
            yield from _walk_modules(os.path.join(path, info.name.rpartition(".")[2]), info.name + ".")


# isdgrid.__main__ is the ``python -m isdgrid`` script: importing it runs the command line.
MODULES = ["isdgrid"] + sorted(m for m in _walk_modules(PACKAGE_DIR, "isdgrid.") if not m.endswith(".__main__"))


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_in_a_fresh_interpreter(module: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"import {module}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"import {module} failed:\n{proc.stderr}"


# (modules, modules they must not import, whether `if TYPE_CHECKING:` imports are allowed).
# Names are relative to the package; a rule on "launchers" covers isdgrid.launchers.*.
LAYERS: list[tuple[tuple[str, ...], tuple[str, ...], bool]] = [
    (
        ("codec", "wire", "handshake", "errors"),
        ("grid", "service", "servicequeue", "proxy", "server", "transport", "slot"),
        False,
    ),
    (("transport",), ("server", "proxy", "grid", "service", "servicequeue", "result"), False),
    (("server",), ("proxy", "grid", "service", "servicequeue"), True),
    (("daemon", "agent"), ("grid", "server", "proxy", "transport", "slot", "launchers", "cli"), False),
]

LAYER_CASES = [(module, forbidden, typing_ok) for modules, forbidden, typing_ok in LAYERS for module in modules]


def _source_file(module: str) -> str | None:
    """The file of ``isdgrid.<module>``, or None when the module does not exist (yet)."""
    base = os.path.join(PACKAGE_DIR, *module.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(
    nodes: Iterable[ast.AST], type_checking: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement in ``nodes``, with whether it sits under ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_checking
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.body, True)
            yield from _imports(node.orelse, type_checking)
        else:
            yield from _imports(ast.iter_child_nodes(node), type_checking)


def imported_modules(source: str, module: str, is_package: bool, typing_ok: bool) -> set[str]:
    """Absolute names of the isdgrid modules that the source of ``isdgrid.<module>`` imports.

    ``from isdgrid import x`` names the module ``isdgrid.x`` when that file exists, else
    the package itself. Imports under ``if TYPE_CHECKING:`` count unless ``typing_ok``.
    """
    package = f"isdgrid.{module}" if is_package else f"isdgrid.{module}".rpartition(".")[0]
    found: set[str] = set()
    for node, under_type_checking in _imports([ast.parse(source)]):
        if under_type_checking and typing_ok:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        for alias in node.names:
            submodule = f"{target}.{alias.name}"
            if submodule.startswith("isdgrid.") and _source_file(submodule.removeprefix("isdgrid.")) is not None:
                found.add(submodule)
            else:
                found.add(target)
    return {name for name in found if name == "isdgrid" or name.startswith("isdgrid.")}


def _violates(name: str, forbidden: str) -> bool:
    full = f"isdgrid.{forbidden}"
    return name == full or name.startswith(full + ".")


@pytest.mark.parametrize(("module", "forbidden", "typing_ok"), LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_module_imports_nothing_above_it(module: str, forbidden: tuple[str, ...], typing_ok: bool) -> None:
    path = _source_file(module)
    require(path is not None, f"isdgrid.{module} does not exist (yet)")
    assert path is not None
    with open(path, encoding="utf-8") as f:
        source = f.read()
    names = imported_modules(source, module, path.endswith("__init__.py"), typing_ok)
    bad = sorted(name for name in names if any(_violates(name, f) for f in forbidden))
    assert not bad, f"isdgrid.{module} imports {bad}, which sit above it in the call path"


def test_import_reader_resolves_relative_lazy_and_type_checking_imports() -> None:
    source = """
from __future__ import annotations
import os
import isdgrid.codec
from typing import TYPE_CHECKING
from . import errors
from .launchers.base import Launcher
if TYPE_CHECKING:
    from .proxy import ServiceProxy
else:
    from .result import Result
def later():
    from isdgrid import grid
"""
    expected = {"isdgrid.codec", "isdgrid.errors", "isdgrid.launchers.base", "isdgrid.result", "isdgrid.grid"}
    assert imported_modules(source, "server", False, typing_ok=True) == expected
    assert imported_modules(source, "server", False, typing_ok=False) == expected | {"isdgrid.proxy"}
    in_subpackage = "from ..errors import LaunchError\nfrom .base import Launcher\nfrom isdgrid import Grid\n"
    assert imported_modules(in_subpackage, "launchers.local", False, typing_ok=False) == {
        "isdgrid.errors",
        "isdgrid.launchers.base",
        "isdgrid",
    }


def test_pyro5_is_capped_on_its_major_version_only() -> None:
    # A cap on the minor version makes isdgrid uninstallable beside anything that needs a
    # newer Pyro5 5.x; .ci/run tests the newest one pip can install.
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        lines = [line.strip().strip('",') for line in f if line.strip().startswith('"Pyro5')]
    assert len(lines) == 1, lines
    allowed = Requirement(lines[0]).specifier
    assert allowed.contains("5.17") and allowed.contains("5.18") and allowed.contains("5.99.1")
    assert not allowed.contains("5.16") and not allowed.contains("6.0")
