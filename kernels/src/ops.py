"""Launchers of irlm's CUDA kernels: checks, launch configuration, and the kernel groups.

Every launcher takes and returns torch tensors on a CUDA device, checks shapes, dtypes,
devices, strides and alignment before anything reaches the GPU (raising
:class:`~irlm.kernels.nvrtc.KernelArgumentError`), and launches on torch's current stream
without synchronising.  Supported element types: bfloat16, float16, float32 (float32
attention runs on the tensor cores as tf32).  The KV cache holds the model's dtype, or int8 /
float8_e4m3fn with one scale for keys and one for values (``kv_scales``, as
``quantize-kv-cache`` records them in ``llm.paged_attention``): the cache writes quantize as
``irlm.ops.llm.kv_to_cache`` does, bit for bit, and attention reads the 8-bit values back
times the scale.

Request metadata follows ``irlm.ops.llm``: packed tokens, ``q_lens`` / ``cached_lens`` (int32,
``[reqs]``), ``block_tables`` (int32, ``[reqs, max_blocks]``) and the pool
``[layers, blocks, 2, block_size, kv_heads, head_dim]``.  Launchers that need prefix sums of
``q_lens`` compute them (two small torch ops) unless ``cu_q_lens`` (int32, ``[reqs + 1]``) is
given: a runtime computes it once per step and passes it to every layer.
"""
from __future__ import annotations

import ctypes
import math
import os
from functools import lru_cache
from typing import NamedTuple, Optional, Sequence, Union

import torch

from irlm.ops.llm import KVCacheLayout

from .nvrtc import Kernel, KernelArgumentError

c_void_p, c_longlong, c_int, c_float = (ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int,
                                        ctypes.c_float)

CTYPES = {torch.bfloat16: "irlm_bf16", torch.float16: "irlm_fp16", torch.float32: "float"}
FLOAT_DTYPES = tuple(CTYPES)
#: 8-bit KV-cache element types and their C types (common.cuh), the kernels' last template
#: argument (absent for a cache of the model's own dtype)
KV_QUANT_CTYPES = {torch.int8: "signed char", torch.float8_e4m3fn: "irlm_fp8e4m3"}
ATTENTION_HEAD_DIMS = (64, 80, 96, 128, 256)
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_tanh": 1, "gelu_pytorch_tanh": 1, "gelu_new": 1,
               "gelu": 2, "gelu_exact": 2}
RMS_MAXV = (1, 2, 4)


# ---- parameter blocks (mirror the structs in the .cu files, field for field) -------------------
class AttnParams(ctypes.Structure):
    _fields_ = [("q", c_void_p), ("out", c_void_p), ("cache", c_void_p),
                ("block_tables", c_void_p), ("cu_q_lens", c_void_p), ("cached_lens", c_void_p),
                ("alibi", c_void_p), ("part_out", c_void_p), ("part_ml", c_void_p),
                ("split_counters", c_void_p), ("q_stride", c_longlong),
                ("o_stride", c_longlong), ("layer_offset", c_longlong),
                ("num_reqs", c_int), ("heads", c_int), ("kv_heads", c_int), ("group", c_int),
                ("block_size", c_int), ("block_shift", c_int), ("max_blocks", c_int),
                ("window", c_int), ("num_splits", c_int), ("split_size", c_int),
                ("num_tokens", c_int), ("smem_bytes", c_int), ("scale_log2", c_float),
                ("v_scale", c_float)]


class KvWriteParams(ctypes.Structure):
    _fields_ = [("k", c_void_p), ("v", c_void_p), ("cache", c_void_p), ("block_tables", c_void_p),
                ("cu_q_lens", c_void_p), ("cached_lens", c_void_p),
                ("k_stride", c_longlong), ("v_stride", c_longlong), ("layer_offset", c_longlong),
                ("num_reqs", c_int), ("kv_heads", c_int), ("head_dim", c_int),
                ("block_size", c_int), ("block_shift", c_int), ("max_blocks", c_int),
                ("k_scale", c_float), ("v_scale", c_float)]


class RopeParams(ctypes.Structure):
    _fields_ = [("q", c_void_p), ("k", c_void_p), ("v", c_void_p), ("cache", c_void_p),
                ("block_tables", c_void_p), ("cu_q_lens", c_void_p), ("cached_lens", c_void_p),
                ("positions", c_void_p), ("inv_freq", c_void_p), ("cos", c_void_p),
                ("sin", c_void_p), ("q_out", c_void_p), ("k_out", c_void_p),
                ("q_stride", c_longlong), ("k_stride", c_longlong), ("v_stride", c_longlong),
                ("layer_offset", c_longlong), ("cs_stride", c_longlong),
                ("q_out_stride", c_longlong), ("k_out_stride", c_longlong),
                ("num_reqs", c_int), ("heads", c_int), ("kv_heads", c_int), ("head_dim", c_int),
                ("rot_dim", c_int), ("block_size", c_int), ("block_shift", c_int),
                ("max_blocks", c_int), ("k_scale", c_float), ("v_scale", c_float)]


class RmsNormParams(ctypes.Structure):
    _fields_ = [("x", c_void_p), ("residual", c_void_p), ("weight", c_void_p), ("out", c_void_p),
                ("x_stride", c_longlong), ("r_stride", c_longlong), ("o_stride", c_longlong),
                ("hidden", c_int), ("eps", c_float)]


class GatedActParams(ctypes.Structure):
    _fields_ = [("x", c_void_p), ("out", c_void_p), ("rows", c_longlong),
                ("x_stride", c_longlong), ("o_stride", c_longlong), ("inter", c_int)]


class SampleParams(ctypes.Structure):
    _fields_ = [("logits", c_void_p), ("temperature", c_void_p), ("top_k", c_void_p),
                ("top_p", c_void_p), ("seeds", c_void_p), ("offsets", c_void_p),
                ("out", c_void_p), ("stride", c_longlong), ("vocab", c_int)]


# ---- kernel groups (one NVRTC compilation each; CI compiles every one of them) -----------------
def _vec(dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


def attention_block_n(dtype, head_dim: int, decode: bool) -> int:
    if dtype == torch.float32:
        return 32
    return 64 if decode or head_dim <= 128 else 32


def _cache_arg(dtype, cache_dtype) -> str:
    """The kernels' trailing cache-type template argument: "" for a cache of the model's dtype
    (``cache_dtype`` None or ``dtype``), ", signed char" / ", irlm_fp8e4m3" for int8 / fp8."""
    if cache_dtype is None or cache_dtype == dtype:
        return ""
    return f", {KV_QUANT_CTYPES[cache_dtype]}"


@lru_cache(maxsize=None)
def decode_kernel(dtype, head_dim: int, cache_dtype=None) -> Kernel:
    t, bn = CTYPES[dtype], attention_block_n(dtype, head_dim, True)
    c = _cache_arg(dtype, cache_dtype)
    return Kernel("paged_attention_decode.cu",
                  [f"irlm_paged_attention_decode<{t}, {head_dim}, {bn}{c}>",
                   f"irlm_attention_split_reduce<{t}, {head_dim}>"])


@lru_cache(maxsize=None)
def prefill_kernel(dtype, head_dim: int, cache_dtype=None) -> Kernel:
    t, bn = CTYPES[dtype], attention_block_n(dtype, head_dim, False)
    c = _cache_arg(dtype, cache_dtype)
    return Kernel("prefill_attention.cu", [f"irlm_prefill_attention<{t}, {head_dim}, {bn}{c}>"])


@lru_cache(maxsize=None)
def kv_write_kernel(dtype, cache_dtype=None) -> Kernel:
    t, c = CTYPES[dtype], _cache_arg(dtype, cache_dtype)
    return Kernel("kv_cache_write.cu", [f"irlm_kv_cache_write<{t}, {_vec(dtype)}{c}>",
                                        f"irlm_kv_cache_write<{t}, 1{c}>"])


@lru_cache(maxsize=None)
def rope_kernel(dtype, cache_dtype=None) -> Kernel:
    t, v, c = CTYPES[dtype], _vec(dtype), _cache_arg(dtype, cache_dtype)
    return Kernel("rope_kv_write.cu", [f"irlm_rope_kv_write<{t}, {v}, true{c}>",
                                       f"irlm_rope_kv_write<{t}, 1, true{c}>",
                                       f"irlm_rope_kv_write<{t}, {v}, false{c}>",
                                       f"irlm_rope_kv_write<{t}, 2, false{c}>"], fast_math=False)


@lru_cache(maxsize=None)
def rms_kernel(dtype) -> Kernel:
    t, v = CTYPES[dtype], _vec(dtype)
    return Kernel("rms_norm.cu", [f"irlm_rms_norm<{t}, {vec}, {m}, {a}>" for vec in (v, 1)
                                  for m in RMS_MAXV for a in ("false", "true")])


@lru_cache(maxsize=None)
def act_kernel(dtype) -> Kernel:
    t, v = CTYPES[dtype], _vec(dtype)
    return Kernel("gated_act.cu", [f"irlm_gated_act<{t}, {vec}, {a}>" for vec in (v, 1)
                                   for a in (0, 1, 2)])


@lru_cache(maxsize=None)
def sample_kernel() -> Kernel:
    return Kernel("sampling.cu", [f"irlm_sample<{t}>" for t in CTYPES.values()])


def all_kernels() -> list[Kernel]:
    """Every kernel group the launchers can use (for precompilation and the compile test)."""
    ks = []
    for dt in FLOAT_DTYPES:
        for d in ATTENTION_HEAD_DIMS:
            ks += [decode_kernel(dt, d), prefill_kernel(dt, d)]
        ks += [kv_write_kernel(dt), rope_kernel(dt), rms_kernel(dt), act_kernel(dt)]
    for dt in FLOAT_DTYPES:            # int8 / fp8 KV caches
        for c in KV_QUANT_CTYPES:
            for d in ATTENTION_HEAD_DIMS:
                ks += [decode_kernel(dt, d, c), prefill_kernel(dt, d, c)]
            ks += [kv_write_kernel(dt, c), rope_kernel(dt, c)]
    from .gemv import all_gemv_kernels
    from .quant_linear import all_quant_kernels
    return ks + [sample_kernel()] + [rope_apply_kernel()] + all_quant_kernels() \
        + all_gemv_kernels()


# ---- checks -------------------------------------------------------------------------------------
def _tensor(name, t, *, ndim=None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise KernelArgumentError(f"{name} must be on a CUDA device, got {t.device}")
    if device is not None and t.device != device:
        raise KernelArgumentError(f"{name} is on {t.device}, expected {device}")
    if ndim is not None and t.dim() != ndim:
        raise KernelArgumentError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise KernelArgumentError(f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")
    return t


def _aligned(t: torch.Tensor, nbytes: int = 16) -> bool:
    return t.data_ptr() % nbytes == 0


def _heads_contiguous(name, t):
    """[tokens, heads, D] with heads and D contiguous (a token stride is allowed, e.g. a slice
    of a fused qkv projection)."""
    if t.stride(2) != 1 or (t.shape[1] > 1 and t.stride(1) != t.shape[2]):
        raise KernelArgumentError(f"{name} must have contiguous heads and head_dim (strides "
                                  f"[*, {t.shape[2]}, 1]), got strides {tuple(t.stride())}")


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _kv_quantization(kv_cache, dtype, kv_scales):
    """``(None, 1.0, 1.0)`` for a cache of the model's dtype, ``(cache dtype, key scale, value
    scale)`` for an int8 / float8_e4m3fn cache (which needs ``kv_scales``)."""
    name = str(kv_cache.dtype).replace("torch.", "")
    if kv_cache.dtype == dtype:
        if kv_scales is not None and len(kv_scales) > 0:
            raise KernelArgumentError(f"kv_scales are for an int8 or float8_e4m3fn kv_cache, "
                                      f"not {name}")
        return None, 1.0, 1.0
    if kv_cache.dtype not in KV_QUANT_CTYPES:
        raise KernelArgumentError(f"kv_cache dtype {kv_cache.dtype} differs from {dtype} (a "
                                  f"cache holds the model's dtype, int8 or float8_e4m3fn)")
    scales = tuple(kv_scales) if kv_scales is not None else ()
    if len(scales) != 2:
        raise KernelArgumentError(f"the {name} kv_cache needs kv_scales = (key scale, value "
                                  f"scale), got {kv_scales!r}")
    # float32, as the kernels (and the reference's float32 arithmetic) use them
    ks, vs = c_float(float(scales[0])).value, c_float(float(scales[1])).value
    if not all(math.isfinite(x) and x > 0 for x in (ks, vs)):
        raise KernelArgumentError(f"kv_scales must be positive and finite float32 values, "
                                  f"got {[float(x) for x in scales]}")
    return kv_cache.dtype, ks, vs


def _cache_geometry(kv_cache, layer, kv_heads, head_dim, dtype, kv_scales=None):
    """(layer offset in elements, block size, log2 of it, (cache dtype or None, key scale,
    value scale)) after checking the pool against the keys' shape and dtype."""
    _tensor("kv_cache", kv_cache, ndim=6)
    L, nb, two, bs, kvh, d = KVCacheLayout.of(kv_cache.shape)
    if two != 2:
        raise KernelArgumentError(f"kv_cache dim 2 must be 2 (key, value), got {two}")
    if kvh != kv_heads or d != head_dim:
        raise KernelArgumentError(f"kv_cache holds {kvh} kv heads of {d}, the keys "
                                  f"{kv_heads} of {head_dim}")
    quant = _kv_quantization(kv_cache, dtype, kv_scales)
    if not kv_cache.is_contiguous():
        raise KernelArgumentError("kv_cache must be contiguous")
    if bs <= 0 or bs & (bs - 1):
        raise KernelArgumentError(f"block_size must be a power of two, got {bs}")
    if not 0 <= int(layer) < L:
        raise KernelArgumentError(f"layer {layer} is outside the cache's {L} layers")
    if not _aligned(kv_cache):
        raise KernelArgumentError("kv_cache must be 16-byte aligned")
    return int(layer) * kv_cache.stride(0), bs, bs.bit_length() - 1, quant


def _meta(block_tables, cached_lens, q_lens=None, cu_q_lens=None, device=None):
    i32 = (torch.int32,)
    _tensor("block_tables", block_tables, ndim=2, dtypes=i32, device=device)
    _tensor("cached_lens", cached_lens, ndim=1, dtypes=i32, device=device)
    R = cached_lens.shape[0]
    if block_tables.shape[0] != R:
        raise KernelArgumentError(f"block_tables has {block_tables.shape[0]} rows for {R} requests")
    if not block_tables.is_contiguous() or not cached_lens.is_contiguous():
        raise KernelArgumentError("block_tables and cached_lens must be contiguous")
    if cu_q_lens is None and q_lens is not None:
        _tensor("q_lens", q_lens, ndim=1, dtypes=i32, device=device)
        if q_lens.shape[0] != R:
            raise KernelArgumentError(f"q_lens has {q_lens.shape[0]} entries for {R} requests")
        cu_q_lens = torch.nn.functional.pad(torch.cumsum(q_lens, 0, dtype=torch.int32), (1, 0))
    if cu_q_lens is not None:
        _tensor("cu_q_lens", cu_q_lens, ndim=1, dtypes=i32, device=device)
        if cu_q_lens.shape[0] != R + 1 or not cu_q_lens.is_contiguous():
            raise KernelArgumentError(f"cu_q_lens must be contiguous with {R + 1} entries")
    return R, cu_q_lens


def cu_seqlens(q_lens: torch.Tensor) -> torch.Tensor:
    """[reqs + 1] int32 prefix sums of q_lens, starting at 0."""
    return torch.nn.functional.pad(torch.cumsum(q_lens, 0, dtype=torch.int32), (1, 0))


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ---- KV cache write -----------------------------------------------------------------------------
def kv_cache_write(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                   block_tables: torch.Tensor, q_lens: Optional[torch.Tensor],
                   cached_lens: torch.Tensor, *, cu_q_lens: Optional[torch.Tensor] = None,
                   kv_scales: Optional[Sequence[float]] = None) -> None:
    """Write ``k``/``v`` ``[tokens, kv_heads, D]`` into ``kv_cache[layer]`` at each token's
    position (``llm.paged_attention``'s side effect); an int8 / fp8 cache stores ``k /
    kv_scales[0]`` and ``v / kv_scales[1]`` quantized (``irlm.ops.llm.kv_to_cache``)."""
    _tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES)
    dev = k.device
    _tensor("v", v, ndim=3, dtypes=(k.dtype,), device=dev)
    if v.shape != k.shape:
        raise KernelArgumentError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    _heads_contiguous("k", k)
    _heads_contiguous("v", v)
    T, kvh, d = k.shape
    layer_off, bs, shift, (cdt, ks, vs) = _cache_geometry(kv_cache, layer, kvh, d, k.dtype,
                                                          kv_scales)
    _tensor("kv_cache", kv_cache, device=dev)
    R, cu = _meta(block_tables, cached_lens, q_lens, cu_q_lens, dev)
    if T == 0 or R == 0:
        return
    vec = _vec(k.dtype)
    ok = (kvh * d) % vec == 0 and all(_aligned(x) and x.stride(0) % vec == 0 for x in (k, v))
    kern = kv_write_kernel(k.dtype, cdt)
    p = KvWriteParams(_ptr(k), _ptr(v), _ptr(kv_cache), _ptr(block_tables), _ptr(cu),
                      _ptr(cached_lens), k.stride(0), v.stride(0), layer_off, R, kvh, d, bs,
                      shift, block_tables.shape[1], ks, vs)
    kern.launch(kern.names[0 if ok else 1], (T,), (128,), p, device=dev)


# ---- attention ----------------------------------------------------------------------------------
def attention_smem_bytes(dtype, head_dim: int, decode: bool, cache_dtype=None) -> int:
    """Dynamic shared memory of one attention CTA (mirrors AttnSmem in attention.cuh)."""
    es = torch.empty((), dtype=dtype).element_size()
    wm, wn = (1, 4) if decode else (4, 1)
    bn = attention_block_n(dtype, head_dim, decode)
    ld, bm = head_dim + 16 // es, 16 * wm
    q = bm * ld * es
    tile = 2 * bn * ld * es                       # one K and V tile as the model's dtype
    if cache_dtype is None or cache_dtype == dtype:
        kv = 2 * tile                             # two cp.async stages
    else:
        kv = 2 * 2 * bn * head_dim + tile         # two 8-bit stages + the converted tile
    epi = (wn * bm * (head_dim + 4) + 2 * wn * bm) * 4
    return q + max(kv, epi)


def _attn_common(q, kv_cache, layer, block_tables, cached_lens, scale, sliding_window,
                 alibi_slopes, out, q_lens=None, cu_q_lens=None, kv_scales=None):
    _tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    dev = q.device
    _heads_contiguous("q", q)
    T, H, D = q.shape
    if D not in ATTENTION_HEAD_DIMS:
        raise KernelArgumentError(f"head_dim {D} has no attention kernel (supported: "
                                  f"{', '.join(map(str, ATTENTION_HEAD_DIMS))})")
    _tensor("kv_cache", kv_cache, ndim=6, device=dev)
    kvh = KVCacheLayout.of(kv_cache.shape).kv_heads
    if kvh == 0 or H % kvh:
        raise KernelArgumentError(f"{H} query heads are not a multiple of {kvh} kv heads")
    layer_off, bs, shift, (cdt, ks, vs) = _cache_geometry(kv_cache, layer, kvh, D, q.dtype,
                                                          kv_scales)
    R, cu = _meta(block_tables, cached_lens, q_lens, cu_q_lens, dev)
    vec = _vec(q.dtype)
    if not _aligned(q) or q.stride(0) % vec:
        raise KernelArgumentError("q must be 16-byte aligned with a token stride that is a "
                                  "multiple of 16 bytes")
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype, device=dev)
    else:
        _tensor("out", out, ndim=3, dtypes=(q.dtype,), device=dev)
        if tuple(out.shape) != (T, H, D):
            raise KernelArgumentError(f"out must have shape {(T, H, D)}, got {tuple(out.shape)}")
        _heads_contiguous("out", out)
        if not _aligned(out, 8) or out.stride(0) % 4:
            raise KernelArgumentError("out must be 8-byte aligned with a token stride that is "
                                      "a multiple of 4 elements")
    alibi = None
    if alibi_slopes is not None and len(alibi_slopes) > 0:
        alibi = (alibi_slopes if isinstance(alibi_slopes, torch.Tensor) else
                 torch.tensor(list(alibi_slopes), dtype=torch.float32))
        alibi = alibi.to(device=dev, dtype=torch.float32).contiguous()
        if alibi.shape != (H,):
            raise KernelArgumentError(f"{alibi.numel()} alibi slopes for {H} heads")
    if sliding_window is None or sliding_window < 0:
        raise KernelArgumentError(f"sliding_window must be >= 0, got {sliding_window}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    p = AttnParams()
    p.q, p.out, p.cache = _ptr(q), _ptr(out), _ptr(kv_cache)
    p.block_tables, p.cu_q_lens, p.cached_lens = _ptr(block_tables), _ptr(cu), _ptr(cached_lens)
    p.alibi = _ptr(alibi)
    p.q_stride, p.o_stride, p.layer_offset = q.stride(0), out.stride(0), layer_off
    p.num_reqs, p.heads, p.kv_heads, p.group = R, H, kvh, H // kvh
    p.block_size, p.block_shift, p.max_blocks = bs, shift, block_tables.shape[1]
    p.window, p.num_splits, p.split_size, p.num_tokens = int(sliding_window), 1, 1 << 30, T
    # a quantized cache: q . (k * ks) = ks * (q . k), so the key scale joins the softmax scale
    p.scale_log2 = scale * ks * math.log2(math.e)
    p.v_scale = vs
    return p, out, (alibi, cu), (T, H, D, R, kvh), cdt


MAX_SPLITS = 128  # IRLM_MAX_SPLITS in paged_attention_decode.cu


def choose_splits(ctas: int, kv_len: int, block_n: int, sms: int,
                  min_keys: int = 128, max_splits: int = 64) -> tuple[int, int]:
    """(num_splits, split_size) for flash-decoding: enough CTAs for ~4 per SM, partitions of
    at least ``min_keys`` keys, each a multiple of ``block_n``.  No split where the unsplit
    CTAs already fill a wave and the context is at most ``4 * min_keys`` keys: there the
    partials and the reduce kernel cost more than the parallelism gains (32 requests x 8 kv
    heads at 256 cached tokens: 16.1 us a layer unsplit against 19.5 us in 3, H200;
    docs/performance.md)."""
    if kv_len <= min_keys or (ctas >= sms and kv_len <= 4 * min_keys):
        return 1, 1 << 30
    splits = min(max(1, -(-4 * sms // max(ctas, 1))), kv_len // min_keys, max_splits)
    if splits <= 1:
        return 1, 1 << 30
    size = -(-kv_len // splits)
    size = -(-size // block_n) * block_n
    return -(-kv_len // size), size


def paged_attention_decode(q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                           block_tables: torch.Tensor, cached_lens: torch.Tensor, *,
                           scale: Optional[float] = None, sliding_window: int = 0,
                           alibi_slopes=None, out: Optional[torch.Tensor] = None,
                           max_kv_len: Optional[int] = None,
                           num_splits: Optional[int] = None,
                           kv_scales: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Decode attention: ``q [reqs, heads, D]``, one token per request at position
    ``cached_lens[r]``, whose key/value are already in the cache.  ``max_kv_len`` is an upper
    bound of ``cached_lens + 1`` (computed with a device sync when omitted); ``num_splits``
    forces the number of context partitions (default: chosen from the batch and the length);
    ``kv_scales`` (key scale, value scale) for an int8 / fp8 cache.
    """
    p, out, keep, (T, H, D, R, kvh), cdt = _attn_common(
        q, kv_cache, layer, block_tables, cached_lens, scale, sliding_window, alibi_slopes, out,
        kv_scales=kv_scales)
    if T != R:
        raise KernelArgumentError(f"decode takes one query per request: q has {T} tokens for "
                                  f"{R} requests")
    if R == 0:
        return out
    if max_kv_len is None:
        max_kv_len = int(cached_lens.max()) + 1
    kv_len = min(max_kv_len, sliding_window) if sliding_window else max_kv_len
    G = H // kvh
    tiles = -(-G // 16)
    bn = attention_block_n(q.dtype, D, True)
    if num_splits is None:
        splits, size = choose_splits(R * kvh * tiles, kv_len, bn, _sm_count(q.device.index or 0))
    else:
        size = -(-kv_len // min(MAX_SPLITS, max(1, int(num_splits))))
        size = -(-size // bn) * bn
        splits = -(-kv_len // size)
        if splits == 1:
            size = 1 << 30
    part_out = part_ml = counters = None
    if splits > 1:
        part_out = torch.empty((splits, R, H, D), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((splits, R, H, 2), dtype=torch.float32, device=q.device)
        p.part_out, p.part_ml = _ptr(part_out), _ptr(part_ml)
        if fold_splits_enabled():
            counters = split_counters(q.device, R * kvh * tiles)
            p.split_counters = _ptr(counters)
    p.num_splits, p.split_size = splits, size
    smem = attention_smem_bytes(q.dtype, D, True, cdt)
    p.smem_bytes = smem
    kern = decode_kernel(q.dtype, D, cdt)
    kern.launch(kern.names[0], (tiles * splits, kvh, R), (128,), p, smem=smem, device=q.device)
    if splits > 1 and counters is None:
        kern.launch(kern.names[1], (H, R), (128,), p, device=q.device)
    return out


def fold_splits_enabled() -> bool:
    """``IRLM_FOLD_SPLITS=1``: a split decode attention combines its partitions in its last CTA
    (attention.cuh: fold_splits) instead of launching irlm_attention_split_reduce.  Off by
    default: on an H200 it gained nothing end to end (docs/performance.md).  Read at each
    launch, so a benchmark can compare the two by capturing its graphs again."""
    v = os.environ.get("IRLM_FOLD_SPLITS", "0").strip()
    if v not in ("0", "1"):
        raise KernelArgumentError(f"IRLM_FOLD_SPLITS must be 0 or 1, got {v!r}")
    return v == "1"


#: per device: the zeroed int32 counters of fold_splits, kept across launches (each launch
#: leaves them zeroed).  One buffer a device, so decode attentions on one device must not run
#: concurrently on two streams (irlm's runners issue a step's kernels on one stream).
_SPLIT_COUNTERS: dict = {}
#: every counter buffer ever handed out: a captured CUDA graph keeps using the one it was
#: captured with after a larger one replaces it, so none is ever freed
_SPLIT_COUNTERS_KEPT: list = []


def split_counters(device: torch.device, n: int) -> Optional[torch.Tensor]:
    """At least ``n`` zeroed counters on ``device``; None while a CUDA graph is being captured
    and the buffer would have to grow (the caller then launches the reduce kernel: an
    allocation and its zeroing cannot be captured once and replayed as kept state)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _SPLIT_COUNTERS.get(idx)
    if buf is None or buf.numel() < n:
        if torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _SPLIT_COUNTERS[idx] = buf
        _SPLIT_COUNTERS_KEPT.append(buf)
    return buf


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                      block_tables: torch.Tensor, q_lens: Optional[torch.Tensor],
                      cached_lens: torch.Tensor, *, scale: Optional[float] = None,
                      sliding_window: int = 0, alibi_slopes=None,
                      out: Optional[torch.Tensor] = None,
                      cu_q_lens: Optional[torch.Tensor] = None,
                      max_q_len: Optional[int] = None,
                      kv_scales: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Causal attention of packed tokens ``q [tokens, heads, D]`` (request r: ``q_lens[r]``
    tokens at positions ``cached_lens[r] + i``) over the paged cache, which must already hold
    this step's keys and values.  ``max_q_len`` bounds ``q_lens`` (device sync when omitted);
    ``kv_scales`` (key scale, value scale) for an int8 / fp8 cache.
    """
    if q_lens is None and cu_q_lens is None:
        raise KernelArgumentError("prefill_attention needs q_lens or cu_q_lens")
    p, out, (alibi, cu), (T, H, D, R, kvh), cdt = _attn_common(
        q, kv_cache, layer, block_tables, cached_lens, scale, sliding_window, alibi_slopes, out,
        q_lens=q_lens, cu_q_lens=cu_q_lens, kv_scales=kv_scales)
    if R == 0 or T == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu[1:] - cu[:-1]).max())
    G = H // kvh
    tiles = -(-max_q_len * G // 64)
    smem = attention_smem_bytes(q.dtype, D, False, cdt)
    p.smem_bytes = smem
    kern = prefill_kernel(q.dtype, D, cdt)
    kern.launch(kern.names[0], (tiles, kvh, R), (128,), p, smem=smem, device=q.device)
    return out


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    block_tables: torch.Tensor, q_lens: torch.Tensor, cached_lens: torch.Tensor,
                    layer: int, *, scale: Optional[float] = None, sliding_window: int = 0,
                    alibi_slopes=None, out: Optional[torch.Tensor] = None,
                    cu_q_lens: Optional[torch.Tensor] = None, max_q_len: Optional[int] = None,
                    max_kv_len: Optional[int] = None, decode: Optional[bool] = None,
                    write_kv: bool = True,
                    fresh: "Union[bool, FreshSuffix, None]" = False,
                    uniform_q_len: Optional[int] = None,
                    kv_scales: Optional[Sequence[float]] = None) -> torch.Tensor:
    """``llm.paged_attention`` on the GPU: write k/v into the cache, then attend.  An int8 /
    float8_e4m3fn ``kv_cache`` takes the op's ``kv_scales`` (key scale, value scale).

    kernels/capi/paged_attention.cu makes the same launch choices in C++ (the TensorRT
    plugin's path); tests/test_kernels_cmake.py checks that the two agree.

    Runs the decode kernel when every request has one token (``decode=None`` infers this from
    ``tokens == reqs``, which assumes every q_len >= 1), else the prefill kernel (which also
    handles decode requests mixed into a prefill batch).

    ``fresh=True`` (the caller knows every ``cached_lens`` is 0: no request has a cached
    prefix) lets a prefill step attend over this step's own ``k``/``v`` with torch's fused
    attention instead (:func:`fresh_prefill_attention`), which is 2-3x faster than the paged
    prefill kernel on long prompts (benchmarks/prefill_attention.py); ``uniform_q_len`` (every
    request has that many tokens) lets it use the dense SDPA backends.  A :class:`FreshSuffix`
    says only the requests from one index on are fresh (in-flight batching puts newly
    admitted prompts after the running requests): those go to torch, the others to the paged
    prefill kernel.  The cache is still written.  Variants torch's kernels do not cover
    (ALiBi, sliding window, fp32) use the paged kernel throughout, and so does an int8 / fp8
    cache: the op attends over the keys and values as the cache stores them (quantized), which
    this step's own k/v are not.
    """
    _tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    R = cached_lens.shape[0] if isinstance(cached_lens, torch.Tensor) else -1
    if cu_q_lens is None and q_lens is not None and isinstance(q_lens, torch.Tensor) \
            and q_lens.device == q.device and q_lens.dtype == torch.int32 and q_lens.dim() == 1:
        cu_q_lens = cu_seqlens(q_lens)
    if write_kv:
        kv_cache_write(k, v, kv_cache, layer, block_tables, q_lens, cached_lens,
                       cu_q_lens=cu_q_lens, kv_scales=kv_scales)
    if decode is None:
        decode = q.shape[0] == R
    if fresh and not decode and kv_cache.dtype == q.dtype \
            and fresh_prefill_supported(q, k, alibi_slopes, sliding_window):
        cu = cu_q_lens if cu_q_lens is not None else \
            cu_seqlens(torch.as_tensor(q_lens, dtype=torch.int32, device=q.device))
        if max_q_len is None:
            max_q_len = int((cu[1:] - cu[:-1]).max())
        if fresh is True:
            fresh = FreshSuffix(0, 0, 0, max_q_len, uniform_q_len)
        if fresh.request == 0:
            return fresh_prefill_attention(q, k, v, cu, fresh.max_q_len, scale=scale, out=out,
                                           uniform_q_len=fresh.uniform_q_len)
        r0, t0 = fresh.request, fresh.token
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        prefill_attention(q[:t0], kv_cache, layer, block_tables[:r0],
                          None if q_lens is None else q_lens[:r0], cached_lens[:r0],
                          scale=scale, out=out[:t0], cu_q_lens=cu[:r0 + 1],
                          max_q_len=fresh.head_max_q_len)
        fresh_prefill_attention(q[t0:], k[t0:], v[t0:], cu[r0:] - t0, fresh.max_q_len,
                                scale=scale, out=out[t0:], uniform_q_len=fresh.uniform_q_len)
        return out
    if decode:
        return paged_attention_decode(q, kv_cache, layer, block_tables, cached_lens, scale=scale,
                                      sliding_window=sliding_window, alibi_slopes=alibi_slopes,
                                      out=out, max_kv_len=max_kv_len, kv_scales=kv_scales)
    return prefill_attention(q, kv_cache, layer, block_tables, q_lens, cached_lens, scale=scale,
                             sliding_window=sliding_window, alibi_slopes=alibi_slopes, out=out,
                             cu_q_lens=cu_q_lens, max_q_len=max_q_len, kv_scales=kv_scales)


class FreshSuffix(NamedTuple):
    """Requests ``request..`` of a prefill step (tokens ``token..``) have no cached prefix;
    ``head_max_q_len`` bounds the q_lens before them, ``max_q_len`` theirs, and
    ``uniform_q_len`` is their common length if they have one."""
    request: int
    token: int
    head_max_q_len: int
    max_q_len: int
    uniform_q_len: Optional[int] = None

    @classmethod
    def of(cls, q_lens: Sequence[int], cached_lens: Sequence[int]) -> "Optional[FreshSuffix]":
        """The longest run of trailing requests with nothing cached, from host lengths."""
        r0 = len(cached_lens)
        while r0 > 0 and int(cached_lens[r0 - 1]) == 0:
            r0 -= 1
        if r0 == len(cached_lens):
            return None
        head = [int(n) for n in q_lens[:r0]]
        tail = [int(n) for n in q_lens[r0:]]
        return cls(r0, sum(head), max(head, default=0), max(tail),
                   tail[0] if min(tail) == max(tail) else None)


def fresh_prefill_supported(q: torch.Tensor, k: torch.Tensor, alibi_slopes,
                            sliding_window: int) -> bool:
    """Whether :func:`fresh_prefill_attention` covers this attention (torch's fused kernels:
    bf16/f16, head dims up to 256 in multiples of 8, no ALiBi, no sliding window)."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256 and not sliding_window
            and (alibi_slopes is None or len(alibi_slopes) == 0))


def fresh_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_q_lens: torch.Tensor, max_q_len: int, *,
                            scale: Optional[float] = None, out: Optional[torch.Tensor] = None,
                            uniform_q_len: Optional[int] = None) -> torch.Tensor:
    """Causal attention of packed prompts with no cached prefix: ``q [tokens, H, D]`` over
    ``k``/``v [tokens, kv_heads, D]`` of the same tokens (request r: tokens
    ``cu_q_lens[r]:cu_q_lens[r+1]``).

    Prompts of one length (``uniform_q_len``) are viewed as a dense batch for
    ``scaled_dot_product_attention`` with cuDNN first (the fastest on sm_90 by far:
    benchmarks/prefill_attention.py), then flash; prompts of different lengths go to torch's
    variable-length flash attention.  Both take grouped K/V heads as they are.
    """
    import torch.nn.functional as F
    T, H, D = q.shape
    kvh = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if uniform_q_len and T % uniform_q_len == 0:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        R, L = T // uniform_q_len, uniform_q_len
        qd, kd, vd = (x.view(R, L, x.shape[1], D).transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale,
                                               enable_gqa=kvh != H)
        o = o.transpose(1, 2).reshape(T, H, D)
    else:
        from torch.nn.attention.varlen import varlen_attn
        cu = cu_q_lens.to(torch.int32)
        o = varlen_attn(q, k, v, cu, cu, int(max_q_len), int(max_q_len), scale=scale,
                        window_size=(-1, 0))
    if out is None:
        return o
    out.copy_(o)
    return out


# ---- rotary embedding + cache write -------------------------------------------------------------
def rope_inv_freq(rot_dim: int, base: float = 10000.0, scaling: Optional[dict] = None,
                  device=None) -> torch.Tensor:
    """float32 ``[rot_dim / 2]`` inverse frequencies as transformers computes them, with
    ``scaling`` = a HF ``rope_scaling`` dict of type ``llama3`` or ``linear`` (or None)."""
    if rot_dim <= 0 or rot_dim % 2:
        raise KernelArgumentError(f"rotary dim must be even and positive, got {rot_dim}")
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old = scaling.get("original_max_position_embeddings", 8192)
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        inv = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv = inv / scaling["factor"]
    elif kind not in ("default", None):
        raise KernelArgumentError(f"rope scaling {kind!r} is not supported by the kernel "
                                  "(default, linear, llama3)")
    return inv.to(device=device) if device is not None else inv


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, inv_freq: Optional[torch.Tensor] = None, *,
                  v: Optional[torch.Tensor] = None, kv_cache: Optional[torch.Tensor] = None,
                  layer: int = 0, block_tables: Optional[torch.Tensor] = None,
                  q_lens: Optional[torch.Tensor] = None,
                  cached_lens: Optional[torch.Tensor] = None,
                  positions: Optional[torch.Tensor] = None, style: str = "neox",
                  cu_q_lens: Optional[torch.Tensor] = None,
                  kv_scales: Optional[Sequence[float]] = None,
                  cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
                  q_out: Optional[torch.Tensor] = None,
                  k_out: Optional[torch.Tensor] = None) -> None:
    """Rotate ``q [tokens, heads, D]`` and ``k [tokens, kv_heads, D]`` (the first ``R`` dims of
    each head; ``style`` "neox" = rotate-half, "gptj" = interleaved pairs) into ``q_out`` /
    ``k_out`` (same shapes; in place when not given) and, when ``kv_cache`` is given, write
    rotated k and ``v`` into it (an int8 / fp8 cache: quantized with ``kv_scales``, as
    :func:`kv_cache_write`).

    The angles: either ``cos`` / ``sin [tokens, R]`` tables of q's dtype (llm.rope's: element
    j becomes ``x[j] cos[j] -/+ x[partner] sin[j]``), or ``inv_freq`` (``R / 2`` float32
    entries) at ``positions`` (int32 ``[tokens]``) or each token's cache position."""
    if style not in ("neox", "gptj"):
        raise KernelArgumentError(f"style must be 'neox' or 'gptj', got {style!r}")
    _tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    dev, dt = q.device, q.dtype
    _tensor("k", k, ndim=3, dtypes=(dt,), device=dev)
    _heads_contiguous("q", q)
    _heads_contiguous("k", k)
    T, H, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise KernelArgumentError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match")
    kvh = k.shape[1]
    for name, out, x in (("q_out", q_out, q), ("k_out", k_out, k)):
        if out is not None:
            _tensor(name, out, ndim=3, dtypes=(dt,), device=dev)
            if out.shape != x.shape:
                raise KernelArgumentError(f"{name} {tuple(out.shape)} differs from its input "
                                          f"{tuple(x.shape)}")
            _heads_contiguous(name, out)
    if (cos is None) == (inv_freq is None) or (cos is None) != (sin is None):
        raise KernelArgumentError("give either inv_freq or both cos and sin tables")
    cs_stride = 0
    if cos is not None:
        _tensor("cos", cos, ndim=2, dtypes=(dt,), device=dev)
        _tensor("sin", sin, ndim=2, dtypes=(dt,), device=dev)
        if cos.shape != sin.shape or cos.stride() != sin.stride() or cos.shape[0] != T \
                or cos.stride(1) != 1:
            raise KernelArgumentError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must "
                                      f"be [{T}, rot_dim] rows with one stride and a contiguous "
                                      f"last dim")
        half = cos.shape[1] // 2
        if cos.shape[1] % 2:
            raise KernelArgumentError(f"cos/sin cover {cos.shape[1]} dims: need an even count")
        cs_stride = cos.stride(0)
    else:
        _tensor("inv_freq", inv_freq, ndim=1, dtypes=(torch.float32,), device=dev)
        half = inv_freq.shape[0]
        inv_freq = inv_freq.contiguous()
    rot = 2 * half
    if rot > D or half > 256 or half == 0:
        raise KernelArgumentError(f"{rot} rotary dims do not fit head_dim {D} (at most "
                                  f"head_dim and 512)")
    R, cu, layer_off, bs, shift, mb = 0, None, 0, 1, 0, 0
    cdt, ks, vs = None, 1.0, 1.0
    if positions is not None:
        _tensor("positions", positions, ndim=1, dtypes=(torch.int32,), device=dev)
        if positions.shape[0] != T or not positions.is_contiguous():
            raise KernelArgumentError(f"positions must be contiguous with {T} entries")
    if kv_cache is not None or (positions is None and cos is None):
        if cached_lens is None or block_tables is None and kv_cache is not None:
            raise KernelArgumentError("rope_kv_write needs cached_lens (and block_tables with a "
                                      "cache) to place tokens")
        if block_tables is None:
            block_tables = torch.zeros((cached_lens.shape[0], 1), dtype=torch.int32, device=dev)
        if q_lens is None and cu_q_lens is None:
            raise KernelArgumentError("rope_kv_write needs q_lens or cu_q_lens")
        R, cu = _meta(block_tables, cached_lens, q_lens, cu_q_lens, dev)
        mb = block_tables.shape[1]
    if kv_cache is not None:
        if v is None:
            raise KernelArgumentError("writing the cache needs v")
        _tensor("v", v, ndim=3, dtypes=(dt,), device=dev)
        if v.shape != k.shape:
            raise KernelArgumentError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
        _heads_contiguous("v", v)
        _tensor("kv_cache", kv_cache, device=dev)
        layer_off, bs, shift, (cdt, ks, vs) = _cache_geometry(kv_cache, layer, kvh, D, dt,
                                                              kv_scales)
    elif kv_scales is not None and len(kv_scales) > 0:
        raise KernelArgumentError("kv_scales without a kv_cache")
    if T == 0:
        return
    vec = _vec(dt)
    tensors = [x for x in (q, k, v if kv_cache is not None else None, q_out, k_out)
               if x is not None]
    ok = (D % vec == 0 and all(_aligned(x) and x.stride(0) % vec == 0 for x in tensors)
          and (half % vec == 0 if style == "neox" else rot % vec == 0))
    kern = rope_kernel(dt, cdt)
    idx = (0 if ok else 1) if style == "neox" else (2 if ok else 3)
    p = RopeParams(_ptr(q), _ptr(k), _ptr(v) if kv_cache is not None else 0, _ptr(kv_cache),
                   _ptr(block_tables) if kv_cache is not None else 0, _ptr(cu),
                   _ptr(cached_lens) if cu is not None else 0, _ptr(positions), _ptr(inv_freq),
                   _ptr(cos), _ptr(sin), _ptr(q_out), _ptr(k_out),
                   q.stride(0), k.stride(0), v.stride(0) if kv_cache is not None else 0,
                   layer_off, cs_stride, q_out.stride(0) if q_out is not None else 0,
                   k_out.stride(0) if k_out is not None else 0,
                   R, H, kvh, D, rot, bs, shift, mb, ks, vs)
    kern.launch(kern.names[idx], (T,), (256,), p, device=dev)


# ---- RMSNorm ------------------------------------------------------------------------------------
def _rows(name, x):
    if x.dim() < 1 or x.stride(-1) != 1:
        raise KernelArgumentError(f"{name} must have a contiguous last dim")
    if x.dim() == 1:
        return x.view(1, -1)
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        raise KernelArgumentError(f"{name} of shape {tuple(x.shape)} and strides "
                                  f"{tuple(x.stride())} cannot be viewed as rows") from None


def _rms(x, weight, eps, residual, out):
    _tensor("x", x, dtypes=FLOAT_DTYPES)
    dev, dt = x.device, x.dtype
    _tensor("weight", weight, ndim=1, dtypes=(dt,), device=dev)
    hidden = x.shape[-1]
    if weight.shape[0] != hidden or not weight.is_contiguous():
        raise KernelArgumentError(f"weight must be contiguous with {hidden} entries, got "
                                  f"{tuple(weight.shape)}")
    x2 = _rows("x", x)
    r2 = None
    if residual is not None:
        _tensor("residual", residual, dtypes=(dt,), device=dev)
        if residual.shape != x.shape:
            raise KernelArgumentError(f"residual {tuple(residual.shape)} differs from x "
                                      f"{tuple(x.shape)}")
        r2 = _rows("residual", residual)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        _tensor("out", out, dtypes=(dt,), device=dev)
        if out.shape != x.shape:
            raise KernelArgumentError(f"out {tuple(out.shape)} differs from x {tuple(x.shape)}")
    o2 = _rows("out", out)
    rows = x2.shape[0]
    if rows == 0 or hidden == 0:
        return out
    vec = _vec(dt)
    ts = [t for t in (x2, r2, o2, weight) if t is not None]
    if hidden % vec or not all(_aligned(t) and (t.dim() == 1 or t.stride(0) % vec == 0)
                               for t in ts):
        vec = 1
    nvec = hidden // vec
    threads = min(1024, -(-nvec // 32) * 32)
    need = -(-nvec // threads)
    maxv = next((m for m in RMS_MAXV if m >= need), None)
    if maxv is None:
        raise KernelArgumentError(f"hidden size {hidden} is too large for the RMSNorm kernel "
                                  f"(at most {1024 * RMS_MAXV[-1] * vec} here)")
    kern = rms_kernel(dt)
    name = f"irlm_rms_norm<{CTYPES[dt]}, {vec}, {maxv}, {'true' if r2 is not None else 'false'}>"
    p = RmsNormParams(_ptr(x2), _ptr(r2), _ptr(weight), _ptr(o2), x2.stride(0),
                      r2.stride(0) if r2 is not None else 0, o2.stride(0), hidden, float(eps))
    kern.launch(name, (rows,), (threads,), p, device=dev)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * weight`` over the last dim (fp32 statistics)."""
    return _rms(x, weight, eps, None, out)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6, *, out: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` (in place, rounded to the dtype) and ``out = rms_norm(residual)``;
    returns ``(out, residual)``.  ``out`` may be ``x`` itself."""
    return _rms(x, weight, eps, residual, out), residual


# ---- gated activations --------------------------------------------------------------------------
def gated_act(x: torch.Tensor, act: str = "silu", *,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(x[..., :I]) * x[..., I:]`` for ``x [..., 2I]``; act in silu, gelu_tanh, gelu."""
    if act not in ACTIVATIONS:
        raise KernelArgumentError(f"unknown activation {act!r}; one of {', '.join(ACTIVATIONS)}")
    _tensor("x", x, dtypes=FLOAT_DTYPES)
    dev, dt = x.device, x.dtype
    if x.shape[-1] % 2:
        raise KernelArgumentError(f"the last dim of x ({x.shape[-1]}) must be even: gate|up")
    inter = x.shape[-1] // 2
    x2 = _rows("x", x)
    if out is None:
        out = torch.empty(tuple(x.shape[:-1]) + (inter,), dtype=dt, device=dev)
    else:
        _tensor("out", out, dtypes=(dt,), device=dev)
        if tuple(out.shape) != tuple(x.shape[:-1]) + (inter,):
            raise KernelArgumentError(f"out must have shape {tuple(x.shape[:-1]) + (inter,)}")
    o2 = _rows("out", out)
    rows = x2.shape[0]
    if rows == 0 or inter == 0:
        return out
    vec = _vec(dt)
    if inter % vec or not all(_aligned(t) and t.stride(0) % vec == 0 for t in (x2, o2)):
        vec = 1
    n = rows * (inter // vec)
    blocks = max(1, min(-(-n // 256), _sm_count(dev.index or 0) * 16))
    kern = act_kernel(dt)
    name = f"irlm_gated_act<{CTYPES[dt]}, {vec}, {ACTIVATIONS[act]}>"
    p = GatedActParams(_ptr(x2), _ptr(o2), rows, x2.stride(0), o2.stride(0), inter)
    kern.launch(name, (blocks,), (256,), p, device=dev)
    return out


# ---- sampling -----------------------------------------------------------------------------------
Scalar = Union[int, float, None, torch.Tensor, Sequence]


def _per_request(name, value, R, dtype, dev, default):
    if value is None:
        return None if default is None else torch.full((R,), default, dtype=dtype, device=dev)
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return torch.full((R,), value.item(), dtype=dtype, device=dev)
        if value.shape != (R,):
            raise KernelArgumentError(f"{name} must have {R} entries, got {tuple(value.shape)}")
        return value.to(device=dev, dtype=dtype).contiguous()
    if isinstance(value, (int, float)):
        return torch.full((R,), value, dtype=dtype, device=dev)
    t = torch.tensor(list(value), dtype=dtype)
    if t.shape != (R,):
        raise KernelArgumentError(f"{name} must have {R} entries, got {len(t)}")
    return t.to(dev)


def sample(logits: torch.Tensor, temperature: Scalar = 1.0, top_k: Scalar = None,
           top_p: Scalar = None, seeds: Scalar = None, offsets: Scalar = None, *,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token ids (int32 ``[reqs]``) sampled from ``logits [reqs, vocab]`` on the GPU.

    Per request (scalars broadcast; tensors stay on the GPU): ``temperature`` (<= 0: greedy),
    ``top_k`` (0: off), ``top_p`` (1: off), ``seeds`` (int64; default: drawn from torch's
    generator) and ``offsets`` (int64, e.g. the step number: the same seed and offset give the
    same draw)."""
    _tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    dev = logits.device
    R, V = logits.shape
    if logits.stride(1) != 1:
        raise KernelArgumentError("logits must have a contiguous vocab dim")
    if V >= 2 ** 31 - 1:
        raise KernelArgumentError(f"vocab {V} is too large")
    if out is None:
        out = torch.empty((R,), dtype=torch.int32, device=dev)
    else:
        _tensor("out", out, ndim=1, dtypes=(torch.int32,), device=dev)
        if out.shape[0] != R or not out.is_contiguous():
            raise KernelArgumentError(f"out must be contiguous int32 with {R} entries")
    if R == 0:
        return out
    temp = _per_request("temperature", temperature, R, torch.float32, dev, None)
    tk = _per_request("top_k", top_k, R, torch.int32, dev, None)
    tp = _per_request("top_p", top_p, R, torch.float32, dev, None)
    if seeds is None:
        sd = torch.randint(0, 2 ** 62, (R,), dtype=torch.int64, device=dev)
    else:
        sd = _per_request("seeds", seeds, R, torch.int64, dev, None)
    off = _per_request("offsets", offsets, R, torch.int64, dev, None)
    kern = sample_kernel()
    p = SampleParams(_ptr(logits), _ptr(temp), _ptr(tk), _ptr(tp), _ptr(sd), _ptr(off), _ptr(out),
                     logits.stride(0), V)
    kern.launch(f"irlm_sample<{CTYPES[logits.dtype]}>", (R,), (1024,), p, device=dev)
    return out


def greedy(logits: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """argmax over the vocab (the first index of the maximum, as torch.argmax), int32."""
    return sample(logits, temperature=0.0, seeds=0, out=out)


# ---- rotary embedding on the attention layout (llm.rope) -----------------------------------------
class RopeApplyParams(ctypes.Structure):
    _fields_ = [("x", c_void_p), ("out", c_void_p), ("cos", c_void_p), ("sin", c_void_p),
                ("xs", c_longlong * 3), ("os", c_longlong * 3), ("cs", c_longlong * 3),
                ("D", c_int), ("R", c_int)]


# dict.fromkeys, not a set: the order (and so the test ids) must not depend on hashing
ROPE_VARIANTS = [(x, c) for x in FLOAT_DTYPES for c in dict.fromkeys((x, torch.float32))]


@lru_cache(maxsize=None)
def rope_apply_kernel() -> Kernel:
    return Kernel("rope.cu", [f"irlm_rope<{CTYPES[x]}, {CTYPES[c]}>" for x, c in ROPE_VARIANTS])


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``llm.rope`` (rotate-half): ``x * cos + rotate_half(x) * sin`` over the first
    ``R = cos.shape[-1]`` dims of ``x [..., D]`` (rank <= 4, any strides with a contiguous last
    dim); ``cos``/``sin`` broadcast to ``x.shape[:-1] + (R,)``.  The result has x's strides."""
    _tensor("x", x, dtypes=FLOAT_DTYPES)
    dev = x.device
    if x.dim() > 4 or x.dim() < 1:
        raise KernelArgumentError(f"x must have rank 1 to 4, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    D, R = x.shape[-1], cos.shape[-1]
    if R % 2 or R > D or sin.shape[-1] != R:
        raise KernelArgumentError(f"cos/sin cover {R} dims of {D}: need an even count <= D")
    _tensor("cos", cos, dtypes=(x.dtype, torch.float32), device=dev)
    _tensor("sin", sin, dtypes=(cos.dtype,), device=dev)
    x4 = x
    while x4.dim() < 4:
        x4 = x4.unsqueeze(0)
    try:
        c4 = cos.expand(*x4.shape[:-1], R)
        s4 = sin.expand(*x4.shape[:-1], R)
    except RuntimeError:
        raise KernelArgumentError(f"cos {tuple(cos.shape)} does not broadcast to "
                                  f"{tuple(x.shape[:-1]) + (R,)}") from None
    if c4.stride() != s4.stride() or c4.stride(-1) != 1:
        c4, s4 = c4.contiguous(), s4.contiguous()
    if out is None:
        out = torch.empty_like(x)
    o4 = out
    while o4.dim() < 4:
        o4 = o4.unsqueeze(0)
    B, H, T = x4.shape[:3]
    if B * H * T == 0:
        return out
    p = RopeApplyParams(_ptr(x4), _ptr(o4), _ptr(c4), _ptr(s4), (c_longlong * 3)(*x4.stride()[:3]),
                   (c_longlong * 3)(*o4.stride()[:3]), (c_longlong * 3)(*c4.stride()[:3]), D, R)
    threads = min(128, max(32, -(-max(R // 2, D - R) // 32) * 32))
    kern = rope_apply_kernel()
    kern.launch(f"irlm_rope<{CTYPES[x.dtype]}, {CTYPES[cos.dtype]}>", (T, H, B), (threads,), p,
                device=dev)
    return out
