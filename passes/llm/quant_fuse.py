"""``fuse-quant``: quantize/dequantize patterns around ``core.linear`` → the quantized GEMM ops.

``quantize{...,fuse=false}`` leaves the quantization explicit: ``quant.dequantize`` of the
stored weight feeding ``core.linear``, and for activation modes ``quant.quantize`` /
``quant.quantize_per_token`` + ``quant.dequantize`` on its input.  This pass rewrites

``llm.linear_act`` (a linear with its activation epilogue) is matched like ``core.linear`` and
its ``act`` carried over.

* ``core.linear(x, dequantize(q, s[, z]) [, b])`` with ``x`` not dequantized → ``quant.linear``
  (weight-only; mode from q's dtype: i8 int8, u8 int4, f8e4m3 fp8);
* ``core.linear(dequantize(quantize_per_token{i8}(x)), dequantize(q i8, s [N]) [, b])`` →
  ``quant.linear_a8{mode=w8a8}(x, q, s[, b])``;
* ``core.linear(dequantize(quantize{f8e4m3}(x, xs), xs), dequantize(q f8, s 0-d) [, b])`` →
  ``quant.linear_a8{mode=fp8}(x, q, s, xs[, b])``.

The dequantized weight must be read by this linear only (a shared one stays explicit); the
quantized activation may feed several linears (q/k/v share it), and ``dce`` removes what is
left.  A pattern that does not match exactly is left as it is, which is always correct: the
reference interpreter runs the explicit form too.
"""
from __future__ import annotations

from typing import Optional

from irlm.ir import Graph, Op, Value
from irlm.types import DType

from ..registry import register_pass
from ..rewriting.rewriter import Rewriter

_WEIGHT_MODE = {DType.i8: "int8", DType.u8: "int4", DType.f8e4m3: "fp8"}


def _producer(v: Value, name: str) -> Optional[Op]:
    p = v.producer
    return p if p is not None and p.name == name else None


def _stored(v: Value) -> bool:
    return v.producer is not None and v.producer.name == "param"


def _weight_dequant(lin: Op) -> Optional[Op]:
    """The ``quant.dequantize`` of stored weights that only ``lin`` reads, as its weight."""
    dq = _producer(lin.operands[1], "quant.dequantize")
    if dq is None or len(dq.results[0].uses) != 1 or dq.operands[0].type.rank != 2:
        return None
    if not all(_stored(v) for v in dq.operands) or dq.attrs["axis"] != 0:
        return None
    if dq.results[0].type.dtype is not lin.operands[0].type.dtype:
        return None
    return dq


def _act_pattern(x: Value) -> Optional[tuple[str, Value, Optional[Value]]]:
    """(mode, float input, static scale) when ``x`` is a dequantized quantized activation."""
    dq = _producer(x, "quant.dequantize")
    if dq is None or len(dq.operands) != 2 or dq.attrs["group"] != 0:
        return None
    q, s = dq.operands
    pt = _producer(q, "quant.quantize_per_token")
    if pt is not None and q is pt.results[0] and s is pt.results[1] \
            and q.type.dtype is DType.i8:
        return "w8a8", pt.operands[0], None
    st = _producer(q, "quant.quantize")
    if st is not None and st.operands[1] is s and q.type.dtype is DType.f8e4m3 \
            and s.type.rank == 0:
        return "fp8", st.operands[0], s
    return None


def fuse_quantized(graph: Graph, stats) -> int:
    """Rewrite every matching linear; returns how many were fused."""
    rw = Rewriter(graph, stats)
    fused = 0
    seeds: list[Op] = []
    for lin in list(graph.ops):
        if lin.name not in ("core.linear", "llm.linear_act") or len(lin.operands) < 2:
            continue
        epilogue = lin.attrs.get("act", "none")
        dq = _weight_dequant(lin)
        if dq is None:
            continue
        q = dq.operands[0]
        mode = _WEIGHT_MODE.get(q.type.dtype)
        if mode is None:
            continue
        bias = list(lin.operands[2:])
        act = _act_pattern(lin.operands[0])
        rw.loc = lin.loc
        with rw.insertion_point(before=lin):
            if act is not None:
                amode, x, xs = act
                s = dq.operands[1]
                ok = (amode == "w8a8" and mode == "int8" and s.type.rank == 1) or \
                     (amode == "fp8" and mode == "fp8" and s.type.rank == 0)
                if not ok:
                    continue
                operands = [x, q, s] + ([xs] if amode == "fp8" else []) + bias
                new = rw.op("quant.linear_a8", *operands, mode=amode, act=epilogue,
                            result_types=[lin.results[0].type])
                stats.bump(f"linears fused ({amode})")
            else:
                if _producer(lin.operands[0], "quant.dequantize") is not None:
                    continue  # a dequantized input that is not one of the a8 patterns
                new = rw.op("quant.linear", lin.operands[0], *dq.operands, *bias,
                            mode=mode, group=dq.attrs["group"], act=epilogue,
                            result_types=[lin.results[0].type])
                stats.bump(f"linears fused ({mode} weight-only)")
        x_prod = lin.operands[0].producer
        rw.replace_op(lin, new)
        rw.erase_op(dq)
        seeds += [v.producer for v in dq.operands if v.producer is not None]
        if x_prod is not None:
            seeds.append(x_prod)
        fused += 1
    _erase_dead_activation_quant(graph, rw, seeds)
    return fused


def _erase_dead_activation_quant(graph: Graph, rw: Rewriter, seeds: list[Op]) -> None:
    """The quantize/dequantize ops and scale params that the fused linears no longer read."""
    todo = list(seeds)
    outputs = {id(o) for o in graph.outputs}
    while todo:
        op = todo.pop()
        if op.name not in ("quant.dequantize", "quant.quantize", "quant.quantize_per_token",
                           "param") or op.graph is None:
            continue
        if any(r.uses or id(r) in outputs for r in op.results):
            continue
        todo.extend(v.producer for v in op.operands if v.producer is not None)
        rw.erase_op(op)


@register_pass("fuse-quant")
def fuse_quant(graph: Graph, ctx):
    """Fuse quantize/dequantize + core.linear into quant.linear (weight-only) and
    quant.linear_a8 (w8a8 per-token int8, fp8 static per-tensor)."""
    fuse_quantized(graph, ctx.stats)
