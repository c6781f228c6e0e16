"""Imports every module that registers built-in passes (the registry loads this lazily)."""
from .transforms import canonicalize, cse, dce  # noqa: F401
from .llm import substitute_attention  # noqa: F401
from . import fusions  # noqa: F401  (fuse-rms-norm, fuse-rope, fuse-qkv, ...)
from .llm import quantize, quant_fuse, quantize_kv  # noqa: F401  (quantize, fuse-quant, quantize-kv-cache)
from .llm import cast_weights  # noqa: F401  (cast-weights)
from .parallel import tp_split, pp_split  # noqa: F401  (tp-split)
