"""Repeated blocks: where a model's parameters sit, stage by block (the RAC paper's Figure 7).

A module whose children (two or more) are all of one class, and that class is not a bare container,
is a stage; its children are the blocks: ResNet's `layer3` (Bottleneck x 6), DenseNet's
`features.denseblock2` (_DenseLayer x 12), EfficientNet's `features.4` (MBConv x 3). Names are
read from the model as the user wrote it; compiled GraphModules keep the qualified names, so the
same grid counts their parameters.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
SHARED = "shared"  # the column of parameters used by several blocks of a stage (a RAC bank)


def block_grid(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Module-name prefix of every block -> (stage name, block name), outermost stages first."""
    grid: dict[str, tuple[str, str]] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        children = list(module.named_children())
        kinds = {type(c) for _, c in children}
        if len(children) >= 2 and len(kinds) == 1 and kinds.pop() not in _CONTAINERS:
            for name, _ in children:
                grid[f"{prefix}{name}"] = (prefix.rstrip(".") or "model", name)
            return
        for name, child in children:
            visit(f"{prefix}{name}.", child)

    visit("", model)
    return grid


def block_params(model: nn.Module, grid: dict[str, tuple[str, str]]) -> dict[str, dict[str, int]]:
    """Parameters per stage and block; a parameter used by several blocks of one stage is counted
    once, under `SHARED`. Parameters outside every block are left out."""
    owners: dict[int, set[tuple[str, str]]] = {}
    sizes: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        cell = _cell(name, grid)
        if cell is not None:
            owners.setdefault(id(p), set()).add(cell)
            sizes[id(p)] = p.numel()
    table: dict[str, Counter] = {stage: Counter() for stage, _ in grid.values()}
    for key, cells in owners.items():
        stage, block = min(cells)
        table[stage][block if len(cells) == 1 else SHARED] += sizes[key]
    return {stage: dict(counts) for stage, counts in table.items()}


def _cell(name: str, grid: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        hit = grid.get(".".join(parts[:i]))
        if hit:
            return hit
    return None
