"""The compile report: one row per pass, printable as a markdown table and convertible to a dict."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from racc.analysis.blocks import SHARED
from racc.analysis.cost import Cost
from racc.errors import RaccError
from racc.passes.base import Skip

_ITEMS_SHOWN = 5
# An `exact` rewrite may move outputs by float rounding only, relative to their largest value.
EXACT_RTOL, EXACT_ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class OutputError:
    """How far a model's outputs moved: max |a-b|, ||a-b|| / ||a||, cosine(a, b)."""

    max_abs: float
    rel_l2: float
    cosine: float
    scale: float  # max |a|, to judge max_abs against

    @staticmethod
    def between(before, after) -> OutputError:
        a, b = _flat(before), _flat(after)
        if a.shape != b.shape:
            return OutputError(math.inf, math.inf, 0.0, float(a.abs().max()) if a.numel() else 0.0)
        a, b = a.double(), b.double()
        diff = (a - b).norm()
        norm = a.norm()
        cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.numel() else 1.0
        rel = float(diff / norm) if norm > 0 else float(diff)
        return OutputError(
            float((a - b).abs().max()) if a.numel() else 0.0,
            rel,
            cosine,
            float(a.abs().max()) if a.numel() else 0.0,
        )

    def within(self, rtol: float, atol: float) -> bool:
        return self.max_abs <= atol + rtol * self.scale

    @property
    def exact(self) -> bool:
        """Within float rounding of the outputs' scale: the bar every `exact` claim must meet."""
        return self.within(EXACT_RTOL, EXACT_ATOL)


def output_step(outputs) -> float:
    """The step of an 8-bit quantizer spanning the outputs' range (with 0): (max - min) / 255."""
    values = _flat(outputs)
    return float(values.max().clamp(min=0) - values.min().clamp(max=0)) / 255


def _flat(outputs) -> torch.Tensor:
    leaves = torch.utils._pytree.tree_leaves(outputs)
    tensors = [t.detach().reshape(-1).float() for t in leaves if isinstance(t, torch.Tensor)]
    return torch.cat(tensors) if tensors else torch.zeros(0)


@dataclass
class PassRow:
    name: str
    exactness: str
    matched: list[str]
    skipped: list[Skip]
    error: OutputError | None
    cost: Cost
    seconds: float
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer: (before, after)
    table: list[dict] = field(default_factory=list)  # the pass's own rows, one per rewrite
    notes: list[str] = field(default_factory=list)  # what the pass chose and measured
    blocks: dict[str, dict[str, int]] = field(default_factory=dict)  # stage: {block: params}

    @property
    def widths_changed(self) -> bool:
        return any(before != after for before, after in self.widths.values())

    def to_dict(self) -> dict:
        row = asdict(self)
        row["skipped"] = [asdict(s) for s in self.skipped]
        return row


@dataclass
class Report:
    model: str
    rows: list[PassRow] = field(default_factory=list)
    leaves: dict[str, str] = field(default_factory=dict)
    explain: bool = False

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "leaves": dict(self.leaves),
            "passes": [r.to_dict() for r in self.rows],
        }

    def to_markdown(self) -> str:
        lines = [
            f"racc report for {self.model}",
            "",
            "| pass | exactness | matched | skipped | max abs err | rel L2 | cosine "
            "| params | MACs | size | time |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [_table_row(r) for r in self.rows]
        for r in self.rows:
            lines += self._listing(f"{r.name} matched", r.matched)
            lines += self._listing(f"{r.name} skipped", r.skipped)
        for r in (r for r in self.rows if r.widths_changed):
            lines += ["", f"{r.name}: output channels per layer", "", "| layer | before | after |"]
            lines += ["|---|---|---|"] + [f"| {n} | {b} | {a} |" for n, (b, a) in r.widths.items()]
        for r in (r for r in self.rows if r.notes):
            lines += ["", f"{r.name}:"] + [f"- {note}" for note in r.notes]
        for r in (r for r in self.rows if r.table):
            lines += ["", f"{r.name}: each rewrite", ""] + _markdown_table(r.table)
        if self.leaves:
            lines += ["", "kept opaque (could not be traced):"]
            lines += [f"- {name}: {why}" for name, why in self.leaves.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def _listing(self, title: str, items: list) -> list[str]:
        shown = items if self.explain else items[:_ITEMS_SHOWN]
        lines = ["", f"{title}:"] + [f"- {s}" for s in shown] if shown else []
        if len(items) > len(shown):
            more = len(items) - len(shown)
            lines.append(f"- ... {more} more (compile with explain=True to list all)")
        return lines

    def plot_params(self, path: str | os.PathLike) -> None:
        """Write a PNG heatmap of parameters per stage x block, before the first pass and after the
        last (the RAC paper's Figure 7); a shared RAC bank has its own column per stage."""
        plt = _pyplot()
        first, last = self.rows[0].blocks, self.rows[-1].blocks
        if not first:
            raise RaccError(
                f"{self.model} has no repeated blocks (a module whose children are all of one "
                "class), so there is no stage x block grid to plot"
            )
        stages = list(first)
        columns = _block_columns(first, last)
        grids = [
            [[table.get(s, {}).get(c, math.nan) for c in columns] for s in stages]
            for table in (first, last)
        ]
        top = max(v for g in grids for r in g for v in r if not math.isnan(v)) or 1
        cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # no such block
        wide = len(columns) > 8  # many blocks: before above after, not side by side
        width, height = 2.5 + 0.6 * len(columns), 1.2 + 0.5 * len(stages)
        fig, axes = plt.subplots(
            2 if wide else 1,
            1 if wide else 2,
            figsize=(width, 2 * height) if wide else (2 * width, height),
            squeeze=False,
            layout="constrained",
        )
        for ax, grid, title in zip(
            axes.flat, grids, (self.rows[0].name, self.rows[-1].name), strict=True
        ):
            image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=top, aspect="auto")
            for (i, j), value in np.ndenumerate(np.array(grid)):
                if not math.isnan(value):
                    color = "black" if value > top / 2 else "white"
                    ax.text(j, i, _si(value), ha="center", va="center", fontsize=7, color=color)
            ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
            if wide and ax is axes.flat[0]:
                ax.tick_params(labelbottom=False)  # the plot below names the columns
            ax.set_yticks(range(len(stages)), stages, fontsize=8)
            total = np.nansum(grid)
            ax.set_title(f"{title}: {_si(total)} params in blocks", fontsize=9)
            ax.set_xlabel("block")
        fig.colorbar(image, ax=axes.ravel().tolist(), label="parameters")
        fig.suptitle(f"{self.model}: parameters per stage x block")
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def plot_channels(self, path: str | os.PathLike) -> None:
        """Write a PNG of output channels per layer before and after each pass that changed them."""
        plt = _pyplot()
        rows = [r for r in self.rows if r.widths_changed]
        if not rows:
            raise RaccError("no pass changed any layer's width; there is nothing to plot")
        fig, axes = plt.subplots(len(rows), 1, figsize=(12, 3.5 * len(rows)), squeeze=False)
        for ax, row in zip(axes[:, 0], rows, strict=True):
            names = list(row.widths)
            before = [row.widths[n][0] for n in names]
            after = [row.widths[n][1] for n in names]
            ax.bar(range(len(names)), before, color="#c6dbef", label="before")
            ax.bar(range(len(names)), after, color="#2171b5", label="after")
            ax.set_title(f"{self.model}: {row.name}")
            ax.set_ylabel("output channels")
            ax.set_xlabel("layer (conv / linear, in graph order)")
            step = max(1, len(names) // 30)
            ax.set_xticks(range(0, len(names), step))
            ax.set_xticklabels(names[::step], rotation=60, ha="right", fontsize=7)
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: write files, never open windows
    import matplotlib.pyplot as plt

    return plt


def _block_columns(*tables: dict[str, dict[str, int]]) -> list[str]:
    """Block names in their order in the model, then the shared column if any stage has one."""
    names: list[str] = []
    for table in tables:
        for blocks in table.values():
            names += [b for b in blocks if b not in names and b != SHARED]
    shared = any(SHARED in blocks for table in tables for blocks in table.values())
    return names + ([SHARED] if shared else [])


def _table_row(r: PassRow) -> str:
    e = r.error
    errors = (
        ("-", "-", "-") if e is None else (f"{e.max_abs:.3g}", f"{e.rel_l2:.3g}", f"{e.cosine:.6f}")
    )
    return (
        f"| {r.name} | {r.exactness} | {len(r.matched)} | {len(r.skipped)} | "
        f"{' | '.join(errors)} | {_si(r.cost.params)} | {_si(r.cost.macs)} | "
        f"{_si(r.cost.bytes)}B | {r.seconds:.2f}s |"
    )


def _markdown_table(rows: list[dict]) -> list[str]:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return _si(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
