"""irlm.kernels: CUDA C++ kernels compiled at run time with NVRTC, and their launchers.

* :mod:`irlm.kernels.nvrtc`: NVRTC compilation (``sm_90a`` on Hopper), the on-disk cubin
  cache, module loading and launches on torch's current stream.
* :mod:`irlm.kernels.ops`: the launchers: ``paged_attention`` (``llm.paged_attention`` on the
  GPU), ``paged_attention_decode``, ``prefill_attention``, ``kv_cache_write``,
  ``rope_kv_write``, ``rms_norm``, ``fused_add_rms_norm``, ``gated_act``, ``sample``,
  ``greedy``.
* :mod:`irlm.kernels.quant_linear`: the quantized linears' GEMV / dequantize kernels and
  torch's fused quantized GEMMs; :mod:`irlm.kernels.quant_gemm`: the weight-only int8 / int4
  GEMM for 17+ rows, written in Triton (Triton is imported only when it first runs).
* :mod:`irlm.kernels.capi`: ctypes mirrors of the CMake-built ``libirlm_kernels.so``'s
  ``irlm_paged_attention`` C ABI (the same launch logic in C++, for C/C++ callers such as the
  TensorRT plugin) and a caller for torch tensors.

Importing this package needs neither cuda-python nor a GPU; the first launch compiles (or
loads from the cache) what it needs.  See docs/kernels.md.
"""
from __future__ import annotations

_OPS = ("paged_attention", "paged_attention_decode", "prefill_attention", "kv_cache_write",
        "rope_kv_write", "rope_inv_freq", "rms_norm", "fused_add_rms_norm", "gated_act",
        "sample", "greedy", "cu_seqlens", "all_kernels")
_ERRORS = ("KernelError", "KernelCompileError", "KernelArgumentError", "KernelLaunchError",
           "KernelUnavailableError")

__all__ = list(_OPS + _ERRORS)


def __getattr__(name):
    if name in _OPS:
        from . import ops
        return getattr(ops, name)
    if name in _ERRORS:
        from . import nvrtc
        return getattr(nvrtc, name)
    raise AttributeError(f"module 'irlm.kernels' has no attribute {name!r}")
