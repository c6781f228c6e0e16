"""Imports every module that registers built-in passes (the registry loads this lazily)."""
from . import canonicalize, cse, dce  # noqa: F401
