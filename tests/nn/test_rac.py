"""RAC modules: the factored block equals its dense cross-kernel conv, the parameter count is the
formula, a stage's bank stays one shared pair of Parameters through every round trip, and it trains."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import racc
from racc.nn.rac import RacBank, RacConv2d, cross_kernel, rac_banks
from tests.conftest import assert_close

F64 = 1e-10  # factored vs dense in float64


class _Stage(nn.Module):
    """Three RAC blocks on one bank, the middle one strided, with BN and ReLU around them."""

    def __init__(self, channels: int = 8, m: int = 4, r: int = 2, k: int = 3) -> None:
        super().__init__()
        bank = RacBank(channels, m, k)
        pairs = [[(i % m, (i + j) % m) for j in range(r)] for i in range(3)]
        self.a = RacConv2d(bank, channels, pairs[0])
        self.b = RacConv2d(bank, channels, pairs[1], stride=2)
        self.c = RacConv2d(bank, channels, pairs[2])
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        x = torch.relu(self.bn(self.a(x))) + x
        return self.c(torch.relu(self.b(x)))


def _blocks(model: nn.Module) -> list[RacConv2d]:
    return [m for m in model.modules() if isinstance(m, RacConv2d)]


def _assert_shared(model: nn.Module) -> None:
    """Every block uses the same bank: a change made through one is seen by all."""
    blocks = _blocks(model)
    assert len({id(b.bank) for b in blocks}) == 1
    with torch.no_grad():
        blocks[0].bank.row[0, 0, 0, 0] += 1.0
    first = blocks[0].bank.row.detach()
    assert all(float(b.bank.row.detach()[0, 0, 0, 0]) == float(first[0, 0, 0, 0]) for b in blocks)
    assert len(rac_banks(model)) == 1


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
def test_factored_block_equals_dense_cross_conv(stride, k):
    torch.manual_seed(k * 10 + stride)
    bank = RacBank(6, m=5, k=k).double()
    block = RacConv2d(bank, 7, [(0, 3), (4, 4), (2, 0)], stride=stride).double()
    x = torch.randn(2, 6, 13, 10, dtype=torch.float64)
    dense = block.to_dense()
    assert dense.kernel_size == (k, k) and dense.stride == (stride, stride)
    with torch.no_grad():
        y, expected = block(x), dense(x)
    assert y.shape == expected.shape == (2, 7, -(-13 // stride), -(-10 // stride))
    assert (y - expected).abs().max() <= F64
    corners = dense.weight.detach().clone()
    corners[..., k // 2, :] = 0
    corners[..., :, k // 2] = 0
    assert corners.abs().max() == 0  # cross-shaped


def test_cross_kernel_puts_row_and_column_through_the_centre():
    row = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3)
    col = torch.tensor([10.0, 20.0, 30.0]).reshape(1, 1, 3, 1)
    expected = torch.tensor([[0.0, 10.0, 0.0], [1.0, 22.0, 3.0], [0.0, 30.0, 0.0]])
    assert torch.equal(cross_kernel(row, col)[0, 0], expected)


@pytest.mark.parametrize(
    ("channels", "out", "m", "r", "k", "blocks"), [(256, 256, 8, 2, 3, 6), (64, 32, 16, 4, 5, 3)]
)
def test_parameter_count_is_the_formula(channels, out, m, r, k, blocks):
    bank = RacBank(channels, m, k)
    stage = nn.ModuleList(RacConv2d(bank, out, [(i, i) for i in range(r)]) for _ in range(blocks))
    counted = sum(p.numel() for p in stage.parameters())
    assert counted == 2 * m * channels * k + blocks * (r * out + out)


def test_bank_is_one_parameter_pair_in_parameters_and_state_dict():
    model = _Stage()
    names = [n for n, _ in model.named_parameters()]
    assert sum("bank" in n for n in names) == 2  # yielded once
    state = model.state_dict()
    assert {k for k in state if k.endswith("bank.row")} == {
        "a.bank.row",
        "b.bank.row",
        "c.bank.row",
    }
    fresh = _Stage()
    fresh.load_state_dict(state)
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        assert_close(fresh.eval()(x), model.eval()(x), 0, 0)
    _assert_shared(fresh)


def test_sharing_survives_deepcopy_and_racc_save_load(tmp_path):
    torch.manual_seed(0)
    model = _Stage().eval()
    x = torch.randn(2, 8, 12, 12)
    _assert_shared(copy.deepcopy(model))
    opt = racc.compile(model, [], (x,))
    racc.save(opt, tmp_path / "stage.racc")
    loaded = racc.load(tmp_path / "stage.racc")
    assert_close(loaded(x), opt(x), 0, 0)
    _assert_shared(loaded)


def test_sharing_survives_torch_compile_and_gradients_reach_every_block():
    torch.manual_seed(0)
    model = _Stage()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 8, 12, 12)
    compiled(x).square().mean().backward()
    bank = _blocks(model)[0].bank
    eager = copy.deepcopy(model)
    eager.zero_grad()
    eager(x).square().mean().backward()
    assert_close(bank.row.grad, _blocks(eager)[0].bank.row.grad, 1e-5, 1e-7, "bank gradient")
    for block in _blocks(model):  # the compiled backward reaches every block's mixer
        assert block.mixer.weight.grad.abs().sum() > 0
    _assert_shared(model)


def test_rac_stage_trains_on_generated_data():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        _Stage(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    x = torch.randn(64, 3, 12, 12)
    y = (x[:, 0].mean((1, 2)) > 0).long()  # a learnable rule
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        bank = model[1].a.bank
        assert bank.row.grad.abs().sum() > 0 and bank.col.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_each_block_sends_gradient_to_the_bank():
    torch.manual_seed(0)
    model = _Stage()
    for block in _blocks(model):  # each block's own path reaches the shared bank
        model.zero_grad()
        block(torch.randn(2, 8, 12, 12)).sum().backward()
        assert block.bank.row.grad.abs().sum() > 0 and block.bank.col.grad.abs().sum() > 0


_DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    sys.path.insert(0, os.getcwd())
    from tests.nn.test_rac import _Stage, _blocks

    def main(rank, world, path):
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
        torch.manual_seed(0)
        model = _Stage()
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.manual_seed(1 + rank)  # different data on each rank
        for _ in range(2):
            opt.zero_grad()
            ddp(torch.randn(2, 8, 12, 12)).square().mean().backward()
            opt.step()
        blocks = _blocks(model)
        assert len({id(b.bank) for b in blocks}) == 1, "blocks stopped sharing"
        row = blocks[0].bank.row.detach().clone()
        rows = [torch.zeros_like(row) for _ in range(world)]
        dist.all_gather(rows, row)
        assert torch.equal(rows[0], rows[1]), "the bank differs between ranks"
        torch.manual_seed(0)
        assert not torch.equal(row, _Stage().a.bank.row), "training did not move the bank"
        dist.barrier()  # both ranks done before either tears gloo down (else a rank can abort)
        dist.destroy_process_group()

    if __name__ == "__main__":
        torch.multiprocessing.spawn(main, args=(2, sys.argv[1]), nprocs=2)
    """
)


def test_sharing_survives_distributed_data_parallel(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "rendezvous")],
        cwd=os.getcwd(),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
