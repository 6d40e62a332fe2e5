"""What compile does with the graph after each verified pass, and what it gives back, for each kind
of source (racc.ir.source): a torch model's result is the GraphModule itself; an ONNX model's is
the mirror written into its ONNX graph after every pass and checked in ONNX Runtime, so that a
write-back that fails names the pass that made it."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from racc.backends.onnx import CompiledOnnx, check_onnx_outputs
from racc.backends.onnx_edit import WrittenBack, write_back
from racc.errors import RaccError
from racc.ir.source import Source
from racc.nn.quant import is_quantized


class Lowering:
    """A torch source: the compiled GraphModule is the result, with its report and inputs."""

    def __init__(self, source: Source):
        self.source = source

    def after_pass(self, step: Any, gm: fx.GraphModule, outputs: Any) -> list[str]:
        """Lower the graph pass `step` left (whose outputs on the example are `outputs`); returns
        notes for the pass's report row."""
        return []

    def result(self, gm: fx.GraphModule, report: Any) -> Any:
        # torch.fx's own way to keep attributes through copy.deepcopy (an EMA copy, a
        # DataParallel replica): GraphModule.__deepcopy__ sets what meta lists here again
        preserved = gm.meta.setdefault("_user_preserved_attributes", {})
        preserved["racc_report"] = report
        preserved["racc_example_inputs"] = tuple(x.detach().clone() for x in self.source.inputs)
        for name, value in preserved.items():
            setattr(gm, name, value)
        return gm


class OnnxLowering(Lowering):
    """An ONNX source: the mirror is written into the ONNX graph after every pass and checked in
    ONNX Runtime against the mirror's outputs; the result is the last file written."""

    def __init__(self, source: Source):
        super().__init__(source)
        self.written: WrittenBack | None = None

    def after_pass(self, step: Any, gm: fx.GraphModule, outputs: Any) -> list[str]:
        try:
            written = write_back(self.source.mirror, gm)
            check_onnx_outputs(
                written.proto, self.source.inputs, outputs, quantized=is_quantized(gm)
            )
        except RaccError as e:
            raise type(e)(f"after pass '{step}', written into the ONNX model: {e}") from e
        self.written = written
        return [written.summary()]

    def result(self, gm: fx.GraphModule, report: Any) -> CompiledOnnx:
        if self.written is None:  # no pass ran: the model as loaded, written back and checked
            with torch.no_grad():
                self.after_pass(None, gm, gm(*self.source.inputs))
        return CompiledOnnx(self.written.proto, report)


LOWERINGS: dict[str, type[Lowering]] = {"torch": Lowering, "onnx": OnnxLowering}


def lowering_for(source: Source) -> Lowering:
    return LOWERINGS[source.kind](source)
