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
            num_blocks = max(2, kv_cache_bytes // per_block)
        self.block_size = int(block_size)
        self.num_blocks = int(num_blocks)
        self.vocab_size = int(graph.outputs[0].type.shape[-1])
        tokens_range = graph.dims.get("tokens")
        self.max_num_tokens = tokens_range.max if tokens_range else None
        limit = self.num_blocks * self.block_size
        self.max_model_len = min(max_model_len or limit, limit)
        self.device = torch.device(device)
        self.kv_cache = torch.zeros(layers, self.num_blocks, two, block_size, kv_heads, head_dim,
                                    dtype=dtype, device=self.device)
        weights = graph.weights
        if self.device.type != "cpu":
            from .cuda_graphs import _to_device
            weights = _to_device(graph, graph.weights, self.device)
        self._interp = Interpreter(graph, weights, device=self.device)

    def step(self, batch: StepBatch) -> torch.Tensor:
        dev = self.device
        feeds = (batch.input_ids_on(dev), batch.positions.to(dev), batch.q_lens.to(dev),
                 batch.cached_lens.to(dev), batch.block_tables.to(dev), self.kv_cache)
        out = self._interp.run([feeds[i] for i in self._order]).outputs[0]
        return out.float()


def runner_for_engine(engine, *, device: str = "auto", num_blocks: Optional[int] = None):
    """The ModelRunner that serves a loaded engine on ``device`` (auto: cuda if present).
    A multi-rank engine (``irlm compile --tp/--pp``) runs all its ranks in the CPU simulator
    (:class:`~irlm.runtime.runners.ranks.RankRunner`); auto picks the CPU for it."""
    max_len = engine.config.get("max_model_len")
    if getattr(engine, "ranks", None):
        par = engine.parallel
        if device not in ("auto", "cpu"):
            raise IRLMError(f"{engine.path}: a multi-rank engine (tp {par.get('tp')}, pp "
                            f"{par.get('pp')}) runs only on the CPU simulator for now (there "
                            f"are no NCCL collectives yet); use --device cpu")
        from .ranks import RankRunner
        return RankRunner([e.graph for e in engine.ranks], num_blocks=num_blocks,
                          max_model_len=max_len)
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
    return GraphRunner(engine.graph, num_blocks=num_blocks, max_model_len=max_len, device=device)
