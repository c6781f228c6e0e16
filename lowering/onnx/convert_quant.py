"""ONNX converters for the ``quant`` dialect: filled in below (Q/DQ pairs)."""
