"""The compile report: one row per pass, printable as a markdown table and convertible to a dict
(JSON); `plots` draws it."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from racc.analysis.cost import Cost
from racc.errors import ExportError, RaccError
from racc.metrics import OutputError
from racc.passes.base import Skip
from racc.report import plots
from racc.text import byte_size, markdown_table, si

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
    # layer: the indices of its output channels the pass kept (pruning passes), for recover's
    # feature matching; not written to JSON (a list per layer)
    kept: dict[str, list[int]] = field(default_factory=dict)

    @property
    def widths_changed(self) -> bool:
        return any(before != after for before, after in self.widths.values())

    def to_dict(self) -> dict:
        row = asdict(self)
        row["skipped"] = [asdict(s) for s in self.skipped]
        del row["kept"]
        return row


@dataclass
class Report:
    model: str
    rows: list[PassRow] = field(default_factory=list)
    leaves: dict[str, str] = field(default_factory=dict)
    explain: bool = False
    capture: str = "torch.fx"  # how the graph was captured (racc.ir.source)
    # compiled with where=: how far the whole model's outputs moved, or why they cannot be compared
    whole: OutputError | str | None = None

    def kept_channels(self) -> dict[str, list[int]]:
        """Each pruned layer's output channels that survived every pass, as indices into the
        layer of the model compile was given."""
        kept: dict[str, list[int]] = {}
        for row in self.rows:
            for layer, idx in row.kept.items():
                kept[layer] = [kept[layer][i] for i in idx] if layer in kept else list(idx)
        return kept

    def to_dict(self) -> dict:
        data = {
            "model": self.model,
            "capture": self.capture,
            "leaves": dict(self.leaves),
            "passes": [r.to_dict() for r in self.rows],
        }
        if self.whole is not None:
            data["whole"] = self.whole if isinstance(self.whole, str) else asdict(self.whole)
        return data

    def to_markdown(self) -> str:
        capture = self.capture + (
            f", {len(self.leaves)} submodule(s) kept opaque" if self.leaves else ""
        )
        lines = [f"racc report for {self.model}", "", f"captured with {capture}"]
        if isinstance(self.whole, OutputError):
            w = self.whole
            lines.append(
                f"the whole model with this part compiled: max abs err {w.max_abs:.3g}, "
                f"rel L2 {w.rel_l2:.3g}, cosine {w.cosine:.6f} (against the original)"
            )
        elif self.whole is not None:
            lines.append(f"the whole model with this part compiled: {self.whole}")
        lines += [
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
        plots.params(self, path)

    def plot_channels(self, path: str | os.PathLike) -> None:
        """Write a PNG of the fraction of output channels each layer keeps, for each pass that
        changed widths, with the after/before counts on the bars."""
        plots.channels(self, path)

    def plot_sqnr(self, path: str | os.PathLike) -> None:
        """Write a PNG of each int8 layer's SQNR (that layer alone quantized), lowest first."""
        plots.sqnr(self, path)

    def plot_passes(self, path: str | os.PathLike) -> None:
        """Write a PNG of each pass's effect: params, MACs and size relative to the input model,
        and the output change each pass caused (relative L2 to the outputs before it)."""
        plots.passes(self, path)

    def plots(self, folder: str | os.PathLike) -> dict[str, str]:
        """Write every plot that applies into `folder`: passes.png always, channels.png when a
        pass changed layer widths, params.png when the model has repeated blocks, sqnr.png when
        the pipeline quantizes to int8.

        Returns:
            File name -> the path written, or "left out: <why>".
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        for name, plot in (
            ("passes.png", self.plot_passes),
            ("params.png", self.plot_params),
            ("channels.png", self.plot_channels),
            ("sqnr.png", self.plot_sqnr),
        ):
            try:
                plot(folder / name)
                written[name] = str(folder / name)
            except RaccError as e:
                written[name] = f"left out: {e}"
        return written


def _finite(value):
    """`value` with every non-finite float replaced by None, so that the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _table_row(r: PassRow) -> str:
    e = r.error
    errors = (
        ("-", "-", "-") if e is None else (f"{e.max_abs:.3g}", f"{e.rel_l2:.3g}", f"{e.cosine:.6f}")
    )
    return (
        f"| {r.name} | {r.exactness} | {len(r.matched)} | {len(r.skipped)} | "
        f"{' | '.join(errors)} | {si(r.cost.params)} | {si(r.cost.macs)} | "
        f"{byte_size(r.cost.bytes)} | {r.seconds:.2f}s |"
    )
