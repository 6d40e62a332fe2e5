"""Prune a YOLO and fine-tune it with Ultralytics' own trainer, then ship it as ONNX.

1. `prune-bn{ratio=0.5}` removes half of the channels of the backbone and neck (the Detect head,
   which racc keeps opaque, is never pruned);
2. the pruned graph goes back into the user's own `DetectionModel` (its loss, its Detect head, its
   names and strides), so Ultralytics' `DetectionTrainer` trains, validates and checkpoints it
   like any YOLO: its data pipeline, augmentation, loss, EMA and mAP;
3. the fine-tuned model is exported to ONNX, checked against torch in ONNX Runtime.

    python examples/yolo_finetune.py --data coco8.yaml --model yolov8n.yaml --epochs 50
    python examples/yolo_finetune.py --model runs/train/weights/best.pt --data my.yaml
    python examples/yolo_finetune.py --quick     # a tiny synthetic data set (what the test runs)
"""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ultralytics.data.utils import check_det_dataset
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.tasks import DetectionModel

import racc


class PrunedDetectionModel(DetectionModel):
    """A `DetectionModel` whose layers run through racc's compiled graph (`self.graph`).

    Everything else is the original's: `loss` and its criterion, the Detect head (shared with
    the graph, which keeps it opaque), `names`, `stride`, `args`. The layer list `self.model`
    holds the graph's own modules wherever a path names the same layer, so the parameters the
    trainer's optimizer and EMA see are exactly the graph's."""

    def _predict_once(self, x, profile=False, embed=None):
        if profile or embed:
            raise ValueError("a pruned YOLO runs as one graph: profile and embed are not available")
        return self.graph(x)

    def fuse(self, verbose=True, imgsz=640):
        return self  # the graph calls conv and BN as separate modules; ONNX export folds them


def into_detection_model(original: DetectionModel, graph: torch.nn.Module) -> PrunedDetectionModel:
    """A copy of `original` that runs `graph` (racc.compile's result for it), sharing its modules.

    Raises ValueError if a parameter of the copy is not the graph's (a pass that replaced layers
    under new names, such as rac or fuse-5x5: train the GraphModule directly instead)."""
    host = copy.deepcopy(original)
    host.__class__ = PrunedDetectionModel
    layers = dict(host.named_modules())
    for path, module in graph.named_modules():
        # fx rebuilds the containers above the layers it calls as plain Modules; the layers
        # themselves (convs, norms, the opaque head) keep their paths and types
        if path in layers and type(module) is type(layers[path]):
            host.set_submodule(path, module)
    host.graph = graph
    own = {id(p) for p in graph.parameters()}
    stale = [name for name, p in host.named_parameters() if id(p) not in own]
    if stale:
        raise ValueError(
            f"{len(stale)} parameters of the model are not the compiled graph's (first: "
            f"{stale[0]}); this works for passes that keep layer names, such as prune-bn"
        )
    return host


class PrunedTrainer(DetectionTrainer):
    """Ultralytics' detection trainer, training a model it is given instead of one it builds."""

    pruned: DetectionModel | None = None

    def get_model(self, cfg=None, weights=None, verbose=True):
        return self.pruned


def synthetic_dataset(folder: Path, images: int = 8, size: int = 64, seed: int = 0) -> Path:
    """A YOLO-format data set of `images` pictures with one to three filled boxes each (two
    classes: bright and dark), the same pictures for train and val; returns its data yaml."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in range(images):
        pixels = np.full((size, size, 3), 128, np.uint8)
        lines = []
        for _ in range(rng.integers(1, 4)):
            w, h = rng.integers(size // 6, size // 2, 2)
            x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
            cls = int(rng.integers(0, 2))
            pixels[y0 : y0 + h, x0 : x0 + w] = 235 if cls == 0 else 20
            lines.append(f"{cls} {(x0 + w / 2) / size} {(y0 + h / 2) / size} {w / size} {h / size}")
        for split in ("train", "val"):
            Image.fromarray(pixels).save(folder / "images" / split / f"{i}.png")
            (folder / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    data = folder / "data.yaml"
    data.write_text(
        f"path: {folder}\ntrain: images/train\nval: images/val\nnames:\n  0: bright\n  1: dark\n"
    )
    return data


def load(model: str, classes: int) -> DetectionModel:
    """A DetectionModel from a yaml (random weights) or from an Ultralytics checkpoint (.pt)."""
    if model.endswith(".pt"):
        return torch.load(model, map_location="cpu", weights_only=False)["model"].float()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DetectionModel(model, nc=classes, verbose=False)


# the quick run: a few pictures seen whole, so that a dozen epochs fit them
QUICK = {"mosaic": 0.0, "warmup_epochs": 1, "close_mosaic": 0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov8n.yaml", help="a yaml or a trained .pt")
    parser.add_argument("--data", help="an Ultralytics data yaml; default: a synthetic one")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels to prune")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default="out/yolo", help="folder for runs and the ONNX file")
    parser.add_argument("--quick", action="store_true", help="a reduced run for tests")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.quick:
        args.epochs, args.imgsz, args.batch = 12, 64, 4
    data = args.data or str(synthetic_dataset(out / "data"))
    model = load(args.model, check_det_dataset(data)["nc"])  # a yaml builds a head for its classes
    model.train()  # warm BN statistics up on noise (a trained checkpoint has its own)
    with torch.no_grad():
        if not args.model.endswith(".pt"):
            for _ in range(3):
                model(torch.rand(4, 3, args.imgsz, args.imgsz))
    model.eval()
    example = (torch.rand(1, 3, args.imgsz, args.imgsz),)
    graph = racc.compile(model, f"prune-bn{{ratio={args.ratio},round_to=8}}", example)
    pruned = into_detection_model(model, graph)

    trainer = PrunedTrainer(
        overrides={
            "model": args.model,  # names the run only: get_model returns the pruned model
            "data": data,
            "epochs": args.epochs,
            "imgsz": args.imgsz,
            "batch": args.batch,
            "device": "cpu" if not torch.cuda.is_available() else 0,
            "workers": 0,
            "project": str(out / "runs"),
            "name": "finetune",
            "exist_ok": True,
            "plots": False,
            "amp": False,
            "seed": 0,
            "deterministic": True,
            "verbose": False,
            **(QUICK if args.quick else {}),
        }
    )
    trainer.pruned = pruned
    losses: list[float] = []  # the mean training loss of each epoch (box + cls + dfl)
    trainer.add_callback(
        "on_train_epoch_end", lambda t: losses.append(float(sum(t.tloss.values())))
    )
    trainer.train()
    tuned = trainer.ema.ema.float().eval()  # the weights Ultralytics saves as last.pt

    onnx_file = out / "yolo_pruned.onnx"
    racc.export_onnx(tuned.graph, onnx_file, example)  # checked against torch in ONNX Runtime
    report = graph.racc_report
    return {
        "params": report.rows[0].cost.params,
        "params_pruned": report.rows[-1].cost.params,
        "losses": losses,
        "metrics": dict(trainer.metrics),
        "best": trainer.best,
        "onnx": onnx_file,
        "pruned": pruned,
        "tuned": tuned,
    }


if __name__ == "__main__":
    result = main()
    print(f"params {result['params']:,} -> {result['params_pruned']:,}")
    print(f"training loss per epoch: {', '.join(f'{x:.3f}' for x in result['losses'])}")
    print(f"validation after fine-tuning: {result['metrics']}")
    print(f"ONNX: {result['onnx']}")
