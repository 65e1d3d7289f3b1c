"""Selecting and packing the files that ``copy_files`` sends to the hosts."""

from __future__ import annotations

import fnmatch
import io
import os
import tarfile
from collections.abc import Iterable, Sequence

__all__ = ["DEFAULT_EXCLUDE", "pack_files", "select_files"]

DEFAULT_EXCLUDE: tuple[str, ...] = ("cns/", ".svn/")


def select_files(rootdir: str, patterns: Iterable[str], exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Paths (relative to ``rootdir``) chosen by the original grid's rules.

    Each pattern is ``folder/name``: ``name`` is an fnmatch pattern matched against the
    file names in ``folder`` and in every folder below it (``Isd/foo.txt`` matches
    ``Isd/foo.txt``, ``Isd/a/foo.txt``, ``Isd/a/b/c/foo.txt``); a bare ``name`` is matched
    in the whole tree. A file whose path contains any string of ``exclude`` is skipped.
    """
    root = os.path.abspath(rootdir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"copy_files: {rootdir!r} is not a folder")
    chosen: dict[str, None] = {}
    for pattern in patterns:
        folder, name = os.path.split(pattern)
        start = os.path.join(root, folder) if folder else root
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            for filename in sorted(filenames):
                full = os.path.join(dirpath, filename)
                if not fnmatch.fnmatch(filename, name):
                    continue
                if any(ex in full for ex in exclude):
                    continue
                chosen[os.path.relpath(full, root)] = None
    return list(chosen)


def pack_files(rootdir: str, relpaths: Iterable[str]) -> bytes:
    """A gzip-compressed tar of ``relpaths`` (folders kept), built in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for rel in relpaths:
            tar.add(os.path.join(rootdir, rel), arcname=rel.replace(os.sep, "/"), recursive=False)
    return buffer.getvalue()
