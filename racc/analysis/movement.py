"""Channel rules for ops without parameters: elementwise math, per-channel ops and data movement.

Data movement is handled by running the op itself on the label tensors, so a channel shuffle, a
flatten into a Linear or a permute to channels-last moves ids exactly as it moves values. What the op
cannot survive after pruning is tied or marked here: a reshape to a constant size couples the
channels along that axis, a constant index on the channel axis is a wall, and a split along channels
is recorded so that pruning can rewrite its sizes.
"""

from __future__ import annotations

import numbers
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from racc.analysis.flow import (
    Flow,
    expand_channels,
    ids_along,
    spec_of,
    squeeze_broadcast,
    varies_along,
)
from racc.analysis.rules import NO_ID, apply_to_labels, labels_of, module_of, wall


def _maps_zero_to_zero(flow: Flow, node: fx.Node) -> bool:
    """Evaluate the op at 0 (e.g. relu -> 0, sigmoid -> 0.5); its other arguments as recorded."""
    zero = torch.zeros(2)
    args = labels_of(flow, node.args[1:])
    kwargs = {k: v for k, v in labels_of(flow, node.kwargs).items() if k != "inplace"}
    try:
        if node.op == "call_module":
            out = module_of(flow, node)(zero)
        elif node.op == "call_method":
            out = getattr(zero, node.target)(*args, **kwargs)
        else:
            out = node.target(zero, *args, **kwargs)
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and bool((out == 0).all())


def unary(flow: Flow, node: fx.Node) -> None:
    """Activations, dropout, identity, casts: the channels stay where they are."""
    flow.labels[node] = flow.labels[node.args[0]]
    flow.zero_kind[node] = "all" if _maps_zero_to_zero(flow, node) else "nonzero"


def per_channel(flow: Flow, node: fx.Node) -> None:
    """Pooling, interpolation, padding: each output channel is computed from its input channel."""
    labels, spec = flow.labels[node.args[0]], spec_of(node)
    ids = ids_along(labels, 1)
    if ids is None or not hasattr(spec, "shape"):
        return wall(flow, node, "mixes channels with other axes")
    if len(spec.shape) != labels.dim() or spec.shape[1] != labels.shape[1]:
        return wall(flow, node, "changes the size of axis 1, where channels are")  # F.pad of it
    flow.labels[node] = expand_channels(ids, spec.shape, 1)
    flow.zero_kind[node] = "all" if _pads_with_zero(flow, node, labels.dim()) else "nonzero"


def _pads_with_zero(flow: Flow, node: fx.Node, ndim: int) -> bool:
    if node.op == "call_module":
        return getattr(module_of(flow, node), "value", 0) == 0
    if node.target is not F.pad:
        return True
    pad = labels_of(flow, node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
    if len(pad) // 2 > ndim - 2:
        return False  # pads the channel axis itself
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0)
    return mode != "constant" or not value


def elementwise(kind: str):
    """add/sub ('all'), mul ('any'), div ('first'): ties the channels of both operands together."""

    def rule(flow: Flow, node: fx.Node) -> None:
        operands = list(node.args[:2]) + [node.kwargs[k] for k in ("other",) if k in node.kwargs]
        labels = [flow.labels[a] if isinstance(a, fx.Node) else a for a in operands]
        tensors = [t for t in labels if isinstance(t, torch.Tensor)]
        constants = [t for t in labels if not isinstance(t, torch.Tensor)]
        if len(tensors) == 2:
            flow.union(*tensors)
            tensors = list(torch.broadcast_tensors(*tensors))
        tensors.sort(key=lambda t: int(t[(0,) * t.dim()]) == NO_ID)
        flow.labels[node] = tensors[0].expand(spec_of(node).shape)
        flow.zero_kind[node] = _elementwise_zero_kind(kind, labels, constants)

    rule.__name__ = f"elementwise_{kind}"
    return rule


def _elementwise_zero_kind(kind: str, labels: list, constants: list) -> str:
    if kind == "mul":
        return "any"
    if kind == "div":
        return "first" if isinstance(labels[0], torch.Tensor) else "nonzero"
    nonzero_constant = any(isinstance(c, numbers.Number) and c != 0 for c in constants)
    constant_tensor = any(
        isinstance(t, torch.Tensor) and bool((squeeze_broadcast(t)[0] == NO_ID).all())
        for t in labels
    )
    return "nonzero" if nonzero_constant or constant_tensor else "all"


def reduce(flow: Flow, node: fx.Node) -> None:
    """mean/sum/amax over axes: fine over space, a wall over channels."""
    labels = flow.labels[node.args[0]]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = list(range(labels.dim())) if dims is None else dims
    dims = sorted({d % labels.dim() for d in ([dims] if isinstance(dims, int) else dims)})
    if any(varies_along(labels, d) for d in dims):
        return wall(flow, node, "reduces over the channel axis")
    for d in reversed(dims):
        labels = labels.narrow(d, 0, 1) if keepdim else labels.select(d, 0)
    flow.labels[node] = labels
    flow.zero_kind[node] = "all"


def move(flow: Flow, node: fx.Node) -> None:
    """Pure data movement (permute, transpose, flatten, cat, stack, squeeze...)."""
    flow.labels[node] = apply_to_labels(flow, node)
    flow.zero_kind[node] = "all"


def concat(flow: Flow, node: fx.Node) -> None:
    """torch.cat without materialising labels along axes every input broadcasts (space, batch)."""
    tensors = list(labels_of(flow, node.args[0]))
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = spec_of(node).shape
    dim %= len(shape)
    for d in range(len(shape)):
        if d != dim and all(t.stride(d) == 0 or t.shape[d] == 1 for t in tensors):
            tensors = [t.narrow(d, 0, 1) for t in tensors]
    flow.labels[node] = torch.cat(tensors, dim).expand(shape)
    flow.zero_kind[node] = "all"


def reshape(flow: Flow, node: fx.Node) -> None:
    """view/reshape: an axis given a constant size must keep it, so its channels go together."""
    move(flow, node)
    sizes = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    out = flow.labels[node]
    for d, size in enumerate(sizes):
        if d == 0 or not varies_along(out, d):
            continue
        if isinstance(size, int) and size not in (-1, 1):
            flow.union(out, out.narrow(d, 0, 1))
        elif isinstance(size, fx.Node):
            _tie_to_size(flow, node, out, d, size)


def _tie_to_size(flow: Flow, node: fx.Node, out: torch.Tensor, axis: int, size: fx.Node) -> None:
    """Axis `axis` of a reshape gets its size from another tensor's shape, read in forward()
    (B, C, H, W = x.shape; y.view(B, C, H, W), as attention blocks do). Pruning changes that
    size with the channels of the tensor it was read from, so those channels and the axis' go
    together, one for one (unless they are those channels reordered). A size computed from a
    channel count (C // heads) fixes both."""
    # a size read from the reshaped tensor itself (C // groups in a channel shuffle) changes with
    # it; one from the batch or spatial sizes never changes
    reads = [(t, d) for t, d in _channel_sizes(flow, size) if t is not node.args[0]]
    if not reads:
        return
    mine, (tensor, d) = ids_along(out, axis), reads[0]
    theirs = ids_along(flow.labels[tensor], d)
    if (
        _size_read(size) is not None
        and mine is not None
        and theirs is not None
        and len(mine) == len(theirs)
    ):
        # the same channels in another order (a channel shuffle's transpose) keep the count
        # equal by themselves; other channels are removed one for one with those
        if set(mine.tolist()) != set(theirs.tolist()):
            flow.union(mine, theirs)
        return
    flow.union(out, out.narrow(axis, 0, 1))
    for tensor, _ in reads:
        flow.mark(
            flow.labels[tensor],
            "broken",
            f"its channel count, read in forward(), sets axis {axis} of '{node.name}' "
            "through arithmetic racc cannot rewrite",
        )


def _channel_sizes(flow: Flow, size: fx.Node) -> list[tuple[fx.Node, int]]:
    """The (tensor, axis) whose sizes the int `size` is computed from, where channels vary along
    the axis: x.shape[d], x.size(d), x.size()[d], and arithmetic on them."""
    reads, stack, seen = [], [size], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        read = _size_read(n)
        if read is not None:
            tensor, d = read
            labels = flow.labels.get(tensor)
            if isinstance(labels, torch.Tensor) and varies_along(labels, d % labels.dim()):
                reads.append((tensor, d % labels.dim()))
            continue
        if isinstance(flow.labels.get(n), torch.Tensor):  # a tensor's values, not a size
            continue
        stack.extend(n.all_input_nodes)
    return reads


def _size_read(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(x, d) for a node that reads the size of axis d of tensor x."""
    if node.op == "call_method" and node.target == "size":
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return (node.args[0], d) if isinstance(d, int) else None
    if node.target is operator.getitem and isinstance(node.args[1], int):
        source = node.args[0]
        if isinstance(source, fx.Node) and (
            (source.target is getattr and source.args[1:] == ("shape",))
            or (source.op == "call_method" and source.target == "size" and len(source.args) == 1)
        ):
            return source.args[0], node.args[1]
    return None


def pixel_shuffle(flow: Flow, node: fx.Node) -> None:
    """pixel_shuffle / pixel_unshuffle move values between channels and space: run on the
    labels. After a shuffle each output channel holds r*r input channels spread over space; they
    are tied, so pruning removes r*r input channels per output channel and the op stays valid.
    After an unshuffle each input channel fills r*r output channels, one id for all of them."""
    move(flow, node)
    out = flow.labels[node]
    if out.dim() < 3 or ids_along(out, 1) is not None:
        return
    corner = out[(slice(None), slice(None), *([slice(0, 1)] * (out.dim() - 2)))]
    flow.union(out, corner)
    flow.labels[node] = expand_channels(corner[0].reshape(-1), out.shape, 1)


def getitem(flow: Flow, node: fx.Node) -> None:
    """Indexing a tuple is free; a constant index on a tensor's channel axis is a wall."""
    source = flow.labels[node.args[0]]
    if isinstance(source, torch.Tensor) and _indexes_channels(source, node.args[1]):
        return wall(flow, node, "indexes the channel axis with constants")
    move(flow, node)


def _indexes_channels(labels: torch.Tensor, index) -> bool:
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        fill = labels.dim() - (len(index) - 1 - sum(i is None for i in index))
        index = index[:at] + (slice(None),) * fill + index[at + 1 :]
    dim = 0
    for i in index:
        if i is None:
            continue
        if not _whole(i, labels.shape[dim]) and varies_along(labels, dim):
            return True
        dim += 1
    return False


def _whole(index, length: int) -> bool:
    """A slice that selects the whole axis, now and after pruning shortens it: x[:, :n] with n
    at least the axis' length (GhostNet's out[:, :self.oup] where oup is every channel)."""
    if not isinstance(index, slice) or index.step not in (None, 1) or index.start not in (None, 0):
        return False
    return index.stop is None or (isinstance(index.stop, int) and index.stop >= length)


def split(flow: Flow, node: fx.Node) -> None:
    """chunk/split/tensor_split: recorded so that pruning can rewrite the sizes of the pieces."""
    move(flow, node)
    args = labels_of(flow, node.args)
    dim = node.kwargs.get("dim", args[2] if len(args) > 2 else 0)
    source = flow.labels[node.args[0]]
    dim %= source.dim()
    if varies_along(source, dim):
        pieces = [ids_along(p, dim) for p in flow.labels[node]]
        if any(p is None for p in pieces):
            return wall(flow, node, "splits an axis where channels mix with other axes")
        flow.splits[node.name] = (dim, [p.numpy().copy() for p in pieces])
