"""The ``llm`` dialect: the inference form's ops.

In the inference form the tokens of every scheduled request are packed into one ``[tokens, ...]``
batch with no padding.  Per-request metadata (all i32):

* ``q_lens[r]``: how many of this step's tokens belong to request r (a prompt chunk, or 1 for
  a decode step); request r's tokens are contiguous and requests are in order;
* ``cached_lens[r]``: how many of request r's tokens are already in the KV cache before this
  step, so this step's tokens sit at positions ``cached_lens[r] + i``;
* ``block_tables[r, j]``: the cache block holding positions ``[j*bs, (j+1)*bs)`` of request r.

The KV cache is one pool ``[layers, blocks, 2, block_size, kv_heads, head_dim]`` (2 = key,
value) owned by the runtime and passed to every step; ``llm.paged_attention`` writes this
step's keys and values into it (its one side effect) and attends over everything cached.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import IRError
from ..registry import attr, define_op, register_graph_check
from ..types import DType, TensorType
from ._shape import require_float, require_int, require_rank, same_dim

#: The inputs of a graph in the inference form, in the order the runtime feeds them
#: (substitute-attention makes them; runtime runners and engine loading check them).
INFERENCE_INPUTS = ("input_ids", "position_ids", "q_lens", "cached_lens", "block_tables",
                    "kv_cache")
#: The inference-form input that holds the paged KV cache.
KV_CACHE_INPUT = "kv_cache"


class KVCacheLayout(NamedTuple):
    """The paged KV cache pool ``[layers, blocks, 2, block_size, kv_heads, head_dim]`` (the
    2 is key, value): llm.paged_attention's ``kv_cache`` operand.  The one declaration of the
    layout; passes, runtime and kernels index it through these names."""
    layers: int
    blocks: int
    kv: int
    block_size: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, shape_or_type) -> "KVCacheLayout":
        """The layout of a cache's shape, TensorType, tensor or graph input Value."""
        shape = getattr(shape_or_type, "type", shape_or_type)
        shape = getattr(shape, "shape", shape)
        if len(shape) != len(cls._fields):
            raise IRError(f"a KV cache has {len(cls._fields)} dims ({', '.join(cls._fields)}), "
                          f"got {len(shape)}")
        return cls(*shape)

    def block_bytes(self, itemsize: int) -> int:
        """Bytes one block takes across all layers (keys and values)."""
        return int(self.layers) * int(self.kv) * int(self.block_size) * int(self.kv_heads) * \
            int(self.head_dim) * int(itemsize)


#: the axis of each KV-cache dim, by name (``KV_CACHE_AXIS["kv_heads"]`` is 4)
KV_CACHE_AXIS = {name: i for i, name in enumerate(KVCacheLayout._fields)}


def kv_cache_input(graph):
    """The graph's KV-cache input Value (an IRError if it is not in the inference form)."""
    for v in graph.inputs:
        if v.name == KV_CACHE_INPUT:
            return v
    raise IRError(f"graph @{graph.name} has no %{KV_CACHE_INPUT} input (not in the inference "
                  f"form; compile it with substitute-attention)")


def _infer_paged_attention(t, a):
    q, k, v, cache, tables, q_lens, cached = t
    for x, what in ((q, "query"), (k, "key"), (v, "value")):
        require_rank(x, 3, what)
        require_float(x, what)
    require_rank(cache, 6, "kv_cache")
    for x, what in ((tables, "block_tables"), (q_lens, "q_lens"), (cached, "cached_lens")):
        require_int(x, what)
    require_rank(tables, 2, "block_tables")
    require_rank(q_lens, 1, "q_lens")
    require_rank(cached, 1, "cached_lens")
    same_dim(q.shape[0], k.shape[0], "query and key token counts differ")
    same_dim(k.shape[0], v.shape[0], "key and value token counts differ")
    same_dim(k.shape[1], v.shape[1], "key and value head counts differ")
    same_dim(q.shape[2], k.shape[2], "query and key head sizes differ")
    same_dim(cache.shape[4], k.shape[1], "kv_cache kv_heads differ from the keys'")
    same_dim(cache.shape[5], k.shape[2], "kv_cache head_dim differs from the keys'")
    same_dim(cache.shape[2], 2, "kv_cache dim 2 must be 2 (key, value)")
    same_dim(tables.shape[0], q_lens.shape[0], "block_tables and q_lens request counts differ")
    same_dim(cached.shape[0], q_lens.shape[0], "cached_lens and q_lens request counts differ")
    if isinstance(q.shape[1], int) and isinstance(k.shape[1], int) and q.shape[1] % k.shape[1]:
        raise IRError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    if isinstance(cache.shape[0], int) and not 0 <= a["layer"] < cache.shape[0]:
        raise IRError(f"layer {a['layer']} is outside the cache's {cache.shape[0]} layers")
    if a["alibi_slopes"] and isinstance(q.shape[1], int) and len(a["alibi_slopes"]) != q.shape[1]:
        raise IRError(f"{len(a['alibi_slopes'])} alibi slopes for {q.shape[1]} heads")
    quantized = cache.dtype in KV_QUANT_DTYPES
    if cache.dtype is not k.dtype and not quantized:
        raise IRError(f"kv_cache dtype {cache.dtype.value} differs from keys' {k.dtype.value}")
    if quantized and len(a["kv_scales"]) != 2:
        raise IRError(f"a {cache.dtype.value} kv_cache needs kv_scales = [key scale, value "
                      f"scale], got {list(a['kv_scales'])}")
    if not quantized and a["kv_scales"]:
        raise IRError(f"kv_scales are for an i8 or f8e4m3 kv_cache, not {cache.dtype.value}")
    if any(not (x > 0) for x in a["kv_scales"]):
        raise IRError(f"kv_scales must be positive, got {list(a['kv_scales'])}")
    return [q.with_shape((q.shape[0], q.shape[1], v.shape[2]))]


#: the ops that write a layer of the paged KV cache and attend over it
PAGED_ATTENTION_OPS = ("llm.paged_attention", "llm.rope_paged_attention")

#: KV-cache element types stored with one static scale per layer for keys and one for values
KV_QUANT_DTYPES = (DType.i8, DType.f8e4m3)


def kv_to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Keys or values as the cache stores them: a float cache as is; i8 ``round(x / s)``
    clamped to +-127; f8e4m3 ``x / s`` clamped to +-448 (float32 math)."""
    if cache_dtype == torch.int8:
        return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    if cache_dtype == torch.float8_e4m3fn:
        return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return x.to(cache_dtype)


def write_kv(cache, layer, k, v, tables, q_lens, cached_lens, scales=(1.0, 1.0)):
    """Write this step's keys and values into the paged cache (reference semantics)."""
    bs = cache.shape[3]
    k = kv_to_cache(k, cache.dtype, scales[0])
    v = kv_to_cache(v, cache.dtype, scales[1])
    start = 0
    for r in range(q_lens.shape[0]):
        n, c = int(q_lens[r]), int(cached_lens[r])
        pos = torch.arange(c, c + n, device=cache.device)
        blocks = tables[r, pos // bs].long()
        slots = pos % bs
        cache[layer, blocks, 0, slots] = k[start:start + n].to(cache.dtype)
        cache[layer, blocks, 1, slots] = v[start:start + n].to(cache.dtype)
        start += n


def _ref_paged_attention(ctx, x, a):
    q, k, v, cache, tables, q_lens, cached = x
    layer, bs = a["layer"], cache.shape[3]
    ks, vs = a["kv_scales"] or (1.0, 1.0)
    write_kv(cache, layer, k, v, tables, q_lens, cached, (ks, vs))
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[2])
    out = torch.empty(q.shape[0], heads, v.shape[2], dtype=q.dtype, device=q.device)
    slopes = torch.tensor(a["alibi_slopes"], dtype=torch.float32, device=q.device) if a["alibi_slopes"] else None
    start = 0
    for r in range(q_lens.shape[0]):
        n, c = int(q_lens[r]), int(cached[r])
        total = c + n
        pos = torch.arange(total, device=q.device)
        blocks = tables[r, pos // bs].long()
        keys = cache[layer, blocks, 0, pos % bs].float() * ks    # [total, kv_heads, d]
        vals = cache[layer, blocks, 1, pos % bs].float() * vs
        rep = heads // kv_heads
        keys = keys.repeat_interleave(rep, dim=1)
        vals = vals.repeat_interleave(rep, dim=1)
        qr = q[start:start + n].float()                      # [n, heads, d]
        scores = torch.einsum("nhd,thd->hnt", qr, keys) * scale
        qpos = torch.arange(c, total, device=q.device)
        dist = qpos[:, None] - pos[None, :]                  # query pos - key pos
        allowed = dist >= 0
        if a["sliding_window"]:
            allowed &= dist < a["sliding_window"]
        if slopes is not None:
            scores = scores - slopes[:, None, None] * dist[None].float()
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:start + n] = torch.einsum("hnt,thd->nhd", probs, vals).to(q.dtype)
        start += n
    return [out]


_ATTENTION_ATTRS = {"layer": attr("int"), "scale": attr("float", None),
                    "sliding_window": attr("int", 0), "alibi_slopes": attr("floats", ()),
                    "kv_scales": attr("floats", ())}


define_op(
    "llm.paged_attention",
    ["query", "key", "value", "kv_cache", "block_tables", "q_lens", "cached_lens"],
    _ATTENTION_ATTRS,
    infer=_infer_paged_attention, reference=_ref_paged_attention, pure=False,
    doc="Causal attention of packed tokens over a paged KV cache, writing this step's keys "
        "and values into the cache first. GQA/MQA when query heads are a multiple of kv "
        "heads; sliding_window > 0 limits each query to that many most recent positions; "
        "alibi_slopes (one per head) add -slope * distance to the scores. An i8 or f8e4m3 "
        "kv_cache stores keys / kv_scales[0] and values / kv_scales[1] (i8: rounded, clamped "
        "to +-127; f8e4m3: clamped to +-448) and reads them back times the scale.")


def _infer_rope_paged_attention(t, a):
    q, k, v, cos, sin = t[:5]
    out = _infer_paged_attention([q, k, v] + list(t[5:]), a)
    for x, what in ((cos, "cos"), (sin, "sin")):
        require_rank(x, 2, what)
        require_float(x, what)
        if x.dtype is not q.dtype:
            raise IRError(f"{what} dtype {x.dtype.value} differs from the query's "
                          f"{q.dtype.value}")
        same_dim(x.shape[0], q.shape[0], f"{what} has a row per token: its token count differs")
    if cos != sin:
        raise IRError(f"cos {cos} and sin {sin} must have one type")
    rot, d = cos.shape[1], q.shape[2]
    if not isinstance(rot, int) or rot % 2 or rot == 0 or (isinstance(d, int) and rot > d):
        raise IRError(f"the rotary dim (cos's last dim, {rot}) must be a static even number "
                      f"from 2 to the head dim {d}")
    return out


def _ref_rope_paged_attention(ctx, x, a):
    from .fused import rotate
    q, k, v, cos, sin = x[:5]
    r = cos.shape[1]
    c, s = cos[:, None, :], sin[:, None, :]

    def rope(t):
        rot = t[..., :r] * c + rotate(t[..., :r], a["style"]) * s
        return rot if r == t.shape[-1] else torch.cat((rot, t[..., r:]), dim=-1)

    att = {n: a[n] for n in _ATTENTION_ATTRS}
    return _ref_paged_attention(ctx, [rope(q), rope(k), v] + list(x[5:]), att)


define_op(
    "llm.rope_paged_attention",
    ["query", "key", "value", "cos", "sin", "kv_cache", "block_tables", "q_lens",
     "cached_lens"],
    dict(_ATTENTION_ATTRS, style=attr("str", "rotate_half", ("rotate_half", "interleaved"))),
    infer=_infer_rope_paged_attention, reference=_ref_rope_paged_attention, pure=False,
    doc="llm.paged_attention of the query and key after llm.rope: the first r dims of each "
        "head (r = cos's last dim) become x*cos + rotate(x)*sin, cos and sin [tokens, r] "
        "holding one row per token (style as llm.rope's). The rotated keys go into the "
        "cache. The GPU executor's fusion of two ropes and an attention "
        "(irlm.lowering.rope_attention), so one kernel rotates and writes the cache.")


def _one_layer_each(graph) -> list[str]:
    """Each layer of the paged KV cache is written by one paged attention: two writing the
    same layer would overwrite each other's keys and values."""
    seen, out = {}, []
    for op in graph.ops:
        if op.name in PAGED_ATTENTION_OPS:
            first = seen.setdefault(op.attrs["layer"], op)
            if first is not op:
                out.append(f"{op.describe()}: layer {op.attrs['layer']} of the KV cache is "
                           f"also written by {first.describe()}; each paged attention needs "
                           f"a layer of its own")
    return out


register_graph_check(_one_layer_each)


def _infer_last_tokens(t, a):
    h, q_lens = t
    require_int(q_lens, "q_lens")
    require_rank(q_lens, 1, "q_lens")
    if h.rank < 1:
        raise IRError("hidden states must have rank >= 1")
    return [h.with_shape((q_lens.shape[0],) + tuple(h.shape[1:]))]


def _ref_last_tokens(ctx, x, a):
    h, q_lens = x
    idx = torch.cumsum(q_lens.long(), 0) - 1
    return [h[idx]]


define_op("llm.last_tokens", ["hidden", "q_lens"], infer=_infer_last_tokens,
          reference=_ref_last_tokens,
          doc="The last token of each request from packed [tokens, ...] states: [reqs, ...].")
