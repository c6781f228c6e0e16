"""A :class:`ModelRunner` over a compiled inference-form graph.

The graph (``plan.irlm`` of an engine, or the output of ``substitute-attention``) takes the
inputs named in :data:`irlm.ops.llm.INFERENCE_INPUTS`; this runner owns
the KV pool those graphs read and write, and runs one step per call.  On the CPU every op runs
its registry reference implementation through the interpreter: slow, but exactly the
semantics that the GPU kernels are tested against.
"""
from __future__ import annotations

from typing import Optional

import torch

from irlm.errors import IRLMError
from irlm.interpreter import Interpreter
from irlm.ir import Graph
from irlm.ops.llm import INFERENCE_INPUTS, KV_CACHE_INPUT, KVCacheLayout

from ..kv_cache import check_kv_pool
from ..model_runner import StepBatch

#: the inputs this runner feeds, in order: the inference form's (irlm.ops.llm)
REQUIRED_INPUTS = INFERENCE_INPUTS


class GraphRunner:
    """Runs an inference-form graph step by step, owning its paged KV pool."""

    supports_device_inputs = True     # fills StepBatch.device_inputs itself (async decode)

    def __init__(self, graph: Graph, *, num_blocks: Optional[int] = None,
                 kv_cache_bytes: int = 512 << 20, max_model_len: Optional[int] = None,
                 device: str = "cpu"):
        names = [v.name for v in graph.inputs]
        missing = [n for n in REQUIRED_INPUTS if n not in names]
        if missing or len(graph.outputs) != 1:
            raise IRLMError(f"graph @{graph.name} is not in the inference form (missing inputs: "
                            f"{', '.join(missing) or 'none'}; {len(graph.outputs)} outputs); "
                            f"compile it with substitute-attention")
        self.graph = graph
        self._order = [REQUIRED_INPUTS.index(n) if n in REQUIRED_INPUTS else None for n in names]
        if None in self._order:
            extra = [n for n in names if n not in REQUIRED_INPUTS]
            raise IRLMError(f"graph @{graph.name} has inputs the runtime cannot feed: "
                            f"{', '.join('%' + n for n in extra)}")
        cache_t = graph.inputs[names.index(KV_CACHE_INPUT)].type
        layers, _, two, block_size, kv_heads, head_dim = KVCacheLayout.of(cache_t)
        dtype = cache_t.dtype.torch
        per_block = KVCacheLayout.of(cache_t).block_bytes(dtype.itemsize)
        if num_blocks is None:
            num_blocks = max(2, kv_cache_bytes // max(per_block, 1))
        self.device = torch.device(device)
        self.block_size = int(block_size)
        self.num_blocks = check_kv_pool(cache_t.shape, dtype, num_blocks, self.device,
                                        f"graph @{graph.name}")
        self.vocab_size = int(graph.outputs[0].type.shape[-1])
        tokens_range = graph.dims.get("tokens")
        self.max_num_tokens = tokens_range.max if tokens_range else None
        limit = self.num_blocks * self.block_size
        self.max_model_len = min(max_model_len or limit, limit)
        self.kv_cache = torch.zeros(layers, self.num_blocks, two, block_size, kv_heads, head_dim,
                                    dtype=dtype, device=self.device)
        weights = graph.weights
        if self.device.type != "cpu":
            from .cuda_graphs import _to_device
            weights = _to_device(graph, graph.weights, self.device)
        self._interp = Interpreter(graph, weights, device=self.device)

    def connect_collectives(self, kernels: dict) -> None:
        """Run the graph's ``dist`` ops through ``kernels`` (a worker's process group)."""
        self._interp.overrides.update(kernels)

    def step(self, batch: StepBatch) -> torch.Tensor:
        dev = self.device
        feeds = (batch.input_ids_on(dev), batch.positions.to(dev), batch.q_lens.to(dev),
                 batch.cached_lens.to(dev), batch.block_tables.to(dev), self.kv_cache)
        out = self._interp.run([feeds[i] for i in self._order]).outputs[0]
        return out.float()


CPU_EXECUTORS = ("fast", "reference")


def cpu_executor(executor: Optional[str] = None) -> str:
    """The CPU executor asked for: ``executor``, else ``IRLM_CPU_EXECUTOR``, else ``fast``."""
    import os
    executor = executor or os.environ.get("IRLM_CPU_EXECUTOR") or "fast"
    if executor not in CPU_EXECUTORS:
        raise IRLMError(f"CPU executor {executor!r} (IRLM_CPU_EXECUTOR / executor=): expected "
                        f"one of {', '.join(CPU_EXECUTORS)}")
    return executor


def runner_for_engine(engine, *, device: str = "auto", num_blocks: Optional[int] = None,
                      parallel: str = "processes", executor: Optional[str] = None,
                      threads: Optional[int] = None):
    """The ModelRunner that serves a loaded engine on ``device`` (auto: cuda if present).
    A multi-rank engine (``irlm compile --tp/--pp``) runs one process per rank over
    torch.distributed (:class:`~irlm.runtime.distributed.DistributedRunner`), or with
    ``parallel="simulator"`` all its ranks in threads of this process on the CPU
    (:class:`~irlm.runtime.runners.ranks.RankRunner`, a test oracle).

    On the CPU, ``executor`` ``fast`` (the default; :mod:`.cpu`) binds every op once
    and runs torch's CPU kernels; ``reference`` runs the interpreter (slow; the oracle, for
    debugging).  The environment variable ``IRLM_CPU_EXECUTOR`` sets the default.
    ``threads``: torch's CPU threads for a CPU engine (default: leave torch's setting; the
    CLI defaults to the physical cores)."""
    executor = cpu_executor(executor)
    max_len = engine.config.get("max_model_len")
    multi_rank = bool(getattr(engine, "ranks", None) or getattr(engine, "parallel", None))
    on_gpu = torch.cuda.is_available() and (
        device == "cuda" or (device == "auto" and not (multi_rank and parallel == "simulator")))
    if on_gpu and engine.config.get("dtype") == "f32":
        import warnings
        warnings.warn(f"{engine.path}: this engine computes in f32, which on a GPU runs off "
                      f"the tensor cores' bf16 rate and past irlm's quantized kernels; compile "
                      f"it in bf16 for the GPU (--device cuda, which makes bf16 the default "
                      f"for a model file; a model object in bf16)", RuntimeWarning,
                      stacklevel=2)
    if multi_rank:
        if parallel not in ("processes", "simulator"):
            raise IRLMError(f"parallel '{parallel}': expected processes or simulator")
        if parallel == "processes":
            from ..distributed import DistributedRunner
            return DistributedRunner(engine.path, device=device, num_blocks=num_blocks,
                                     max_model_len=max_len, threads=threads,
                                     executor=executor)
        par = engine.parallel
        if device not in ("auto", "cpu"):
            raise IRLMError(f"{engine.path}: the multi-rank simulator (tp {par.get('tp')}, pp "
                            f"{par.get('pp')}) runs on the CPU only; use device cpu or "
                            f"parallel processes")
        from .ranks import RankRunner
        return RankRunner([e.graph for e in engine.ranks], num_blocks=num_blocks,
                          max_model_len=max_len, tp=int(par.get("tp", 1)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise IRLMError("--device cuda: no CUDA GPU is available here")
    if device == "cuda":
        try:
            from .cuda_graphs import CudaGraphRunner
        except ImportError:
            CudaGraphRunner = None
        if CudaGraphRunner is not None:
            return CudaGraphRunner(engine.graph, num_blocks=num_blocks, max_model_len=max_len)
    if device == "cpu" and executor == "fast":
        from .cpu import CpuGraphRunner
        return CpuGraphRunner(engine.graph, num_blocks=num_blocks, max_model_len=max_len,
                              linear_dtype=engine.config.get("cpu_linear"), threads=threads)
    if threads is not None and device == "cpu":
        from .cpu import set_threads
        set_threads(threads)
    return GraphRunner(engine.graph, num_blocks=num_blocks, max_model_len=max_len, device=device)
