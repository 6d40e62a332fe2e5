"""`racc bench`: params, MACs, weight bytes and median latency of any number of models, in ONNX
Runtime and in torch, timed interleaved (A B C A B C ...) in one process so that ratios are fair."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from racc.analysis.cost import measure_cost
from racc.backends.onnx import export_onnx
from racc.cpu import this_cpu
from racc.errors import ExportError, InputError
from racc.text import byte_size, si
from racc.timing import interleaved, ort_call, ort_session, torch_call

if TYPE_CHECKING:
    from racc.models import Model


@dataclass
class Measured:
    """One model's numbers; None where they do not apply (torch latency of an ONNX file)."""

    name: str
    params: int | None = None
    macs: int | None = None
    bytes: int | None = None
    latency_ms: dict[str, float | None] = field(default_factory=dict)  # "ORT b8": median ms


@dataclass
class BenchResult:
    models: list[Measured]
    threads: int
    rounds: int
    cpu: str = field(default_factory=lambda: str(this_cpu()))

    def rows(self) -> list[tuple[str, list[float | None]]]:
        first = self.models[0]
        rows = [(k, [getattr(m, k) for m in self.models]) for k in ("params", "macs", "bytes")]
        return rows + [(k, [m.latency_ms.get(k) for m in self.models]) for k in first.latency_ms]

    def to_markdown(self) -> str:
        names = [m.name for m in self.models]
        ratios = [f"{name} / {names[0]}" for name in names[1:]]
        lines = [
            "| metric | " + " | ".join(names + ratios) + " |",
            "|---|" + "---|" * (len(names) + len(ratios)),
        ]
        for key, values in self.rows():
            cells = [_format(key, v) for v in values]
            first = values[0]
            cells += [f"{v / first:.3f}x" if first and v is not None else "-" for v in values[1:]]
            label = {"macs": "MACs per sample", "bytes": "weights"}.get(key, key)
            label = f"{key} latency (ms)" if " b" in key else label
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        footer = f"\nmedians of {self.rounds} interleaved rounds, {self.threads} threads"
        lines.append(
            footer + ("; each ratio is a model's value over the first's" if ratios else "")
        )
        lines.append(f"CPU: {self.cpu}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "threads": self.threads,
            "rounds": self.rounds,
            "cpu": self.cpu,
            "models": [vars(m) for m in self.models],
        }


def _format(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key == "bytes":
        return byte_size(value)
    if " b" in key:
        return f"{value:.2f}"
    return si(value)


def bench(
    models: list[Model], sample: tuple[int, ...], batches: list[int], rounds: int, threads: int
) -> BenchResult:
    """Measure each model on random inputs of shape (batch, *sample) for each batch size."""
    measured = [Measured(m.spec) for m in models]
    with tempfile.TemporaryDirectory() as folder:
        sessions = []
        for i, (model, entry) in enumerate(zip(models, measured, strict=True)):
            x = torch.randn(1, *sample)
            if model.module is not None:
                cost = measure_cost(model.module.eval(), (x,))
                entry.params, entry.macs, entry.bytes = cost.params, cost.macs, cost.bytes
                path = Path(folder) / f"model{i}.onnx"
                # the graph checked against torch; whether this CPU computes an int8 file's
                # integers is compile's and export's check (the CPU line says which kernel ran)
                export_onnx(model.module, path, example_inputs=(x,), check="graph")
            else:
                path = model.onnx
                entry.params, entry.bytes = _initializer_sizes(model.proto(), path.parent)
                mirror = model.graph_module()
                if not mirror.racc_leaves:  # an op run by ORT node by node has no MAC count
                    entry.macs = measure_cost(mirror, (x,)).macs
            sessions.append(_session(path, model.spec, sample, batches, threads))
        steps = [(backend, b) for backend in ("ORT", "torch") for b in batches]
        for backend, batch in tqdm(steps, desc="racc bench", leave=False):
            x = torch.randn(batch, *sample)
            if backend == "ORT":
                runs, owners = [ort_call(s, x) for s in sessions], measured
            else:
                pairs = [
                    (m, e) for m, e in zip(models, measured, strict=True) if m.module is not None
                ]
                runs = [torch_call(m.module, x) for m, _ in pairs]
                owners = [e for _, e in pairs]
            for entry in measured:
                entry.latency_ms[f"{backend} b{batch}"] = None
            if runs:
                timing = interleaved(runs, rounds)
                for entry, seconds in zip(owners, timing.medians, strict=True):
                    entry.latency_ms[f"{backend} b{batch}"] = seconds * 1e3
    return BenchResult(measured, threads, rounds)


def _initializer_sizes(proto: onnx.ModelProto, folder: Path) -> tuple[int, int]:
    arrays = [onnx.numpy_helper.to_array(t, base_dir=str(folder)) for t in proto.graph.initializer]
    return sum(int(np.prod(a.shape)) for a in arrays), sum(a.nbytes for a in arrays)


def _session(path: Path, spec: str, sample: tuple[int, ...], batches: list[int], threads: int):
    try:
        session = ort_session(path, threads=threads)
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot load '{spec}': {e}") from e
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InputError(f"'{spec}' has {len(inputs)} inputs; racc bench times single-input models")
    dims = inputs[0].shape
    wanted = (None, *sample)
    if len(dims) != len(wanted) or any(
        isinstance(d, int) and w is not None and d != w for d, w in zip(dims, wanted, strict=False)
    ):
        raise InputError(
            f"'{spec}' takes input '{inputs[0].name}' of shape {dims}, not (batch, "
            f"{', '.join(map(str, sample))}); set --input-shape to match"
        )
    if isinstance(dims[0], int) and any(b != dims[0] for b in batches):
        raise InputError(
            f"'{spec}' has a fixed batch of {dims[0]}; time it with --batches {dims[0]}"
        )
    return session
