"""irlm: a graph compiler for large-language-model inference."""
from .errors import IRError, IRLMError, ParseError, VerificationError
from .ir import Graph, Location, Op, Value
from .types import DType, TensorType, sym
from .builder import Builder, make_op

__version__ = "0.1.0"

from .compilation import CompileConfig, compile  # noqa: E402,A004  (irlm.compile(source, config))
__all__ = ["IRError", "IRLMError", "ParseError", "VerificationError", "Graph", "Location", "Op",
           "Value", "DType", "TensorType", "sym", "Builder", "make_op", "compile", "CompileConfig"]
