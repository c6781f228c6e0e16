"""Assembling the server: engine core + FastAPI app (OpenAI, KServe v2 HTTP, metrics,
playground) on uvicorn + the KServe v2 gRPC service on grpc.aio, in one event loop.

Life cycle: the engine core process loads the engine (the server refuses to start if that
fails, with the core's error); HTTP and gRPC listen on loopback unless told otherwise.
SIGTERM or SIGINT drains: new requests get 503 / UNAVAILABLE, requests in flight run to their
end (up to ``drain_timeout`` seconds), then the listeners close and the core exits.

If the core dies, the requests in flight get errors naming the cause, new ones and the health
endpoints 503; after :data:`ENGINE_FAILURE_GRACE_S` the server stops and :func:`serve` raises
the cause (``irlm serve`` exits 1 with it): a server that can no longer generate should be
restarted by its supervisor, not linger looking alive.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .client import EngineClient
from .engine_core import EngineSpec
from .errors import ServingError
from .metrics import CONTENT_TYPE_LATEST, ServingMetrics

log = logging.getLogger("irlm.serving")

#: paths reachable without the API key: liveness / readiness probes and the static page
PUBLIC_PATHS = ("/health", "/v2/health/live", "/v2/health/ready", "/")

#: seconds the server goes on answering (with errors, and 503 from the health endpoints) after
#: the engine core died, before it stops
ENGINE_FAILURE_GRACE_S = 1.0


def failure_grace() -> float:
    """Seconds between the engine core's death and the server stopping:
    ``IRLM_SERVE_FAILURE_GRACE`` (for slow probes, and tests on loaded machines), else
    :data:`ENGINE_FAILURE_GRACE_S`."""
    import os
    value = os.environ.get("IRLM_SERVE_FAILURE_GRACE")
    try:
        return max(0.0, float(value)) if value else ENGINE_FAILURE_GRACE_S
    except ValueError:
        raise ServingError(f"IRLM_SERVE_FAILURE_GRACE={value!r}: expected seconds") from None


@dataclass
class ServeConfig:
    spec: EngineSpec
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: Optional[int] = 8001        # None: no gRPC listener
    api_key: Optional[str] = None
    max_queue: int = 256                   # requests waiting beyond the running batch
    served_model_name: str = "model"
    model_version: str = "1"
    drain_timeout: float = 30.0
    model_config: dict = field(default_factory=dict)   # from --model-repo (config.pbtxt)
    log_level: str = "warning"


def check_key(cfg: ServeConfig, header: Optional[str]) -> bool:
    if cfg.api_key is None:
        return True
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    token = value.strip() if scheme.lower() == "bearer" else header.strip()
    return hmac.compare_digest(token.encode(), cfg.api_key.encode())


def build_app(client: EngineClient, cfg: ServeConfig) -> FastAPI:
    from .kserve_http import KServeHTTP
    from .openai_api import OpenAIServer
    app = FastAPI(title="irlm", docs_url=None, redoc_url=None, openapi_url=None)

    # A plain ASGI middleware, not @app.middleware("http"): that one (BaseHTTPMiddleware)
    # pipes every streamed chunk through an extra task and memory stream, which at hundreds of
    # concurrent SSE streams costs more than producing the chunks.
    app.add_middleware(_APIKeyMiddleware, cfg=cfg)
    app.include_router(OpenAIServer(client, cfg.served_model_name).router())
    app.include_router(KServeHTTP(client, cfg).router())

    @app.get("/health")
    async def health():
        if client.failure is not None:
            return JSONResponse({"status": "engine failed", "error": client.failure},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(client.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files(__package__).joinpath("playground.html").read_text("utf-8")

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, e: ServingError):
        if request.url.path.startswith("/v1/"):
            return JSONResponse(e.openai_body(), status_code=e.status)
        return JSONResponse({"error": e.message}, status_code=e.status)
    return app


class _APIKeyMiddleware:
    """``--api-key`` on every HTTP path but :data:`PUBLIC_PATHS`: 401 in the OpenAI error
    shape under ``/v1/``, ``{"error": ...}`` elsewhere."""

    def __init__(self, app, cfg: ServeConfig):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.cfg.api_key is None or \
                scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        value = headers.get(b"authorization") or headers.get(b"x-api-key")
        if check_key(self.cfg, value.decode("latin-1") if value else None):
            return await self.app(scope, receive, send)
        e = ServingError("missing or wrong API key (send Authorization: Bearer KEY)", 401)
        body = e.openai_body() if scope["path"].startswith("/v1/") else {"error": e.message}
        await JSONResponse(body, status_code=401)(scope, receive, send)


class _Server:
    """uvicorn without its own signal handling (we drain first)."""

    def __init__(self, app, cfg: ServeConfig):
        import uvicorn

        class Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

            def install_signal_handlers(self):       # older uvicorn
                pass
        self.server = Quiet(uvicorn.Config(app, host=cfg.host, port=cfg.port,
                                           log_level=cfg.log_level, access_log=False,
                                           timeout_graceful_shutdown=5,
                                           lifespan="off"))


async def serve_async(cfg: ServeConfig, *, on_ready: Optional[Callable[[], None]] = None,
                      client: Optional[EngineClient] = None) -> int:
    loop = asyncio.get_running_loop()
    grace = failure_grace()           # a bad setting fails before the engine loads
    if client is None:
        client = EngineClient(cfg.spec, max_queue=cfg.max_queue,
                              metrics=ServingMetrics(cfg.served_model_name))
        await loop.run_in_executor(None, client.start_process)
    client.attach(loop)
    http = _Server(build_app(client, cfg), cfg).server
    grpc_server = None
    watchdog = None
    try:
        if cfg.grpc_port is not None:
            from .kserve_grpc import start_grpc
            grpc_server = await start_grpc(client, cfg)
        stopping = asyncio.Event()

        async def drain():
            log.warning("irlm serve: draining %d requests", client.num_active)
            await client.drain(cfg.drain_timeout)
            http.should_exit = True
            stopping.set()

        def on_signal():
            if not client.draining:
                loop.create_task(drain())
            else:                                  # second signal: stop now
                http.force_exit = http.should_exit = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal)

        async def on_engine_failure():
            await client.failed.wait()
            # Every stream has its error by now; the grace lets the handlers write it (and
            # probes see the 503) before the listeners close.  uvicorn then still finishes
            # the responses under way.
            await asyncio.sleep(grace)
            http.should_exit = True
        watchdog = loop.create_task(on_engine_failure())
        serve_task = loop.create_task(http.serve())
        while not http.started and not serve_task.done():
            await asyncio.sleep(0.02)
        if serve_task.done() and client.failure is None:
            serve_task.result()
            raise ServingError(f"could not listen on {cfg.host}:{cfg.port}", 500)
        if on_ready and client.failure is None:
            on_ready()
        await serve_task
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
        if client.failure is not None:
            raise ServingError(client.failure, 500)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await loop.run_in_executor(None, client.shutdown)
    return 0


def event_loop_factory() -> Optional[Callable[[], asyncio.AbstractEventLoop]]:
    """uvloop's loop where it is installed (its socket writes, the bulk of streaming many
    small server-sent events, cost a fraction of asyncio's), else asyncio's.
    ``IRLM_SERVE_LOOP=asyncio`` picks asyncio's anyway."""
    import os
    if os.environ.get("IRLM_SERVE_LOOP", "auto") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def serve(cfg: ServeConfig, on_ready: Optional[Callable[[], None]] = None) -> int:
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(serve_async(cfg, on_ready=on_ready))
