"""The built-in dialects.  Importing this package registers every op it defines."""
from . import core, llm, fused, quant, dist  # noqa: F401
