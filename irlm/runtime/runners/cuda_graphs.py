"""The CUDA executor: an inference-form graph on the GPU, decode steps as CUDA graphs.

Every op runs on the GPU: the ``llm`` ops that irlm has kernels for (paged attention, RMSNorm,
residual-add + RMSNorm, gated activations; :mod:`irlm.kernels`) run those kernels, the
quantized linears run the paths of lowering/quant_linears.py (int8 GEMV, tinygemm int4,
cuBLASLt fp8 / int8 GEMMs), and every other op runs its registry reference implementation on
CUDA tensors (torch: cuBLAS for the linears, views for reshapes).  Which kernel runs each op is lowering's kernel selection
(:data:`irlm.lowering.kernel_selection.KERNELS`).

Pure decode steps (one new token per request) are captured as CUDA graphs per
(batch bucket, context bucket) and replayed: the host then spends one launch per step instead
of one per op.  Padding rows of a bucket write into a scratch block that the runtime never
hands out.  Steps with prompt tokens of up to 512 tokens run as piecewise graphs (the
token-wise ops captured per token bucket, attention eager: prefill_graphs.py); larger ones
run eagerly, where the kernels outlast the host's launches.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from irlm.errors import IRLMError
from irlm.interpreter import Interpreter
from irlm.ir import Graph
from irlm.lowering.kernel_selection import KERNELS
from irlm.ops.llm import KV_CACHE_INPUT, PAGED_ATTENTION_OPS, KVCacheLayout
from irlm.weights import WeightStore

from .interpreter import REQUIRED_INPUTS
from .prefill_graphs import PiecewisePrefill
from ..kv_cache import check_kv_pool, kv_block_bytes
from ..model_runner import StepBatch, fill_device_inputs

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


# ----- the runner ------------------------------------------------------------------------------

class CudaGraphRunner:
    """A :class:`~irlm.runtime.model_runner.ModelRunner` on one CUDA device."""

    supports_device_inputs = True     # fills StepBatch.device_inputs on the device

    def __init__(self, graph: Graph, *, num_blocks: Optional[int] = None,
                 max_model_len: Optional[int] = None, gpu_memory_fraction: float = 0.95,
                 device: str = "cuda", cuda_graphs: bool = True, weights=None,
                 collectives: bool = False, fuse_rope: Optional[bool] = None):
        """``collectives``: the graph is one rank of a multi-rank engine and its ``dist`` ops
        get their implementation from the caller (irlm.runtime.distributed, over NCCL).
        ``fuse_rope``: run each layer's two ropes and cache write as one kernel
        (irlm.lowering.rope_attention, on a copy of the graph); None reads IRLM_FUSE_ROPE."""
        dist = next((op for op in graph.ops if op.dialect == "dist"), None)
        if dist is not None and not collectives:
            raise IRLMError(f"graph @{graph.name} is one rank of a multi-rank (tp/pp) engine "
                            f"({dist.describe()}): run the whole engine (LLM.from_engine / "
                            f"irlm run start one process per rank), not one rank alone")
        if not torch.cuda.is_available():
            raise IRLMError("the CUDA executor needs a CUDA GPU")
        names = [v.name for v in graph.inputs]
        if sorted(names) != sorted(REQUIRED_INPUTS) or len(graph.outputs) != 1:
            raise IRLMError(f"graph @{graph.name} is not in the inference form; compile it "
                            f"with substitute-attention")
        _check_attention_head_dims(graph)
        from irlm.kernels.ops import fold_splits_enabled
        from irlm.lowering.rope_attention import fuse_rope_attention, fusion_enabled
        try:
            fold_splits_enabled()       # a bad IRLM_FOLD_SPLITS is refused here, not mid-step
        except ValueError as e:
            raise IRLMError(str(e)) from None
        #: the layers whose ropes run inside the attention's cache write
        self.rope_fusions = 0
        if fuse_rope if fuse_rope is not None else fusion_enabled():
            graph = graph.clone()
            self.rope_fusions = fuse_rope_attention(graph)
        self.graph = graph
        self.device = torch.device(device)
        self._order = [REQUIRED_INPUTS.index(n) for n in names]
        store = weights if weights is not None else graph.weights
        self.weights = _to_device(graph, store, self.device)
        # quantized linears: kernel paths chosen and their weight layouts converted once, here
        # (before the KV pool is sized from the memory left)
        from irlm.lowering.dense_linears import DenseLinearPlan
        from irlm.lowering.quant_linears import QuantLinearPlan
        t0 = time.perf_counter()
        self.quant_plan = QuantLinearPlan().prepare(graph, self.weights, self.device)
        # float linears: irlm's GEMV where timing it against cuBLAS at 1-8 rows says it wins
        self.dense_plan = DenseLinearPlan().prepare(graph, self.weights, self.device)
        #: seconds the linears' paths took to choose at load (checks, compiles, timing)
        self.linear_plans_s = time.perf_counter() - t0
        cache_t = graph.inputs[names.index(KV_CACHE_INPUT)].type
        layers, _, two, bs, kv_heads, head_dim = KVCacheLayout.of(cache_t)
        # the plan's cache type: an int8 / fp8 cache (--kv-cache-dtype) takes one byte an
        # element, so the same memory holds twice the blocks of a bf16 one
        dtype = cache_t.dtype.torch
        tokens_range = graph.dims.get("tokens")
        self.max_num_tokens = tokens_range.max if tokens_range else None
        # prompt steps of up to 512 tokens as piecewise graphs (prefill_graphs.py); a rank of
        # a multi-rank engine keeps them eager (its collectives were not tested under them)
        self._prefill = PiecewisePrefill(self) if cuda_graphs and not collectives else None
        #: False runs prompt steps op by op (benchmarks compare the two)
        self.piecewise_prefill = self._prefill is not None
        if num_blocks is None:
            # Reserve the planned activation memory of the largest step (plus room for kernel
            # workspaces and CUDA graph pools), then give the KV pool a fraction of the rest.
            from irlm.lowering.memory_plan import plan_activation_memory
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()    # what torch's allocator caches (e.g. of a calibration)
            per_block = kv_block_bytes(layers, bs, kv_heads, head_dim, dtype)
            tokens = self.max_num_tokens or 8192
            plan = plan_activation_memory(graph, {
                "tokens": tokens, "reqs": min(DECODE_BUCKETS[-1], tokens),
                "max_blocks": -(-(max_model_len or 8192) // bs), "cache_blocks": 1})
            self.activation_bytes = plan.arena_bytes
            # the prompt graphs' static buffers (every bucket) and their pool's temporaries
            prefill = 0
            if self._prefill is not None and self._prefill.max_tokens:
                top = self._prefill.max_tokens
                prefill = sum(self._prefill.static_bytes(b) for b in self._prefill.buckets)
                prefill += plan_activation_memory(graph, {
                    "tokens": top, "reqs": min(DECODE_BUCKETS[-1], top),
                    "max_blocks": -(-(max_model_len or 8192) // bs),
                    "cache_blocks": 1}).arena_bytes
            self.prefill_graph_bytes = prefill
            free, _ = torch.cuda.mem_get_info(self.device)
            usable = (free - int(1.5 * plan.arena_bytes) - prefill - (1 << 30)) \
                * gpu_memory_fraction
            num_blocks = int(usable // per_block) - 1
            if num_blocks < 1:
                raise IRLMError(f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB "
                                f"free, activations need {plan.arena_bytes / 2**30:.1f} GiB "
                                f"at {tokens} tokens per step")
        self.block_size = int(bs)
        self.num_blocks = check_kv_pool(cache_t.shape, dtype, num_blocks, self.device,
                                        f"graph @{graph.name}")
        self.vocab_size = int(graph.outputs[0].type.shape[-1])
        limit = self.num_blocks * self.block_size
        self.max_model_len = min(max_model_len or limit, limit)
        # one more block than the runtime sees: the scratch block of padding rows
        self.kv_cache = torch.zeros(layers, self.num_blocks + 1, two, bs, kv_heads, head_dim,
                                    dtype=dtype, device=self.device)
        self._scratch = self.num_blocks
        # Constants live on the device from the start: a CUDA graph cannot copy from the host.
        constants = {id(op.attrs["value"]): op.attrs["value"].to(self.device)
                     for op in graph.ops if op.name == "core.constant"}
        overrides = dict(KERNELS)
        overrides.update(self.quant_plan.overrides())
        overrides.update(self.dense_plan.overrides())
        overrides["core.constant"] = lambda ctx, x, a: [constants[id(a["value"])]]
        self._interp = Interpreter(graph, self.weights, check_types=False, overrides=overrides,
                                   device=self.device)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None
        self.stats = {"graph_replays": 0, "graph_captures": 0, "eager_steps": 0,
                      "prefill_replays": 0, "prefill_captures": 0}

    @property
    def prefill_graphs(self) -> Optional[PiecewisePrefill]:
        """The piecewise prompt graphs (None on a rank of a multi-rank engine or without CUDA
        graphs); ``.why`` says why a graph cannot be cut (then prompt steps run op by op)."""
        return self._prefill

    def release_graphs(self) -> None:
        """Destroy the captured decode graphs (the runner captures again on its next step).
        A graph that captured NCCL calls holds its communicator (NCCL reclaims captured work
        when the graph is destroyed), so a rank releases them before leaving its process group:
        on the H100 rank 0, graphs alive, waited out torch's 120 s abort timeout while its
        worker, graphs gone, aborted in 0.5 s (docs/distributed.md)."""
        if self._graphs or (self._prefill is not None and self._prefill.captured):
            torch.cuda.synchronize(self.device)
            self._graphs.clear()
            self._pool = None
            if self._prefill is not None:
                self._prefill.release()

    def linear_tactics(self) -> dict[str, str]:
        """What load-time timing chose for the linears of a few rows (1, 2, 4, 8: the small
        decode graphs), per row count and weight shape: the float linears' cuBLAS vs irlm's
        GEMV, the quantized ones' default path vs irlm's GEMV, with each candidate's time
        (lowering/tactics.py)."""
        return {**self.dense_plan.summary(), **self.quant_plan.tactics_summary()}

    def connect_collectives(self, kernels: dict) -> None:
        """Run the graph's ``dist`` ops through ``kernels`` (a worker's process group)."""
        self._interp.overrides.update(kernels)

    # ----- one step ----------------------------------------------------------------------------
    def step(self, batch: StepBatch) -> torch.Tensor:
        reqs = len(batch)
        decode = batch.num_tokens == reqs
        if decode and self.cuda_graphs and reqs <= DECODE_BUCKETS[-1]:
            return self._replay(batch)
        return self._eager(batch, decode)

    def _feeds(self, ids, pos, q_lens, cached, tables):
        feeds = (ids, pos, q_lens, cached, tables, self.kv_cache)
        return [feeds[i] for i in self._order]

    def _eager(self, batch: StepBatch, decode: bool) -> torch.Tensor:
        dev = self.device
        q_lens = batch.q_lens.to(dev, non_blocking=True)
        from irlm.kernels.ops import FreshSuffix
        max_q = int(batch.q_lens.max())
        # prompts with no cached prefix attend over their own k/v (ops.paged_attention)
        fresh = None if decode else FreshSuffix.of(batch.q_lens.tolist(),
                                                   batch.cached_lens.tolist())
        state = {"decode": decode, "fresh": fresh,
                 "max_q_len": max_q,
                 "max_kv_len": int((batch.cached_lens + batch.q_lens).max()),
                 "cu_q_lens": _cu(q_lens)}
        feeds = self._feeds(
            batch.input_ids_on(dev), batch.positions.to(dev, non_blocking=True),
            q_lens, batch.cached_lens.to(dev, non_blocking=True),
            batch.block_tables.to(dev, non_blocking=True))
        tokens = batch.num_tokens
        if not decode and self.cuda_graphs and self.piecewise_prefill \
                and self._prefill is not None and tokens <= self._prefill.max_tokens:
            return self._prefill.run(feeds, state, tokens).float()
        out = self._interp.run(feeds, state=state).outputs[0]
        self.stats["eager_steps"] += 1
        return out.float()

    def _replay(self, batch: StepBatch) -> torch.Tensor:
        reqs = len(batch)
        bucket = next(b for b in DECODE_BUCKETS if b >= reqs)
        ctx = self._context_bucket(int((batch.cached_lens + 1).max()))
        key = (bucket, ctx)
        entry = self._graphs.get(key) or self._capture(bucket, ctx)
        graph, bufs, out, _state = entry
        ids, pos, q_lens, cached, tables = bufs
        # blocks past the context bucket cannot hold this step's positions
        width = min(batch.block_tables.shape[1], tables.shape[1])
        ids[:reqs].copy_(batch.input_ids, non_blocking=True)
        if batch.device_inputs is not None:    # the previous step's tokens, still on the GPU
            fill_device_inputs(ids, batch.device_inputs)
        pos[:reqs].copy_(batch.positions, non_blocking=True)
        cached[:reqs].copy_(batch.cached_lens, non_blocking=True)
        tables[:reqs, :width].copy_(batch.block_tables[:, :width], non_blocking=True)
        if reqs < bucket:  # padding rows: position 0 of the scratch block
            ids[reqs:].zero_()
            pos[reqs:].zero_()
            cached[reqs:].zero_()
            tables[reqs:].fill_(self._scratch)
        graph.replay()
        self.stats["graph_replays"] += 1
        return out[:reqs].float()

    def _context_bucket(self, kv_len: int) -> int:
        """Decode graphs are captured per power-of-two context bound (at least 256)."""
        ctx = 256
        while ctx < kv_len:
            ctx *= 2
        return min(ctx, _round_up(self.max_model_len, self.block_size))

    def capture(self, batch_sizes=DECODE_BUCKETS, max_context: int = 256) -> int:
        """Capture the decode graphs of these batch buckets ahead of time (engine warm-up), for
        contexts up to ``max_context`` tokens; returns how many were captured now."""
        ctx = self._context_bucket(max_context)
        todo = [b for b in batch_sizes if (b, ctx) not in self._graphs]
        for b in todo:
            self._capture(b, ctx)
        return len(todo)

    def _capture(self, bucket: int, ctx: int):
        dev = self.device
        max_blocks = -(-ctx // self.block_size)
        ids = torch.zeros(bucket, dtype=torch.int64, device=dev)
        pos = torch.zeros(bucket, dtype=torch.int64, device=dev)
        q_lens = torch.ones(bucket, dtype=torch.int32, device=dev)
        cached = torch.zeros(bucket, dtype=torch.int32, device=dev)
        tables = torch.full((bucket, max_blocks), self._scratch, dtype=torch.int32, device=dev)
        state = {"decode": True, "max_q_len": 1, "max_kv_len": ctx, "cu_q_lens": _cu(q_lens)}
        feeds = self._feeds(ids, pos, q_lens, cached, tables)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):          # warm up: compile kernels, create handles
            for _ in range(2):
                self._interp.run(feeds, state=state)
        torch.cuda.current_stream(dev).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._interp.run(feeds, state=state).outputs[0]
        # The graph reads every tensor it was captured with by address: keep them (the state's
        # cu_q_lens and alibi slopes too) alive as long as the graph.
        entry = (graph, (ids, pos, q_lens, cached, tables), out, state)
        self._graphs[(bucket, ctx)] = entry
        self.stats["graph_captures"] += 1
        return entry


def _check_attention_head_dims(graph: Graph) -> None:
    """Refuse, at load, an engine whose attention has no kernel (rather than at its first
    step)."""
    from irlm.kernels.ops import ATTENTION_HEAD_DIMS
    for op in graph.ops:
        if op.name in PAGED_ATTENTION_OPS:
            d = op.operands[0].type.shape[-1]
            if d not in ATTENTION_HEAD_DIMS:
                raise IRLMError(f"graph @{graph.name}: {op.describe()} has head_dim {d}, which "
                                f"the GPU attention kernels do not take (they take "
                                f"{', '.join(map(str, ATTENTION_HEAD_DIMS))}); run this engine "
                                f"on the CPU (device='cpu')")


def _cu(q_lens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(q_lens.shape[0] + 1, dtype=torch.int32, device=q_lens.device)
    out[1:] = torch.cumsum(q_lens, 0, dtype=torch.int32)
    return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _to_device(graph: Graph, store, device) -> WeightStore:
    """Every weight the graph reads, on the device, in its declared dtype."""
    out = WeightStore()
    for op in graph.params():
        name = op.attrs["name"]
        if name in out:
            continue
        t = store.get(name)
        out.add_tensor(name, t.to(device=device, dtype=op.results[0].type.dtype.torch))
    if hasattr(store, "drop_cache"):
        store.drop_cache()      # the source copies (e.g. unfused weights) are not needed
    return out
