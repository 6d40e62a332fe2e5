"""Backends: lowering only, no decisions. torch_io saves and loads modules; onnx exports and checks."""
