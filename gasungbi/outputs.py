"""Where a command may write its output: never over one of its own inputs, never over what is already
there unless the user asked for it (``--overwrite``). Each check raises a one-line :class:`UserError`
naming the flag and the path; it runs before the command reads or builds anything.

Run directories (train, sft, grpo) have their own rule, :func:`gasungbi.train.checkpoint.claim_run_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from gasungbi.errors import UserError

PathLike = str | os.PathLike


def _within(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or lies below it (both resolved)."""
    return path == root or root in path.parents


def _names(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def output_dir(out: PathLike, flag: str, inputs: Iterable[PathLike] = (), overwrite: bool = False,
               replaced: Callable[[Path], list[str]] | None = None) -> Path:
    """Check the directory ``out`` (given as ``flag``) may be written. Refused: a file; one of the
    command's ``inputs`` or a folder holding one (even with ``overwrite``); without ``overwrite``, a
    directory holding what writing would replace: ``replaced(out)`` names it (default: everything in it)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {out} is a file, not a directory")
    target = path.resolve()
    for src in inputs:
        if _within(Path(src).resolve(), target):
            what = "is" if Path(src).resolve() == target else "holds"
            raise UserError(f"{flag} {out} {what} the input {src}: writing there would destroy it; "
                            "choose another directory")
    if path.is_dir() and not overwrite:
        held = sorted(replaced(path) if replaced is not None else (p.name for p in path.iterdir()))
        if held:
            raise UserError(f"{flag} {out} already holds {_names(held)}: add --overwrite to replace "
                            f"{'them' if len(held) > 1 else 'it'}, or choose another directory")
    return path


def output_file(out: PathLike, flag: str, overwrite: bool = False) -> Path:
    """Check the file ``out`` (given as ``flag``) may be written: not a directory, and (without
    ``overwrite``) not an existing file."""
    path = Path(out)
    if path.is_dir():
        raise UserError(f"{flag} {out} is a directory; give the path of the file to write")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {out} already exists: add --overwrite to replace it, or choose another path")
    return path
