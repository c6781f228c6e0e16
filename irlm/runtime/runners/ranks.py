"""A :class:`ModelRunner` over the per-rank graphs of a tensor- or pipeline-parallel engine.

On the CPU all ranks run together in the multi-rank simulator
(:func:`irlm.runtime.distributed.run_ranks`): one thread per rank, each with the reference interpreter
and its own paged KV pool.  A pool's shape comes from its rank's graph (a tp rank caches its kv
heads, a pipeline stage its layers), but every pool has the same number of blocks, because the
runtime's one block manager hands out block tables that all ranks index.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from irlm.errors import IRLMError
from irlm.ir import Graph

from irlm.ops.llm import KV_CACHE_INPUT, KVCacheLayout

from .interpreter import REQUIRED_INPUTS
from ..kv_cache import check_kv_pool
from ..model_runner import StepBatch


class RankRunner:
    """Runs ``graphs`` (rank order) step by step; the logits are the last rank's output 0
    (every tp rank holds the gathered logits; the last pipeline stage is the one with them)."""

    def __init__(self, graphs: Sequence[Graph], *, num_blocks: Optional[int] = None,
                 kv_cache_bytes: int = 512 << 20, max_model_len: Optional[int] = None,
                 tp: Optional[int] = None):
        """``tp``: the tp size of a tp x pp engine (rank r = tp rank r % tp of stage r // tp);
        the logits are then tp rank 0 of the last stage's."""
        if not graphs:
            raise IRLMError("a multi-rank runner needs at least one rank graph")
        self.graphs = list(graphs)
        self.tp = tp
        self._logits_rank = len(self.graphs) - (tp or 1)
        self._orders, shapes = [], []
        for r, g in enumerate(self.graphs):
            names = [v.name for v in g.inputs]
            if sorted(names) != sorted(REQUIRED_INPUTS):
                raise IRLMError(f"rank {r}: graph @{g.name} is not in the inference form (inputs "
                                f"{', '.join('%' + n for n in names)}; expected "
                                f"{', '.join('%' + n for n in REQUIRED_INPUTS)})")
            self._orders.append([REQUIRED_INPUTS.index(n) for n in names])
            shapes.append(g.inputs[names.index(KV_CACHE_INPUT)].type)
        last = self.graphs[self._logits_rank]
        self.block_size = int(KVCacheLayout.of(shapes[0]).block_size)
        if any(int(KVCacheLayout.of(t).block_size) != self.block_size for t in shapes):
            raise IRLMError("the ranks' KV caches have different block sizes")
        if num_blocks is None:
            # the budget is per rank, like a GPU's memory; the tightest rank decides
            per_block = max(KVCacheLayout.of(t).block_bytes(t.dtype.torch.itemsize)
                            for t in shapes)
            num_blocks = max(2, kv_cache_bytes // max(per_block, 1))
        for r, t in enumerate(shapes):     # all ranks live in this one process
            check_kv_pool(t.shape, t.dtype.torch, num_blocks, torch.device("cpu"),
                          f"rank {r}: graph @{self.graphs[r].name}")
        self.num_blocks = num_blocks
        self.vocab_size = int(last.outputs[0].type.shape[-1])
        tokens_range = last.dims.get("tokens")
        self.max_num_tokens = tokens_range.max if tokens_range else None
        limit = self.num_blocks * self.block_size
        self.max_model_len = min(max_model_len or limit, limit)
        self.kv_caches = [torch.zeros(int(t.shape[0]), self.num_blocks, *map(int, t.shape[2:]),
                                      dtype=t.dtype.torch) for t in shapes]

    def step(self, batch: StepBatch) -> torch.Tensor:
        from irlm.runtime.distributed.simulator import run_ranks
        feeds = [(batch.input_ids, batch.positions, batch.q_lens, batch.cached_lens,
                  batch.block_tables, cache) for cache in self.kv_caches]
        inputs = [[f[i] for i in order] for f, order in zip(feeds, self._orders)]
        outs = run_ranks(self.graphs, inputs, tp=self.tp)
        return outs[self._logits_rank][0].float()
