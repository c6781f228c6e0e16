"""ONNX converters for the ``core`` dialect (and ``param``): standard opset-23 operators.

Each converter states its rule in its docstring.  Result types come from the IR, so shape
operands (Reshape, Expand, ConstantOfShape) are built from the result's dims, symbolic ones
computed at run time from the inputs' shapes (context.py).
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from irlm.ir import Op
from irlm.ops._shape import promote
from irlm.types import DType

from .context import ONNX_DTYPE, LoweringContext as Ctx
from .registry import converter

INT64_MAX = 2 ** 63 - 1


def _rank(op: Op, i: int = 0) -> int:
    return op.operands[i].type.rank


def _axis(op: Op, axis: int, i: int = 0) -> int:
    r = _rank(op, i)
    return axis + r if axis < 0 else axis


def _out(op: Op, i: int = 0):
    return op.results[i].type


# ----- weights and constants ----------------------------------------------------------------------
@converter("param", "initializer (external data)")
def _param(ctx: Ctx, op: Op):
    """A weight: an initializer whose bytes live in the external data file."""
    return [ctx.defer_weight(op.attrs["name"], op.attrs["type"])]


@converter("core.constant", "initializer")
def _constant(ctx: Ctx, op: Op):
    return [ctx.const(op.attrs["value"], _out(op).dtype)]


@converter("core.full", "ConstantOfShape")
def _full(ctx: Ctx, op: Op):
    t = _out(op)
    value = helper.make_tensor("value", ONNX_DTYPE[t.dtype], [1],
                               [_typed_scalar(op.attrs["value"], t.dtype)])
    return [ctx.node1("ConstantOfShape", [ctx.shape(t.shape)], value=value)]


def _typed_scalar(v: float, dtype: DType):
    if dtype is DType.bool:
        return bool(v)
    if dtype.is_int:
        return int(v)
    return float(v)


@converter("core.arange", "Range")
def _arange(ctx: Ctx, op: Op):
    """Range(start, end, step) on int64 scalars, cast to the result dtype."""
    a = op.attrs
    scalar = lambda d: ctx.node1("Squeeze", [ctx.dim(d), ctx.ints([0])])  # noqa: E731
    out = ctx.node1("Range", [scalar(a["start"]), scalar(a["end"]),
                              ctx.scalar(a["step"], DType.i64)])
    return [ctx.cast(out, DType.i64, _out(op).dtype)]


# ----- elementwise --------------------------------------------------------------------------------
def _binary(op_name: str, onnx_op: str, negate: bool = False):
    @converter(op_name, onnx_op)
    def conv(ctx: Ctx, op: Op):
        dtype = promote(op.operands[0].type, op.operands[1].type)
        args = [ctx.operand_as(op, i, dtype) for i in (0, 1)]
        out = ctx.node1(onnx_op, args)
        return [ctx.node1("Not", [out]) if negate else out]
    conv.__doc__ = f"{op_name} -> {onnx_op}" + (" + Not" if negate else "") + \
        " (a 0-d operand cast to the other's dtype)"


for _irlm, _onnx in (("add", "Add"), ("sub", "Sub"), ("mul", "Mul"), ("div", "Div"),
                     ("pow", "Pow"), ("maximum", "Max"), ("minimum", "Min"), ("eq", "Equal"),
                     ("lt", "Less"), ("le", "LessOrEqual"), ("gt", "Greater"),
                     ("ge", "GreaterOrEqual"), ("logical_and", "And"),
                     ("logical_or", "Or")):
    _binary(f"core.{_irlm}", _onnx)
_binary("core.ne", "Equal", negate=True)


@converter("core.floor_divide", "Div / Floor, or (a - Mod(a, b)) / b for integers")
def _floor_divide(ctx: Ctx, op: Op):
    """floor(a / b): Floor(Div) for floats; for integers (a - a mod b) / b with Python's
    mod (sign of b), which is exact where ONNX's truncating Div is not."""
    dtype = promote(op.operands[0].type, op.operands[1].type)
    a, b = (ctx.operand_as(op, i, dtype) for i in (0, 1))
    if dtype.is_float:
        return [ctx.node1("Floor", [ctx.node1("Div", [a, b])])]
    rem = ctx.node1("Mod", [a, b], fmod=0)
    return [ctx.node1("Div", [ctx.node1("Sub", [a, rem]), b])]


def _unary(op_name: str, onnx_op: str):
    @converter(op_name, onnx_op)
    def conv(ctx: Ctx, op: Op):
        return [ctx.node1(onnx_op, [ctx.inp(op, 0)])]
    conv.__doc__ = f"{op_name} -> {onnx_op}"


for _irlm, _onnx in (("abs", "Abs"), ("cos", "Cos"), ("sin", "Sin"), ("exp", "Exp"),
                     ("log", "Log"), ("erf", "Erf"), ("neg", "Neg"), ("reciprocal", "Reciprocal"),
                     ("relu", "Relu"), ("sigmoid", "Sigmoid"), ("sqrt", "Sqrt"),
                     ("tanh", "Tanh"), ("logical_not", "Not")):
    _unary(f"core.{_irlm}", _onnx)


@converter("core.rsqrt", "Reciprocal(Sqrt)")
def _rsqrt(ctx: Ctx, op: Op):
    return [ctx.node1("Reciprocal", [ctx.node1("Sqrt", [ctx.inp(op, 0)])])]


def silu(ctx: Ctx, x: str) -> str:
    """x * sigmoid(x) (TensorRT fuses the pair; opset 23 has no Silu)."""
    return ctx.node1("Mul", [x, ctx.node1("Sigmoid", [x])])


def gelu(ctx: Ctx, x: str, approximate: str) -> str:
    return ctx.node1("Gelu", [x], approximate="tanh" if approximate == "tanh" else "none")


@converter("core.silu", "Mul(x, Sigmoid(x))")
def _silu(ctx: Ctx, op: Op):
    return [silu(ctx, ctx.inp(op, 0))]


@converter("core.gelu", "Gelu (opset 20)")
def _gelu(ctx: Ctx, op: Op):
    return [gelu(ctx, ctx.inp(op, 0), op.attrs["approximate"])]


@converter("core.cast", "Cast")
def _cast(ctx: Ctx, op: Op):
    return [ctx.cast(ctx.inp(op, 0), op.operands[0].type.dtype, op.attrs["dtype"])]


@converter("core.clamp", "Clip")
def _clamp(ctx: Ctx, op: Op):
    dtype = op.operands[0].type.dtype
    lo, hi = op.attrs["min"], op.attrs["max"]
    bound = lambda v: None if v is None else ctx.scalar(_typed_scalar(v, dtype), dtype)  # noqa
    return [ctx.node1("Clip", [ctx.inp(op, 0), bound(lo), bound(hi)])]


@converter("core.where", "Where")
def _where(ctx: Ctx, op: Op):
    dtype = _out(op).dtype
    return [ctx.node1("Where", [ctx.inp(op, 0), ctx.operand_as(op, 1, dtype),
                                ctx.operand_as(op, 2, dtype)])]


@converter("core.masked_fill", "Where(mask, value, x)")
def _masked_fill(ctx: Ctx, op: Op):
    dtype = op.operands[0].type.dtype
    value = op.attrs["value"]
    if dtype.is_float:
        v = ctx.scalar(value, dtype)
    else:
        v = ctx.scalar(_typed_scalar(value, dtype), dtype)
    return [ctx.node1("Where", [ctx.inp(op, 1), v, ctx.inp(op, 0)])]


@converter("core.tril", "Trilu(upper=0)")
def _tril(ctx: Ctx, op: Op):
    return [ctx.node1("Trilu", [ctx.inp(op, 0), ctx.scalar(op.attrs["diagonal"], DType.i64)],
                      upper=0)]


@converter("core.triu", "Trilu(upper=1)")
def _triu(ctx: Ctx, op: Op):
    return [ctx.node1("Trilu", [ctx.inp(op, 0), ctx.scalar(op.attrs["diagonal"], DType.i64)],
                      upper=1)]


# ----- reductions ---------------------------------------------------------------------------------
def _reduce(op_name: str, onnx_op: str):
    @converter(op_name, onnx_op)
    def conv(ctx: Ctx, op: Op):
        dims = list(op.attrs["dims"]) or list(range(_rank(op)))
        x = ctx.inp(op, 0)
        src, out = op.operands[0].type.dtype, _out(op).dtype
        x = ctx.cast(x, src, out)   # sum of ints/bools is i64, as torch's
        return [ctx.node1(onnx_op, [x, ctx.ints([_axis(op, d) for d in dims])],
                          keepdims=int(op.attrs["keepdim"]))]


for _irlm, _onnx in (("sum", "ReduceSum"), ("mean", "ReduceMean"), ("amax", "ReduceMax"),
                     ("amin", "ReduceMin")):
    _reduce(f"core.{_irlm}", _onnx)


@converter("core.max", "ReduceMax + ArgMax")
def _max(ctx: Ctx, op: Op):
    axis, keep = _axis(op, op.attrs["dim"]), int(op.attrs["keepdim"])
    x = ctx.inp(op, 0)
    return [ctx.node1("ReduceMax", [x, ctx.ints([axis])], keepdims=keep),
            ctx.node1("ArgMax", [x], axis=axis, keepdims=keep, select_last_index=0)]


@converter("core.argmax", "ArgMax")
def _argmax(ctx: Ctx, op: Op):
    return [ctx.node1("ArgMax", [ctx.inp(op, 0)], axis=_axis(op, op.attrs["dim"]),
                      keepdims=int(op.attrs["keepdim"]), select_last_index=0)]


@converter("core.softmax", "Softmax")
def _softmax(ctx: Ctx, op: Op):
    return [ctx.node1("Softmax", [ctx.inp(op, 0)], axis=_axis(op, op.attrs["dim"]))]


@converter("core.log_softmax", "LogSoftmax")
def _log_softmax(ctx: Ctx, op: Op):
    return [ctx.node1("LogSoftmax", [ctx.inp(op, 0)], axis=_axis(op, op.attrs["dim"]))]


@converter("core.cumsum", "CumSum")
def _cumsum(ctx: Ctx, op: Op):
    x = ctx.cast(ctx.inp(op, 0), op.operands[0].type.dtype, _out(op).dtype)
    return [ctx.node1("CumSum", [x, ctx.scalar(_axis(op, op.attrs["dim"]), DType.i64)])]


@converter("core.topk", "TopK")
def _topk(ctx: Ctx, op: Op):
    a = op.attrs
    return ctx.node("TopK", [ctx.inp(op, 0), ctx.ints([a["k"]])], 2,
                    axis=_axis(op, a["dim"]), largest=int(a["largest"]), sorted=1)


@converter("core.sort", "TopK over the whole axis (ties keep input order)")
def _sort(ctx: Ctx, op: Op):
    axis = _axis(op, op.attrs["dim"])
    k = ctx.dim(op.operands[0].type.shape[axis])
    return ctx.node("TopK", [ctx.inp(op, 0), k], 2, axis=axis,
                    largest=int(op.attrs["descending"]), sorted=1)


def _check_histc(op: Op):
    if not op.operands[0].type.dtype.is_float:
        return "histc of a non-float operand"
    if not op.attrs["max"] > op.attrs["min"]:
        return "histc with max <= min (torch takes the data's range: not static)"
    return None


@converter("core.histc", "one-hot counts: Floor/Equal/ReduceSum", check=_check_histc)
def _histc(ctx: Ctx, op: Op):
    """bin = floor((x - min) * bins / (max - min)), x == max in the last bin, values outside
    [min, max] dropped; counts = sum over x of (bin == arange(bins))."""
    a, dtype = op.attrs, op.operands[0].type.dtype
    bins = a["bins"]
    x = ctx.node1("Reshape", [ctx.inp(op, 0), ctx.ints([-1, 1])])
    lo, hi = ctx.scalar(a["min"], dtype), ctx.scalar(a["max"], dtype)
    scaled = ctx.node1("Mul", [ctx.node1("Sub", [x, lo]),
                               ctx.scalar(bins / (a["max"] - a["min"]), dtype)])
    b = ctx.node1("Min", [ctx.node1("Floor", [scaled]), ctx.scalar(bins - 1, dtype)])
    inside = ctx.node1("And", [ctx.node1("GreaterOrEqual", [x, lo]),
                               ctx.node1("LessOrEqual", [x, hi])])
    hits = ctx.node1("And", [ctx.node1("Equal", [b, ctx.const(np.arange(bins), dtype)]), inside])
    return [ctx.node1("ReduceSum", [ctx.cast(hits, DType.bool, dtype), ctx.ints([0])],
                      keepdims=0)]


# ----- shape and layout ---------------------------------------------------------------------------
@converter("core.reshape", "Reshape")
def _reshape(ctx: Ctx, op: Op):
    return [ctx.node1("Reshape", [ctx.inp(op, 0), ctx.reshape_shape(_out(op).shape)])]


@converter("core.expand", "Expand")
def _expand(ctx: Ctx, op: Op):
    return [ctx.node1("Expand", [ctx.inp(op, 0), ctx.shape(_out(op).shape)])]


@converter("core.permute", "Transpose")
def _permute(ctx: Ctx, op: Op):
    perm = [_axis(op, d) for d in op.attrs["dims"]]
    return [ctx.node1("Transpose", [ctx.inp(op, 0)], perm=perm)]


@converter("core.transpose", "Transpose")
def _transpose(ctx: Ctx, op: Op):
    perm = list(range(_rank(op)))
    i, j = _axis(op, op.attrs["dim0"]), _axis(op, op.attrs["dim1"])
    perm[i], perm[j] = perm[j], perm[i]
    return [ctx.node1("Transpose", [ctx.inp(op, 0)], perm=perm)]


@converter("core.unsqueeze", "Unsqueeze")
def _unsqueeze(ctx: Ctx, op: Op):
    d = op.attrs["dim"]
    axis = d + _rank(op) + 1 if d < 0 else d
    return [ctx.node1("Unsqueeze", [ctx.inp(op, 0), ctx.ints([axis])])]


@converter("core.squeeze", "Squeeze")
def _squeeze(ctx: Ctx, op: Op):
    shape = op.operands[0].type.shape
    dims = [_axis(op, d) for d in op.attrs["dims"]] or list(range(len(shape)))
    dims = [d for d in dims if shape[d] == 1]   # torch leaves non-1 dims alone
    if not dims:
        return [ctx.node1("Identity", [ctx.inp(op, 0)])]
    return [ctx.node1("Squeeze", [ctx.inp(op, 0), ctx.ints(dims)])]


@converter("core.concat", "Concat")
def _concat(ctx: Ctx, op: Op):
    dtype = _out(op).dtype
    return [ctx.node1("Concat", [ctx.operand_as(op, i, dtype) for i in range(len(op.operands))],
                      axis=_axis(op, op.attrs["dim"]))]


@converter("core.split", "Split")
def _split(ctx: Ctx, op: Op):
    sizes = op.attrs["sizes"]
    return ctx.node("Split", [ctx.inp(op, 0), ctx.shape(sizes)], len(sizes),
                    axis=_axis(op, op.attrs["dim"]))


@converter("core.slice", "Slice")
def _slice(ctx: Ctx, op: Op):
    a = op.attrs
    axis = _axis(op, a["dim"])
    end = a["end"]
    if isinstance(end, int) and end >= INT64_MAX // 2:
        end = INT64_MAX
    return [ctx.node1("Slice", [ctx.inp(op, 0), ctx.dim(a["start"]), ctx.dim(end),
                                ctx.ints([axis]), ctx.ints([a["step"]])])]


@converter("core.gather", "GatherElements")
def _gather(ctx: Ctx, op: Op):
    idx = ctx.operand_as(op, 1, DType.i64)
    return [ctx.node1("GatherElements", [ctx.inp(op, 0), idx], axis=_axis(op, op.attrs["dim"]))]


@converter("core.index_select", "Gather")
def _index_select(ctx: Ctx, op: Op):
    idx = ctx.operand_as(op, 1, DType.i64)
    return [ctx.node1("Gather", [ctx.inp(op, 0), idx], axis=_axis(op, op.attrs["dim"]))]


@converter("core.embedding", "Gather(axis=0)")
def _embedding(ctx: Ctx, op: Op):
    return [ctx.node1("Gather", [ctx.inp(op, 0), ctx.operand_as(op, 1, DType.i64)], axis=0)]


@converter("core.scatter", "ScatterElements")
def _scatter(ctx: Ctx, op: Op):
    reduction = "add" if op.attrs["reduce"] == "add" else "none"
    return [ctx.node1("ScatterElements", [ctx.inp(op, 0), ctx.operand_as(op, 1, DType.i64),
                                          ctx.inp(op, 2)],
                      axis=_axis(op, op.attrs["dim"]), reduction=reduction)]


# ----- matrix products and normalization ----------------------------------------------------------
@converter("core.matmul", "MatMul")
def _matmul(ctx: Ctx, op: Op):
    return [ctx.node1("MatMul", [ctx.inp(op, 0), ctx.inp(op, 1)])]


@converter("core.bmm", "MatMul")
def _bmm(ctx: Ctx, op: Op):
    return [ctx.node1("MatMul", [ctx.inp(op, 0), ctx.inp(op, 1)])]


def linear(ctx: Ctx, x: str, weight: str, bias) -> str:
    """x @ W^T (+ b): MatMul with a Transpose of the [out, in] weight, which ORT and
    TensorRT fold into the constant."""
    out = ctx.node1("MatMul", [x, ctx.node1("Transpose", [weight], perm=[1, 0])])
    return ctx.node1("Add", [out, bias]) if bias is not None else out


@converter("core.linear", "MatMul(x, Transpose(W)) + Add")
def _linear(ctx: Ctx, op: Op):
    return [linear(ctx, ctx.inp(op, 0), ctx.inp(op, 1), ctx.inp(op, 2))]


@converter("core.grouped_mm", "per-row expert Gather + batched MatMul")
def _grouped_mm(ctx: Ctx, op: Op):
    """Row t belongs to expert e(t) = #{e : offsets[e] <= t}; out[t] = input[t] @ weight[e(t)],
    zero for rows past the last offset."""
    x, w = ctx.inp(op, 0), ctx.inp(op, 1)
    rows = op.operands[0].type.shape[0]
    n_exp = op.operands[1].type.shape[0]
    scalar = lambda d: ctx.node1("Squeeze", [ctx.dim(d), ctx.ints([0])])  # noqa: E731
    t = ctx.node1("Range", [ctx.scalar(0, DType.i64), scalar(rows), ctx.scalar(1, DType.i64)])
    offs = ctx.operand_as(op, 2, DType.i64)
    le = ctx.node1("LessOrEqual", [ctx.node1("Unsqueeze", [offs, ctx.ints([0])]),
                                   ctx.node1("Unsqueeze", [t, ctx.ints([1])])])
    expert = ctx.node1("ReduceSum", [ctx.cast(le, DType.bool, DType.i64), ctx.ints([1])],
                       keepdims=0)
    valid = ctx.node1("Less", [expert, ctx.scalar(n_exp, DType.i64)])
    safe = ctx.node1("Min", [expert, ctx.scalar(n_exp - 1, DType.i64)])
    w_rows = ctx.node1("Gather", [w, safe], axis=0)                      # [rows, k, n]
    prod = ctx.node1("MatMul", [ctx.node1("Unsqueeze", [x, ctx.ints([1])]), w_rows])
    prod = ctx.node1("Squeeze", [prod, ctx.ints([1])])
    zero = ctx.scalar(0.0, op.operands[0].type.dtype)
    return [ctx.node1("Where", [ctx.node1("Unsqueeze", [valid, ctx.ints([1])]), prod, zero])]


def _check_layer_norm(op: Op):
    if len(op.attrs["normalized_shape"]) != 1:
        return None   # LayerNormalization normalizes over the trailing axes: any count
    return None


@converter("core.layer_norm", "LayerNormalization", check=_check_layer_norm)
def _layer_norm(ctx: Ctx, op: Op):
    a = op.attrs
    n = len(a["normalized_shape"])
    x = ctx.inp(op, 0)
    dtype = op.operands[0].type.dtype
    scale = ctx.inp(op, 1)
    if scale is None:
        scale = ctx.node1("ConstantOfShape", [ctx.shape(a["normalized_shape"])],
                          value=helper.make_tensor("value", ONNX_DTYPE[dtype], [1], [1.0]))
    return [ctx.node1("LayerNormalization", [x, scale, ctx.inp(op, 2)], axis=-n,
                      epsilon=a["eps"], stash_type=1)]


def _check_sdpa(op: Op):
    q, k = op.operands[0].type, op.operands[1].type
    if q.rank != 4 or k.rank != 4:
        return (f"scaled_dot_product_attention with rank-{q.rank} query: ONNX Attention "
                f"takes [batch, heads, seq, head_dim]")
    if len(op.operands) > 3 and op.attrs["is_causal"]:
        return "scaled_dot_product_attention with both a mask and is_causal"
    return None


@converter("core.scaled_dot_product_attention", "Attention (opset 23)", check=_check_sdpa)
def _sdpa(ctx: Ctx, op: Op):
    """Attention over [batch, heads, seq, head_dim] operands; GQA when query heads are a
    multiple of key heads; a bool mask keeps True positions, a float mask is added."""
    q = op.operands[0].type
    scale = op.attrs["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if isinstance(q.shape[-1], int) else None
    mask = ctx.inp(op, 3)
    return [ctx.node1("Attention", [ctx.inp(op, 0), ctx.inp(op, 1), ctx.inp(op, 2), mask],
                      scale=scale, is_causal=int(op.attrs["is_causal"]))]


__all__ = ["linear", "silu", "gelu", "TensorProto"]
