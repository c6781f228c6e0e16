"""Mixture-of-experts ops on a GPU with no host read of device data.

A traced MoE layer (transformers' grouped experts path, e.g. Mixtral) routes tokens on the
device: ``core.topk`` picks the experts, ``core.sort`` orders the (token, expert) rows by
expert, ``core.histc`` + ``core.cumsum`` count the rows per expert into offsets, and
``core.grouped_mm`` multiplies each expert's rows by that expert's weight.  The reference
implementations of ``core.grouped_mm`` (one GEMM per expert after reading the offsets on the
host) and CUDA's ``torch.histc`` (which asks the driver for free memory to pick a strategy)
may not run while a decode step is being captured as a CUDA graph; the implementations here
can, and the CUDA runner's kernel table (:mod:`irlm.lowering.kernel_selection`) installs them.

``core.grouped_mm`` takes one of three paths (:func:`grouped_mm_path`):

* ``grouped``: ``torch._grouped_mm``, one CUTLASS grouped GEMM launch for every expert that
  reads the offsets on the device.  torch has this kernel for bf16 operands on sm_90 / sm_100
  (its other cases loop over the experts on the host), with 16-byte aligned rows.
* ``per-expert``: outside a capture (prefill steps run eagerly), when the grouped kernel does
  not apply (fp16 / fp32 engines, other GPUs, odd sizes): the reference, one GEMM per expert
  over its rows after one device-to-host read of the offsets.  No wasted work.
* ``dense``: inside a capture, when the grouped kernel does not apply: every expert on every
  row (one batched GEMM) and each row keeps its own expert's product.  Exact, but it does
  ``experts`` times the arithmetic of the grouped GEMM, so it is a fallback for the few rows
  of a decode step with a handful of experts, not a path to be fast on.
"""
from __future__ import annotations

from typing import Optional

import torch

#: the GPUs torch's grouped kernel runs on (compute capability); elsewhere it loops on the host
GROUPED_MM_CAPABILITIES = ((9, 0), (10, 0))


def _rows_ok(t: torch.Tensor) -> bool:
    """torch._grouped_mm's layout rule for the last two dims: one of them contiguous, the
    other's stride a multiple of 16 bytes, the base 16-byte aligned."""
    align = 16 // t.element_size()
    s0, s1 = t.stride(-2), t.stride(-1)
    n0, n1 = t.shape[-2], t.shape[-1]
    if t.data_ptr() % 16:
        return False
    if s0 == 1 and s1 >= max(1, n0):
        return s1 % align == 0
    if s1 == 1 and s0 >= max(1, n1):
        return s0 % align == 0
    return False


def grouped_mm_path(x: torch.Tensor, w: torch.Tensor, *, capturing: bool,
                    capability: Optional[tuple[int, int]]) -> str:
    """Which implementation runs ``core.grouped_mm`` of ``x [rows, k]`` and ``w [experts, k, n]``
    on a GPU of this compute capability (None: not a CUDA device): see the module doc."""
    if (capability in GROUPED_MM_CAPABILITIES and x.dtype == w.dtype == torch.bfloat16
            and hasattr(torch, "_grouped_mm") and _rows_ok(x) and _rows_ok(w)):
        return "grouped"
    return "dense" if capturing else "per-expert"


def row_experts(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert of each row: ``e(t) = #{e : offsets[e] <= t}`` (``experts`` for rows past
    the last offset), computed on the device."""
    t = torch.arange(rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets.contiguous(), t, right=True)


def grouped_mm_dense(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``core.grouped_mm`` as one batched GEMM of every expert over every row, then a per-row
    select; no host read of the offsets (see the module doc for its cost)."""
    rows, n, experts = x.shape[0], w.shape[2], w.shape[0]
    expert = row_experts(offsets, rows)
    every = torch.matmul(x.unsqueeze(0), w)                       # [experts, rows, n]
    pick = expert.clamp(max=experts - 1).long().view(1, rows, 1).expand(1, rows, n)
    out = every.gather(0, pick).squeeze(0)
    return out.masked_fill((expert >= experts).unsqueeze(1), 0)


def grouped_mm_grouped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``core.grouped_mm`` through ``torch._grouped_mm``, rows past the last offset zeroed on
    the device (the kernel leaves them unwritten)."""
    out = torch._grouped_mm(x, w, offs=offsets.to(torch.int32))
    past = row_experts(offsets, x.shape[0]) >= w.shape[0]
    return out.masked_fill_(past.unsqueeze(1), 0)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *,
               capturing: Optional[bool] = None,
               capability: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``core.grouped_mm`` on the device of its operands, by :func:`grouped_mm_path`
    (``capturing`` and ``capability``: those of the operands' device unless given)."""
    if x.shape[0] == 0:
        return torch.zeros(0, w.shape[2], dtype=x.dtype, device=x.device)
    cuda = x.device.type == "cuda"
    if capturing is None:
        capturing = cuda and torch.cuda.is_current_stream_capturing()
    if capability is None and cuda:
        capability = torch.cuda.get_device_capability(x.device)
    path = grouped_mm_path(x, w, capturing=capturing, capability=capability)
    if path == "grouped":
        return grouped_mm_grouped(x, w, offsets)
    if path == "dense":
        return grouped_mm_dense(x, w, offsets)
    from irlm.registry import get_op_def
    return get_op_def("core.grouped_mm").reference(None, [x, w, offsets], {})[0]


def histc_scatter(x: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """``torch.histc(x, bins, lo, hi)`` (``lo < hi``) as a scatter-add of ones: value v goes to
    bin ``floor((v - lo) * bins / (hi - lo))`` (``hi`` itself to the last bin), values outside
    ``[lo, hi]`` nowhere; the same binning as torch's kernels, with no host call."""
    v = x.reshape(-1).float()
    idx = ((v - lo) * bins / (hi - lo)).floor().long().clamp(0, bins - 1)
    inside = (v >= lo) & (v <= hi)
    idx = torch.where(inside, idx, bins)                       # one spill bin, dropped
    counts = torch.zeros(bins + 1, dtype=torch.float32, device=x.device)
    counts.scatter_add_(0, idx, torch.ones_like(v))
    return counts[:bins].to(x.dtype)
