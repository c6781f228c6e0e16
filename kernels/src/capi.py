"""ctypes mirrors of the CMake-built kernel library's C ABI for paged attention
(kernels/capi/irlm_paged_attention.h), and a thin caller for torch tensors.

The library (``libirlm_kernels.so``, kernels/CMakeLists.txt) holds the launch logic of
:func:`irlm.kernels.ops.paged_attention` written once in C++ for C/C++ callers (the TensorRT
plugin); this module is how Python tests and users reach it.  The structures below must match
the header field for field (tests/test_kernels_cmake.py checks sizes and offsets with the C++
compiler).
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from irlm.ops.llm import KVCacheLayout

from .nvrtc import KernelArgumentError, KernelLaunchError

c_void_p, c_longlong, c_int, c_float, c_size_t, c_uint, c_char_p = (
    ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_float, ctypes.c_size_t,
    ctypes.c_uint, ctypes.c_char_p)

#: IrlmDType codes
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3,
          torch.float8_e4m3fn: 4}
#: IrlmPagedAttentionStatus codes (positive codes are cudaError_t values)
OK, INVALID, UNSUPPORTED, WORKSPACE, INTERNAL = 0, -2, -3, -4, -5
MAX_ALIBI_HEADS = 512   # IRLM_PA_MAX_ALIBI_HEADS


class IrlmPagedAttentionArgs(ctypes.Structure):
    _fields_ = [("query", c_void_p), ("key", c_void_p), ("value", c_void_p),
                ("kv_cache", c_void_p), ("block_tables", c_void_p), ("q_lens", c_void_p),
                ("cached_lens", c_void_p), ("out", c_void_p), ("alibi_slopes", c_void_p),
                ("query_stride", c_longlong), ("key_stride", c_longlong),
                ("value_stride", c_longlong), ("out_stride", c_longlong),
                ("num_tokens", c_int), ("num_reqs", c_int), ("heads", c_int),
                ("kv_heads", c_int), ("head_dim", c_int), ("layers", c_int),
                ("num_blocks", c_int), ("block_size", c_int), ("max_blocks", c_int),
                ("layer", c_int), ("dtype", c_int), ("cache_dtype", c_int),
                ("num_alibi_slopes", c_int), ("sliding_window", c_int), ("scale", c_float),
                ("kv_scale_k", c_float), ("kv_scale_v", c_float), ("max_q_len", c_int),
                ("max_kv_len", c_int), ("decode", c_int), ("num_splits", c_int),
                ("num_sms", c_int)]


class IrlmLaunch(ctypes.Structure):
    _fields_ = [("kernel", c_char_p), ("grid", c_uint * 3), ("block", c_uint * 3),
                ("shared_mem_bytes", c_size_t)]


class IrlmPagedAttentionPlan(ctypes.Structure):
    _fields_ = [("prepare", IrlmLaunch), ("kv_write", IrlmLaunch), ("attention", IrlmLaunch),
                ("split_reduce", IrlmLaunch), ("decode", c_int), ("num_splits", c_int),
                ("split_size", c_int), ("workspace_bytes", c_size_t)]


#: (C struct name, ctypes mirror) for the layout test
STRUCTS = [("IrlmPagedAttentionArgs", IrlmPagedAttentionArgs), ("IrlmLaunch", IrlmLaunch),
           ("IrlmPagedAttentionPlan", IrlmPagedAttentionPlan)]


class PagedAttentionLibrary:
    """``irlm_paged_attention*`` of a loaded ``libirlm_kernels.so``."""

    def __init__(self, path):
        self.lib = lib = ctypes.CDLL(str(path))
        args_p = ctypes.POINTER(IrlmPagedAttentionArgs)
        lib.irlm_paged_attention.argtypes = [args_p, c_void_p, c_size_t, c_void_p]
        lib.irlm_paged_attention.restype = c_int
        lib.irlm_paged_attention_workspace_size.argtypes = [args_p, ctypes.POINTER(c_size_t)]
        lib.irlm_paged_attention_workspace_size.restype = c_int
        lib.irlm_paged_attention_plan.argtypes = [args_p, c_size_t,
                                                  ctypes.POINTER(IrlmPagedAttentionPlan)]
        lib.irlm_paged_attention_plan.restype = c_int
        lib.irlm_paged_attention_error.argtypes = []
        lib.irlm_paged_attention_error.restype = c_char_p

    def error(self) -> str:
        return self.lib.irlm_paged_attention_error().decode()

    def _check(self, rc: int, what: str):
        if rc == OK:
            return
        msg = self.error() or f"status {rc}"
        if rc in (INVALID, UNSUPPORTED):
            raise KernelArgumentError(msg)
        raise KernelLaunchError(f"{what}: {msg} (status {rc})")

    def workspace_size(self, args: IrlmPagedAttentionArgs) -> int:
        n = c_size_t()
        self._check(self.lib.irlm_paged_attention_workspace_size(ctypes.byref(args),
                                                                 ctypes.byref(n)),
                    "irlm_paged_attention_workspace_size")
        return n.value

    def plan(self, args: IrlmPagedAttentionArgs, workspace_bytes: int) -> IrlmPagedAttentionPlan:
        plan = IrlmPagedAttentionPlan()
        self._check(self.lib.irlm_paged_attention_plan(ctypes.byref(args), workspace_bytes,
                                                       ctypes.byref(plan)),
                    "irlm_paged_attention_plan")
        return plan

    def paged_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        kv_cache: torch.Tensor, block_tables: torch.Tensor, q_lens: torch.Tensor,
                        cached_lens: torch.Tensor, layer: int, *, scale: Optional[float] = None,
                        sliding_window: int = 0, alibi_slopes=None,
                        out: Optional[torch.Tensor] = None, **bounds) -> torch.Tensor:
        """:func:`irlm.kernels.ops.paged_attention`'s signature, run by the library's
        ``irlm_paged_attention`` on torch's current stream (workspace from torch's allocator).
        ``bounds``: max_q_len, max_kv_len, decode (-1/0/1), num_splits, num_sms; kv_scales
        (key scale, value scale) for an int8 / fp8 cache."""
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        slopes = None
        if alibi_slopes is not None and len(alibi_slopes) > 0:
            slopes = (ctypes.c_float * len(alibi_slopes))(*[float(s) for s in alibi_slopes])
        args = tensor_args(q, k, v, kv_cache, block_tables, q_lens, cached_lens, out, layer,
                           scale=scale, sliding_window=sliding_window, alibi_slopes=slopes,
                           **bounds)
        ws = torch.empty(self.workspace_size(args), dtype=torch.uint8, device=q.device)
        with torch.cuda.device(q.device):
            stream = torch.cuda.current_stream(q.device).cuda_stream
            self._check(self.lib.irlm_paged_attention(ctypes.byref(args), ws.data_ptr(),
                                                      ws.numel(), stream),
                        "irlm_paged_attention")
        return out


def _token_stride(name, t) -> int:
    if t.dim() != 3 or t.stride(2) != 1 or (t.shape[1] > 1 and t.stride(1) != t.shape[2]):
        raise KernelArgumentError(f"{name} must be [tokens, heads, head_dim] with contiguous "
                                  f"heads and head_dim, got shape {tuple(t.shape)} strides "
                                  f"{tuple(t.stride())}")
    return t.stride(0)


def tensor_args(q, k, v, kv_cache, block_tables, q_lens, cached_lens, out, layer, *,
                scale=None, sliding_window=0, alibi_slopes=None, max_q_len=0, max_kv_len=0,
                decode=-1, num_splits=0, num_sms=0, kv_scales=None) -> IrlmPagedAttentionArgs:
    """The C arguments for torch tensors (``alibi_slopes``: a ctypes float array or None; the
    caller keeps it alive; ``kv_scales``: (key scale, value scale) of an int8 / fp8 cache)."""
    for name, t in (("block_tables", block_tables), ("q_lens", q_lens),
                    ("cached_lens", cached_lens), ("kv_cache", kv_cache)):
        if not t.is_contiguous():
            raise KernelArgumentError(f"{name} must be contiguous")
    geo = KVCacheLayout.of(kv_cache.shape)
    if tuple(k.shape) != tuple(v.shape) or tuple(k.shape[1:]) != (geo.kv_heads, geo.head_dim):
        raise KernelArgumentError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [tokens, "
                                  f"{geo.kv_heads}, {geo.head_dim}] (the kv_cache's heads)")
    if tuple(out.shape) != tuple(q.shape) or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise KernelArgumentError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and out "
                                  f"{tuple(out.shape)} do not fit together")
    a = IrlmPagedAttentionArgs()
    a.query, a.key, a.value, a.kv_cache = (q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                           kv_cache.data_ptr())
    a.block_tables, a.q_lens, a.cached_lens, a.out = (block_tables.data_ptr(), q_lens.data_ptr(),
                                                      cached_lens.data_ptr(), out.data_ptr())
    a.query_stride, a.key_stride = _token_stride("q", q), _token_stride("k", k)
    a.value_stride, a.out_stride = _token_stride("v", v), _token_stride("out", out)
    a.num_tokens, a.num_reqs = q.shape[0], cached_lens.shape[0]
    a.heads, a.kv_heads, a.head_dim = q.shape[1], k.shape[1], q.shape[2]
    a.layers, a.num_blocks, a.block_size = geo.layers, geo.blocks, geo.block_size
    a.max_blocks, a.layer = block_tables.shape[1], int(layer)
    a.dtype, a.cache_dtype = DTYPES.get(q.dtype, -1), DTYPES.get(kv_cache.dtype, -1)
    if alibi_slopes is not None:
        a.alibi_slopes = ctypes.addressof(alibi_slopes)
        a.num_alibi_slopes = len(alibi_slopes)
    a.sliding_window = int(sliding_window)
    a.scale = 0.0 if scale is None else float(scale)
    a.max_q_len, a.max_kv_len, a.decode = int(max_q_len), int(max_kv_len), int(decode)
    a.num_splits, a.num_sms = int(num_splits), int(num_sms)
    if kv_scales is not None and len(kv_scales) > 0:
        if len(kv_scales) != 2:
            raise KernelArgumentError(f"kv_scales = (key scale, value scale), got {kv_scales!r}")
        a.kv_scale_k, a.kv_scale_v = float(kv_scales[0]), float(kv_scales[1])
    return a
