"""``irlm serve``: an engine behind the OpenAI API and Triton's KServe v2 protocols.

One concept a module: :mod:`.engine_core` (the engine in its own process, fed through
queues), :mod:`.client` (the server's side of it: submit, stream, detokenize), :mod:`.fields`
(request fields with errors naming them), :mod:`.openai_api`, :mod:`.kserve_http`,
:mod:`.kserve_grpc`, :mod:`.metrics` (Prometheus), :mod:`.model_repo` (Triton config.pbtxt),
:mod:`.app` (assembly and life cycle).  See docs/serving.md.
"""
from .app import ServeConfig, build_app, serve, serve_async
from .client import EngineClient
from .engine_core import EngineSpec
from .errors import ServingError

__all__ = ["ServeConfig", "EngineSpec", "EngineClient", "ServingError", "build_app", "serve",
           "serve_async"]
