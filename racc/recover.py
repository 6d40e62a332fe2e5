"""Getting the accuracy back after a structural pass: BN statistics re-estimated on data, and the
compiled model trained with the original as its teacher (knowledge distillation).

    racc.recalibrate_bn(student, loader)                         # cheap, often most of the way
    racc.recover(student, teacher=model, data=loader, epochs=3)  # distillation, in place

`recover` trains on one process, on a GPU, or under `torchrun` with DistributedDataParallel: when
torch.distributed is initialised, each process trains on its share of every batch (or on what its
DataLoader's DistributedSampler gives it) and DDP averages the gradients, so a run on N processes
takes the steps one process would take on the same global batches.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from racc.data import (
    Batch,
    batches_per_epoch,
    call,
    cycle,
    first_batches,
    inputs_of,
    sampler_shards,
    share,
    split_batch,
    to_device,
)
from racc.distill import FeatureMatch, distillation_loss
from racc.errors import InputError, PassConfigError


def recalibrate_bn(
    model: nn.Module, data: Iterable[Batch], batches: int | None = None, progress: bool = False
) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm of `model` on `data`; in place.

    After pruning, fusing or RAC the statistics a BN kept describe the layer it used to follow:
    re-estimating them costs forward passes only, and often recovers much of the accuracy.
    Only the BNs run in training mode (dropout and int8 quantizers stay in eval mode), with a
    cumulative average over the batches (momentum None), under no_grad; every module's mode
    and momentum are restored. Under torch.distributed, the statistics are averaged over the
    processes, so all of them keep the same.

    Args:
        model: any module (a compiled one, or the student of `recover`).
        data: batches: tensors of inputs, or (inputs, targets) pairs (a DataLoader).
        batches: use at most this many batches (default: all).
        progress: show a progress bar.

    Returns:
        `model`, its BN statistics re-estimated.

    Raises:
        InputError: `data` gave no batch, or a batch the model does not take.
    """
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return model
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in norms}
    seen = 0
    try:
        model.eval()
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for batch in tqdm(
                first_batches(data, batches), disable=not progress, desc="BN statistics"
            ):
                inputs = to_device(inputs_of(batch), norms[0].running_mean.device)
                call(model, inputs, f"batch {seen}")
                seen += 1
    finally:
        for module, mode in modes.items():
            module.train(mode)
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    if not seen:
        raise InputError(
            "recalibrate_bn: data gave no batch; pass a DataLoader or a list of batches"
        )
    if dist.is_available() and dist.is_initialized():
        for bn in norms:
            for stat in (bn.running_mean, bn.running_var):
                dist.all_reduce(stat)
                stat /= dist.get_world_size()
    return model


@dataclass
class Recovery:
    """What `recover` did: the steps it took, the mean loss of each logged stretch, the time."""

    steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since last)
    seconds: float = 0.0
    resumed_from: int = 0
    mode: str = ""


def recover(
    student: nn.Module,
    teacher: nn.Module | None = None,
    data: Iterable[Batch] | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    *,
    lr: float = 0.01,
    optimizer: Literal["sgd", "adamw"] | Callable[[Iterable], torch.optim.Optimizer] = "sgd",
    weight_decay: float = 5e-4,
    warmup: float = 0.05,
    temperature: float = 1.0,
    alpha: float = 0.5,
    loss_fn: Callable[[Any, Any, Any], torch.Tensor] | None = None,
    features: tuple[str, ...] = (),
    feature_weight: float = 1.0,
    bn: Literal["train", "frozen"] = "train",
    amp: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    log_every: int = 10,
    progress: bool = True,
    seed: int = 0,
) -> Recovery:
    """Train `student` (in place) back towards `teacher`'s outputs, or on labels alone.

    The loss, per batch of inputs x and targets y:

    - with a teacher: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y),
      where s, t are the student's and the teacher's outputs (logits over axis 1: classifiers,
      and per pixel for segmentation), T = `temperature`; without targets, the KL term alone;
    - without a teacher: CE(s, y), plain fine-tuning;
    - `loss_fn(student_out, teacher_out, targets)` replaces either (detectors, tuple outputs).

    Defaults a user of a CNN expects: SGD with Nesterov momentum 0.9, `lr` 0.01 with a linear
    warm-up over `warmup` of the steps and a cosine decay to 0, weight decay on weights only (not
    on BN scales or biases); mixed precision (bf16 autocast) on a CUDA device that has it.

    The teacher runs in eval mode under no_grad; it is never changed. The student trains in
    train mode; with `bn="frozen"` its BNs keep their statistics (eval mode), which also makes
    a DDP run on CPU equal to one process (CPU has no SyncBatchNorm; on CUDA recover converts
    the BNs to SyncBatchNorm). A student compiled with int8 trains as its fake-quant twin
    (QAT): gradients pass straight through its quantizers, whose scales stay fixed.

    Args:
        student: the model to train, e.g. what `racc.compile` returned; trained in place.
        teacher: the original model (`racc.compile` never changes it); None for fine-tuning.
        data: batches (a DataLoader or a list): tensors of inputs, or (inputs, targets) pairs.
            It is iterated again for each epoch; each process of a torchrun job trains on its
            share of every batch unless the DataLoader's sampler is a DistributedSampler.
        steps, epochs: how long: exactly one of them.
        lr, optimizer, weight_decay, warmup: the optimiser ("sgd", "adamw", or a function of
            the parameters returning an optimiser) and its schedule.
        temperature, alpha, loss_fn: the loss, above.
        features: layers both models have (names such as "layer2.1.conv2"), whose outputs are
            matched too: feature_weight * the mean over them of MSE(student's, teacher's on
            the channels the student kept). Which channels survived comes from the student's
            report (`racc.compile` or `racc.compress` of the teacher made it).
        bn: "train" (the default) or "frozen".
        amp: mixed precision; None: bf16 autocast on CUDA where supported, off on CPU.
        checkpoint: a file; the model, optimiser, schedule and step are saved there every
            `checkpoint_every` steps (default: every tenth of the run) and at the end, and a
            run finds it and resumes from it.
        log_every: average the loss over this many steps for `Recovery.losses`.
        progress: show a progress bar (on the first process).
        seed: seeds anything random in the student's forward (dropout), step by step; the
            caller's random state is left as it was.

    Returns:
        A `Recovery`: steps, loss curve, time; the student is trained in place.

    Raises:
        PassConfigError: a bad option. InputError: data without batches, or a batch the
            models do not take, or targets where fine-tuning needs them.

    Example:
        >>> small = racc.compile(model, "prune-bn{ratio=0.5}", (x,))
        >>> racc.recalibrate_bn(small, loader)
        >>> racc.recover(small, teacher=model, data=loader, epochs=3)
    """
    _check_options(teacher, data, steps, epochs, temperature, alpha, bn, warmup, log_every)
    device = next(iter(student.parameters())).device
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    total = steps if steps is not None else epochs * batches_per_epoch(data)
    model = _wrapped(student, distributed, device)
    opt = _optimizer(student, optimizer, lr, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(total, warmup))
    use_amp = torch.cuda.is_bf16_supported() if amp is None and device.type == "cuda" else bool(amp)
    record = Recovery(mode=_mode(teacher, loss_fn))
    start = _resume(checkpoint, student, opt, schedule, record) if checkpoint else 0
    every = checkpoint_every or max(1, total // 10)
    shard = distributed and not sampler_shards(data)
    if teacher is not None:
        teacher_modes = {m: m.training for m in teacher.modules()}
        teacher.eval()
    matched = FeatureMatch(student, teacher, features) if features else None
    began, running, count = time.perf_counter(), 0.0, 0
    bar = tqdm(total=total, initial=start, disable=not progress or rank != 0, desc="recover")
    try:
        for step, batch in zip(range(start, total), cycle(data, start), strict=False):
            inputs, targets = split_batch(batch)
            if shard:
                inputs, targets = share(inputs, rank, world), share(targets, rank, world)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            _train_mode(student, bn)
            with _seeded(seed + step, device), _autocast(device, use_amp):
                out = call(model, inputs, f"step {step}")
                if teacher is not None:
                    with torch.no_grad():
                        target_out = call(teacher, inputs, f"step {step}")
                else:
                    target_out = None
                loss = distillation_loss(out, target_out, targets, temperature, alpha, loss_fn)
                if matched is not None:
                    loss = loss + feature_weight * matched.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            running, count = running + float(loss.detach()), count + 1
            if count == log_every or step + 1 == total:
                record.losses.append((step + 1, running / count))
                bar.set_postfix(loss=f"{running / count:.4f}")
                running, count = 0.0, 0
            bar.update(1)
            record.steps = step + 1
            if checkpoint and rank == 0 and ((step + 1) % every == 0 or step + 1 == total):
                _save(checkpoint, student, opt, schedule, record)
    finally:
        bar.close()
        student.eval()
        if matched is not None:
            matched.remove()
        if teacher is not None:
            for module, mode in teacher_modes.items():
                module.train(mode)
    if record.steps < total or not total:
        raise InputError("recover: data gave no batch; pass a DataLoader or a list of batches")
    record.seconds = time.perf_counter() - began
    return record


# --- options -----------------------------------------------------------------------------------


def _check_options(teacher, data, steps, epochs, temperature, alpha, bn, warmup, log_every):
    if (steps is None) == (epochs is None):
        raise PassConfigError("recover: give exactly one of steps and epochs, e.g. epochs=3")
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise PassConfigError(f"recover: {name} must be an int >= 1, got {value!r}")
    if data is None or isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise InputError(
            "recover: data must be batches (a DataLoader, or a list of tensors or (inputs, "
            f"targets) pairs), got {type(data).__name__}"
        )
    if not temperature > 0 or not 0 <= alpha <= 1 or not 0 <= warmup < 1 or log_every < 1:
        raise PassConfigError(
            "recover: temperature must be > 0, alpha in [0, 1], warmup in [0, 1) and log_every "
            f">= 1, got {temperature}, {alpha}, {warmup}, {log_every}"
        )
    if bn not in ("train", "frozen"):
        raise PassConfigError(f"recover: bn must be 'train' or 'frozen', got {bn!r}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise InputError(f"recover: teacher must be a torch module, got {type(teacher).__name__}")


def _mode(teacher, loss_fn) -> str:
    if loss_fn is not None:
        return "loss_fn"
    return "distillation" if teacher is not None else "fine-tuning"


def _optimizer(student: nn.Module, optimizer, lr: float, weight_decay: float):
    if callable(optimizer):
        return optimizer(student.parameters())
    trained = [p for p in student.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if p.dim() > 1], "weight_decay": weight_decay},
        {"params": [p for p in trained if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise PassConfigError(
        f"recover: optimizer must be 'sgd', 'adamw' or a function of the parameters, got "
        f"{optimizer!r}"
    )


def _warmup_cosine(total: int, warmup: float) -> Callable[[int], float]:
    ramp = max(1, round(warmup * total)) if warmup else 0

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        return 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, total - ramp)))

    return factor


# --- training state ----------------------------------------------------------------------------


def _train_mode(student: nn.Module, bn: str) -> None:
    student.train()
    if bn == "frozen":
        for m in student.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _wrapped(student: nn.Module, distributed: bool, device: torch.device) -> nn.Module:
    if not distributed:
        return student
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        return DistributedDataParallel(student, device_ids=[device])
    return DistributedDataParallel(student)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """The step's randomness (dropout) seeded by its number, so that a resumed run draws what
    an uninterrupted one does; the caller's random state is restored after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _save(path, student, opt, schedule, record: Recovery) -> None:
    state = {
        "model": student.state_dict(),
        "optimizer": opt.state_dict(),
        "schedule": schedule.state_dict(),
        "step": record.steps,
        "losses": record.losses,
    }
    aside = f"{os.fspath(path)}.partial"
    torch.save(state, aside)
    os.replace(aside, path)  # a run stopped while saving leaves the last whole checkpoint


def _resume(path, student, opt, schedule, record: Recovery) -> int:
    if not os.path.exists(path):
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise InputError(
            f"recover: checkpoint '{path}' does not fit this student and run: "
            f"{str(e).splitlines()[0]}; remove it to start again"
        ) from e
    record.losses = [tuple(x) for x in state.get("losses", [])]
    record.resumed_from = record.steps = int(state["step"])
    return record.steps
