"""``quantize{mode=int8|int4|fp8, group=128}``: weight-only quantization of linear layers.

Every ``core.linear`` whose weight is a ``param`` becomes a ``quant.linear`` over *derived*
weights (:meth:`irlm.passes.Rewriter.derived_param`): the quantized tensor, its scales and (for
int4) its zero points are computed lazily from the stored weight by round-to-nearest, the first
time something reads them; the pass itself copies no data (unless ``measure=true``, the default,
which quantizes each weight once to report its error).

* ``int8``: symmetric, one scale per output channel: ``s = amax(|W[n, :]|) / 127``,
  ``q = clamp(round(W / s), -127, 127)``.
* ``int4``: asymmetric, one scale and zero point per group of ``group`` consecutive input
  features (32, 64, 128...): over a group's range ``[lo, hi]`` (widened to contain 0),
  ``s = (hi - lo) / 15``, ``z = round(-lo / s)``, ``q = clamp(round(W / s) + z, 0, 15)``,
  packed two per byte (low nibble first).
* ``fp8``: float8 e4m3, one scale per tensor: ``s = amax(|W|) / 448``, ``q = fp8(W / s)``.

By default the LM head (a linear whose result reaches a graph output without passing another
linear, or whose weight is named ``lm_head`` or is also read by an embedding) stays in full
precision: ``skip=none`` quantizes it too.  Embeddings are never quantized (they are not linear
layers).  ``ctx.stats`` gets ``rel error <weight>`` = ||dequant(Q(W)) - W||_F / ||W||_F per
layer and the mean and max over layers (``--stats`` prints them).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from irlm.errors import IRLMError
from irlm.ir import Graph, Op, Value
from irlm.ops.quant import FP8_MAX, dequantize_reference, pack_int4
from irlm.types import DType, TensorType

from .errors import PassError
from .fusions.weights import ensure_weight_store
from .options import Option
from .registry import register_pass
from .rewriter import Rewriter

MODES = ("int8", "int4", "fp8")
_EPS = 1e-12


# ----- round-to-nearest quantizers (torch, float32 math) ------------------------------------------


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32):
    """``(q i8 [N, K], s [N])``: symmetric per output channel."""
    wf = w.float()
    s = (wf.abs().amax(dim=1) / 127.0).clamp(min=_EPS).to(scale_dtype)
    q = torch.round(wf / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: torch.Tensor, group: int, scale_dtype: torch.dtype = torch.float32):
    """``(q u8 [N, K/2] packed, s [N, K/group], z u8 [N, K/group])``: asymmetric group-wise."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    s = ((hi - lo) / 15.0).clamp(min=_EPS).to(scale_dtype)
    sf = s.float()
    z = torch.round(-lo / sf).clamp(0, 15)
    q = (torch.round(g / sf[..., None]) + z[..., None]).clamp(0, 15)
    return pack_int4(q.reshape(n, k)), s, z.to(torch.uint8)


def quantize_fp8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32):
    """``(q f8e4m3 [N, K], s 0-d)``: per-tensor scale amax / 448."""
    wf = w.float()
    s = (wf.abs().amax() / FP8_MAX).clamp(min=_EPS).to(scale_dtype)
    q = (wf / s.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s


def quantize_weight(w: torch.Tensor, mode: str, group: int = 0,
                    scale_dtype: torch.dtype = torch.float32) -> tuple:
    """The stored tensors of ``mode``: (q, scales) or, for int4, (q, scales, zeros)."""
    if mode == "int8":
        return quantize_int8(w, scale_dtype)
    if mode == "int4":
        return quantize_int4(w, group, scale_dtype)
    if mode == "fp8":
        return quantize_fp8(w, scale_dtype)
    raise PassError(f"quantize: unknown mode '{mode}' (valid: {', '.join(MODES)})")


def dequantize_weight(parts: tuple, mode: str, group: int = 0) -> torch.Tensor:
    q, s = parts[0], parts[1]
    z = parts[2] if len(parts) > 2 else None
    return dequantize_reference(q, s, z, group=group if mode == "int4" else 0)


def relative_error(w: torch.Tensor, parts: tuple, mode: str, group: int = 0) -> float:
    """``||dequant(parts) - W||_F / ||W||_F``."""
    wf = w.float()
    norm = wf.norm().item()
    diff = (dequantize_weight(parts, mode, group) - wf).norm().item()
    return diff / norm if norm > 0 else diff


def stored_types(shape, mode: str, group: int, scale_dtype: DType) -> list[TensorType]:
    n, k = shape
    if mode == "int8":
        return [TensorType((n, k), DType.i8), TensorType((n,), scale_dtype)]
    if mode == "int4":
        return [TensorType((n, k // 2), DType.u8), TensorType((n, k // group), scale_dtype),
                TensorType((n, k // group), DType.u8)]
    return [TensorType((n, k), DType.f8e4m3), TensorType((), scale_dtype)]


# ----- which linears -----------------------------------------------------------------------------

_LINEARS = ("core.linear", "quant.linear", "llm.linear_act", "core.matmul")


def _reaches_output(v: Value, graph: Graph) -> bool:
    """Whether ``v`` flows into a graph output without passing through another GEMM."""
    outputs = {id(o) for o in graph.outputs}
    seen, todo = set(), [v]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if id(x) in outputs:
            return True
        for u in x.uses:
            if u.op.name not in _LINEARS:
                todo.extend(u.op.results)
    return False


def is_lm_head(linear: Op, graph: Graph, embedding_weights: set[str]) -> bool:
    name = linear.operands[1].producer.attrs["name"]
    return ("lm_head" in name or name in embedding_weights
            or _reaches_output(linear.results[0], graph))


def _layer(linear: Op, wname: str) -> str:
    where = str(linear.loc.module) if linear.loc and linear.loc.module else ""
    return f"layer '{where or wname}' (weight '{wname}')"


def _candidates(graph: Graph, skip: str) -> tuple[list[Op], list[Op]]:
    """(linears to quantize, linears skipped as LM head)."""
    embedding_weights = {op.operands[0].producer.attrs["name"] for op in graph.ops
                         if op.name == "core.embedding" and op.operands
                         and op.operands[0].producer is not None
                         and op.operands[0].producer.name == "param"}
    todo, skipped = [], []
    for op in list(graph.ops):
        if op.name != "core.linear" or len(op.operands) < 2:
            continue
        w = op.operands[1]
        if w.producer is None or w.producer.name != "param" or w.type.rank != 2 \
                or not w.type.dtype.is_float or w.type.dtype is DType.f8e4m3:
            continue
        if skip == "lm_head" and is_lm_head(op, graph, embedding_weights):
            skipped.append(op)
        else:
            todo.append(op)
    return todo, skipped


# ----- the pass ----------------------------------------------------------------------------------


class _Once:
    """Quantizes one weight once; the derived entries (q, scales, zeros) share the result."""

    def __init__(self, mode: str, group: int, scale_dtype: torch.dtype):
        self.mode, self.group, self.scale_dtype = mode, group, scale_dtype
        self.parts: Optional[tuple] = None

    def __call__(self, w: torch.Tensor) -> tuple:
        if self.parts is None:
            self.parts = quantize_weight(w, self.mode, self.group, self.scale_dtype)
        return self.parts

    def part(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda w: self(w)[i]


@register_pass("quantize", options={
    "mode": Option(str, "int8", "weight format: int8 (per channel), int4 (group-wise, zero "
                   "point) or fp8 (e4m3, per tensor)", choices=list(MODES)),
    "group": Option(int, 128, "int4: input features that share one scale and zero point"),
    "skip": Option(str, "lm_head", "lm_head: keep the LM head in full precision; none: "
                   "quantize every linear", choices=["lm_head", "none"]),
    "scale_dtype": Option(str, "f32", "dtype of the stored scales", choices=["f32", "f16"]),
    "measure": Option(bool, True, "quantize each weight now to report its relative error in "
                      "the statistics (needs the weight data)"),
})
def quantize(graph: Graph, ctx):
    """Weight-only quantization: core.linear over a param -> quant.linear over derived weights.

    int8: symmetric per output channel; int4: asymmetric group-wise (group along the input
    features), packed two per byte; fp8: e4m3 with one scale per tensor.  The LM head stays
    in full precision unless skip=none.  Statistics: per-layer relative weight error."""
    o = ctx.options
    mode, group = o.mode, o.group
    if mode not in MODES:  # options are checked by the registry; this guards direct calls
        raise PassError(f"quantize: unknown mode '{mode}' (valid: {', '.join(MODES)})")
    if mode == "int4" and group <= 0:
        raise PassError(f"quantize: option 'group' must be a positive number of input "
                        f"features for mode int4, got {group}")
    if mode != "int4":
        group = 0
    sdt = DType.parse(o.scale_dtype)
    todo, skipped = _candidates(graph, o.skip)
    # Check every layer before changing anything: an error leaves the graph as it was.
    for op in todo:
        k = op.operands[1].type.shape[1]
        if mode == "int4" and (not isinstance(k, int) or k % group or k % 2):
            raise PassError(f"quantize: option group={group} does not divide the {k} input "
                            f"features of {_layer(op, op.operands[1].producer.attrs['name'])}"
                            f" (use a group that divides it, e.g. 32)")
    if not todo:
        ctx.stats.bump("linears skipped (lm_head)", len(skipped))
        return
    store = ensure_weight_store(graph)
    rw = Rewriter(graph, ctx.stats)
    tag = mode + (f"g{group}" if mode == "int4" else "") + ("" if sdt is DType.f32 else "-f16s")
    errors: list[float] = []
    for op in todo:
        w = op.operands[1]
        wname = w.producer.attrs["name"]
        once = _Once(mode, group, sdt.torch)
        types = stored_types(w.type.shape, mode, group, sdt)
        suffixes = ["", ".scales", ".zeros"][:len(types)]
        rw.loc = op.loc
        with rw.insertion_point(before=op):
            stored = [rw.derived_param(f"{wname}.{tag}{sfx}", [w], once.part(i), type=t,
                                       how=f"quantize-{tag}{sfx.replace('.', '-')}")
                      for i, (sfx, t) in enumerate(zip(suffixes, types))]
            operands = [op.operands[0], *stored] + list(op.operands[2:])
            new = rw.op("quant.linear", *operands, mode=mode, group=group,
                        result_types=[op.results[0].type])
        if o.measure:
            try:
                wt = store.get(wname)
            except IRLMError:
                ctx.stats.bump("error not measured (no weight data)")
            else:
                # The derived entries may have existed already (same weight, same options).
                parts = tuple(store.get(v.producer.attrs["name"]) for v in stored)
                err = relative_error(wt, parts, mode, group)
                errors.append(err)
                ctx.stats.counters[f"rel error {wname}"] = float(f"{err:.4g}")
        rw.replace_op(op, new)
        ctx.stats.bump("linears quantized")
        if not w.uses and not any(x is w for x in graph.outputs):
            rw.erase_op(w.producer)
    if skipped:
        ctx.stats.bump("linears skipped (lm_head)", len(skipped))
    if errors:
        ctx.stats.counters["rel error mean"] = float(f"{sum(errors) / len(errors):.4g}")
        ctx.stats.counters["rel error max"] = float(f"{max(errors):.4g}")
