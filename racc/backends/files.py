"""File checks shared by the backends."""

from __future__ import annotations

import os

from racc.errors import ExportError


def check_writable(path: str | os.PathLike) -> None:
    """Raise `ExportError` before any work if `path` cannot be written."""
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(parent):
        raise ExportError(
            f"cannot write '{path}': folder '{parent}' does not exist; create it "
            "or choose a writable path"
        )
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ExportError(f"cannot write '{path}': permission denied; choose a writable path")
