"""File checks shared by the backends, and writing a file so that a failure leaves none."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from racc.errors import ExportError


def check_writable(
    path: str | os.PathLike, folder: bool = False, makes_parents: bool = False
) -> None:
    """Raise `ExportError` before any work if `path` (a file, or a `folder`) cannot be written.
    With `makes_parents` the caller creates missing folders, so only an existing ancestor must be
    a writable folder."""
    target = Path(path)
    if target.exists() and target.is_dir() != folder:
        fix = "it is a file; give a folder" if folder else "it is a folder; name a file inside it"
        raise ExportError(f"cannot write '{path}': {fix}")
    existing = next(p for p in (target, *target.absolute().parents) if p.exists())
    if existing != target and not existing.is_dir():
        raise ExportError(
            f"cannot write '{path}': '{existing}' is a file, not a folder; choose another path"
        )
    parent = target.absolute().parent
    if not makes_parents and not target.exists() and existing != parent:
        raise ExportError(
            f"cannot write '{path}': folder '{parent}' does not exist; create it "
            "or choose a writable path"
        )
    if not os.access(existing, os.W_OK):
        raise ExportError(f"cannot write '{path}': permission denied; choose a writable path")


@contextlib.contextmanager
def written_aside(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh path beside `path` to write and check the file at. It is renamed to `path` when
    the block ends (atomically: same folder), and removed if the block raises, so `path` only
    ever holds a complete, checked file, and an earlier file there survives a failed write."""
    check_writable(path)
    final = Path(path)
    aside = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:8]}.partial{final.suffix}")
    try:
        yield aside
        os.replace(aside, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)
