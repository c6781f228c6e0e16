"""``irlm serve ENGINE_DIR``: serve a compiled engine over the OpenAI API and Triton's KServe
v2 protocols (HTTP and gRPC), with Prometheus metrics.  The work is in :mod:`irlm.serving`."""
from __future__ import annotations

import argparse
import sys

from . import SUMMARIES
from ..errors import IRLMError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help=SUMMARIES["serve"],
        description="Serve a compiled engine. HTTP: OpenAI /v1/*, KServe v2 /v2/*, /metrics "
                    "and a playground at /. gRPC: Triton's GRPCInferenceService.")
    p.add_argument("engine", nargs="?", metavar="ENGINE_DIR",
                   help="engine directory (irlm compile -o ENGINE_DIR)")
    p.add_argument("--model-repo", metavar="DIR",
                   help="a Triton model repository whose config.pbtxt (TensorRT-LLM backend "
                        "parameters) names the engine and its settings")
    p.add_argument("--factory", metavar="MODULE:FN",
                   help="serve the irlm.runtime.LLM that FN() returns (MODULE or FILE.py); "
                        "for custom runners and benchmarks")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="gRPC port (default 8001; 0 or negative: no gRPC)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but health "
                        "(default: $IRLM_API_KEY if set)")
    p.add_argument("--served-model-name", default=None,
                   help="model name clients use (default: the engine directory's name)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests allowed to wait beyond the running batch before new ones get "
                        "429 / RESOURCE_EXHAUSTED (default 256)")
    p.add_argument("--max-num-tokens", type=int, default=None,
                   help="token budget of one engine step (default: min(512, the engine's))")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="most sequences in flight (default 64, or the model repo's)")
    p.add_argument("--kv-cache-fraction", type=float, default=None,
                   help="fraction of the GPU memory free after loading the weights given to "
                        "the KV cache (TensorRT-LLM's kv_cache_free_gpu_mem_fraction)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (overrides "
                   "--kv-cache-fraction)")
    p.add_argument("--policy", choices=("guaranteed-no-evict", "max-utilization"), default=None,
                   help="scheduler policy (default guaranteed-no-evict)")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable KV prefix reuse")
    p.add_argument("--async-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="overlap host work with the device's next step (default: on for a "
                        "GPU engine, off on a CPU; see docs/runtime.md)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for a CPU engine (default: the physical cores; each "
                        "rank of a multi-rank engine: its share of them)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight (default 30)")
    p.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from ..runtime.distributed.runner import is_multi_rank
    from ..serving import EngineSpec, ServeConfig, ServingError, serve
    from ..serving.model_repo import load_model_repo

    repo = load_model_repo(args.model_repo) if args.model_repo else None
    args.max_queue_default = args.max_queue is None
    if args.max_queue is None:
        args.max_queue = 256
    engine = args.engine or (repo.engine_dir if repo else None)
    if (engine is None) == (args.factory is None):
        raise IRLMError("give ENGINE_DIR (or --model-repo DIR) or --factory MODULE:FN")
    llm_kwargs = dict(repo.llm_kwargs) if repo else {}
    for flag, key in (("max_num_tokens", "max_num_tokens"), ("max_batch_size", "max_batch_size"),
                      ("policy", "policy")):
        if getattr(args, flag) is not None:
            llm_kwargs[key] = getattr(args, flag)
    if args.no_prefix_caching:
        llm_kwargs["enable_prefix_caching"] = False
    if args.async_decode is not None:
        llm_kwargs["async_decode"] = args.async_decode
    for name in ("max_num_tokens", "max_batch_size", "num_blocks", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise IRLMError(f"--{name.replace('_', '-')} {v}: must be at least 1")
    if args.max_queue < 0:
        raise IRLMError(f"--max-queue {args.max_queue}: must be at least 0")
    fraction = args.kv_cache_fraction
    if fraction is None and repo is not None:
        fraction = repo.kv_cache_fraction
    threads = args.threads
    if threads is None and args.device != "cuda" and engine is not None \
            and not is_multi_rank(engine):
        # (a multi-rank engine shares this host's cores out among its ranks itself)
        from ..runtime.runners.cpu import physical_cores
        threads = physical_cores()
    # The tokenizer's own thread pool would compete with the GEMMs' threads for the cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = EngineSpec(engine_dir=engine, factory=args.factory, device=args.device,
                      threads=threads,
                      num_blocks=args.num_blocks, kv_cache_fraction=fraction,
                      kv_tokens=repo.kv_tokens if repo else None, llm_kwargs=llm_kwargs)
    name = args.served_model_name or (repo.name if repo else None) or \
        (os.path.basename(os.path.normpath(engine)) if engine else "model")
    cfg = ServeConfig(spec, host=args.host, port=args.port,
                      grpc_port=args.grpc_port if args.grpc_port > 0 else None,
                      api_key=args.api_key or os.environ.get("IRLM_API_KEY"),
                      max_queue=(repo.max_queue if repo and repo.max_queue and
                                 args.max_queue_default else args.max_queue),
                      served_model_name=name,
                      drain_timeout=args.drain_timeout, log_level=args.log_level,
                      model_config=repo.config if repo else {})

    def ready():
        grpc = f", gRPC {cfg.host}:{cfg.grpc_port}" if cfg.grpc_port else ""
        print(f"irlm serve: {name} on http://{cfg.host}:{cfg.port}{grpc}", file=sys.stderr,
              flush=True)
    try:
        return serve(cfg, on_ready=ready)
    except ServingError as e:
        raise IRLMError(e.message) from None
