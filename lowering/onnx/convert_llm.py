"""ONNX converters for the ``llm`` dialect (the fused ops and the inference form).

RMSNormalization and RotaryEmbedding are opset-23 standard ops; the gated and bias
activations are their standard decompositions (TensorRT fuses them back); paged attention has
no standard form (block tables, in-place cache writes) and becomes an ``irlm.PagedAttention``
custom node (custom_ops.py).
"""
from __future__ import annotations

from typing import Optional

import sympy

from irlm.ir import Op, Value
from irlm.registry import get_op_def
from irlm.types import DType

from .context import LoweringContext as Ctx
from .convert_core import gelu, linear, silu
from .custom_ops import DOMAIN, DOMAIN_VERSION, PAGED_ATTENTION
from .registry import converter


def act(ctx: Ctx, x: str, name: str) -> str:
    if name == "silu":
        return silu(ctx, x)
    if name in ("gelu", "gelu_tanh"):
        return gelu(ctx, x, "tanh" if name == "gelu_tanh" else "none")
    if name == "relu":
        return ctx.node1("Relu", [x])
    raise AssertionError(name)


def _norm_weight(ctx: Ctx, op: Op, i: int) -> str:
    w = ctx.inp(op, i)
    off = op.attrs["weight_offset"]
    if off:
        w = ctx.node1("Add", [w, ctx.scalar(off, op.operands[i].type.dtype)])
    return w


def _rms(ctx: Ctx, x: str, w: str, eps: float, dtype: DType) -> str:
    # stash_type=1: statistics in float32, as the reference and the kernel
    return ctx.node1("RMSNormalization", [x, ctx.cast(w, dtype, dtype)], axis=-1, epsilon=eps,
                     stash_type=1)


@converter("llm.rms_norm", "RMSNormalization (opset 23)")
def _rms_norm(ctx: Ctx, op: Op):
    return [_rms(ctx, ctx.inp(op, 0), _norm_weight(ctx, op, 1), op.attrs["eps"],
                 op.operands[0].type.dtype)]


@converter("llm.add_rms_norm", "Add + RMSNormalization (opset 23)")
def _add_rms_norm(ctx: Ctx, op: Op):
    total = ctx.node1("Add", [ctx.inp(op, 0), ctx.inp(op, 1)])
    return [_rms(ctx, total, _norm_weight(ctx, op, 2), op.attrs["eps"],
                 op.operands[0].type.dtype), total]


# ----- rotary embedding ---------------------------------------------------------------------------
_ELEMENTWISE = {"core.cos", "core.sin", "core.cast", "core.neg"}
_LEADING = {"core.unsqueeze", "core.reshape", "core.expand"}


def _duplicated_halves(v: Value, depth: int = 0) -> bool:
    """Whether v's last dim provably holds the same values in both halves: v comes from
    concat(a, a) on the last dim through elementwise ops, scalar products and ops that only
    change leading dims (f(concat(a, a)) = concat(f(a), f(a)))."""
    op = v.producer
    if op is None or depth > 16:
        return False
    last = v.type.rank - 1
    if op.name == "core.concat" and len(op.operands) == 2 and op.operands[0] is op.operands[1] \
            and op.attrs["dim"] in (-1, last):
        return True
    if op.name in _ELEMENTWISE:
        return _duplicated_halves(op.operands[0], depth + 1)
    if op.name in ("core.mul", "core.div") and any(o.type.rank == 0 for o in op.operands):
        x = next(o for o in op.operands if o.type.rank > 0)
        return _duplicated_halves(x, depth + 1)
    if op.name in _LEADING:
        src = op.operands[0]
        if src.type.rank and src.type.shape[-1] == v.type.shape[-1]:
            if op.name == "core.reshape" and src.type.rank - 1 != last and \
                    src.type.shape[-1] != v.type.shape[-1]:
                return False
            return _duplicated_halves(src, depth + 1)
    return False


def _standard_rope(op: Op) -> Optional[str]:
    """Why llm.rope cannot be one RotaryEmbedding node (None: it can)."""
    x, cos = op.operands[0].type, op.operands[1].type
    if op.attrs["style"] != "rotate_half":
        return "interleaved style"
    if x.rank != 4 or cos.rank != 4:
        return "not [batch, heads, seq, head_dim]"
    if cos.shape[1] != 1:
        return "cos varies per head"
    if not ((cos.shape[0] == 1 or sympy.sympify(cos.shape[0] - x.shape[0]) == 0) and
            sympy.sympify(cos.shape[2] - x.shape[2]) == 0):
        return "cos does not cover every batch row and position"
    if not (_duplicated_halves(op.operands[1]) and _duplicated_halves(op.operands[2])):
        return "cos/sin halves are not provably equal"
    return None


@converter("llm.rope", "RotaryEmbedding (opset 23), else Mul/Slice/Neg/Concat/Add")
def _rope(ctx: Ctx, op: Op):
    """RotaryEmbedding when its cos/sin caches provably are concat(c, c) (the HF form, which
    the standard op stores once: [batch, seq, rot/2]); otherwise the exact decomposition
    x_rot*cos + rotate(x_rot)*sin, pass-through of the rest."""
    x, cos, sin = (ctx.inp(op, i) for i in range(3))
    xt = op.operands[0].type
    rot = op.operands[1].type.shape[-1]
    d = xt.shape[-1]
    if _standard_rope(op) is None:
        half = lambda c: ctx.node1("Squeeze", [ctx.node1(  # noqa: E731
            "Slice", [c, ctx.ints([0]), ctx.ints([rot // 2]), ctx.ints([-1])]), ctx.ints([1])])
        cos, sin = half(cos), half(sin)
        if op.operands[1].type.shape[0] != xt.shape[0]:   # one cache row for every batch row
            full = ctx.shape([xt.shape[0], xt.shape[2], rot // 2])
            cos, sin = (ctx.node1("Expand", [c, full]) for c in (cos, sin))
        return [ctx.node1("RotaryEmbedding", [x, cos, sin],
                          rotary_embedding_dim=rot if rot != d else None, interleaved=0)]
    last = xt.rank - 1
    sl = lambda t, a, b: ctx.node1("Slice", [t, ctx.ints([a]), ctx.ints([b]),  # noqa: E731
                                             ctx.ints([last])])
    x_rot = x if rot == d else sl(x, 0, rot)
    if op.attrs["style"] == "rotate_half":
        h = rot // 2
        rotated = ctx.node1("Concat", [ctx.node1("Neg", [sl(x_rot, h, rot)]), sl(x_rot, 0, h)],
                            axis=-1)
    else:  # interleaved pairs: (-x1, x0) per pair
        pairs_shape = list(xt.shape[:-1]) + [rot // 2, 2]
        pairs = ctx.node1("Reshape", [x_rot, ctx.reshape_shape(pairs_shape)])
        even = ctx.node1("Slice", [pairs, ctx.ints([0]), ctx.ints([1]), ctx.ints([-1])])
        odd = ctx.node1("Slice", [pairs, ctx.ints([1]), ctx.ints([2]), ctx.ints([-1])])
        swapped = ctx.node1("Concat", [ctx.node1("Neg", [odd]), even], axis=-1)
        rotated = ctx.node1("Reshape", [swapped, ctx.reshape_shape(list(xt.shape[:-1]) + [rot])])
    out = ctx.node1("Add", [ctx.node1("Mul", [x_rot, cos]), ctx.node1("Mul", [rotated, sin])])
    if rot == d:
        return [out]
    return [ctx.node1("Concat", [out, sl(x, rot, d)], axis=-1)]


# ----- activations ----------------------------------------------------------------------------
@converter("llm.gated_act", "Split + activation + Mul")
def _gated_act(ctx: Ctx, op: Op):
    n = op.operands[0].type.shape[-1] // 2
    gate, up = ctx.node("Split", [ctx.inp(op, 0), ctx.ints([n, n])], 2, axis=-1)
    return [ctx.node1("Mul", [act(ctx, gate, op.attrs["act"]), up])]


@converter("llm.linear_act", "MatMul + Add + activation")
def _linear_act(ctx: Ctx, op: Op):
    return [act(ctx, linear(ctx, ctx.inp(op, 0), ctx.inp(op, 1), ctx.inp(op, 2)),
                op.attrs["act"])]


# ----- the inference form ---------------------------------------------------------------------
@converter("llm.last_tokens", "Gather(hidden, CumSum(q_lens) - 1)")
def _last_tokens(ctx: Ctx, op: Op):
    lens = ctx.operand_as(op, 1, DType.i64)
    idx = ctx.node1("Sub", [ctx.node1("CumSum", [lens, ctx.scalar(0, DType.i64)]),
                            ctx.scalar(1, DType.i64)])
    return [ctx.node1("Gather", [ctx.inp(op, 0), idx], axis=0)]


@converter("llm.paged_attention", "irlm.PagedAttention (custom node; TensorRT plugin)")
def _paged_attention(ctx: Ctx, op: Op):
    """One irlm.PagedAttention node per layer; the cache flows through the nodes as a value
    (kv_cache -> kv_cache_out -> the next layer), so the graph returns the updated cache."""
    ctx.opsets[DOMAIN] = DOMAIN_VERSION
    a = op.attrs
    scale = a["scale"]
    if scale is None:
        hd = op.operands[0].type.shape[2]
        scale = 1.0 / float(hd) ** 0.5
    names = [ctx.inp(op, i) for i in range(7)]
    slot, cache_value = get_op_def(op.name).operand_index("kv_cache"), op.operand("kv_cache")
    names[slot] = ctx.current_cache.get(id(cache_value), names[slot])
    out, cache_out = ctx.node(PAGED_ATTENTION.name, names, 2, domain=DOMAIN,
                              layer=a["layer"], scale=float(scale),
                              sliding_window=a["sliding_window"],
                              alibi_slopes=[float(s) for s in a["alibi_slopes"]] or None,
                              kv_scales=[float(s) for s in a["kv_scales"]] or None)
    ctx.current_cache[id(cache_value)] = cache_out
    return [out]
