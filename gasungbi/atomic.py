"""Writes that never leave a half-written file or directory behind: write under a temporary name in
the same folder, then rename (``os.replace`` is atomic on POSIX and Windows), so a crash or a kill
leaves either the old version or the new one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def write_file(dest: str | os.PathLike, write: Callable[[Path], object], fsync: bool = False) -> Path:
    """Call ``write(tmp_path)``, then rename the file to ``dest``; ``fsync`` flushes it to disk first."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    write(tmp)
    if fsync:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dest)
    return dest


def write_text(dest: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """``dest`` holds ``text`` (UTF-8), all or nothing."""
    return write_file(dest, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync)


def write_dir(dest: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_dir)`` on a fresh :func:`tmp_dir` beside ``dest``, then :func:`replace_dir`."""
    tmp = fresh_dir(tmp_dir(dest))
    write(tmp)
    return replace_dir(tmp, dest)


def tmp_dir(dest: str | os.PathLike) -> Path:
    """The temporary folder that is filled before it becomes ``dest``: ``.NAME.tmp`` beside it (the
    processes of a distributed save all write there, one of them renames it)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.tmp")


def fresh_dir(path: str | os.PathLike) -> Path:
    """``path`` as an empty folder (what a crash left there is removed)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Put the finished folder ``tmp`` in place of ``dest`` (an existing ``dest`` is removed first:
    the one non-atomic instant)."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest
