"""racc: a graph-level model transformation compiler for convolutional networks.

opt = racc.compile(model, passes="fold-bn", example_inputs=(x,))
print(opt.racc_report)
racc.export_onnx(opt, "model.onnx")
"""

from racc import passes, sparsity
from racc.analysis import analyze
from racc.backends.onnx import export_onnx
from racc.backends.torch_io import load, save
from racc.compiler import compile
from racc.errors import RaccError
from racc.passes.channels import prune_channels, zero_channels

__version__ = "0.1.0"

__all__ = [
    "RaccError",
    "analyze",
    "compile",
    "export_onnx",
    "load",
    "passes",
    "prune_channels",
    "save",
    "sparsity",
    "zero_channels",
]
