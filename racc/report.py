"""The compile report: one row per pass, printable as a markdown table and convertible to a dict."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from racc.analysis.blocks import SHARED
from racc.analysis.cost import Cost
from racc.errors import ExportError, RaccError
from racc.metrics import OutputError
from racc.passes.base import Skip
from racc.text import markdown_table, mib, si

_ITEMS_SHOWN = 5


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
            lines += ["", f"{r.name}: each rewrite", ""] + markdown_table(r.table)
        if self.leaves:
            lines += ["", "kept opaque (could not be traced):"]
            lines += [f"- {name}: {why}" for name, why in self.leaves.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def to_json(self) -> str:
        """`to_dict()` as JSON text (a non-finite error is written as null)."""
        return json.dumps(_finite(self.to_dict()), indent=2, default=str)

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write the markdown report to `path` and the same as JSON next to it (suffix .json).

        Returns:
            The two paths written.
        """
        markdown = Path(path)
        data = markdown.with_suffix(".json")
        try:
            markdown.parent.mkdir(parents=True, exist_ok=True)
            markdown.write_text(self.to_markdown() + "\n")
            data.write_text(self.to_json() + "\n")
        except OSError as e:
            raise ExportError(f"cannot write the report to '{path}': {e.strerror or e}") from e
        return markdown, data

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
                    ax.text(j, i, si(value), ha="center", va="center", fontsize=7, color=color)
            ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
            if wide and ax is axes.flat[0]:
                ax.tick_params(labelbottom=False)  # the plot below names the columns
            ax.set_yticks(range(len(stages)), stages, fontsize=8)
            total = np.nansum(grid)
            ax.set_title(f"{title}: {si(total)} params in blocks", fontsize=9)
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

    def plot_passes(self, path: str | os.PathLike) -> None:
        """Write a PNG of each pass's effect: params, MACs and size relative to the input model,
        and the output change each pass caused (relative L2 to the outputs before it)."""
        plt = _pyplot()
        names = [r.name for r in self.rows]
        first = self.rows[0].cost
        fig, (left, right) = plt.subplots(
            1, 2, figsize=(5 + 1.4 * len(names), 4.2), layout="constrained"
        )
        width = 0.27
        for i, (what, color) in enumerate(
            (("params", "#9ecae1"), ("macs", "#4292c6"), ("bytes", "#08519c"))
        ):
            ratios = [getattr(r.cost, what) / max(getattr(first, what), 1) for r in self.rows]
            bars = left.bar(
                [j + (i - 1) * width for j in range(len(names))],
                ratios,
                width,
                color=color,
                label={"macs": "MACs", "bytes": "size"}.get(what, what),
            )
            left.bar_label(bars, [f"{v:.2f}" for v in ratios], fontsize=7)
        sizes = [f"{name}\n{mib(r.cost.bytes)}" for name, r in zip(names, self.rows, strict=True)]
        left.set_xticks(range(len(names)), sizes, fontsize=8)
        left.axhline(1.0, color="gray", lw=0.8, ls="--")
        left.set_ylabel("relative to the input model")
        left.set_title("cost after each pass", fontsize=10)
        left.legend(fontsize=8)
        rows = self.rows[1:]
        errors = [max(r.error.rel_l2, 1e-12) if r.error else math.nan for r in rows]
        colors = [_EXACTNESS_COLORS.get(r.exactness, "gray") for r in rows]
        bars = right.bar(range(len(rows)), errors, color=colors)
        right.bar_label(
            bars, [f"cos {r.error.cosine:.4f}" if r.error else "" for r in rows], fontsize=7
        )
        right.set_yscale("log")
        right.set_xticks(range(len(rows)), [f"{r.name}\n{r.exactness}" for r in rows], fontsize=8)
        right.set_ylabel("rel. L2 change of the outputs")
        right.set_title("output change caused by each pass", fontsize=10)
        fig.suptitle(f"{self.model}: per-pass cost and error")
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def plots(self, folder: str | os.PathLike) -> dict[str, str]:
        """Write every plot that applies into `folder`: passes.png always, channels.png when a
        pass changed layer widths, params.png when the model has repeated blocks.

        Returns:
            File name -> the path written, or why that plot was left out.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        for name, plot in (
            ("passes.png", self.plot_passes),
            ("params.png", self.plot_params),
            ("channels.png", self.plot_channels),
        ):
            try:
                plot(folder / name)
                written[name] = str(folder / name)
            except RaccError as e:
                written[name] = f"left out: {e}"
        return written


_EXACTNESS_COLORS = {"exact": "#31a354", "approximate": "#fd8d3c", "needs_finetune": "#de2d26"}


def _finite(value):
    """`value` with every non-finite float replaced by None, so that the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


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
        f"{' | '.join(errors)} | {si(r.cost.params)} | {si(r.cost.macs)} | "
        f"{mib(r.cost.bytes)} | {r.seconds:.2f}s |"
    )
