"""Coverage: every pass on the models users bring, each model in a process of its own.

python -m benchmarks.coverage                  # every model below: the table in BENCHMARKS.md
python -m benchmarks.coverage --quick          # one model per source
python -m benchmarks.coverage --only timm:     # the models whose spec starts with this
python -m benchmarks.coverage --jsonl rows.jsonl   # also each row as it is done; then
python -m benchmarks.coverage --table rows.jsonl   # the table of those rows
python -m benchmarks.coverage --table a.jsonl,b.jsonl  # b's rows replace a's for the same model
python -m benchmarks.coverage --table rows.jsonl --into BENCHMARKS.md   # in place of its section

Models are built from their definitions with seeded random weights (no download) and BN warmed
up. Each cell is one of:
- ok: the pass ran, verified; for prune-bn and int8 the ONNX file was checked in ONNX Runtime
  (outputs against torch; for int8 every planned QLinearConv fused);
- n/a: the pass had nothing to do on this model (no prunable group, no pair to fuse, no stage),
  which racc says with a RaccError or an empty match;
- miss: a RaccError that refused, its message in the last column;
- RAW: any other exception, a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import racc
from racc.errors import PruneError, RaccError
from racc.zoo import names as torchvision_names
from racc.zoo import torchvision_model, warm_up_bn

SIDE = 64
TIMEOUT_S = 600
# Too large to build three copies of on this machine's 24 GiB within the time (over 300M params).
TOO_LARGE = {"vit_h_14", "vit_l_16", "regnet_y_128gf"}

TIMM = (
    "resnet18 resnet26d resnext26ts seresnext26d_32x4d ecaresnet26t legacy_seresnet18 "
    "skresnet18 resnest14d res2net50_14w_8s gcresnext26ts bat_resnext26ts efficientnet_b0 "
    "efficientnetv2_rw_t tinynet_a mobilenetv2_100 mobilenetv3_large_100 "
    "tf_mobilenetv3_small_100 mobilenetv4_conv_small fbnetc_100 mnasnet_100 spnasnet_100 "
    "semnasnet_100 hardcorenas_a mixnet_s lcnet_050 ghostnet_100 repghostnet_050 rexnet_100 "
    "regnetx_002 regnety_002 dla34 dpn48b densenet121 vgg11_bn repvgg_a0 mobileone_s0 "
    "hrnet_w18_small cspresnet50 cspdarknet53 cs3darknet_s nf_resnet26 selecsls42b gernet_s "
    "ese_vovnet19b_dw hgnetv2_b0 inception_v3 xception41 convnext_atto edgenext_xx_small "
    "fastvit_t8 efficientvit_b0 mobilevit_xxs halonet26t botnet26t_256 coatnet_0_rw_224 "
    "levit_128s vit_tiny_patch16_224"
).split()
YOLO = "yolov5nu yolov5su yolov8n yolov8s yolo11n yolo11s yolov6n yolov9t yolov10n yolo12n".split()
SEGMENTATION = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"]
VIDEO = ["r3d_18", "mc3_18", "r2plus1d_18"]
DETECTION = [  # compiled with where="backbone": their transforms and NMS are Python
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "ssdlite320_mobilenet_v3_large",
    "retinanet_resnet50_fpn",
]
PASSES = {
    "prune-bn": "prune-bn{ratio=0.5}",
    "int8": "int8",
    "fuse-5x5": "fuse-5x5{allow_nonlinear=true}",
    "rac": "rac",
}


def specs() -> list[str]:
    """Every model, the most varied first: YOLO, one timm model per family, segmentation, video,
    detection, then torchvision's classifiers, the smallest first (a run cut short has seen the
    most kinds of model)."""
    import torchvision

    def params(name: str) -> int:
        weights = torchvision.models.get_model_weights(name)
        return next(iter(weights)).meta.get("num_params", 0)

    tv = sorted((n for n in torchvision_names() if n not in TOO_LARGE), key=params)
    return [
        *(f"yolo:{n}" for n in YOLO),
        *(f"timm:{n}" for n in TIMM),
        *(f"segmentation:{n}" for n in SEGMENTATION),
        *(f"video:{n}" for n in VIDEO),
        *(f"detection:{n}" for n in DETECTION),
        *(f"torchvision:{n}" for n in tv),
    ]


@dataclass
class Row:
    spec: str
    capture: str = "-"
    groups: str = "-"
    share: float | None = None
    cells: dict[str, str] = field(default_factory=dict)
    first_error: str = ""
    seconds: float = 0.0


def build(spec: str) -> tuple[torch.nn.Module, tuple, dict]:
    """The model, its example inputs, and compile's extra arguments (where=) for `spec`."""
    source, _, name = spec.partition(":")
    torch.manual_seed(0)
    if source == "torchvision":
        side = 299 if name == "inception_v3" else SIDE
        model = torchvision_model(name, side=side, warm=False)
        side = side if _runs(model, side) else 224  # ViT and MaxViT take 224 only
        return warm_up_bn(model, side), (torch.randn(1, 3, side, side),), {}
    if source == "segmentation":
        import torchvision.models.segmentation as seg

        model = warm_up_bn(getattr(seg, name)(weights=None, weights_backbone=None), SIDE)
        return model, (torch.randn(1, 3, SIDE, SIDE),), {}
    if source == "video":
        import torchvision.models.video as video

        model = getattr(video, name)().eval()
        with torch.no_grad():
            model.train()(torch.randn(2, 3, 4, 32, 32))
        return model.eval(), (torch.randn(1, 3, 4, 32, 32),), {}
    if source == "detection":
        import torchvision.models.detection as det

        model = getattr(det, name)(weights=None, weights_backbone=None).eval()
        return model, ([torch.rand(3, 160, 200)],), {"where": "backbone"}
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10)
        side = model.pretrained_cfg.get("input_size", (3, SIDE, SIDE))[-1]
        side = SIDE if _runs(model, SIDE) else side
        return warm_up_bn(model, side), (torch.randn(1, 3, side, side),), {}
    if source == "yolo":
        from ultralytics.nn.tasks import DetectionModel

        with contextlib.redirect_stdout(io.StringIO()):
            model = DetectionModel(f"{name}.yaml", verbose=False)
        return warm_up_bn(model, SIDE), (torch.randn(1, 3, SIDE, SIDE),), {}
    raise SystemExit(f"unknown model source in '{spec}'")


def _runs(model: torch.nn.Module, side: int) -> bool:
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, side, side))
        return True
    except Exception:
        return False


def run_one(spec: str) -> Row:
    """Every column of the table for one model."""
    row, start = Row(spec), time.perf_counter()
    try:
        model, inputs, extra = build(spec)
    except Exception as e:  # the model's own constructor: not racc's
        row.first_error = f"build: {type(e).__name__}: {str(e)[:160]}"
        return row
    part = model.get_submodule(extra["where"]) if "where" in extra else model
    part_inputs = inputs
    if "where" in extra:
        from racc.part import inputs_of

        part_inputs = inputs_of(model, extra["where"], inputs)
    try:
        analysis = racc.analyze(part, part_inputs)
        prunable = [g for g in analysis.groups if g.prunable and g.size > 1]
        row.groups = f"{len(prunable)}/{len(analysis.groups)}"
        row.share = analysis.prunable_share()
        how = "torch.export" if analysis.traced.capture.startswith("torch.export") else "fx"
        row.capture = how + (f" + {len(analysis.leaves)} opaque" if analysis.leaves else "")
        row.cells["zero->prune"] = _zero_then_prune(part, part_inputs, analysis, prunable)
    except Exception as e:
        row.cells["zero->prune"] = _verdict(e, row)
    for column, passes in PASSES.items():
        row.cells[column] = _compile(model, passes, inputs, extra, row)
    row.seconds = time.perf_counter() - start
    return row


def _zero_then_prune(model, inputs, analysis, prunable) -> str:
    if not prunable:
        return "n/a"
    rng = np.random.default_rng(0)
    for group in rng.choice(prunable, size=min(2, len(prunable)), replace=False):
        idxs = sorted(rng.choice(group.size, size=max(1, group.size // 4), replace=False).tolist())
        zeroed = racc.zero_channels(model, {group: idxs})
        pruned = racc.prune_channels(model, {group: idxs}, inputs)
        with torch.no_grad():
            a, b = _flat(zeroed(*inputs)), _flat(pruned(*inputs))
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(a.abs().max()))):
            return f"FAIL on {group.details(idxs)[:60]}"
    return "ok"


def _flat(outputs) -> torch.Tensor:
    from torch.utils._pytree import tree_leaves

    return torch.cat([t.flatten().float() for t in tree_leaves(outputs) if torch.is_tensor(t)])


def _compile(model, passes: str, inputs, extra: dict, row: Row) -> str:
    calibration = [tuple(_like(x, seed) for x in inputs) for seed in range(1, 3)]
    try:
        opt = racc.compile(model, passes, inputs, calibration=calibration, **extra)
        if not opt.racc_report.rows[-1].matched:
            return "n/a"
        if passes in (PASSES["prune-bn"], PASSES["int8"]) and "where" not in extra:
            path = f"/tmp/racc-coverage-{os.getpid()}.onnx"
            racc.export_onnx(opt, path)  # checks ONNX Runtime against torch
            os.remove(path)
        return "ok"
    except PruneError as e:
        if "no prunable channel group" in str(e):
            return "n/a"
        return _verdict(e, row)
    except Exception as e:
        return _verdict(e, row)


def _like(x, seed: int):
    generator = torch.Generator().manual_seed(seed)
    if isinstance(x, torch.Tensor):
        return torch.randn(x.shape, generator=generator).to(x.dtype)
    return [torch.rand(t.shape, generator=generator) for t in x]  # a detector's image list


def _verdict(e: Exception, row: Row) -> str:
    kind = "miss" if isinstance(e, RaccError) else "RAW"
    if not row.first_error:
        row.first_error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return kind


def _child(spec: str) -> Row:
    command = [sys.executable, "-m", "benchmarks.coverage", "--one", spec]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Row(spec, first_error=f"timeout after {TIMEOUT_S} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " ".join(done.stderr.split()[-30:])
        return Row(spec, first_error=f"process died (exit {done.returncode}): {tail[:200]}")
    return Row(**json.loads(lines[-1]))


def table(rows: list[Row], total: int | None = None, note: str = "") -> str:
    columns = ["zero->prune", *PASSES]
    of = f" of the {total} listed (the run was cut short)" if total and total > len(rows) else ""
    from benchmarks.common import machine

    lines = [
        f"### Coverage: {len(rows)} models users bring{of} (random weights, BN warmed; "
        f"{SIDE}x{SIDE} unless the model needs its own size)",
        "",
        "- Command: `python -m benchmarks.coverage` (its own run, not `make bench`'s machine)",
        f"- Machine: {machine()}",
        *([f"- {note}"] if note else []),
        "",
        "ok: ran and verified (prune-bn and int8: "
        "exported and checked in ONNX Runtime); n/a: nothing to do on this model; miss: a "
        "RaccError that says why (last column); RAW: any other exception. Detectors are "
        'compiled with `where="backbone"`.',
        "",
        "| column | ok | n/a | miss | RAW | ok share of applicable |",
        "|---|---|---|---|---|---|",
    ]
    for c in columns:
        cells = [r.cells.get(c, "RAW") for r in rows]
        count = {k: sum(v.startswith(k) for v in cells) for k in ("ok", "n/a", "miss", "RAW")}
        count["miss"] += sum(v.startswith("FAIL") for v in cells)
        applicable = len(cells) - count["n/a"]
        share = f"{count['ok'] / applicable:.0%}" if applicable else "-"
        lines.append(
            f"| {c} | {count['ok']} | {count['n/a']} | {count['miss']} | {count['RAW']} | {share} |"
        )
    lines += [
        "",
        "| model | capture | groups (prunable/all) | share of conv channels | "
        + " | ".join(columns)
        + " | time | first error |",
        "|---|---|---|---|" + "---|" * len(columns) + "---|---|",
    ]
    for r in rows:
        share = "-" if r.share is None else f"{r.share:.2f}"
        cells = " | ".join(r.cells.get(c, "-") for c in columns)
        error = r.first_error.replace("|", "/")
        lines.append(
            f"| {r.spec} | {r.capture} | {r.groups} | {share} | {cells} | {r.seconds:.0f}s "
            f"| {error} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model per source")
    parser.add_argument("--only", default="", help="models whose spec starts with this")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one model, a JSON line
    parser.add_argument("--jsonl", help="also append each row as JSON to this file")
    parser.add_argument("--table", help="print the table of the rows in this --jsonl file")
    parser.add_argument("--into", help="replace the coverage section of this markdown file")
    parser.add_argument("--note", default="", help="a line under the table's heading")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    if args.one:
        with contextlib.redirect_stdout(io.StringIO()):
            row = run_one(args.one)
        print(json.dumps(asdict(row)))
        return
    if args.table:  # rows a run wrote with --jsonl, as the table
        rows = {}  # by model: a row from a later file replaces an earlier one
        for path in args.table.split(","):
            for line in filter(str.strip, open(path)):
                row = Row(**json.loads(line))
                rows[row.spec] = row
        _emit(table(list(rows.values()), total=len(specs()), note=args.note), args.into)
        return
    chosen = [s for s in specs() if s.startswith(args.only)]
    if args.quick:
        chosen = list({s.partition(":")[0]: s for s in reversed(chosen)}.values())[::-1]
    rows = []
    for spec in chosen:
        row = _child(spec)
        rows.append(row)
        print(f"{spec}: {row.cells} {row.first_error[:120]}", file=sys.stderr)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(asdict(row)) + "\n")
    _emit(table(rows), args.into)


def _emit(text: str, into: str | None) -> None:
    """Print the table, or put it in place of the coverage section of the markdown file `into`."""
    if not into:
        print(text)
        return
    with open(into) as f:
        document = f.read()
    start = document.find("### Coverage:")
    if start < 0:
        document = document.rstrip() + "\n\n" + text + "\n"
    else:
        end = document.find("\n### ", start + 1)
        document = document[:start] + text + ("\n" + document[end:] if end >= 0 else "\n")
    with open(into, "w") as f:
        f.write(document)


if __name__ == "__main__":
    main()
