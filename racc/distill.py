"""The losses of racc.recover: knowledge distillation on logits (with temperature, mixed with the
labels' cross-entropy) and feature matching at layers both models have, on the channels the
student kept."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from racc.errors import InputError, PassConfigError


def distillation_loss(
    out, teacher_out, targets, temperature: float, alpha: float, loss_fn
) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(out, teacher_out, targets)
    if teacher_out is None:
        if targets is None:
            raise InputError(
                "recover: fine-tuning without a teacher needs targets: give (inputs, targets) "
                "batches, or the original model as teacher"
            )
        return F.cross_entropy(logits(out), targets)
    student_logits, teacher_logits = logits(out), logits(teacher_out)
    if student_logits.shape != teacher_logits.shape:
        raise InputError(
            f"recover: the student's output has shape {tuple(student_logits.shape)}, the "
            f"teacher's {tuple(teacher_logits.shape)}; distillation compares them position by "
            "position: give loss_fn for outputs of other shapes"
        )
    t = temperature
    kd = F.kl_div(
        F.log_softmax(student_logits.float() / t, 1),
        F.log_softmax(teacher_logits.float() / t, 1),
        reduction="none",
        log_target=True,
    )
    kd = kd.sum(1).mean() * t * t  # per sample (and pixel), as the batchmean reduction
    if targets is None or alpha == 1:
        return kd
    return alpha * kd + (1 - alpha) * F.cross_entropy(student_logits, targets)


def logits(out) -> torch.Tensor:
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if len(leaves) != 1 or leaves[0].dim() < 2:
        raise InputError(
            "recover: the model's output is not one tensor of logits (batch, classes, ...): "
            "give loss_fn(student_out, teacher_out, targets)"
        )
    return leaves[0]


class FeatureMatch:
    """Forward hooks on the named layers of both models; `loss()` is the mean MSE between the
    student's outputs and the teacher's on the channels the student kept."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, names: tuple[str, ...]):
        if teacher is None:
            raise PassConfigError("recover: features match the teacher's layers; give a teacher")
        report = getattr(student, "racc_report", None)
        kept = report.kept_channels() if report is not None else {}
        self.outputs: dict[str, list] = {name: [None, None] for name in names}
        self.kept = {name: kept.get(name) for name in names}
        self.hooks = []
        for side, model in enumerate((student, teacher)):
            modules = dict(model.named_modules())
            for name in names:
                if name not in modules:
                    which = "student" if side == 0 else "teacher"
                    raise InputError(
                        f"recover: features: the {which} has no layer '{name}'; name layers both "
                        "models call (a compiled model's are listed by its report's widths)"
                    )
                self.hooks.append(modules[name].register_forward_hook(self._keep(name, side)))

    def _keep(self, name: str, side: int):
        def hook(module, args, output):
            self.outputs[name][side] = output

        return hook

    def loss(self) -> torch.Tensor:
        terms = []
        for name, (mine, theirs) in self.outputs.items():
            if self.kept[name] is not None:
                theirs = theirs[:, self.kept[name]]
            if mine.shape != theirs.shape:
                raise InputError(
                    f"recover: features: '{name}' gives {tuple(mine.shape)} in the student and "
                    f"{tuple(theirs.shape)} in the teacher (on the channels kept); match layers "
                    "whose channels only pruning changed"
                )
            terms.append(F.mse_loss(mine.float(), theirs.detach().float()))
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
