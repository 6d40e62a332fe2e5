"""Getting the accuracy back after prune-bn, on real data (scikit-learn's digits at 32x32).

For a CIFAR-style ResNet-18 and a MobileNetV2-style net, trained here from scratch: the test
accuracy of the original, right after prune-bn (channels for about half of the MACs), after
racc.recalibrate_bn, and after racc.recover with the same steps, once as plain fine-tuning and
once distilled from the original; then racc.compress with max_drop=1.0. MACs and ONNX Runtime
latency (2 threads, batch 1 and 8, interleaved) of the pruned model are ratios to the original.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

import racc
from benchmarks.common import (
    latency_ratios,
    machine,
    models_from_args,
    ort_file_session,
    rounds_from_args,
)
from racc.analysis.cost import measure_cost
from racc.data import accuracy, batches, digits
from racc.zoo import small_image_net

# net -> (its prune-bn pipeline for about half of the MACs, epochs to train it, to recover it)
NETS = {
    "resnet18": ("prune-bn{ratio=0.3,round_to=8}", 6, 2),
    "mobilenet_v2": ("prune-bn{ratio=0.3,round_to=8}", 10, 3),
}
SIDE, BATCH, LR = 32, 64, 0.05  # LR: recovery's (training from scratch takes the same)


def row(name: str, pipeline: str, epochs: int, recover_epochs: int, rounds: int) -> dict:
    x, y, x_test, y_test = digits(side=SIDE)
    test = batches(x_test, y_test, 256)
    torch.manual_seed(0)
    model = small_image_net(name, num_classes=10)
    began = time.perf_counter()
    racc.recover(model, data=batches(x, y, BATCH, shuffle=True), epochs=epochs, lr=LR,
                 progress=False)  # fmt: skip
    result = {"net": name, "train_s": time.perf_counter() - began}
    result["original"] = accuracy(model, test)
    example = (x[:8],)
    pruned = racc.compile(model, pipeline, example)
    result["pruned"] = accuracy(pruned, test)
    racc.recalibrate_bn(pruned, batches(x, None, BATCH))
    result["recalibrated"] = accuracy(pruned, test)
    for label, teacher in (("fine-tuned", None), ("distilled", model)):
        student = copy.deepcopy(pruned)
        data = batches(x, y, BATCH, shuffle=True, seed=1)
        began = time.perf_counter()
        racc.recover(student, teacher, data, epochs=recover_epochs, lr=LR, progress=False)
        result[label] = accuracy(student, test)
        result[f"{label}_s"] = time.perf_counter() - began
    began = time.perf_counter()
    steps = pipeline.replace("}", ",steps=2}")
    small = racc.compress(model, steps, example, data=batches(x, y, BATCH, shuffle=True, seed=2),
                          eval_data=test, max_drop=1.0, epochs=recover_epochs, lr=LR)  # fmt: skip
    result["compress"] = small.racc_compression
    result["compress_s"] = time.perf_counter() - began
    cost = [measure_cost(m, (x[:1],)) for m in (model, pruned)]
    result["macs"] = cost[1].macs / cost[0].macs
    result["params"] = cost[1].params / cost[0].params
    with tempfile.TemporaryDirectory() as folder:
        sessions = [ort_file_session(m, x[:1], Path(folder), n) for m, n in
                    ((model, "original"), (pruned, "pruned"))]  # fmt: skip
        result["b1"] = latency_ratios(sessions, 1, SIDE, rounds)[0]
        result["b8"] = latency_ratios(sessions, 8, SIDE, max(3, rounds // 2))[0]
    return result


def _small_net() -> torch.nn.Module:
    """The 16x16 digits net of tests/test_recover.py: four conv-BN-ReLU, pool, linear."""
    torch.manual_seed(0)
    layers, width = [], 3
    for out, stride in ((32, 1), (64, 2), (64, 1), (128, 2)):
        conv = torch.nn.Conv2d(width, out, 3, stride, 1, bias=False)
        layers += [conv, torch.nn.BatchNorm2d(out), torch.nn.ReLU()]
        width = out
    head = [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10)]
    return torch.nn.Sequential(*layers, *head)


def sparsity_table(lams=(0, 1e-4, 1e-3, 3e-3, 1e-2), epochs: int = 8) -> list[str]:
    """BnSparsity's L1 strength against what it does in a short run: SGD (Nesterov 0.9, lr
    0.05, weight decay 5e-4) on digits at 16x16, then prune-bn{ratio=0.5} and recalibrate_bn."""
    import torch.nn.functional as F

    from racc.sparsity import BnSparsity

    x, y, x_test, y_test = digits(side=16)
    test = batches(x_test, y_test, 256)
    rows = ["| lam | steps | accuracy | gamma q1 / median | below 0.05 | pruned 0.5 + recalibrate_bn |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for lam in lams:
        model = _small_net()
        sparsity = BnSparsity(model, lam=lam, norm="l1")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                              weight_decay=5e-4)  # fmt: skip
        steps = 0
        model.train()
        for xb, yb in (b for _ in range(epochs) for b in batches(x, y, BATCH, shuffle=True)):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            sparsity.apply_()
            opt.step()
            steps += 1
        stats = sparsity.summary(cutoff=0.05)
        pruned = racc.compile(model.eval(), "prune-bn{ratio=0.5}", (x[:8],))
        racc.recalibrate_bn(pruned, batches(x, None, BATCH))
        rows.append(f"| {lam:g} | {steps} | {accuracy(model, test):.2f}% | {stats['q1']:.3f} / "
                    f"{stats['median']:.3f} | {stats['below']} of {stats['gammas']} | "
                    f"{accuracy(pruned, test):.2f}% |")  # fmt: skip
    return rows


def main() -> None:
    rounds = rounds_from_args(quick=5, full=15)
    print("### Recovery after prune-bn: digits at 32x32 (accuracy on its 360 test images)\n")
    print(
        "Command: `python -m benchmarks.recover`. Each net is trained here from scratch (racc."
        "recover without a teacher is plain training: SGD, Nesterov, cosine), pruned, then "
        "recovered; fine-tuning and distillation take the same steps from the same "
        "recalibrated model. MACs, params and ORT latency are ratios to the original.\n"
    )
    print(f"- Machine: {machine()}\n")
    print(
        "| net | pipeline | original | pruned | + recalibrate_bn | + fine-tune | + distill "
        "| MACs | params | ORT b1 | ORT b8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for name, (pipeline, epochs, again) in models_from_args(NETS).items():
        r = row(name, pipeline, epochs, again, rounds)
        results.append(r)
        print(
            f"| {name} | `{pipeline}`, {again} epochs to recover | {r['original']:.2f}% | "
            f"{r['pruned']:.2f}% | {r['recalibrated']:.2f}% | {r['fine-tuned']:.2f}% | "
            f"{r['distilled']:.2f}% | {r['macs']:.2f}x | {r['params']:.2f}x | {r['b1']:.2f}x | "
            f"{r['b8']:.2f}x |",
            flush=True,
        )
    print("\n#### BnSparsity's strength in a short run (the 16x16 net of tests/test_recover.py)\n")
    print("\n".join(sparsity_table()))
    print("\n#### racc.compress with max_drop=1.0 (the same pipeline in 2 steps)\n")
    for r in results:
        log = r["compress"]
        print(f"{r['net']} ({r['compress_s']:.0f} s):\n\n{log.to_markdown()}\n")


if __name__ == "__main__":
    main()
