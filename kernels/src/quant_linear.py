"""Quantized linears on the GPU: irlm's int8 GEMV / dequantize kernels and torch's fused
quantized GEMMs, with the weight layouts each one reads.

==============  =========================  ===========================================  =======
op / mode       small batch (M rows)       large batch                                  weight
                                                                                        layout
==============  =========================  ===========================================  =======
linear int8     ``irlm_w8a16_gemv``        ``irlm_dequant_int8`` + cuBLAS bf16 GEMM     as
(W8A16)         (M <= GEMV_MAX_M)                                                       stored
linear int4     ``torch._weight_int4pack_  ``irlm_dequant_int4`` + cuBLAS bf16 GEMM     tinygemm
(W4A16, AWQ)    mm`` (tinygemm, bf16)                                                   packed
                (M <= INT4_TINYGEMM_MAX_M),                                             at load
                or ``irlm_w4a16_gemv``
                where timed faster (*)
linear_a8 fp8   ``irlm_w8a16_gemv`` with   ``torch._scaled_mm`` (cuBLASLt fp8 GEMM,     as
(W8A8)          e4m3 weights, x rounded    per-tensor scales), and at small M where     stored
                to e4m3 in-kernel, where   the GEMV is not faster
                timed faster (*)
linear fp8      ``irlm_w8a16_gemv`` with   fp32 dequantize (torch) + cuBLAS             as
(W8A16)         e4m3 weights                                                            stored
linear_a8 w8a8  ``torch._int_mm`` (cuBLASLt int8 GEMM) + per-token x per-channel        as
(SmoothQuant)   scales in fp32 (M padded to 17 rows where cuBLASLt needs it)            stored
==============  =========================  ===========================================  =======

(*) At 1, 2, 4 and 8 rows the runner times irlm's GEMV against the other path per weight shape
when it loads the engine (lowering/tactics.py); ``INT4_GEMV_MAX_M`` / ``FP8_GEMV_MAX_M`` > 0
would run the GEMV up to that many rows regardless.

For int8 and int4 the large-batch column above is the fallback: from 17 rows up to
``quant_gemm.GEMM_MAX_M`` they run the Triton weight-only GEMM of :mod:`.quant_gemm`
(dequantized in registers, tensor cores) where Triton runs.

Weight layouts.  ``_scaled_mm`` and ``_int_mm`` want the second operand column-major
``[K, N]``: that is ``qweight.t()`` of the stored row-major ``[N, K]``, a view, so the stored
tensor is already the layout they read and nothing is copied.  tinygemm reads its own tiled
int32 layout: :func:`pack_int4_tinygemm` converts irlm's int4 storage (low nibble first, zero
points ``z``, ``w = (q - z) * s``) once, when the runner loads the engine, into
``torch._convert_weight_to_int4pack``'s packing (high nibble first) and tinygemm's
``[K/group, N, 2]`` scale-and-zero tensor (``w = (q - 8) * scale + zero``, so
``zero = (8 - z) * s``).

Every function here is asynchronous and allocation-only (no host synchronisation), so the
runner captures them in its decode CUDA graphs.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from typing import Optional

import torch

from .nvrtc import Kernel, KernelArgumentError
from .ops import CTYPES, _ptr, _sm_count, _tensor

c_void_p, c_longlong, c_int = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int

# The row limits below are from benchmarks/quant_gemm.py on an H200 (2026-12-04, Llama-3-8B
# linear shapes, docs/performance.md).
#: up to this many rows the int8 GEMV kernel runs; above it the Triton GEMM (quant_gemm) or,
#: without Triton, dequantize + cuBLAS.  The GEMV beat the GEMM at 1 row on every shape
#: (e.g. gate/up 37.0 vs 60.8 us) and lost at 8 (147.2 vs 56.6 us)
GEMV_MAX_M = 1
#: up to this many rows fp8 engines always run the GEMV with e4m3 weights; 0: only at the
#: row counts where load-time timing picks it (lowering/tactics.py).  0: cuBLASLt's fp8 GEMM
#: (`torch._scaled_mm`) was as fast or faster at every M measured, 1 row included (gate/up
#: 39.3 vs 41.7 us, down 29.4 vs 30.3 us)
FP8_GEMV_MAX_M = 0
GEMV_ROWS = (1, 2, 4, 8)
#: the warps that may share one output feature of a GEMV (gemv.cuh)
GEMV_WARPS_PER_ROW = (1, 2, 4)
#: warps a GEMV block (256 threads)
GEMV_BLOCK_WARPS = 8


def gemv_warps_per_row(n: int, device_index: int) -> int:
    """How many warps share each of a GEMV's ``n`` output features: the most that keeps all of
    them resident at once (64 warps a SM).  One warp a feature leaves the GPU half empty on
    Llama-3-8B's o and down projections (4096 features against 132 * 64 warp slots on an
    H100), and a warp's long row is then a chain of dependent load rounds."""
    slots = _sm_count(device_index) * 64
    return max([1] + [w for w in GEMV_WARPS_PER_ROW if n * w <= slots])


def _warps_per_row(n: int, dev, warps_per_row: Optional[int]) -> int:
    if warps_per_row is None:
        return gemv_warps_per_row(n, dev.index or 0)
    if warps_per_row not in GEMV_WARPS_PER_ROW:
        raise KernelArgumentError(f"warps_per_row={warps_per_row}: the GEMVs are compiled for "
                                  f"{GEMV_WARPS_PER_ROW}")
    return warps_per_row
#: up to this many rows int4 runs tinygemm; above it the Triton GEMM, then dequantize +
#: cuBLAS.  tinygemm beat the GEMM at 8 rows on every shape and lost at 16 (gate/up 135.8 vs
#: 91.2 us)
INT4_TINYGEMM_MAX_M = 8
#: up to this many rows int4 always runs irlm's int4 GEMV (reading the stored layout) before
#: tinygemm; 0: only at the row counts where load-time timing picks it (lowering/tactics.py).
#: On an H100 (2026-12-05) the FMA kernel lost to tinygemm on every shape at 1-8 rows (gate/up
#: at 1 row 38.9 vs 33.3 us); the tensor-core kernel (groups of 128k) is timed the same way
INT4_GEMV_MAX_M = 0
#: output features per warp of the int4 GEMV (its activations are converted once for them):
#: the default, and the variants compiled (benchmarks/quant_gemm.py compares them)
INT4_GEMV_ROWS_PER_WARP = 2
INT4_GEMV_ROWS = (2, 4)
#: the int4 group sizes tinygemm accepts
TINYGEMM_GROUPS = (32, 64, 128, 256)
GEMV_DTYPES = (torch.bfloat16, torch.float16)
FP8_MAX = 448.0
#: bytes at the start of each weight row that a GEMV asks into L2 before it waits on the
#: previous kernel (gemv.cuh's prefetch_row; IRLM_GEMV_PREFETCH overrides).  Off: on an H100
#: (2026-12-05, gpu_decode.py --launch) 4, 16 and 64 KiB did not speed up bf16 or int4
#: batch-1 decode and slowed int8's step by up to 4% (4.09 -> 4.24 ms)
WEIGHT_PREFETCH_BYTES = 0


def weight_prefetch_bytes() -> int:
    """The GEMVs' weight prefetch per row (see WEIGHT_PREFETCH_BYTES), read at each launch so a
    benchmark can compare settings by recapturing its graphs."""
    v = os.environ.get("IRLM_GEMV_PREFETCH")
    if v is None:
        return WEIGHT_PREFETCH_BYTES
    try:
        return max(0, int(v))
    except ValueError:
        raise KernelArgumentError(f"IRLM_GEMV_PREFETCH={v!r}: expected a byte count") from None


class QGemvParams(ctypes.Structure):
    _fields_ = [("x", c_void_p), ("w", c_void_p), ("scales", c_void_p), ("bias", c_void_p),
                ("out", c_void_p), ("x_stride", c_longlong), ("o_stride", c_longlong),
                ("m", c_int), ("n", c_int), ("k", c_int), ("scale_stride", c_int),
                ("x_scale", ctypes.c_float), ("prefetch", c_int)]


class Q4GemvParams(ctypes.Structure):
    _fields_ = [("x", c_void_p), ("w", c_void_p), ("scales", c_void_p), ("zeros", c_void_p),
                ("bias", c_void_p), ("out", c_void_p), ("x_stride", c_longlong),
                ("o_stride", c_longlong), ("m", c_int), ("n", c_int), ("k", c_int),
                ("group", c_int), ("prefetch", c_int)]


class QuantActParams(ctypes.Structure):
    _fields_ = [("x", c_void_p), ("scale", c_void_p), ("out", c_void_p), ("rows", c_longlong),
                ("cols", c_longlong), ("x_stride", c_longlong)]


class ScaleI32Params(ctypes.Structure):
    _fields_ = [("acc", c_void_p), ("x_scale", c_void_p), ("w_scale", c_void_p),
                ("bias", c_void_p), ("out", c_void_p), ("rows", c_longlong),
                ("cols", c_longlong), ("acc_stride", c_longlong)]


class DequantParams(ctypes.Structure):
    _fields_ = [("q", c_void_p), ("scales", c_void_p), ("zeros", c_void_p), ("out", c_void_p),
                ("n", c_longlong), ("k", c_longlong), ("group", c_int)]


@lru_cache(maxsize=None)
def quant_kernel(dtype) -> Kernel:
    t = CTYPES[dtype]
    names = [f"irlm_dequant_int8<{t}>", f"irlm_dequant_int4<{t}>"]
    if dtype in GEMV_DTYPES:
        names += [f"irlm_w8a16_gemv<{t}, {m}, {w}, {r}>" for m in GEMV_ROWS
                  for w in ("false", "true") for r in GEMV_WARPS_PER_ROW]
    # launched plainly: with programmatic dependent launch the int8 engine's batch-1 decode
    # step was 2-2.5% slower (H100, 2026-12-05, two runs: 4.09 against 4.01 and 3.99 ms),
    # while every other format's was 1.5-3% faster
    return Kernel("quant_linear.cu", names, programmatic=False)


@lru_cache(maxsize=None)
def int4_gemv_kernel(dtype) -> Kernel:
    t = CTYPES[dtype]
    return Kernel("quant_gemv_int4.cu", [f"irlm_w4a16_gemv<{t}, {m}, {r}>"
                                         for r in INT4_GEMV_ROWS for m in GEMV_ROWS]
                  + [f"irlm_w4a16_mma<{t}>"])


@lru_cache(maxsize=None)
def quant_act_kernel(dtype) -> Kernel:
    t = CTYPES[dtype]
    # no fast math: the divisions must round as torch's do
    return Kernel("quant_act.cu", [f"irlm_quantize_fp8<{t}>", f"irlm_quantize_per_token_i8<{t}>",
                                   f"irlm_scale_i32<{t}>"], fast_math=False)


def all_quant_kernels() -> list[Kernel]:
    return [quant_kernel(dt) for dt in CTYPES] + [int4_gemv_kernel(dt) for dt in GEMV_DTYPES] \
        + [quant_act_kernel(dt) for dt in GEMV_DTYPES]


# ---- int8 weight-only ----------------------------------------------------------------------------
def gemv_supported(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether :func:`w8a16_gemv` / :func:`fp8_gemv` take this input (else use the other
    path)."""
    k = qweight.shape[1]
    return (x.dtype in GEMV_DTYPES and k % 16 == 0 and qweight.is_contiguous()
            and qweight.data_ptr() % 16 == 0)


def w8a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               bias: Optional[torch.Tensor] = None, *,
               warps_per_row: Optional[int] = None) -> torch.Tensor:
    """``x [M, K] @ (qweight i8 [N, K] * scales f32 [N, 1])^T (+ bias)`` in x's dtype
    (bf16/fp16), accumulated in fp32; launched once per 8 rows of x.  ``warps_per_row``: 1, 2
    or 4 warps a feature (default :func:`gemv_warps_per_row`)."""
    return _gemv(x, qweight, scales, bias, 0.0, warps_per_row)


def fp8_gemv(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
             bias: Optional[torch.Tensor] = None, x_scale: float = 0.0, *,
             warps_per_row: Optional[int] = None) -> torch.Tensor:
    """The e4m3 weight ``qweight [N, K]`` (f32 0-d ``w_scale``) times x [M, K] (bf16/fp16)
    (quant.linear fp8).  ``x_scale > 0``: x holds e4m3 values (exactly, in bf16) of an
    activation quantized with that scale, which multiplies the result (see fp8_linear_gemv)."""
    return _gemv(x, qweight, w_scale, bias, float(x_scale), warps_per_row)


def fp8_linear_gemv(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                    x_scale: torch.Tensor, x_scale_value: float,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """quant.linear_a8{mode=fp8} for a few rows: x rounded to e4m3 once (as quant.quantize),
    held exactly in x's dtype, then the fp8-weight GEMV with both scales applied to the fp32
    sums.  ``x_scale_value``: ``x_scale`` as a Python float, read once at load."""
    xq = quantize_fp8_static(x, x_scale).to(x.dtype)
    return _gemv(xq, qweight, w_scale, bias, x_scale_value)


def _gemv(x, qweight, scales, bias, x_scale, warps_per_row=None):
    _tensor("x", x, ndim=2, dtypes=GEMV_DTYPES)
    dev, dt = x.device, x.dtype
    fp8 = qweight.dtype == torch.float8_e4m3fn
    _tensor("qweight", qweight, ndim=2, dtypes=(torch.int8, torch.float8_e4m3fn), device=dev)
    _tensor("scales", scales, ndim=0 if fp8 else 1, dtypes=(torch.float32,), device=dev)
    n, k = qweight.shape
    if x_scale and not fp8:
        raise KernelArgumentError("x_scale (activation rounding to e4m3) needs fp8 weights")
    if x.shape[1] != k or (not fp8 and (scales.shape[0] != n or not scales.is_contiguous())):
        raise KernelArgumentError(f"x {tuple(x.shape)}, qweight {tuple(qweight.shape)} and "
                                  f"scales {tuple(scales.shape)} do not fit together")
    if not gemv_supported(x, qweight):
        raise KernelArgumentError("the int8 GEMV needs K % 16 == 0 and a contiguous, 16-byte "
                                  "aligned qweight")
    kern = quant_kernel(dt)
    # one warp a feature by default: sharing them made the int8 GEMV slower on o and down
    # (H100, 2026-12-05: 10.8 against 10.0 us and 25.8 against 24.2 us at one row)
    wpr = _warps_per_row(n, dev, 1 if warps_per_row is None else warps_per_row)
    per_block = GEMV_BLOCK_WARPS // wpr
    prefetch = weight_prefetch_bytes()

    def launch(xs, os_, cnt, maxm):
        p = QGemvParams(_ptr(xs), _ptr(qweight), _ptr(scales), _ptr(bias), _ptr(os_),
                        xs.stride(0), os_.stride(0), cnt, n, k, 0 if fp8 else 1, x_scale,
                        prefetch)
        kern.launch(f"irlm_w8a16_gemv<{CTYPES[dt]}, {maxm}, {'true' if fp8 else 'false'}, "
                    f"{wpr}>", (-(-n // per_block),), (32 * GEMV_BLOCK_WARPS,), p, device=dev)
    return _gemv_row_blocks(x, n, bias, launch)


def _gemv_row_blocks(x, n, bias, launch):
    """What the GEMV launchers share: the bias checked, x's rows made 16-byte aligned, the
    output allocated, and ``launch(x_rows, out_rows, rows, maxm)`` per block of up to 8 rows
    (``maxm``: the kernel instance, the smallest of GEMV_ROWS that holds them)."""
    dev, dt = x.device, x.dtype
    if bias is not None:
        _tensor("bias", bias, ndim=1, dtypes=(dt,), device=dev)
        if bias.shape[0] != n or not bias.is_contiguous():
            raise KernelArgumentError(f"bias must be contiguous with {n} entries")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        # a fresh copy: contiguous() returns a contiguous view at a misaligned offset (or a
        # one-row slice, whose row stride torch ignores) as it is
        x = x.clone(memory_format=torch.contiguous_format)
    m = x.shape[0]
    out = torch.empty(m, n, dtype=dt, device=dev)
    for r0 in range(0, m, GEMV_ROWS[-1]):
        cnt = min(GEMV_ROWS[-1], m - r0)
        launch(x[r0:r0 + cnt], out[r0:r0 + cnt], cnt, next(r for r in GEMV_ROWS if r >= cnt))
    return out


def _dequant(name, q, scales, zeros, k, group, dtype):
    dev = q.device
    n = q.shape[0]
    out = torch.empty(n, k, dtype=dtype, device=dev)
    total = n * (k // 16)
    blocks = max(1, min(-(-total // 256), _sm_count(dev.index or 0) * 8))
    p = DequantParams(_ptr(q), _ptr(scales), _ptr(zeros), _ptr(out), n, k, group)
    quant_kernel(dtype).launch(f"{name}<{CTYPES[dtype]}>", (blocks,), (256,), p, device=dev)
    return out


def dequantize_fp8(qweight: torch.Tensor, w_scale: torch.Tensor, dtype) -> torch.Tensor:
    """``float(qweight) * w_scale`` in dtype (fp32 math, one rounding; torch ops)."""
    return (qweight.float() * w_scale).to(dtype)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """``qweight i8 [N, K] * scales f32 [N, 1]`` in dtype (fp32 math, one rounding)."""
    _tensor("qweight", qweight, ndim=2, dtypes=(torch.int8,))
    _tensor("scales", scales, ndim=1, dtypes=(torch.float32,), device=qweight.device)
    n, k = qweight.shape
    if k % 16 or not qweight.is_contiguous() or scales.shape[0] != n:
        raise KernelArgumentError("dequantize_int8 needs a contiguous [N, K] qweight with "
                                  "K % 16 == 0 and N scales")
    return _dequant("irlm_dequant_int8", qweight, scales.contiguous(), None, k, 0, dtype)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group: int, dtype) -> torch.Tensor:
    """irlm's packed int4 ``(q - z) * s`` (q u8 [N, K/2] low nibble first, s f32 and z u8
    [N, K/group]) as [N, K] in dtype."""
    _tensor("qweight", qweight, ndim=2, dtypes=(torch.uint8,))
    dev = qweight.device
    _tensor("scales", scales, ndim=2, dtypes=(torch.float32,), device=dev)
    _tensor("zeros", zeros, ndim=2, dtypes=(torch.uint8,), device=dev)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if group <= 0 or group % 16 or k % group or not qweight.is_contiguous() \
            or tuple(scales.shape) != (n, k // group) or scales.shape != zeros.shape:
        raise KernelArgumentError(f"dequantize_int4 needs a contiguous qweight, group % 16 == "
                                  f"0 dividing K and [N, K/group] scales and zeros; got "
                                  f"qweight {tuple(qweight.shape)}, group {group}, scales "
                                  f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)}")
    return _dequant("irlm_dequant_int4", qweight, scales.contiguous(), zeros.contiguous(), k,
                    group, dtype)


# ---- int4 weight-only: irlm's GEMV on the stored layout ------------------------------------------
def int4_gemv_supported(x_dtype, qweight: torch.Tensor, group: int) -> bool:
    """Whether :func:`w4a16_gemv` takes this weight (K % 32 == 0, group a multiple of 32,
    contiguous 16-byte aligned rows)."""
    k = qweight.shape[1] * 2
    return (x_dtype in GEMV_DTYPES and k % 32 == 0 and group > 0 and group % 32 == 0
            and k % group == 0 and qweight.is_contiguous() and qweight.data_ptr() % 16 == 0)


#: warps a block of irlm_w4a16_mma (they split K).  Measured on an H100 (2026-12-05,
#: benchmarks/quant_gemm.py paths int4-mma-w1..w8): 8 was fastest or within 8% of the
#: fastest on every Llama-3-8B shape at 1 and 8 rows; fewer warps with more blocks lost
#: up to 4.5x on the narrow shapes (N = 4096), and 1 or 2 were never fastest.
INT4_MMA_WARPS = 8


def int4_mma_supported(x_dtype, qweight: torch.Tensor, group: int) -> bool:
    """Whether the tensor-core variant of :func:`w4a16_gemv` takes this weight: as the GEMV,
    and a group that is a multiple of 128 (each 128-k step of the kernel in one group)."""
    return int4_gemv_supported(x_dtype, qweight, group) and group % 128 == 0


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor, group: int, bias: Optional[torch.Tensor] = None, *,
               rows: int = INT4_GEMV_ROWS_PER_WARP,
               tensor_cores: Optional[bool] = None,
               warps: int = INT4_MMA_WARPS) -> torch.Tensor:
    """``x [M, K] @ ((q - z) * s)^T (+ bias)`` for irlm's stored int4 (q u8 [N, K/2] low
    nibble first, s f32 / z u8 [N, K/group]) in x's dtype, fp32 sums; once per 8 rows of x.
    ``tensor_cores``: the MMA kernel (irlm_w4a16_mma: exact q - z on the tensor cores, groups
    of 128k) with ``warps`` warps a block splitting K (1-8); None: it wherever
    :func:`int4_mma_supported`, else the FMA kernel with ``rows`` features per warp."""
    _tensor("x", x, ndim=2, dtypes=GEMV_DTYPES)
    dev, dt = x.device, x.dtype
    _tensor("qweight", qweight, ndim=2, dtypes=(torch.uint8,), device=dev)
    _tensor("scales", scales, ndim=2, dtypes=(torch.float32,), device=dev)
    _tensor("zeros", zeros, ndim=2, dtypes=(torch.uint8,), device=dev)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if x.shape[1] != k or not int4_gemv_supported(dt, qweight, group) \
            or tuple(scales.shape) != (n, k // group) or zeros.shape != scales.shape \
            or not scales.is_contiguous() or not zeros.is_contiguous():
        raise KernelArgumentError(f"the int4 GEMV needs K % 32 == 0, a group that is a "
                                  f"multiple of 32 dividing K, a contiguous 16-byte aligned "
                                  f"qweight and contiguous [N, K/group] scales and zeros; got "
                                  f"x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, group "
                                  f"{group}, scales {tuple(scales.shape)}")
    if rows not in INT4_GEMV_ROWS:
        raise KernelArgumentError(f"rows={rows}: the int4 GEMV is compiled for "
                                  f"{INT4_GEMV_ROWS} features per warp")
    mma = int4_mma_supported(dt, qweight, group) if tensor_cores is None else tensor_cores
    if mma and group % 128:
        raise KernelArgumentError(f"group {group}: the int4 MMA kernel needs a group that is "
                                  f"a multiple of 128")
    kern = int4_gemv_kernel(dt)
    if mma:
        prefetch = weight_prefetch_bytes()
        warps = int(warps)
        if not 1 <= warps <= 8:
            raise KernelArgumentError(f"warps={warps}: the int4 MMA kernel runs 1 to 8 warps "
                                      f"a block")

        def launch(xs, os_, cnt, maxm):
            p = Q4GemvParams(_ptr(xs), _ptr(qweight), _ptr(scales), _ptr(zeros), _ptr(bias),
                             _ptr(os_), xs.stride(0), os_.stride(0), cnt, n, k, group,
                             prefetch)
            kern.launch(f"irlm_w4a16_mma<{CTYPES[dt]}>", (-(-n // 16),), (32 * warps,), p,
                        device=dev)
        return _gemv_row_blocks(x, n, bias, launch)
    fma_warps = 8

    def launch(xs, os_, cnt, maxm):
        p = Q4GemvParams(_ptr(xs), _ptr(qweight), _ptr(scales), _ptr(zeros), _ptr(bias),
                         _ptr(os_), xs.stride(0), os_.stride(0), cnt, n, k, group)
        kern.launch(f"irlm_w4a16_gemv<{CTYPES[dt]}, {maxm}, {rows}>",
                    (-(-n // (fma_warps * rows)),), (32 * fma_warps,), p, device=dev)
    return _gemv_row_blocks(x, n, bias, launch)


# ---- int4 weight-only through tinygemm ------------------------------------------------------------
def tinygemm_inner_k_tiles(k: int) -> int:
    """The inner K tiles of tinygemm's packing for K input features (0: not packable)."""
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), 0)


def tinygemm_supported(n: int, k: int, group: int) -> bool:
    return group in TINYGEMM_GROUPS and k % group == 0 and n % 8 == 0 \
        and tinygemm_inner_k_tiles(k) > 0


def pack_int4_tinygemm(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       high_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """irlm int4 storage -> (tinygemm's packed int32 weight, bf16 [K/group, N, 2] scales and
    zeros); a load-time transform (module doc).  ``high_first``: the byte order
    ``_convert_weight_to_int4pack`` reads (element 2j in the high nibble, as torch >= 2.5
    documents); the runner checks it once on the device (lowering/quant_linears.py)."""
    k = qweight.shape[1] * 2
    if high_first:
        qweight = ((qweight & 0x0F) << 4) | (qweight >> 4)
    packed = torch._convert_weight_to_int4pack(qweight.contiguous(), tinygemm_inner_k_tiles(k))
    s, z = scales.float(), zeros.float()
    sz = torch.stack([s.t(), ((8.0 - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def int4_tinygemm(x: torch.Tensor, packed: torch.Tensor, group: int,
                  scale_zeros: torch.Tensor) -> torch.Tensor:
    """``x [M, K] bf16`` times the tinygemm-packed weight: ``[M, N]`` bf16."""
    return torch._weight_int4pack_mm(x.contiguous(), packed, group, scale_zeros)


# ---- activation quantization and the w8a8 epilogue: quant_act.cu, else torch ops ---------------
#: False: the torch ops below instead of quant_act.cu's kernels (for comparing them)
FUSED_ACT_QUANT = True
#: device index -> whether quant_act.cu's kernels gave the torch ops' bits there (checked once,
#: by :func:`act_kernels_ok`, before they are used on that device)
_ACT_OK: dict = {}


def act_kernels_ok(device) -> bool:
    """Whether quant_act.cu's kernels run on ``device`` and give exactly the torch ops' results
    (checked once per device on small random inputs; never inside a CUDA graph capture, where
    an unchecked device keeps the torch ops)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return False
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    ok = _ACT_OK.get(idx)
    if ok is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        ok = _ACT_OK[idx] = _check_act_kernels(torch.device("cuda", idx))
    return ok


def _check_act_kernels(dev) -> bool:
    import warnings
    g = torch.Generator(device="cpu").manual_seed(0)
    try:
        for dt in GEMV_DTYPES:
            x = (torch.randn(5, 264, generator=g) * 4).to(dt).to(dev)
            x[0, :4] = torch.tensor([3000.0, -3000.0, 0.0, 0.5])
            s = torch.tensor(0.75, device=dev)
            if not torch.equal(_fp8_kernel(x, s).view(torch.uint8),
                               _fp8_torch(x, s).view(torch.uint8)):
                raise ValueError("fp8 codes differ")
            (qk, sk), (qt, st) = _i8_kernel(x), _i8_torch(x)
            if not (torch.equal(qk, qt) and torch.equal(sk, st)):
                raise ValueError("int8 codes or scales differ")
            acc = torch.randint(-2 ** 28, 2 ** 28, (5, 96), generator=g, dtype=torch.int32)
            ws = torch.rand(96, generator=g) * 1e-3
            b = torch.randn(96, generator=g).to(dt)
            acc, ws, b = acc.to(dev), ws.to(dev), b.to(dev)
            if not torch.equal(_scale_kernel(acc, st, ws, b, dt), _scale_torch(acc, st, ws, b, dt)):
                raise ValueError("the w8a8 epilogue differs")
    except Exception as e:  # noqa: BLE001 - any failure: the torch ops, with the reason
        warnings.warn(f"the activation quantization kernels (quant_act.cu) are not used on {dev}: "
                      f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)
        return False
    return True


def _act_kernel_takes(x: torch.Tensor) -> bool:
    return (FUSED_ACT_QUANT and x.is_cuda and x.dtype in GEMV_DTYPES and x.dim() == 2
            and x.shape[1] % 8 == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0
            and x.data_ptr() % 16 == 0 and act_kernels_ok(x.device))


def _act_grid(x: torch.Tensor, per_thread: int) -> int:
    total = x.shape[0] * (x.shape[1] // per_thread)
    return max(1, min(-(-total // 256), _sm_count(x.device.index or 0) * 8))


def _fp8_kernel(x, x_scale):
    m, k = x.shape
    out = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    if m:
        p = QuantActParams(_ptr(x), _ptr(x_scale), _ptr(out), m, k, x.stride(0))
        quant_act_kernel(x.dtype).launch(f"irlm_quantize_fp8<{CTYPES[x.dtype]}>",
                                         (_act_grid(x, 8),), (256,), p, device=x.device)
    return out


def _fp8_torch(x, x_scale):
    return (x.float() / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _i8_kernel(x):
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        p = QuantActParams(_ptr(x), _ptr(s), _ptr(q), m, k, x.stride(0))
        quant_act_kernel(x.dtype).launch(f"irlm_quantize_per_token_i8<{CTYPES[x.dtype]}>",
                                         (m,), (256,), p, device=x.device)
    return q, s


def _i8_torch(x):
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    # divided by a tensor, not a Python number: CUDA divides by a host scalar as a multiply by
    # its reciprocal, which differs from the division in ~4.5% of the amax values
    s = (amax / amax.new_full((), 127.0)).clamp_(min=1e-12)
    return torch.round(xf / s).clamp_(-127, 127).to(torch.int8), s


def _scale_kernel(acc, xs, w_scales, bias, dtype):
    m, n = acc.shape
    out = torch.empty(m, n, dtype=dtype, device=acc.device)
    if m:
        p = ScaleI32Params(_ptr(acc), _ptr(xs), _ptr(w_scales), _ptr(bias), _ptr(out), m, n,
                           acc.stride(0))
        grid = max(1, min(-(-(m * (n // 4)) // 256), _sm_count(acc.device.index or 0) * 8))
        quant_act_kernel(dtype).launch(f"irlm_scale_i32<{CTYPES[dtype]}>", (grid,), (256,), p,
                                       device=acc.device)
    return out


def _scale_torch(acc, xs, w_scales, bias, dtype):
    y = acc.float() * xs * w_scales
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


# ---- fp8 (W8A8, static per-tensor scales) ---------------------------------------------------------
def quantize_fp8_static(x: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """``x / x_scale`` clamped to +-448 and rounded to e4m3 (quant.quantize's semantics); one
    kernel on a GPU (quant_act.cu), else torch ops."""
    if _act_kernel_takes(x) and x_scale.is_cuda and x_scale.dtype == torch.float32 \
            and x_scale.numel() == 1:
        return _fp8_kernel(x, x_scale)
    return _fp8_torch(x, x_scale)


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
               x_scale: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               fast_accum: bool = False) -> torch.Tensor:
    """quant.linear_a8{mode=fp8}: x [M, K] (bf16/fp16), qweight f8e4m3 [N, K], f32 0-d
    scales; cuBLASLt's fp8 GEMM with fp32 accumulation, output in x's dtype.
    ``fast_accum``: cuBLASLt's fast accumulation (on Hopper the tensor cores' partial sums
    are not promoted to fp32 every few K blocks: faster, less exact); the runner does not
    use it, benchmarks/quant_gemm.py measures it (path ``fp8-mm-fast``)."""
    xq = quantize_fp8_static(x, x_scale)
    return torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=w_scale, bias=bias,
                            out_dtype=x.dtype, use_fast_accum=fast_accum)


# ---- w8a8 SmoothQuant (dynamic per-token activations) ----------------------------------------------
#: cuBLASLt's int8 GEMM (torch._int_mm) wants more than 16 rows
INT_MM_MIN_M = 17


def quantize_per_token_i8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q i8, scale f32 [M, 1]) as quant.quantize_per_token{i8}: scale = amax|x| / 127; one
    kernel on a GPU (quant_act.cu), else torch ops."""
    return _i8_kernel(x) if _act_kernel_takes(x) else _i8_torch(x)


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """quant.linear_a8{mode=w8a8}: per-token int8 x, int8 weights [N, K] with f32 per-channel
    scales; exact int32 products (cuBLASLt), scaled in fp32 (one kernel on a GPU, else torch
    ops), output in x's dtype."""
    m = x.shape[0]
    fused = _act_kernel_takes(x)
    xq, xs = _i8_kernel(x) if fused else _i8_torch(x)
    if m < INT_MM_MIN_M:
        xq = torch.nn.functional.pad(xq, (0, 0, 0, INT_MM_MIN_M - m))
    acc = torch._int_mm(xq, qweight.t())[:m]
    if fused and acc.shape[1] % 4 == 0 and w_scales.dtype == torch.float32 \
            and w_scales.is_contiguous() \
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())):
        return _scale_kernel(acc, xs, w_scales, bias, x.dtype)
    return _scale_torch(acc, xs, w_scales, bias, x.dtype)
