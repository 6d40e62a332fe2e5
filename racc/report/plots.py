"""The report's plots (matplotlib, headless): parameters per stage x block, the fraction of channels
each layer keeps, each pass's cost and output change, and int8's SQNR per layer."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from racc.analysis.blocks import SHARED
from racc.errors import RaccError
from racc.passes.int8.sensitivity import MEASURED, SQNR
from racc.text import byte_size, si

if TYPE_CHECKING:
    from racc.report import Report


_EXACTNESS_COLORS = {"exact": "#31a354", "approximate": "#fd8d3c", "needs_finetune": "#de2d26"}


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


def params(report: Report, path: str | os.PathLike) -> None:
    """Write a PNG heatmap of parameters per stage x block, before the first pass and after the
    last (the RAC paper's Figure 7); a shared RAC bank has its own column per stage."""
    plt = _pyplot()
    first, last = report.rows[0].blocks, report.rows[-1].blocks
    if not first:
        raise RaccError(
            f"{report.model} has no repeated blocks (a module whose children are all of one "
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
        axes.flat, grids, (report.rows[0].name, report.rows[-1].name), strict=True
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
    fig.suptitle(f"{report.model}: parameters per stage x block")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def channels(report: Report, path: str | os.PathLike) -> None:
    """Write a PNG of the fraction of output channels each layer keeps, for each pass that changed
    layer widths (a wide classifier and a narrow stem read on one scale), with the counts
    (after/before) on the bars."""
    plt = _pyplot()
    rows = [r for r in report.rows if r.widths_changed]
    if not rows:
        raise RaccError("no pass changed any layer's width; there is nothing to plot")
    count = max(len(r.widths) for r in rows)
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(max(8, 0.22 * count + 2), 3.8 * len(rows)), squeeze=False
    )
    for ax, row in zip(axes[:, 0], rows, strict=True):
        names = list(row.widths)
        before = np.array([row.widths[n][0] for n in names], dtype=float)
        after = np.array([row.widths[n][1] for n in names], dtype=float)
        kept = after / np.maximum(before, 1)
        colors = ["#2171b5" if k < 1 else "#9ecae1" for k in kept]
        bars = ax.bar(range(len(names)), kept, color=colors)
        counts = [f"{a:.0f}/{b:.0f}" for a, b in zip(after, before, strict=True)]
        many = len(names) > 12
        ax.bar_label(bars, counts, fontsize=6 if many else 8, rotation=90 if many else 0, padding=2)
        ax.set_ylim(0, 1.25)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        total = f"{after.sum():.0f} of {before.sum():.0f} channels kept ({after.sum() / before.sum():.0%})"
        ax.set_title(f"{report.model}: {row.name}: {total}", fontsize=10)
        ax.set_ylabel("fraction of output channels kept")
        ax.set_xlabel("layer (conv / linear, in graph order); bar labels: after/before")
        ax.set_xticks(
            range(len(names)), names, rotation=70 if many else 0, ha="right" if many else "center",
            fontsize=6 if many else 8,
        )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sqnr(report: Report, path: str | os.PathLike) -> None:
    """Write a PNG ranking the int8 layers, most sensitive first, coloured by whether each runs
    int8 or fell back to fp32: by its measured cost with only that layer quantized where it was
    measured (sensitivity=output|kl|metric), else by the layer's own SQNR (dB, lowest first)."""
    plt = _pyplot()
    rows = [r for r in report.rows if r.table and SQNR in r.table[0]]
    if not rows:
        raise RaccError("no int8 pass in the pipeline; there is no SQNR to plot")
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(max(8, 0.22 * len(rows[0].table) + 2), 4 * len(rows)), squeeze=False
    )
    for ax, row in zip(axes[:, 0], rows, strict=True):
        measured = next((c for c in MEASURED.values() if c in row.table[0]), None)
        if measured:
            table = sorted(row.table, key=lambda t: -t[measured])
            values = [max(t[measured], 1e-12) for t in table]
            ax.set_yscale("log")
            ax.set_ylabel(f"{measured.removesuffix(' (alone)')}, this layer alone int8")
            labels, what = [f"{v:.1e}" for v in values], "cost per layer, highest first"
        else:
            table = sorted(row.table, key=lambda t: t[SQNR])
            values = [min(t[SQNR], 99.0) for t in table]  # inf: a layer whose output is exact
            ax.set_ylabel("SQNR (dB), this layer alone int8")
            labels, what = [f"{v:.0f}" for v in values], "SQNR per layer, lowest first"
        colors = ["#2171b5" if t["runs"] == "int8" else "#de2d26" for t in table]
        bars = ax.bar(range(len(table)), values, color=colors)
        ax.bar_label(bars, labels, fontsize=6, padding=1)
        ax.set_xticks(
            range(len(table)), [t["layer"] for t in table], rotation=70, ha="right", fontsize=6
        )
        ax.set_title(f"{report.model}: {row.name}: {what}", fontsize=10)
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#2171b5", "#de2d26")]
        corner = "upper right" if measured else "upper left"  # away from the tallest bars
        ax.legend(handles, ["runs int8", "kept fp32"], fontsize=8, loc=corner)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def passes(report: Report, path: str | os.PathLike) -> None:
    """Write a PNG of each pass's effect: params, MACs and size relative to the input model,
    and the output change each pass caused (relative L2 to the outputs before it)."""
    plt = _pyplot()
    names = [r.name for r in report.rows]
    first = report.rows[0].cost
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(5 + 1.4 * len(names), 4.2), layout="constrained"
    )
    width = 0.27
    for i, (what, color) in enumerate(
        (("params", "#9ecae1"), ("macs", "#4292c6"), ("bytes", "#08519c"))
    ):
        ratios = [getattr(r.cost, what) / max(getattr(first, what), 1) for r in report.rows]
        bars = left.bar(
            [j + (i - 1) * width for j in range(len(names))],
            ratios,
            width,
            color=color,
            label={"macs": "MACs", "bytes": "size"}.get(what, what),
        )
        left.bar_label(bars, [f"{v:.2f}" for v in ratios], fontsize=7)
    sizes = [
        f"{name}\n{byte_size(r.cost.bytes)}" for name, r in zip(names, report.rows, strict=True)
    ]
    left.set_xticks(range(len(names)), sizes, fontsize=8)
    left.axhline(1.0, color="gray", lw=0.8, ls="--")
    left.set_ylabel("relative to the input model")
    left.set_title("cost after each pass", fontsize=10)
    left.legend(fontsize=8)
    rows = report.rows[1:]
    errors = [max(r.error.rel_l2, 1e-12) if r.error else math.nan for r in rows]
    colors = [_EXACTNESS_COLORS.get(r.exactness, "gray") for r in rows]
    bars = right.bar(range(len(rows)), errors, color=colors)
    right.bar_label(
        bars,
        [f"{r.error.rel_l2:.2g}\ncos {r.error.cosine:.5f}" if r.error else "" for r in rows],
        fontsize=7,
    )
    right.set_yscale("log")
    known = [e for e in errors if not math.isnan(e)]
    if known:  # whole decades around the bars, each labelled, and room for the labels
        low = 10 ** (math.floor(math.log10(min(known))) - 1)
        high = 10 ** math.ceil(math.log10(max(known)) + 0.5)
        right.set_ylim(low, high)
        right.set_yticks(
            [10.0**k for k in range(round(math.log10(low)), round(math.log10(high)) + 1)]
        )
    right.set_xticks(range(len(rows)), [f"{r.name}\n{r.exactness}" for r in rows], fontsize=8)
    right.set_ylabel("rel. L2 change of the outputs (log)")
    right.set_title("output change caused by each pass", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _EXACTNESS_COLORS.values()]
    right.legend(handles, list(_EXACTNESS_COLORS), fontsize=8, title="exactness", title_fontsize=8)
    fig.suptitle(f"{report.model}: per-pass cost and error")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compression(log, path: str | os.PathLike) -> None:
    """Write a PNG of racc.compress's tries (a `racc.compress.Compression`): the metric after
    each try, kept ones joined by a line, the baseline and the contract's floor, and the MACs
    left after each try on a second axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(log.tries) + 3), 4.5))
    x = range(1, len(log.tries) + 1)
    kept = [i for i, t in enumerate(log.tries) if t.kept]
    ax.axhline(log.baseline, color="#555555", lw=1, label=f"original {log.baseline:.2f}")
    floor = log.baseline - log.max_drop
    ax.axhline(floor, color="#de2d26", lw=1, ls="--", label=f"contract floor {floor:.2f}")
    ax.plot([i + 1 for i in kept], [log.tries[i].metric for i in kept], color="#2171b5", lw=1.5)
    for i, t in enumerate(log.tries):
        ax.scatter(i + 1, t.metric, color="#2171b5" if t.kept else "#de2d26", zorder=3)
        ax.annotate(f"{t.metric:.1f}", (i + 1, t.metric), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=7)  # fmt: skip
    ax.set_xticks(list(x), [f"{t.stage}: {t.pipeline}" for t in log.tries], rotation=25,
                  ha="right", fontsize=7)  # fmt: skip
    ax.set_ylabel("metric after recovery (blue: kept, red: backed off)")
    macs = ax.twinx()
    macs.bar(list(x), [t.macs / log.original_macs for t in log.tries], alpha=0.15, color="#31a354")
    macs.set_ylim(0, 1.05)
    macs.set_ylabel("MACs / original (bars)")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"racc compress: {log.pipeline() or '(nothing kept)'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gammas(scores, cutoff: float | None, ratio: float, title: str, path) -> None:
    """Write a PNG histogram of the importances prune-bn ranks (log scale), with the cutoff a
    ratio uses and how many units fall below it."""
    import numpy as np

    plt = _pyplot()
    values = np.maximum(np.asarray(scores, dtype=float), 1e-8)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bins = np.logspace(np.log10(values.min()), np.log10(values.max()) + 1e-9, 50)
    ax.hist(values, bins=bins, color="#2171b5")
    ax.set_xscale("log")
    if cutoff is not None:
        below = int((values <= cutoff).sum())
        ax.axvline(max(cutoff, 1e-8), color="#de2d26", ls="--",
                   label=f"cutoff at ratio {ratio:g}: {cutoff:.3g} ({below} of {len(values)} units)")  # fmt: skip
        ax.legend(fontsize=8)
    ax.set_xlabel("importance of a unit: |gamma| (mean over its group's BNs)")
    ax.set_ylabel("units")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
