"""The dense GEMV (``gemv.cu``): a linear of a few rows with weights in the activations' dtype.

``gemv(x, weight, bias)`` computes ``F.linear(x, weight, bias)`` for bf16 / fp16 x [M, K] and
weight [N, K], accumulating in fp32 with one rounding, once per 8 rows of x.  It competes with
cuBLAS for batch-1 decode steps; the runner times both per weight shape at load
(lowering/tactics.py) and runs it only where it is faster.  Asynchronous and allocation-only,
so it is captured in the decode CUDA graphs.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Optional

import torch

from .nvrtc import Kernel, KernelArgumentError
from .ops import CTYPES, _ptr, _tensor
from .quant_linear import (GEMV_BLOCK_WARPS, GEMV_DTYPES, GEMV_ROWS, GEMV_WARPS_PER_ROW,
                           _gemv_row_blocks, _warps_per_row, weight_prefetch_bytes)

c_void_p, c_longlong, c_int = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int


class GemvParams(ctypes.Structure):
    _fields_ = [("x", c_void_p), ("w", c_void_p), ("bias", c_void_p), ("out", c_void_p),
                ("x_stride", c_longlong), ("o_stride", c_longlong), ("m", c_int), ("n", c_int),
                ("k", c_int), ("prefetch", c_int)]


@lru_cache(maxsize=None)
def gemv_kernel(dtype) -> Kernel:
    t = CTYPES[dtype]
    return Kernel("gemv.cu", [f"irlm_gemv<{t}, {m}, {r}>" for m in GEMV_ROWS
                              for r in GEMV_WARPS_PER_ROW])


def all_gemv_kernels() -> list[Kernel]:
    return [gemv_kernel(dt) for dt in GEMV_DTYPES]


def gemv_supported(x_dtype, weight: torch.Tensor) -> bool:
    """Whether :func:`gemv` takes this weight for activations of ``x_dtype``: bf16 / fp16 of
    the same dtype, K % 8 == 0, contiguous 16-byte aligned rows."""
    return (x_dtype in GEMV_DTYPES and weight.dtype == x_dtype and weight.dim() == 2
            and weight.shape[1] % 8 == 0 and weight.is_contiguous()
            and weight.data_ptr() % 16 == 0)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
         warps_per_row: Optional[int] = None) -> torch.Tensor:
    """``x [M, K] @ weight[N, K]^T (+ bias)`` in x's dtype, fp32 sums (see the module doc);
    ``warps_per_row``: 1, 2 or 4 warps a feature (default: quant_linear.gemv_warps_per_row)."""
    _tensor("x", x, ndim=2, dtypes=GEMV_DTYPES)
    dev, dt = x.device, x.dtype
    _tensor("weight", weight, ndim=2, dtypes=(dt,), device=dev)
    n, k = weight.shape
    if x.shape[1] != k:
        raise KernelArgumentError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not "
                                  f"fit together")
    if not gemv_supported(dt, weight):
        raise KernelArgumentError("the GEMV needs K % 8 == 0 and a contiguous, 16-byte aligned "
                                  "weight")
    kern = gemv_kernel(dt)
    wpr = _warps_per_row(n, dev, warps_per_row)
    per_block = GEMV_BLOCK_WARPS // wpr
    prefetch = weight_prefetch_bytes()

    def launch(xs, os_, cnt, maxm):
        p = GemvParams(_ptr(xs), _ptr(weight), _ptr(bias), _ptr(os_), xs.stride(0),
                       os_.stride(0), cnt, n, k, prefetch)
        kern.launch(f"irlm_gemv<{CTYPES[dt]}, {maxm}, {wpr}>", (-(-n // per_block),),
                    (32 * GEMV_BLOCK_WARPS,), p, device=dev)
    return _gemv_row_blocks(x, n, bias, launch)
