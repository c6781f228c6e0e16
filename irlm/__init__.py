"""irlm: a graph compiler for large-language-model inference."""
from .errors import IRError, IRLMError, ParseError, VerificationError
from .ir import Graph, Location, Op, Value
from .types import DType, TensorType, sym
from .builder import Builder, make_op

__version__ = "0.1.0"

__all__ = ["IRError", "IRLMError", "ParseError", "VerificationError", "Graph", "Location", "Op",
           "Value", "DType", "TensorType", "sym", "Builder", "make_op", "LLM", "SamplingParams",
           "compile", "CompileConfig", "build_engine"]

# The runtime's user API, named as vLLM and TensorRT-LLM name it.  Resolved on first use so
# that `import irlm` (the IR core, used by pass writers) does not pull in the runtime, torch's
# CUDA state or transformers.
_RUNTIME_API = ("LLM", "SamplingParams")
# The compiler's library entry (irlm.compile(source, config)), resolved lazily for the same reason.
_COMPILE_API = ("compile", "CompileConfig", "build_engine")


def __getattr__(name):
    if name in _RUNTIME_API:
        from . import runtime
        return getattr(runtime, name)
    if name in _COMPILE_API:
        from . import compilation
        return getattr(compilation, name)
    raise AttributeError(f"module 'irlm' has no attribute {name!r}")
