"""File checks shared by the backends, and writing a file so that a failure leaves none."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from racc.errors import ExportError


def check_writable(path: str | os.PathLike) -> None:
    """Raise `ExportError` before any work if `path` cannot be written."""
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    if os.path.isdir(path):
        raise ExportError(f"cannot write '{path}': it is a folder; name a file inside it")
    if not os.path.isdir(parent):
        raise ExportError(
            f"cannot write '{path}': folder '{parent}' does not exist; create it "
            "or choose a writable path"
        )
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
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
