"""How reports write numbers and tables: SI counts, MiB sizes, markdown tables of dict rows."""

from __future__ import annotations


def byte_size(n_bytes: float) -> str:
    """A size in MiB, or in KiB (B) where MiB would round to 0.0: 1.5 MiB, 12.3 KiB, 512 B."""
    if n_bytes >= 2**20 / 10:
        return f"{n_bytes / 2**20:.2f} MiB"
    if n_bytes >= 1024:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes:.0f} B"


def si(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def markdown_table(rows: list[dict]) -> list[str]:
    """Lines of a markdown table with the first row's keys as columns."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return si(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
