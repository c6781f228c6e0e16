"""irlm.lowering.onnx: IR graphs -> ONNX models (and, where TensorRT is installed, engines).

* :func:`export_onnx` writes ``model.onnx`` + external weight data for any stage (the traced
  stateless graph, the fused graph, the paged inference form) and checks it;
* :func:`unsupported_ops` / :func:`check_lowerable` ask the converter table (registry.py) what
  would not lower, with each op's source location, before anything is written;
* :mod:`.trt_build` builds a TensorRT engine from the export through TensorRT's Python API.

docs/onnx.md is the user guide (op mapping, the ``irlm`` custom domain, trtexec).
"""
try:
    import onnx as _onnx  # noqa: F401
except ModuleNotFoundError as _e:   # one clear line from the CLI instead of a traceback
    from irlm.errors import IRLMError
    raise IRLMError(f"the ONNX lowering needs the onnx package ({_e}): "
                    f"pip install 'irlm[onnx]'") from None

from .custom_ops import CUSTOM_OPS, DOMAIN, custom_nodes
from .export import (OnnxExport, check_model, export_onnx, optimization_profile,
                     trtexec_command)
from .registry import (CONVERTERS, UnsupportedOpsError, check_lowerable, get_converters,
                       unsupported_ops)

__all__ = ["export_onnx", "OnnxExport", "check_model", "optimization_profile",
           "trtexec_command", "unsupported_ops", "check_lowerable", "UnsupportedOpsError",
           "get_converters", "CONVERTERS", "CUSTOM_OPS", "DOMAIN", "custom_nodes"]
