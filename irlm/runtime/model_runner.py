"""The one interface between the runtime and whatever computes logits.

A compiled engine, the CPU reference interpreter and the test runners all implement
:class:`ModelRunner`.  Per step the runtime hands over a :class:`StepBatch` in the inference
form (:mod:`irlm.ops.llm`): the new tokens of every scheduled sequence packed without padding,
their positions, ``q_lens`` / ``cached_lens`` and block tables into the KV pool that the runner
owns.  The runner writes this step's keys and values into the pool and returns the logits of
each sequence's last new token.  Everything else (which block holds what, what to schedule,
how to sample) is the runtime's business, so a runner stays a pure function of
(pool, batch) -> (pool', logits).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch


def describe_executor(runner) -> str:
    """What computes a runner's logits, in a few words (``CpuGraphRunner, f16 linears,
    threads 2``; a multi-rank engine's runner says its ranks' executors)."""
    if hasattr(runner, "describe"):
        return runner.describe()
    what = type(runner).__name__
    if hasattr(runner, "linear_dtype"):
        what += f", {runner.linear_dtype} linears, threads {runner.threads}"
    return what


@dataclass
class StepBatch:
    """One forward step of the in-flight batch; rows (sequences) in order."""
    request_ids: list[int]       # one id per row: a sequence (n > 1 and beams run several)
    input_ids: torch.Tensor      # [tokens] int64, the packed new tokens of every row
    positions: torch.Tensor      # [tokens] int64, absolute positions (cached_len + i)
    q_lens: torch.Tensor         # [reqs] int32, new tokens per row (prompt chunk or 1)
    cached_lens: torch.Tensor    # [reqs] int32, tokens already in the KV cache per row
    block_tables: torch.Tensor   # [reqs, max_blocks] int32, padded with 0
    # Async decode: tokens the previous step sampled that the host has not read yet.
    # (tokens on the device, positions in input_ids to fill, rows of tokens to fill them with);
    # input_ids holds a placeholder there.  Runners with ``supports_device_inputs`` fill them
    # on the device (:meth:`input_ids_on`); for others the engine reads them first.
    device_inputs: Optional[tuple] = None

    @classmethod
    def pack(cls, request_ids: Sequence[int], new_tokens: Sequence[Sequence[int]],
             cached_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
             pin_memory: bool = False) -> "StepBatch":
        """Build a batch from per-row Python lists (host tensors; the runner moves them).

        Vectorized with numpy: at 512 rows a per-token Python loop costs about as much as a
        decode step's host budget.  ``pin_memory`` (for a CUDA runner): a copy from pageable
        memory may wait for the work already queued on the device, which would serialize
        the host with the GPU; from pinned memory it is queued like a kernel."""
        n = len(new_tokens)
        q_lens = np.fromiter((len(c) for c in new_tokens), dtype=np.int64, count=n)
        cached = np.asarray(cached_lens, dtype=np.int64).reshape(n)
        ids = np.fromiter(itertools.chain.from_iterable(new_tokens), dtype=np.int64,
                          count=int(q_lens.sum()))
        # position of token i of row r: cached[r] + i, i.e. its index in the packed batch
        # minus the row's start, plus the row's cached length
        starts = np.cumsum(q_lens) - q_lens
        pos = np.arange(ids.shape[0], dtype=np.int64) + np.repeat(cached - starts, q_lens)
        widths = [len(t) for t in block_tables]
        tables = np.zeros((n, max(widths, default=0)), dtype=np.int32)
        for r, (t, w) in enumerate(zip(block_tables, widths)):
            tables[r, :w] = t
        def host(a):
            t = torch.from_numpy(a)
            return t.pin_memory() if pin_memory else t
        return cls(request_ids=list(request_ids),
                   input_ids=host(ids),
                   positions=host(pos),
                   q_lens=host(q_lens.astype(np.int32)),
                   cached_lens=host(cached.astype(np.int32)),
                   block_tables=host(tables))

    def input_ids_on(self, device) -> torch.Tensor:
        """``input_ids`` on ``device`` with the device-resident tokens filled in."""
        ids = self.input_ids.to(device, non_blocking=True)
        if self.device_inputs is not None:
            if ids is self.input_ids:        # .to() did not copy: do not edit the batch
                ids = ids.clone()
            fill_device_inputs(ids, self.device_inputs)
        return ids

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def __len__(self) -> int:
        return len(self.request_ids)


def fill_device_inputs(ids: torch.Tensor, device_inputs: tuple) -> torch.Tensor:
    """Write the previous step's sampled tokens into ``ids`` (in place) where the batch has
    placeholders, on ``ids``' device, without reading them on the host."""
    src, dst, rows = device_inputs
    dev = ids.device
    ids[device_index(dst, dev)] = src.to(dev)[device_index(rows, dev)].to(ids.dtype)
    return ids


def device_index(values: Sequence[int], device) -> torch.Tensor:
    """An int64 index tensor on ``device``, copied from pinned memory when that is a GPU (a
    pageable copy may wait for the device's queued work)."""
    t = torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@runtime_checkable
class ModelRunner(Protocol):
    """What the runtime needs from an engine.

    ``num_blocks`` and ``block_size`` describe the KV pool the runner owns (the runtime's
    :class:`~irlm.runtime.kv_cache.BlockManager` mirrors them); ``max_model_len`` is the
    longest sequence (prompt + output) the model supports.
    """
    vocab_size: int
    block_size: int
    num_blocks: int
    max_model_len: int

    def step(self, batch: StepBatch) -> torch.Tensor:
        """[reqs, vocab] float32 logits of each row's LAST new token (any device)."""
        ...
