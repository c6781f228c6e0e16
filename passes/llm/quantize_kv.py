"""``quantize-kv-cache{dtype=int8|fp8}``: store the paged KV cache in 8 bits.

The cache is the largest buffer of a serving engine; halving it (from f16/bf16) doubles the
tokens that fit, and halves the bytes decode attention reads.  Keys and values are stored
divided by one static scale per layer each (``llm.paged_attention``'s ``kv_scales``), taken
from calibration: ``scale = amax / qmax`` of the layer's keys (values) over the calibration
prompts (qmax 127 for int8, 448 for fp8 e4m3).  The graph's ``kv_cache`` input changes to
``i8`` / ``f8e4m3``, so the runtime allocates the smaller pool from the plan's type.

Calibration: ``calib=`` / ``tokenizer=`` as for ``quantize`` (passes/llm/calibration.py).
Statistics: ``kv scales layer N`` = "key scale/value scale"; docs/quantization.md has the
measured accuracy.
"""
from __future__ import annotations

from irlm.ir import Graph
from irlm.ops.llm import KV_QUANT_DTYPES
from irlm.types import DType

from ..errors import PassError
from ..options import Option
from ..registry import register_pass

KV_DTYPES = {"int8": DType.i8, "fp8": DType.f8e4m3}
_QMAX = {DType.i8: 127.0, DType.f8e4m3: 448.0}


@register_pass("quantize-kv-cache", options={
    "dtype": Option(str, "int8", "cache element type: int8 or fp8 (e4m3)",
                    choices=list(KV_DTYPES)),
    "calib": Option(str, "", "calibration set (see quantize): .json token ids or text"),
    "tokenizer": Option(str, "", "tokenizer.json (or its directory) for a text calib"),
})
def quantize_kv_cache(graph: Graph, ctx):
    """Store the paged KV cache as int8 or fp8 with one calibrated scale per layer for keys
    and one for values (the paged inference form only)."""
    o = ctx.options
    want = KV_DTYPES[o.dtype]
    cache = next((v for v in graph.inputs if v.name == "kv_cache"), None)
    atts = [op for op in graph.ops if op.name == "llm.paged_attention"]
    if cache is None or not atts:
        raise PassError("quantize-kv-cache: the graph has no paged KV cache (run "
                        "substitute-attention first: it makes the paged inference form)")
    if cache.type.dtype in KV_QUANT_DTYPES:
        raise PassError(f"quantize-kv-cache: the KV cache is already {cache.type.dtype.value}")
    from .calibration import load_calibration, observe
    prompts = load_calibration(o.calib, o.tokenizer)
    obs = observe(graph, prompts, kv=True)
    ctx.stats.counters["calibration prompts"] = obs.prompts
    ctx.stats.counters["calibration tokens"] = obs.tokens
    qmax = _QMAX[want]
    # Attributes and the cache type change together, in place: each alone would fail the
    # op's type rule (a quantized cache needs kv_scales and vice versa), so no op is rebuilt
    # in between; the pass manager verifies the result.
    for op in atts:
        k_amax, v_amax = obs.kv.get(op.attrs["layer"], (0.0, 0.0))
        scales = (max(k_amax, 1e-6) / qmax, max(v_amax, 1e-6) / qmax)
        op.attrs["kv_scales"] = tuple(float(f"{s:.6g}") for s in scales)
        ctx.stats.counters[f"kv scales layer {op.attrs['layer']}"] = \
            "/".join(f"{s:.4g}" for s in op.attrs["kv_scales"])
    cache.type = cache.type.with_dtype(want)
    ctx.stats.bump("attention layers with a quantized cache", len(atts))
