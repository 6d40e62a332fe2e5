"""Frontend: nn.Module -> torch.fx GraphModule, with the example values of every node recorded.

`trace` works on a copy of the model in eval mode. When a submodule cannot be symbolically traced it
becomes a leaf (an opaque call) and tracing is retried; only when the failure is in the model's own
`forward` does tracing fail, with an `UnsupportedModelError` naming the module and the reason.

`record_examples` runs the traced model once and stores, in `node.meta["racc.example"]`, the value of
every node: a `TensorSpec` (shape, dtype) for a tensor, the value itself for an int, a size or a tuple
of those. Analyses read shapes from there, never by running the model again.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

from racc.errors import InputError, UnsupportedModelError
from racc.ir.capture import Proxy, concrete_args, drop_concrete_placeholders, pieces, torch_type
from racc.ir.export import EXPORT_CAPTURE, export_instead

try:  # private since torch 2.2; the public class is the same minus lazy code generation
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover
    _LazyGraphModule = fx.GraphModule

_MAX_LEAF_RETRIES = 64
EXAMPLE = "racc.example"  # node.meta key of the value spec record_examples stores
_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class TracedModel:
    """A traced copy of a model: the GraphModule and the submodules kept opaque, with the reason."""

    gm: fx.GraphModule
    leaves: dict[str, str]  # qualified name -> why it could not be traced
    capture: str = "torch.fx symbolic trace"  # how the graph was captured, as reports say it


class _LeafTracer(fx.Tracer):
    """A tracer that keeps some submodules opaque and remembers which module a failure came from.

    Buffers a forward reads directly (FrozenBatchNorm2d's statistics, a layer's scale table) are
    graph attributes like parameters, not constants folded at trace time, so the channel rules see
    which channels they belong to and pruning slices them."""

    proxy_buffer_attributes = True

    def __init__(self, leaves: set[str] = frozenset()):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # racc's own modules (racc.nn) trace as one op, like torch's layers
        return (
            qualname in self.leaves
            or type(m).__module__.startswith("racc.nn.")
            or super().is_leaf_module(m, qualname)
            or torch_type(m) is not type(m)  # a torch layer under another name
        )

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return Proxy(node, self)

    def iter(self, obj: fx.Proxy):
        """Iterate the result of an op whose number of pieces the call itself says:
        chunk(n), split([sizes]), tensor_split(n) (list(x.chunk(2, 1)), as YOLO's C2f does).
        fx iterates only a result unpacked into names; any other iteration fails as before."""
        count = pieces(obj.node)
        if count is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(count)])

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            # The innermost module sets this first; outer frames leave it alone.
            if not hasattr(e, "_racc_module"):
                e._racc_module = qualname
            raise


def check_model(model: Any) -> None:
    """Raise `UnsupportedModelError` unless `model` is an nn.Module with floating-point parameters."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"expected a torch.nn.Module, got {type(model).__name__}; "
            "pass the model object itself (for an .onnx file use the ONNX frontend)"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script or trace): its "
            "Python forward is gone, so torch.fx cannot trace it; compile the nn.Module it was "
            "made from, or export it to ONNX and compile the .onnx file"
        )
    parameters = dict(model.named_parameters())
    for name, p in (*parameters.items(), *model.named_buffers()):
        if p.is_meta:
            raise UnsupportedModelError(
                f"'{name}' is on the meta device and holds no values, so no pass could be "
                "checked; materialize the model first (model.to_empty(device='cpu') and "
                "load_state_dict, or build it without device='meta')"
            )
        if p.is_floating_point() and p.dtype not in _DTYPES:
            raise UnsupportedModelError(
                f"'{name}' has dtype {p.dtype}; racc compiles float32 (or float64) models: "
                "compile model.float(), then convert the result to half precision if needed"
            )
        if name in parameters and not p.is_floating_point():
            raise UnsupportedModelError(
                f"parameter '{name}' has dtype {p.dtype}; racc transforms floating-point models "
                "only: compile the float model and quantize it with the int8 pass"
            )


def normalize_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Accept a tensor or a tuple/list of tensors; raise `InputError` for anything else."""
    if example_inputs is None:
        raise InputError(
            "example_inputs is required: pass a tuple of tensors shaped like the model's inputs, "
            "e.g. example_inputs=(torch.randn(1, 3, 224, 224),)"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise InputError(
            f"example_inputs must be a tensor or a tuple of tensors, "
            f"got {type(example_inputs).__name__}"
        )
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise InputError(
                f"example_inputs[{i}] is a {type(x).__name__}, not a tensor; pass "
                "a tuple of tensors such as (torch.randn(1, 3, 224, 224),)"
            )
    return tuple(example_inputs)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode for the duration, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def trace(
    model: nn.Module, copy_model: bool = True, example_inputs: tuple | None = None
) -> TracedModel:
    """Symbolically trace `model` in eval mode; untraceable submodules become leaves.

    With `copy_model` (the default) the result owns a deep copy of the model. Without it the result
    shares the model's submodules: for analyses, which only read them, run inside `eval_mode`.
    With `example_inputs`, forward's parameters after them that have defaults are fixed to them
    (see `racc.ir.capture.concrete_args`), and a forward fx cannot trace is captured with
    torch.export instead (racc.ir.export).
    """
    check_model(model)
    if isinstance(model, fx.GraphModule):
        leaves = dict(getattr(model, "racc_leaves", {}))
        if copy_model:
            return TracedModel(copy.deepcopy(model).eval(), leaves)
        return TracedModel(fx.GraphModule(model, copy.deepcopy(model.graph)), leaves)
    root = copy.deepcopy(model).eval() if copy_model else model
    leaves: dict[str, str] = {}
    concrete = concrete_args(root, None if example_inputs is None else len(example_inputs))
    for _ in range(_MAX_LEAF_RETRIES):
        tracer = _LeafTracer(set(leaves))
        try:
            graph = tracer.trace(root, concrete_args=concrete or None)
        except Exception as e:
            failing = getattr(e, "_racc_module", "")
            if not failing or failing in leaves:  # the root's own forward
                gm = export_instead(root, example_inputs, _first_line(e), _LeafTracer)
                gm.racc_leaves = {}
                return TracedModel(gm, {}, capture=EXPORT_CAPTURE)
            leaves[failing] = _first_line(e)
            continue
        drop_concrete_placeholders(graph, concrete)
        # Analyses never call forward(): a lazy module skips generating its code (about 20 ms).
        module_class = fx.GraphModule if copy_model else _LazyGraphModule
        gm = module_class(tracer.root, graph, type(model).__name__)
        gm.racc_leaves = leaves
        fixed = ", ".join(f"{k}={v!r}" for k, v in concrete.items())
        how = "torch.fx symbolic trace" + (f", with {fixed} of forward() fixed" if fixed else "")
        return TracedModel(gm, leaves, how)
    raise UnsupportedModelError(
        f"gave up tracing {type(model).__name__} after {_MAX_LEAF_RETRIES} opaque submodules"
    )


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def example_of(node: fx.Node) -> Any:
    """The value spec `record_examples` stored for `node` (None before it ran)."""
    return node.meta.get(EXAMPLE)


def spec_of_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return type(value)(spec_of_value(v) for v in value)
    if isinstance(value, dict):
        return {k: spec_of_value(v) for k, v in value.items()}
    return value


class _ExampleRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        # racc's message names the node; fx would append the node's repr and a tlparse hint
        self.extra_traceback = False

    def run_node(self, n: fx.Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as e:
            raise InputError(_shape_failure_message(self.module, n, self.args_of(n), e)) from e
        n.meta[EXAMPLE] = spec_of_value(value)
        return value

    def args_of(self, n: fx.Node) -> list:
        return [example_of(a) for a in n.all_input_nodes]


class _ValueRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str] | None):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if self.names is None or n.name in self.names:
            # a copy: an in-place op later (ReLU(inplace=True)) would change the value recorded
            self.values[n.name] = value.clone() if isinstance(value, torch.Tensor) else value
        return value


def node_values(
    gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], names: set[str] | None = None
) -> dict[str, Any]:
    """Run `gm` on `inputs` without grad and return the value of every node (or of `names`)."""
    recorder = _ValueRecorder(gm, names)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.values


def module_call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many call_module nodes call each submodule (a shared module is called more than once)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _first_layer(gm: fx.GraphModule) -> str:
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if hasattr(m, "in_channels"):
                return (
                    f"the first layer '{node.target}' ({m}) expects {m.in_channels} input channels"
                )
            if hasattr(m, "in_features"):
                return (
                    f"the first layer '{node.target}' ({m}) expects {m.in_features} input features"
                )
    return "check the shapes the model's forward expects"


def _shape_failure_message(gm: fx.GraphModule, n: fx.Node, inputs: list, e: Exception) -> str:
    shapes = ", ".join(str(list(s.shape)) for s in inputs if isinstance(s, TensorSpec))
    return (
        f"the model fails at node '{n.name}' ({n.target}) on inputs of shape {shapes or '?'}: "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. {_first_layer(gm)}; "
        "pass example_inputs of a shape the model accepts"
    )


def check_inputs(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Raise `InputError` unless there is one non-empty, finite float32/float64 tensor per input
    of `gm`: on anything else no output comparison could show a pass wrong."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) != len(placeholders):
        raise InputError(
            f"the model takes {len(placeholders)} input(s) "
            f"({', '.join(p.name for p in placeholders)}), example_inputs has {len(example_inputs)}"
        )
    for node, x in zip(placeholders, example_inputs, strict=True):
        where = f"example input '{node.name}' (shape {list(x.shape)}, {x.dtype})"
        if not x.is_floating_point():
            raise InputError(
                f"{where}: racc models take floating-point inputs; pass e.g. torch.randn(...)"
            )
        if x.dtype not in _DTYPES:
            raise InputError(
                f"{where}: racc compiles float32 (or float64) models; pass float32 inputs and "
                "compile model.float(), then convert the result to half precision if you need it"
            )
        if x.numel() == 0:
            raise InputError(
                f"{where} is empty: no output could show a pass wrong; pass at least one sample"
            )
        if not bool(torch.isfinite(x).all()):
            raise InputError(
                f"{where} holds NaN or infinite values: outputs computed from them cannot be "
                "compared; pass finite inputs such as real samples or torch.randn(...)"
            )


def check_outputs(gm: fx.GraphModule, outputs: Any) -> None:
    """Raise `UnsupportedModelError` unless the model's outputs can be compared: tensors (None
    beside them is allowed), at least one of them computed from the inputs, all finite."""
    leaves = tree_leaves(outputs)
    other = [v for v in leaves if v is not None and not isinstance(v, torch.Tensor)]
    if other:
        raise UnsupportedModelError(
            f"{type(gm).__name__}'s output holds a {type(other[0]).__name__} ({other[0]!r}), not a "
            "tensor: racc checks every pass by comparing tensor outputs, and a Python number "
            "(from .item(), float() or int()) hides what changed; return the tensor instead"
        )
    tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
    if not tensors:
        raise UnsupportedModelError(
            f"{type(gm).__name__} returns no tensor ({outputs!r}): there is nothing to compile or "
            "check; return the model's output tensors from forward()"
        )
    if not _reads_inputs(gm):
        raise UnsupportedModelError(
            f"{type(gm).__name__}'s outputs do not depend on its inputs (a constant): no pass can be "
            "checked on them; return what forward() computes from its inputs"
        )
    if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
        raise UnsupportedModelError(
            f"{type(gm).__name__}'s outputs hold NaN or infinite values on the example inputs, so they "
            "cannot be compared; check the weights (a NaN from training?) and the inputs' scale"
        )


def _reads_inputs(gm: fx.GraphModule) -> bool:
    """Whether some tensor the graph outputs is computed from a placeholder."""
    graph = nx.DiGraph((a, n) for n in gm.graph.nodes for a in n.all_input_nodes)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return output in graph and any(n.op == "placeholder" for n in nx.ancestors(graph, output))


def check_no_mutation(
    gm: fx.GraphModule, originals: tuple[torch.Tensor, ...], used: tuple[torch.Tensor, ...]
) -> None:
    """Raise `UnsupportedModelError` if running `gm` changed its inputs (`used`, copies of
    `originals`), naming the first node after which an input differs."""
    if all(torch.equal(a, b) for a, b in zip(originals, used, strict=True)):
        return
    copies = tuple(x.clone() for x in originals)
    culprit = "?"

    class Watch(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            nonlocal culprit
            value = super().run_node(n)
            if culprit == "?" and not all(
                torch.equal(a, b) for a, b in zip(originals, copies, strict=True)
            ):
                culprit = f"'{n.name}' ({n.target})"
            return value

    with torch.no_grad():
        Watch(gm).run(*copies)
    raise UnsupportedModelError(
        f"the model's forward changes its input in place (first at node {culprit}): racc "
        "runs it many times on the same inputs, so each run would see other values; use the "
        "out-of-place op (e.g. x = x.relu() for x.relu_(), or nn.ReLU(inplace=False) on the input)"
    )


def record_examples(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> Any:
    """Run `gm` once on `example_inputs`, storing every node's value spec; return the outputs."""
    check_inputs(gm, example_inputs)
    used = tuple(x.clone() for x in example_inputs)
    with torch.no_grad():
        outputs = _ExampleRecorder(gm).run(*used)
    check_no_mutation(gm, example_inputs, used)
    check_outputs(gm, outputs)
    return outputs
