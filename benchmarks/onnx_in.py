"""prune-bn and int8 on an ONNX file vs on the torch model, in one process.

For each model: the torch model is exported (racc.export_onnx: BNs folded into the convs, as a
PyTorch user ships a file); `racc.compile("model.onnx", ...)` prunes the file in place (importance
by weight norm: the file has no BN left) and `racc.compile(model, ...)` prunes the torch model
(by BN gamma) which is then exported. Both prune per layer with multiples of 8 channels; MACs come
from the fx mirror of each file, latency from three interleaved ONNX Runtime sessions (2 threads).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import racc
from benchmarks.common import latency_ratios, models_from_args, rounds_from_args, torchvision_model
from racc.analysis.cost import measure_cost
from racc.ir.onnx import load, to_fx
from racc.metrics import OutputError, output_step
from racc.timing import ort_session

MODELS = ["resnet50", "mobilenet_v2"]
PIPELINE = "prune-bn{ratio=0.5,scope=local,round_to=8}"
LABELS = ("ONNX file, in place", "torch model, exported")


def _both_paths(model, x, pipeline: str, folder: str, calibration=None) -> tuple[list, list]:
    """The original file, `pipeline` run on it in place, and `pipeline` run on the torch model
    then exported (three paths), and the two compile results."""
    paths = [Path(folder) / f"{k}.onnx" for k in ("original", "onnx", "torch")]
    racc.export_onnx(model, paths[0], (x,))
    on_file = racc.compile(str(paths[0]), pipeline, (x,), calibration=calibration)
    racc.export_onnx(on_file, paths[1])
    on_torch = racc.compile(model, pipeline, (x,), calibration=calibration)
    racc.export_onnx(on_torch, paths[2], (x,))
    return paths, [on_file, on_torch]


def _latencies(sessions: list, rounds: int) -> tuple[list[float], list[float]]:
    """Each later session's ORT latency relative to the first, at batch 1 and batch 8."""
    b1 = latency_ratios(sessions, 1, 224, rounds)
    return b1, latency_ratios(sessions, 8, 224, max(3, rounds // 2))


def table(rounds: int) -> list[str]:
    rows = [
        "| model | path | params | MACs | ORT latency b1 | ORT latency b8 | prune-bn time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in models_from_args(MODELS):
        model, x = torchvision_model(name), torch.randn(1, 3, 224, 224)
        with tempfile.TemporaryDirectory() as folder:
            paths, results = _both_paths(model, x, PIPELINE, folder)
            costs = [measure_cost(to_fx(load(p)).gm, (x,)) for p in paths]
            times = [r.racc_report.rows[-1].seconds for r in results]
            b1, b8 = _latencies([ort_session(p, threads=2) for p in paths], rounds)
        for i, label in enumerate(LABELS):
            params = costs[i + 1].params / costs[0].params
            macs = costs[i + 1].macs / costs[0].macs
            rows.append(f"| {name} | {label} | {params:.2f}x | {macs:.2f}x | {b1[i]:.2f}x | "
                        f"{b8[i]:.2f}x | {times[i]:.1f} s |")  # fmt: skip
    return rows


def int8_table(rounds: int) -> list[str]:
    """int8 written into the file in place vs int8 on the torch model then exported: latency
    relative to the fp32 file, and how far the two int8 files' outputs are apart."""
    rows = [
        "| model | path | ORT latency b1 | ORT latency b8 | cosine to fp32 | the two int8 files apart |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name in models_from_args(MODELS):
        model, x = torchvision_model(name), torch.randn(1, 3, 224, 224)
        generator = torch.Generator().manual_seed(0)
        calibration = [torch.randn(8, 3, 224, 224, generator=generator) for _ in range(4)]
        with tempfile.TemporaryDirectory() as folder:
            paths, _ = _both_paths(model, x, "int8", folder, calibration)
            sessions = [ort_session(p, threads=2) for p in paths]
            b1, b8 = _latencies(sessions, rounds)
            test = calibration[0].numpy()
            outputs = [torch.from_numpy(s.run(None, {"input": test})[0]) for s in sessions]
        apart = (outputs[1] - outputs[2]).abs().max().item() / output_step(outputs[0])
        for i, label in enumerate(LABELS):
            cosine = OutputError.between(outputs[0], outputs[i + 1]).cosine
            rows.append(f"| {name} | {label} | {b1[i]:.2f}x | {b8[i]:.2f}x | {cosine:.4f} | "
                        f"{apart:.2g} output steps |")  # fmt: skip
    return rows


def main() -> None:
    rounds = rounds_from_args(quick=5, full=15)
    print("### prune-bn on ONNX input vs on the torch model (ratios to the original file)\n")
    print(f"`{PIPELINE}`, input 224x224; medians of interleaved rounds ({rounds} at batch 1). "
          "The ONNX path ranks channels by weight norm (the export folded the BNs), the torch "
          "path by BN gamma: the same widths, other channels.\n")  # fmt: skip
    print("\n".join(table(rounds)))
    print("\n### int8 on ONNX input vs on the torch model (latency ratios to the fp32 file)\n")
    print("`int8` with 4 random calibration batches of 8 at 224x224; cosine on the first "
          "calibration batch; an output step is the fp32 output's range / 255. The file is "
          "quantized in place (Q/DQ spliced in, the other nodes keep their names).\n")  # fmt: skip
    print("\n".join(int8_table(rounds)))


if __name__ == "__main__":
    main()
