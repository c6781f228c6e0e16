"""One rank of a multi-rank engine in its own process: its shard, its communicator, its runner.

Every rank (the scheduler's process is rank 0) builds a :class:`RankWorker` the same way:

1. load its shard (:func:`irlm.lowering.engine_format.load_rank`: refused unless the top-level
   manifest lists that rank's engine.json with this checksum);
2. join the process group (gloo on the CPU, NCCL on GPUs) and create the tp groups;
3. build the executor of its graph (the reference interpreter on the CPU, the CUDA executor
   with its decode CUDA graphs on a GPU) with the ``dist`` ops running through
   :class:`~irlm.runtime.distributed.comm.TorchComm`;
4. agree with the others on one KV pool size (the runtime's one block manager hands out block
   tables that every rank indexes).

Then it runs whatever step batch rank 0 publishes.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from irlm.runtime.distributed.simulator import DistributedError

from ..model_runner import StepBatch, describe_executor
from .comm import (Layout, TorchComm, configure_nccl_env, configure_shared_gpu_nccl_env,
                   dist_kernels, make_tp_groups)


def load_shard(engine_dir, rank: int):
    from irlm.lowering.engine_format import load_rank
    return load_rank(engine_dir, rank)


def build_runner(graph, layout: Layout, device: torch.device, *, num_blocks: Optional[int],
                 max_model_len: Optional[int], kv_cache_bytes: int,
                 linear_dtype: Optional[str] = None, executor: Optional[str] = None):
    """The executor of this rank's graph, its ``dist`` ops not yet connected (see
    :meth:`RankWorker.connect`).  A pipeline stage before the last returns what it sends; the
    sends are what matters, so the executor keeps only its first output (the executors run
    every op of the graph, used or not).  On the CPU: the CPU executor, or the reference
    interpreter where ``executor`` (IRLM_CPU_EXECUTOR) says ``reference``."""
    if len(graph.outputs) > 1:
        graph.set_outputs([graph.outputs[0]])
    if device.type == "cuda":
        from ..runners.cuda_graphs import CudaGraphRunner
        return CudaGraphRunner(graph, num_blocks=num_blocks, max_model_len=max_model_len,
                               device=str(device), collectives=True)
    from ..runners.interpreter import GraphRunner, cpu_executor
    if cpu_executor(executor) == "fast":
        from ..runners.cpu import CpuGraphRunner
        return CpuGraphRunner(graph, num_blocks=num_blocks, max_model_len=max_model_len,
                              kv_cache_bytes=kv_cache_bytes, linear_dtype=linear_dtype,
                              collectives=True)
    return GraphRunner(graph, num_blocks=num_blocks, max_model_len=max_model_len,
                       kv_cache_bytes=kv_cache_bytes, device=str(device))


def resize_pool(runner, num_blocks: int, max_model_len: Optional[int]) -> None:
    """Give ``runner`` a KV pool of ``num_blocks`` blocks (all ranks use the smallest one);
    before any step, so nothing in the pool is lost."""
    if runner.num_blocks == num_blocks:
        return
    old = runner.kv_cache
    extra = 1 if hasattr(runner, "_scratch") else 0        # the CUDA executor's scratch block
    shape = (old.shape[0], num_blocks + extra) + tuple(old.shape[2:])
    runner.kv_cache = None
    del old
    runner.kv_cache = torch.zeros(shape, dtype=_dtype_of(runner), device=runner.device)
    if extra:
        runner._scratch = num_blocks
    runner.num_blocks = num_blocks
    limit = num_blocks * runner.block_size
    runner.max_model_len = min(max_model_len or limit, limit)


def _dtype_of(runner):
    from irlm.ops.llm import kv_cache_input
    return kv_cache_input(runner.graph).type.dtype.torch


class RankWorker:
    """This process's rank: shard, process group membership, executor, step."""

    def __init__(self, engine_dir, layout: Layout, device: torch.device, *,
                 num_blocks: Optional[int] = None, max_model_len: Optional[int] = None,
                 kv_cache_bytes: int = 512 << 20, shared_gpu: bool = False,
                 threads: Optional[int] = None, executor: Optional[str] = None):
        self.layout, self.device = layout, device
        if threads is not None and device.type == "cpu":
            from ..runners.cpu import set_threads
            set_threads(threads)
        self.shared_gpu = shared_gpu
        self.engine = load_shard(engine_dir, layout.rank)
        cfg = self.engine.config
        if (cfg.get("tp_rank"), cfg.get("pp_stage")) != (layout.tp_rank, layout.stage):
            raise DistributedError(f"{engine_dir}: rank {layout.rank}'s engine says tp rank "
                                   f"{cfg.get('tp_rank')}, stage {cfg.get('pp_stage')}; the "
                                   f"layout says tp rank {layout.tp_rank}, stage "
                                   f"{layout.stage}")
        self.max_model_len = max_model_len or cfg.get("max_model_len")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.runner = build_runner(self.engine.graph, layout, device, num_blocks=num_blocks,
                                   max_model_len=self.max_model_len,
                                   kv_cache_bytes=kv_cache_bytes,
                                   linear_dtype=cfg.get("cpu_linear"), executor=executor)
        self.comm: Optional[TorchComm] = None
        self.steps = 0
        # the logits' width (the last stage's vocab): rank 0 learns it from that rank's info
        self.vocab_size = self.runner.vocab_size

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def connect(self, store, timeout: float) -> None:
        """Join the process group on ``store`` and wire the graph's ``dist`` ops to it."""
        lay = self.layout
        if self.backend == "nccl":
            configure_nccl_env()
            if self.shared_gpu:
                configure_shared_gpu_nccl_env(lay.rank)
        if not dist.is_initialized():
            kwargs = {"device_id": self.device} if self.backend == "nccl" else {}
            dist.init_process_group(self.backend, store=store, rank=lay.rank,
                                    world_size=lay.world_size, timeout=timedelta(seconds=timeout),
                                    **kwargs)
        elif (dist.get_rank(), dist.get_world_size()) != (lay.rank, lay.world_size):
            raise DistributedError(f"this process is already rank {dist.get_rank()} of a "
                                   f"process group of {dist.get_world_size()}; the engine "
                                   f"needs rank {lay.rank} of {lay.world_size}")
        self.comm = TorchComm(lay, make_tp_groups(lay))
        self.runner.connect_collectives(dist_kernels(self.comm, self.device))

    def info(self) -> dict:
        """What rank 0 needs to know of this rank before the first step."""
        r = self.runner
        return {"executor": describe_executor(r),
                "num_blocks": r.num_blocks, "block_size": r.block_size,
                "vocab_size": r.vocab_size, "max_num_tokens": r.max_num_tokens,
                "max_model_len": r.max_model_len}

    def step(self, batch: StepBatch) -> Optional[torch.Tensor]:
        """Run this rank's part of the step; the logits on rank 0 (None elsewhere).

        With pipeline stages, the batch's rows are cut into ``pp`` micro-batches that every
        rank runs in order: while stage s+1 works on micro-batch i, stage s works on i+1, so
        the stages overlap instead of waiting for each other for the whole step.  Rows are
        independent (each its own sequence and KV blocks), so the logits are the same."""
        lay = self.layout
        parts = split_rows(batch, lay.pp) if lay.pp > 1 else [batch]
        outs = [self.runner.step(part) for part in parts]
        self.steps += 1
        if lay.rank != lay.logits_rank:        # a stage's output is what it sent
            out = None
        else:
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if lay.logits_rank == 0:
            return out if lay.rank == 0 else None
        if lay.rank == lay.logits_rank:
            dist.send(out.contiguous(), 0)
            return None
        if lay.rank == 0:
            logits = torch.empty(len(batch), self.vocab_size, dtype=torch.float32,
                                 device=self.device)
            dist.recv(logits, lay.logits_rank)
            return logits
        return None


def split_rows(batch: StepBatch, parts: int) -> list[StepBatch]:
    """``batch`` cut into up to ``parts`` micro-batches of consecutive rows (as even in tokens
    as the rows allow); every rank cuts a batch the same way."""
    rows = len(batch)
    parts = min(parts, rows)
    if parts <= 1:
        return [batch]
    q = batch.q_lens.to(torch.int64)
    ends = torch.cumsum(q, 0)
    total = int(ends[-1])
    cuts, start = [], 0
    for k in range(1, parts):
        # the first row boundary at or past k/parts of the tokens, leaving a row for each rest
        want = total * k // parts
        i = int(torch.searchsorted(ends, torch.tensor(want), right=False)) + 1
        i = max(i, start + 1)
        i = min(i, rows - (parts - k))
        cuts.append(i)
        start = i
    bounds = [0] + cuts + [rows]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        t0 = int(ends[a - 1]) if a else 0
        t1 = int(ends[b - 1])
        width = batch.block_tables.shape[1]
        out.append(StepBatch(batch.request_ids[a:b], batch.input_ids[t0:t1],
                             batch.positions[t0:t1], batch.q_lens[a:b],
                             batch.cached_lens[a:b], batch.block_tables[a:b, :width]))
    return out
