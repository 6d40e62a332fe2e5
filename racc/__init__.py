"""racc: a graph-level model transformation compiler for convolutional networks.

opt = racc.compile(model, passes="fold-bn", example_inputs=(x,))
print(opt.racc_report)
racc.export_onnx(opt, "model.onnx")
racc.recover(opt, teacher=model, data=loader, epochs=3)   # the accuracy back, by distillation
"""

from racc import data, passes, sparsity
from racc.analysis import analyze
from racc.backends.onnx import export_onnx
from racc.backends.torch_io import load, save
from racc.budget import compile
from racc.compress import Compression, compress
from racc.errors import RaccError
from racc.passes.channels import prune_channels, zero_channels
from racc.recover import Recovery, recalibrate_bn, recover

__version__ = "0.1.0"

__all__ = [
    "Compression",
    "RaccError",
    "Recovery",
    "analyze",
    "compile",
    "compress",
    "data",
    "export_onnx",
    "load",
    "passes",
    "prune_channels",
    "recalibrate_bn",
    "recover",
    "save",
    "sparsity",
    "zero_channels",
]
