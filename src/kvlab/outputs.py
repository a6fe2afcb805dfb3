"""Output paths checked before the work that fills them.

A capture or calibration can run for minutes; an output that cannot be written (a folder
without write permission, a file name that is an existing folder) is known at once, so it is
refused at once, in one line, before anything runs or is written. The check is made where
`kvlab.atomic` will make its temporary name: the nearest folder that already exists.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from kvlab.errors import KvlabError


class OutputPathError(KvlabError):
    """An output path that cannot be written."""


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse a file path that is a folder, or whose folder cannot be made or written."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder: give a file name")
    _check_can_create_in(path, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse a folder path that is a file, or whose parent cannot be written (it is made there)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file, not a folder")
    _check_can_create_in(path, what)
    return path


def _check_can_create_in(path: Path, what: str) -> None:
    """Make (and remove) a temporary file in the nearest existing folder above `path`."""
    folder = _nearest_existing(path.absolute().parent)
    if not folder.is_dir():
        raise OutputPathError(f"cannot write {what} {path}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".kvlab-probe.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise OutputPathError(f"cannot write {what} {path}: {folder}: {err.strerror or err}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder
