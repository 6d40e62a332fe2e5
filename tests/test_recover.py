"""racc.recalibrate_bn and racc.recover: BN statistics re-estimated exactly, distillation that brings
a pruned net back on real data (scikit-learn's digits), with labels or from the teacher alone,
checkpoints that resume to the same weights, and a 2-process torchrun-style (gloo) run equal to
one process on the same global batches."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import racc
from racc.data import accuracy, batches, digits
from racc.errors import InputError, PassConfigError

SIDE = 16


def _net(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    block = lambda cin, cout, stride: [  # noqa: E731
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
    ]  # fmt: skip
    return nn.Sequential(
        *block(3, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(128, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained on digits at 16x16 (recover with no teacher is plain training)."""
    x, y, x_test, y_test = digits(side=SIDE)
    model = _net()
    racc.recover(model, data=batches(x, y, 64, shuffle=True), epochs=4, lr=0.05, progress=False)
    return model, (x, y), batches(x_test, y_test, 256)


def test_recalibrate_bn_gives_the_statistics_of_the_data_and_restores_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Dropout(0.5), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model.eval()
    model[3].momentum = 0.3
    data = [torch.randn(8, 3, 5, 5) * 3 + 1 for _ in range(4)]
    racc.recalibrate_bn(model, data)
    every = torch.cat(data)
    mean = every.mean((0, 2, 3))
    var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in data]).mean(
        0
    )  # per batch, averaged
    torch.testing.assert_close(model[0].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[0].running_var, var, rtol=1e-5, atol=1e-5)
    assert not any(m.training for m in model.modules()) and model[3].momentum == 0.3
    # the second BN saw the first one's output with its new statistics, dropout off
    with torch.no_grad():
        inner = torch.cat([model[2](model[0](b)) for b in data])
    torch.testing.assert_close(model[3].running_mean, inner.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_recalibrate_bn_recovers_part_of_what_pruning_cost(trained):
    model, (x, y), test = trained
    pruned = racc.compile(model, "prune-bn{ratio=0.5}", (x[:8],))
    before = accuracy(pruned, test)
    racc.recalibrate_bn(pruned, batches(x, None, 64), batches=10)
    after = accuracy(pruned, test)
    assert after > before + 5, (before, after)


def test_distillation_brings_the_pruned_net_back_and_is_not_worse_than_fine_tuning(trained):
    model, (x, y), test = trained
    original = accuracy(model, test)
    assert original > 90
    state = copy.deepcopy(model.state_dict())
    pruned = racc.compile(model, "prune-bn{ratio=0.5}", (x[:8],))
    racc.recalibrate_bn(pruned, batches(x, None, 64))
    results = {}
    for name, teacher in (("fine-tune", None), ("distill", model)):
        scores = []
        for seed in (1, 2, 3):  # one run's accuracy moves by 2-3 points with the data order and
            student = copy.deepcopy(pruned)  # with the CPU's summation order (thread count)
            data = batches(x, y, 64, shuffle=True, seed=seed)
            run = racc.recover(student, teacher, data, epochs=4, lr=0.05, progress=False)
            assert run.steps == 4 * 23 and run.mode == name.replace(
                "fine-tune", "fine-tuning"
            ).replace("distill", "distillation")
            assert run.losses[-1][1] < run.losses[0][1]  # it learned
            scores.append(accuracy(student, test))
        results[name] = sum(scores) / len(scores)
    # half the channels of a net trained without sparsity: 22% after recalibration, 94-97% after
    # four epochs either way (one test image is 0.28 points); the means of three orders agree
    # within about 0.5 on 1 and 2 threads
    assert results["distill"] >= 93, (original, results)
    assert results["distill"] >= results["fine-tune"] - 1.5, results
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # teacher intact


def test_distillation_without_labels_brings_the_pruned_net_back(trained):
    """The teacher alone carries the task: no targets, the KL term only."""
    model, (x, _), test = trained
    pruned = racc.compile(model, "prune-bn{ratio=0.5}", (x[:8],))
    racc.recalibrate_bn(pruned, batches(x, None, 64))
    before = accuracy(pruned, test)
    run = racc.recover(pruned, model, batches(x, None, 64, shuffle=True, seed=1), epochs=4,
                       lr=0.05, progress=False)  # fmt: skip
    assert run.mode == "distillation"
    assert before < 50 and accuracy(pruned, test) >= 93, (before, accuracy(pruned, test))


def test_an_int8_student_trains_as_its_fake_quant_twin(trained):
    model, (x, y), test = trained
    calibration = [x[i : i + 32] for i in range(0, 128, 32)]
    student = racc.compile(model, "int8", (x[:8],), calibration=calibration)
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    scales = {n: b.clone() for n, b in student.named_buffers() if "scale" in n}
    run = racc.recover(student, model, batches(x, y, 64, shuffle=True), steps=20, progress=False)
    moved = [n for n, p in student.named_parameters() if not torch.equal(p, weights[n])]
    assert run.steps == 20 and len(moved) > len(weights) // 2
    assert all(torch.equal(b, scales[n]) for n, b in student.named_buffers() if n in scales)
    assert accuracy(student, test) > 97  # as the fp32 teacher (98.9), in ORT's arithmetic


def test_a_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path):
    x, y, _, _ = digits(side=SIDE)
    data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 320, 32)]  # 10 batches
    whole, halves = _net(), _net()
    racc.recover(whole, data=data, steps=14, progress=False)
    file = tmp_path / "run.pt"

    class Stopped(Exception):
        pass

    def stopping():  # the job is killed while it reads batch 8
        for k, batch in enumerate(data):
            if k == 7:
                raise Stopped
            yield batch

    with pytest.raises(Stopped):
        racc.recover(halves, data=_Again(stopping), steps=14, checkpoint=file, checkpoint_every=6,
                     progress=False)  # fmt: skip
    assert file.exists() and torch.load(file, weights_only=True)["step"] == 6
    again = _net()  # a new process: fresh weights, found the checkpoint
    second = racc.recover(again, data=data, steps=14, checkpoint=file, progress=False)
    assert second.resumed_from == 6 and second.steps == 14
    for (name, a), b in zip(whole.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class _Again:
    """An iterable that calls `make` for each pass."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return self.make()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"steps": 3, "epochs": 1}, PassConfigError, "exactly one of steps and epochs"),
        ({"steps": 0}, PassConfigError, "steps must be an int >= 1"),
        ({"steps": 2, "alpha": 2.0}, PassConfigError, "alpha in"),
        ({"steps": 2, "bn": "sync"}, PassConfigError, "bn must be 'train' or 'frozen'"),
        ({"steps": 2, "optimizer": "lion"}, PassConfigError, "optimizer must be"),
        ({"steps": 2, "data": torch.randn(4, 3, 8, 8)}, InputError, "data must be batches"),
        ({"steps": 2, "data": []}, InputError, "gave no batch"),
        ({"steps": 2, "data": [torch.randn(4, 3, 8, 8)]}, InputError, "needs targets"),
        ({"steps": 2, "data": [(torch.randn(4, 5, 8, 8), torch.zeros(4).long())]}, InputError,
         r"Sequential fails on step 0 \(inputs \(4, 5, 8, 8\)\)"),
    ],
)  # fmt: skip
def test_bad_recover_options_say_what_to_pass(kwargs, error, message):
    data = kwargs.pop("data", [(torch.randn(4, 3, 8, 8), torch.zeros(4).long())])
    with pytest.raises(error, match=message):
        racc.recover(_net(), data=data, progress=False, **kwargs)


# --- torchrun: two processes over gloo, each on half of every batch -------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        student, teacher = _net(dropout=0), _net()  # dropout draws its masks per process
        teacher[-1].bias.data += 1.0  # a teacher that differs
        seen = []
        student.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
        racc.recover(student, teacher, data, steps=6, bn="frozen", progress=False)
        if rank == 0:
            torch.save({"state": student.state_dict(), "seen": seen}, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_under_ddp_take_the_steps_of_one_on_the_same_global_batches(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, SIDE, SIDE, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(3)]  # fmt: skip
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, _free_port(), data, out), nprocs=2, join=True)
    student, teacher = _net(dropout=0), _net()
    teacher[-1].bias.data += 1.0
    racc.recover(student, teacher, data, steps=6, bn="frozen", progress=False)
    saved = torch.load(out, weights_only=True)
    ddp = saved["state"]
    assert saved["seen"] == [4] * 6  # each process trained on its half of every batch of 8
    moved = 0
    for (name, a), b in zip(
        student.state_dict().items(), _net().state_dict().values(), strict=True
    ):
        torch.testing.assert_close(
            ddp[name], a, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
        moved += not torch.equal(a, b)
    assert moved > 5  # the runs trained, and alike


# --- compress: the accuracy contract ------------------------------------------------------------


def test_compress_prunes_in_steps_and_keeps_the_contract(trained):
    model, (x, y), test = trained
    train = batches(x, y, 64, shuffle=True, seed=2)
    small = racc.compress(model, "prune-bn{ratio=0.4,steps=2}", (x[:8],), data=train,
                          eval_data=test, max_drop=3.0, epochs=2, lr=0.05)  # fmt: skip
    log = small.racc_compression
    assert [t.stage for t in log.tries if t.kept] == [1, 2] and log.met
    assert log.baseline - accuracy(small, test) <= 3.0 and log.final == accuracy(small, test)
    assert log.tries[-1].macs < 0.75 * log.original_macs
    assert log.pipeline() == "prune-bn{ratio=0.2254},prune-bn{ratio=0.2254}"
    assert [r.name for r in small.racc_report.rows].count("prune-bn{ratio=0.2254}") == 2
    assert "contract met" in log.to_markdown()


def test_compress_backs_off_what_breaks_the_contract_and_says_so(trained, tmp_path):
    """A contract no rewrite can keep (the outputs may not move at all): every try is backed
    off, weaker ones tried in turn, and the model comes back whole."""
    model, (x, y), test = trained
    train = batches(x, y, 64, shuffle=True, seed=2)
    calibration = [x[i : i + 32] for i in range(0, 128, 32)]
    with torch.no_grad():
        reference = model.eval()(x[:64])

    def fidelity(m):  # minus the relative L2 error of the outputs, in percent
        with torch.no_grad():
            return -100 * float((m(x[:64]) - reference).norm() / reference.norm())

    small = racc.compress(model, "prune-bn{ratio=0.9},int8", (x[:8],), data=train,
                          eval_fn=fidelity, max_drop=0.0, steps=3, tries=2,
                          calibration=calibration)  # fmt: skip
    log = small.racc_compression
    tried = [(t.stage, t.pipeline, t.kept) for t in log.tries]
    assert tried[:2] == [(1, "prune-bn{ratio=0.9}", False), (1, "prune-bn{ratio=0.45}", False)]
    assert "stage undone" in log.tries[1].note and log.met and log.pipeline() == ""
    int8 = [t.pipeline for t in log.tries if t.stage == 2]
    assert int8[0] == "int8{sensitivity=output}"  # measured: compress ranks the layers by it
    assert int8[1].startswith("int8{skip=")  # the layer that costs the output most, fp32
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters())
    markdown, data = log.save(tmp_path / "compress.md")
    assert "backed off" in open(markdown).read() and '"met": true' in open(data).read()
    log.plot(tmp_path / "compress.png")
    assert (tmp_path / "compress.png").stat().st_size > 10_000


def test_compile_refuses_steps_and_compress_needs_a_metric():
    x = torch.randn(2, 3, SIDE, SIDE)
    with pytest.raises(PassConfigError, match="racc.compress"):
        racc.compile(_net().eval(), "prune-bn{ratio=0.5,steps=2}", (x,))
    with pytest.raises(InputError, match="eval_fn"):
        racc.compress(_net().eval(), "prune-bn{ratio=0.5}", (x,), data=[x])


def test_the_report_knows_which_channels_survived_across_steps(trained):
    """compress prunes in two steps; kept_channels composes them into indices of the original,
    where the student's BN scales are the teacher's."""
    model, (x, y), test = trained
    small = racc.compress(model, "prune-bn{ratio=0.5,steps=2}", (x[:8],), data=batches(x, y, 64),
                          eval_fn=lambda m: 0.0, max_drop=1.0, steps=1)  # fmt: skip
    kept = small.racc_report.kept_channels()
    assert [r.name for r in small.racc_report.rows].count("prune-bn{ratio=0.2929}") == 2
    assert len(kept) >= 3
    for bn in ("1", "4", "7", "10"):
        before = model.get_submodule(bn).weight.detach()
        after = small.get_submodule(bn).weight.detach()
        index = kept.get(bn, list(range(len(before))))  # a group the prunes left whole
        assert len(index) == len(after) and (len(after) < len(before)) == (bn in kept)
        # recovery trained the student one step after each prune: its gammas moved a little
        torch.testing.assert_close(after, before[index], rtol=0.05, atol=0.05)
    assert "kept" not in small.racc_report.to_dict()["passes"][-1]  # the JSON stays small


def test_feature_matching_adds_the_kept_channels_mse(trained):
    model, (x, y), test = trained
    pruned = racc.compile(model, "prune-bn{ratio=0.5}", (x[:8],))
    assert copy.deepcopy(pruned).racc_report.kept_channels() == pruned.racc_report.kept_channels()
    runs = {}
    for features in ((), ("4", "10")):
        student = copy.deepcopy(pruned)
        runs[features] = racc.recover(student, model, [(x[:64], y[:64])] * 4, steps=4,
                                      features=features, log_every=1, progress=False)  # fmt: skip
    first = [run.losses[0][1] for run in runs.values()]
    assert first[1] > first[0] > 0  # the same first batch: the MSE term on top
    with pytest.raises(InputError, match="the student has no layer 'layer9'"):
        racc.recover(copy.deepcopy(pruned), model, [(x[:8], y[:8])], steps=1, features=("layer9",))
    with pytest.raises(PassConfigError, match="give a teacher"):
        racc.recover(copy.deepcopy(pruned), None, [(x[:8], y[:8])], steps=1, features=("4",))


# pipeline -> (epochs of recovery, the accuracy it reaches at least, as measured: fusion across
# ReLUs loses little; RAC shares one bank per stage, which the paper trains from scratch, and
# four epochs take it from chance to 80%)
RECOVERED = {"fuse-5x5{policy=all,allow_nonlinear=true}": (2, 90), "rac": (4, 70)}


@pytest.mark.parametrize("pipeline", list(RECOVERED))
def test_recover_brings_back_what_fusion_across_activations_and_rac_cost(trained, pipeline):
    model, (x, y), test = trained
    epochs, floor = RECOVERED[pipeline]
    changed = racc.compile(model, pipeline, (x[:8],))
    assert changed.racc_report.rows[-1].exactness == "needs_finetune"
    before = accuracy(changed, test)
    racc.recover(changed, model, batches(x, y, 64, shuffle=True), epochs=epochs, lr=0.05,
                 progress=False)  # fmt: skip
    after = accuracy(changed, test)
    assert after > max(before + 10, floor), (before, after)
