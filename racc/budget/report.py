"""BudgetPlan: what compiling to a budget measured, the candidates it weighed and the plan it
chose, with its report (a table of the timed plans and the front, the rewrites measured alone)
and its Pareto plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from racc.budget.plan import Candidate
from racc.budget.rewrites import Rewrite
from racc.text import markdown_table

TOLERANCE = 0.05  # a plan this close to the latency budget (measured) is taken as it is


@dataclass
class BudgetPlan:
    """What the planner measured, the candidates it weighed and the plan it chose."""

    budget: Any  # racc.budget.Budget
    machine: str
    original_seconds: float
    original_bytes: int
    round_to: int
    chosen: Candidate
    candidates: list[Candidate] = field(default_factory=list)  # the predicted Pareto front
    attempts: list[Candidate] = field(default_factory=list)  # compiled and timed, in order
    timings_measured: int = 0  # conv timings taken (not found in the cache)
    compiled: Any = field(default=None, repr=False)  # the chosen plan's model, as it was timed
    rewrites: list[Rewrite] = field(default_factory=list)  # fusions and RAC stages, measured
    int8_planned: bool = False  # whether layers could run int8 (calibration data was given)
    island_seconds: float = 0.0  # per value a cast between fp32 and int8 casts, besides its timing
    left_out: list[tuple[str, str]] = field(default_factory=list)  # rewrites that failed, why
    baseline_metric: float | None = None  # eval_fn of the original, when eval_fn was given

    @property
    def pipeline(self) -> str:
        return self.chosen.pipeline

    @property
    def met(self) -> bool:
        return self.meets(self.chosen)

    def meets(self, c: Candidate) -> bool:
        """Whether `c` (as measured, else predicted) is within the budget: within its limits,
        and where the budget has a max_drop and `c` was evaluated, its metric within it."""
        drop, most = self.drop(c), self.budget.max_drop
        return self.within_limits(c) and (drop is None or most is None or drop <= most + 1e-9)

    def within_limits(self, c: Candidate) -> bool:
        """Whether `c` (as measured, else predicted) has its size under the limit and its
        latency at most TOLERANCE over it."""
        seconds, size = c.actual()
        return seconds <= self.limit_seconds() * (1 + TOLERANCE) and size <= self.limit_bytes()

    def drop(self, c: Candidate) -> float | None:
        """How far `c`'s metric (eval_fn) fell below the original's; None where not measured."""
        if self.baseline_metric is None or c.measured_metric is None:
            return None
        return self.baseline_metric - c.measured_metric

    def limit_seconds(self) -> float:
        b = self.budget
        if b.latency is None:
            return math.inf
        return b.latency * self.original_seconds if b.latency_relative else b.latency

    def limit_bytes(self) -> float:
        b = self.budget
        if b.size is None:
            return math.inf
        return b.size * self.original_bytes if b.size_relative else b.size

    def overrun(self, c: Candidate) -> float:
        """How far `c` is over the budget, as measured or else predicted: the larger of its
        two shares."""
        seconds, size = c.actual()
        return max(seconds / self.limit_seconds(), size / self.limit_bytes())

    def to_markdown(self) -> str:
        rows = []
        for c in self.shown():
            timed = c.measured_seconds is not None
            text = c.pipeline if c.chosen or len(c.pipeline) <= 60 else c.pipeline[:60] + "..."
            rows.append(
                {
                    "plan": "**chosen**" if c.chosen else ("timed" if timed else ""),
                    "weights": c.weights,
                    "latency predicted": f"{c.seconds / self.original_seconds:.2f}x",
                    "latency measured": f"{c.measured_seconds / self.original_seconds:.2f}x"
                    if timed
                    else "-",
                    "MiB predicted": f"{c.bytes / 2**20:.2f}",
                    "MiB measured": f"{c.measured_bytes / 2**20:.2f}" if timed else "-",
                    "rel L2 predicted": f"{c.error:.4f}",
                    "rel L2 measured": f"{c.measured_error:.4f}" if timed else "-",
                    **(
                        {"metric": "-" if c.measured_metric is None else f"{c.measured_metric:.2f}"}
                        if self.baseline_metric is not None
                        else {}
                    ),
                    "pipeline": f"`{text}`",
                }
            )
        head = (
            f"Budget {self.budget}: {self.limit_seconds() * 1e3:.2f} ms; the original "
            f"{self.original_seconds * 1e3:.2f} ms, {self.original_bytes / 2**20:.2f} MiB"
            + ("" if self.baseline_metric is None else f", metric {self.baseline_metric:.2f}")
            + f"; widths in multiples of {self.round_to}"
            + (
                "; each value cast between fp32 and int8 layers costs "
                f"{self.island_seconds * 1e9:.2f} ns besides the cast's own timing"
                if self.int8_planned
                else ""
            )
            + f"; {'met' if self.met else 'NOT met'} as "
            f"measured on {self.machine}\n\n"
        )
        return head + "\n".join(markdown_table(rows)) + self._rewrites_markdown()

    def _rewrites_markdown(self) -> str:
        """The rewrites the planner weighed, each measured alone, and those it could not."""
        rows = [
            {
                "rewrite": r.name,
                "rel L2 alone": f"{math.sqrt(r.error):.4f}",
                "time saved": f"{r.seconds:+.1%}",
                "KiB saved": f"{r.bytes / 2**10:.1f}",
                "chosen": "yes" if r.name in self.chosen.rewrites else "",
            }
            for r in self.rewrites
        ]
        text = "\n\nRewrites, each applied alone and timed against the original:\n\n"
        text += "\n".join(markdown_table(rows)) if rows else "none found in this model"
        for name, why in self.left_out:
            text += f"\n- {name}: left out, {why}"
        return text + "\n"

    def shown(self, most: int = 12) -> list[Candidate]:
        """The plans the table lists, by predicted latency: every one timed, and of the rest of
        the front as many as fit in `most` rows, evenly spread."""
        timed = {id(c) for c in self.attempts}
        rest = [c for c in self.candidates if id(c) not in timed]
        room = max(most - len(timed), 0)
        picks = [
            rest[round(i * (len(rest) - 1) / max(room - 1, 1))] for i in range(min(room, len(rest)))
        ]
        every = {id(c): c for c in picks + self.attempts}.values()
        return sorted(every, key=lambda c: c.seconds)

    def plot(self, path) -> Path:
        """The candidates' latency (as a share of the original) against output error, the size
        as the marker's area; measured where timed, the chosen plan marked; written as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for int8, color in ((False, "tab:blue"), (True, "tab:orange")):
            pts = [c for c in self.candidates if c.int8 == int8]
            ax.scatter(
                [c.seconds / self.original_seconds for c in pts],
                [c.error for c in pts],
                s=[20 + 200 * c.bytes / self.original_bytes for c in pts],
                alpha=0.5,
                color=color,
                label=f"{'int8' if int8 else 'fp32'} predicted",
            )
        timed = [c for c in self.attempts if c.measured_seconds is not None]
        ax.scatter(
            [c.measured_seconds / self.original_seconds for c in timed],
            [c.measured_error for c in timed],
            marker="x",
            color="black",
            label="measured",
        )
        c = self.chosen
        if c.measured_seconds is not None:
            ax.scatter(
                [c.measured_seconds / self.original_seconds],
                [c.measured_error],
                s=160,
                facecolors="none",
                edgecolors="red",
                label="chosen",
            )
        if self.budget.latency is not None:
            ax.axvline(self.limit_seconds() / self.original_seconds, color="red", ls="--", lw=1)
        ax.set_xlabel("latency / original (ONNX Runtime)")
        ax.set_ylabel("output error (relative L2)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
