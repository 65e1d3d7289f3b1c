from __future__ import annotations

import isdgrid


def test_public_names_are_sorted_and_exported() -> None:
    assert isdgrid.__all__ == sorted(isdgrid.__all__)
    public = {n for n in dir(isdgrid) if not n.startswith("_") and not _is_module(n)} - {"annotations"}
    assert set(isdgrid.__all__) - {"__version__"} == public


def test_errors_form_one_tree() -> None:
    for name in isdgrid.__all__:
        obj = getattr(isdgrid, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj is not isdgrid.RemoteTraceback:
            assert issubclass(obj, isdgrid.GridError), name


def test_public_names_have_docstrings() -> None:
    for name in isdgrid.__all__:
        obj = getattr(isdgrid, name)
        if callable(obj):
            assert obj.__doc__, name


def _is_module(name: str) -> bool:
    return type(getattr(isdgrid, name)).__name__ == "module"
