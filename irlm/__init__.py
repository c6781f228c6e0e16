"""irlm: a graph compiler for large-language-model inference."""
from .errors import IRError, IRLMError, ParseError, VerificationError
from .ir import Graph, Location, Op, Value
from .types import DType, TensorType, sym
from .builder import Builder, make_op

__version__ = "0.1.0"
__all__ = ["IRError", "IRLMError", "ParseError", "VerificationError", "Graph", "Location", "Op",
           "Value", "DType", "TensorType", "sym", "Builder", "make_op"]
