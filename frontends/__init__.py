"""irlm.frontends: model loaders and the torch.export tracing frontend."""
from .trace import TraceError, UnsupportedOpError, trace

__all__ = ["trace", "TraceError", "UnsupportedOpError"]
