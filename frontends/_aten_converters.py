"""The ATen → irlm conversion table: one small function per ATen op (or family of overloads).

A converter is called as ``fn(cx, **args)``: ``cx`` is the frontend's ``NodeContext`` (the
node's torch-propagated result types, an op builder carrying the node's source location,
helpers for constants, casts and torch's type promotion); ``args`` are the op's arguments by
their ATen schema names (``self`` is spelled ``x``), already converted: tensors are irlm
``Value`` s, SymInts are irlm dims (``batch*seq``), other arguments stay Python values.
It returns a ``Value`` (a list of them for ops with several results).

Principles:

* Shapes come from torch.  Reshapes, expands, splits and fills take their result shape from
  the shape torch propagated (translated into irlm dims), so they are exact for every symbolic
  size; the driver then checks each result type against torch's, node by node.
* Every conversion is explicit.  irlm ops do not mix dtype categories, so where torch promotes
  (``int_tensor * 0.5``, ``mask.to(float)``) the converter inserts ``core.cast``; Python
  scalars become 0-d ``core.constant`` s of the promoted dtype (f32 next to f16/bf16 tensors,
  where torch keeps a scalar at float precision).
* Bit-exact with eager torch where torch special-cases: ``x ** 2`` is ``x * x``, ``x ** 0.5``
  is ``sqrt``, as in torch's kernels, not ``pow``.
* No fallback: an op missing here is an error naming it (see ``docs/supported-ops.md``, which
  ``python -m irlm.frontends._aten_doc`` regenerates from this table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from irlm.ir import Value
from irlm.types import DType, dims_equal, normalize_axis, normalize_dim

SUPPORTED_OPS_DOC = "docs/supported-ops.md"

CONVERTERS: dict[str, Callable] = {}
MAPPING_DOC: dict[str, str] = {}  # op -> what it becomes, for the doc

INT64_MAX = 2 ** 63 - 1

# Nodes that produce no op: runtime checks torch inserts for its own guards.
DROPPED_OPS = {
    "aten._assert_tensor_metadata.default": "a dtype/device check torch inserts at export",
    "aten._assert_scalar.default": "a runtime check of a symbolic-size guard",
    "aten._assert_async.msg": "a runtime check",
    "aten._assert_async.default": "a runtime check",
    "aten._functional_assert_async.msg": "a runtime check",
    "aten._functional_assert_scalar.default": "a runtime check",
    "aten.sym_constrain_range.default": "a range hint for a symbolic size",
    "aten.sym_constrain_range_for_size.default": "a range hint for a symbolic size",
    "aten._functional_sym_constrain_range.default": "a range hint for a symbolic size",
    "aten._functional_sym_constrain_range_for_size.default": "a range hint for a symbolic size",
}

# Nodes whose value is a symbolic integer: folded into the attributes of their users.
SYMBOLIC_INT_OPS = {
    "aten.sym_size.int", "aten.sym_numel.default", "aten.sym_stride.int",
    "aten.sym_storage_offset.default",
    "operator.add", "operator.sub", "operator.mul", "operator.floordiv", "operator.mod",
    "operator.neg", "operator.pow", "operator.eq", "operator.ne", "operator.lt",
    "operator.le", "operator.gt", "operator.ge", "operator.and_", "operator.or_",
    "torch.sym_max", "torch.sym_min", "torch.sym_sum", "torch.sym_not", "torch.sym_ite",
    "math.ceil", "math.floor",
}


@dataclass(frozen=True)
class Unavailable:
    """A result torch computes but irlm does not (e.g. native_layer_norm's mean and rstd);
    using it is an error naming ``reason``."""
    reason: str


def op_key(target) -> str:
    """``aten.add.Tensor``, ``transformers.grouped_mm_fallback.default``, ``operator.mul``."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    module = getattr(target, "__module__", None) or ""
    module = {"_operator": "operator", "torch.fx.experimental.sym_node": "torch"}.get(module,
                                                                                      module)
    return f"{module}.{getattr(target, '__name__', repr(target))}"


def converts(*ops: str, doc: Optional[str] = None):
    """Register a converter for ATen op overloads; ``doc`` (else the docstring's first line)
    is what docs/supported-ops.md says the op becomes."""
    def register(fn):
        text = doc or (fn.__doc__ or "").strip().splitlines()[0]
        for name in ops:
            if name in CONVERTERS:
                raise ValueError(f"{name} has two converters")
            CONVERTERS[name] = fn
            MAPPING_DOC[name] = text
        return fn
    return register


# ----- helpers ---------------------------------------------------------------------------------

def _reshape(cx, x: Value, shape) -> Value:
    """``x`` in ``shape``; no op when it already has it."""
    shape = tuple(shape)
    if len(shape) == x.type.rank and all(dims_equal(a, b) for a, b in zip(shape, x.type.shape)):
        return x
    return cx.op("core.reshape", x, shape=list(shape))


def _expand(cx, x: Value, shape) -> Value:
    shape = tuple(shape)
    if len(shape) == x.type.rank and all(dims_equal(a, b) for a, b in zip(shape, x.type.shape)):
        return x
    return cx.op("core.expand", x, shape=list(shape))


_axis = normalize_axis   # torch.export has checked the dims


def _scaled(cx, v: Value, factor) -> Value:
    """``v * factor`` (no op for a factor of 1)."""
    if factor == 1:
        return v
    return cx.op("core.mul", v, cx.scalar(factor, v.type.dtype))


def _number(cx, v, what: str):
    if not isinstance(v, (bool, int, float)):
        cx.fail(f"{what} must be a constant number, got {v!r}")
    return v


# ----- no-ops and dtype conversion -------------------------------------------------------------

@converts("aten.clone.default", "aten.contiguous.default", "aten.alias.default",
          "aten.detach.default", "aten.lift_fresh_copy.default", "aten.lift_fresh.default",
          "aten.alias_copy.default", "aten.detach_copy.default", "aten.detach_.default")
def identity(cx, x):
    """no op (SSA values are immutable: copies, aliases, memory formats and autograd
    detaching do not matter)"""
    return x


@converts("aten.dropout.default", "aten.feature_dropout.default", "aten.alpha_dropout.default")
def dropout(cx, input, p, train):
    """no op (inference: ``train`` must be false or ``p`` zero)"""
    if train and p != 0:
        cx.fail("dropout in training mode; trace the model in eval mode")
    return input


@converts("aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten.to.other",
          "aten._to_copy.default", "aten.type_as.default")
def to(cx, x, **_conversion):
    """``core.cast`` to torch's result dtype (no op when it is unchanged; devices are ignored)"""
    return cx.cast(x, cx.out_dtype)


@converts("aten.copy.default")
def copy(cx, x, src):
    """``src`` cast and expanded to ``x``'s type (the functional form of ``x.copy_(src)``)"""
    return _expand(cx, cx.cast(src, x.type.dtype), x.type.shape)


# ----- elementwise arithmetic ------------------------------------------------------------------

def _binary(core_op: str):
    def convert(cx, x, other, alpha=1):
        a, b = cx.promote(x, other)
        return cx.op(core_op, a, _scaled(cx, b, alpha))
    convert.__doc__ = f"``{core_op}`` after torch's type promotion (``alpha`` scales other)"
    return convert


converts("aten.add.Tensor", "aten.add.Scalar")(_binary("core.add"))
converts("aten.sub.Tensor", "aten.sub.Scalar")(_binary("core.sub"))


@converts("aten.rsub.Tensor", "aten.rsub.Scalar")
def rsub(cx, x, other, alpha=1):
    """``core.sub(other, alpha * x)``"""
    a, b = cx.promote(x, other)
    return cx.op("core.sub", b, _scaled(cx, a, alpha))


@converts("aten.mul.Tensor", "aten.mul.Scalar")
def mul(cx, x, other):
    """``core.mul`` after type promotion"""
    return cx.op("core.mul", *cx.promote(x, other))


@converts("aten.div.Tensor", "aten.div.Scalar")
def div(cx, x, other):
    """``core.div`` (true division: integer operands are cast to the float result dtype)"""
    return cx.op("core.div", *cx.promote(x, other, dtype=cx.out_dtype))


@converts("aten.div.Tensor_mode", "aten.div.Scalar_mode")
def div_mode(cx, x, other, rounding_mode):
    """``core.div``, or ``core.floor_divide`` for ``rounding_mode='floor'``"""
    if rounding_mode is None:
        return div(cx, x, other)
    if rounding_mode == "floor":
        return floor_divide(cx, x, other)
    cx.fail(f"rounding_mode={rounding_mode!r} is not supported (only None and 'floor')")


@converts("aten.floor_divide.default", "aten.floor_divide.Scalar")
def floor_divide(cx, x, other):
    """``core.floor_divide`` (integer positions: ``perm // top_k``)"""
    return cx.op("core.floor_divide", *cx.promote(x, other))


# torch computes these exponents without pow (x*x, sqrt, ...); mapping them the same way keeps
# the traced graph bit-exact with eager torch, which std::pow would not be.
_SPECIAL_POWERS = {
    1: lambda cx, x: x,
    2: lambda cx, x: cx.op("core.mul", x, x),
    3: lambda cx, x: cx.op("core.mul", cx.op("core.mul", x, x), x),
    0.5: lambda cx, x: cx.op("core.sqrt", x),
    -0.5: lambda cx, x: cx.op("core.rsqrt", x),
    -1: lambda cx, x: cx.op("core.reciprocal", x),
    -2: lambda cx, x: cx.op("core.reciprocal", cx.op("core.mul", x, x)),
}


@converts("aten.pow.Tensor_Scalar")
def pow_tensor_scalar(cx, x, exponent):
    """``core.mul``/``core.sqrt``/``core.rsqrt``/``core.reciprocal`` for the exponents torch
    special-cases (2, 3, 0.5, -0.5, -1, -2), else ``core.pow`` with a 0-d constant exponent"""
    exponent = _number(cx, exponent, "the exponent")
    dtype = cx.out_dtype
    x = cx.cast(x, dtype)
    special = _SPECIAL_POWERS.get(exponent)
    if special is not None and (dtype.is_float or exponent in (1, 2, 3)):
        return special(cx, x)
    if dtype.is_float:
        return cx.op("core.pow", x, cx.scalar(exponent, dtype))
    cx.fail(f"power {exponent} of an integer tensor is not supported")


@converts("aten.pow.Tensor_Tensor", "aten.pow.Scalar")
def pow_tensor(cx, x, exponent):
    """``core.pow`` in the float result dtype"""
    dtype = cx.out_dtype
    if not dtype.is_float:
        cx.fail("pow of integer tensors is not supported")
    return cx.op("core.pow", *cx.promote(x, exponent, dtype=dtype))


def _unary(core_op: str, float_result: bool):
    def convert(cx, x):
        if float_result:
            x = cx.cast(x, cx.out_dtype)  # torch computes exp(int) etc. in the default float
        return cx.op(core_op, x)
    convert.__doc__ = f"``{core_op}``"
    return convert


for _aten, _core in {"exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "sin": "sin",
                     "cos": "cos", "tanh": "tanh", "erf": "erf", "sigmoid": "sigmoid",
                     "silu": "silu", "reciprocal": "reciprocal"}.items():
    converts(f"aten.{_aten}.default")(_unary(f"core.{_core}", True))
for _aten in ("neg", "abs", "relu"):
    converts(f"aten.{_aten}.default")(_unary(f"core.{_aten}", False))


@converts("aten.gelu.default")
def gelu(cx, x, approximate="none"):
    """``core.gelu {approximate}`` (``none``: erf form; ``tanh``: the tanh approximation)"""
    return cx.op("core.gelu", x, approximate=approximate)


@converts("aten.clamp.default", "aten.clamp_min.default", "aten.clamp_max.default",
          "aten.clamp.Tensor", "aten.clamp_min.Tensor", "aten.clamp_max.Tensor")
def clamp(cx, x, min=None, max=None):
    """``core.clamp`` for floats with constant bounds, else ``core.maximum``/``core.minimum``"""
    dtype = cx.out_dtype
    x = cx.cast(x, dtype)
    constant = all(b is None or isinstance(b, (int, float)) for b in (min, max))
    if dtype.is_float and constant:
        return cx.op("core.clamp", x, min=min, max=max)
    if min is not None:
        x = cx.op("core.maximum", *cx.promote(x, min, dtype=dtype))
    if max is not None:
        x = cx.op("core.minimum", *cx.promote(x, max, dtype=dtype))
    return x


@converts("aten.maximum.default")
def maximum(cx, x, other):
    """``core.maximum`` after type promotion"""
    return cx.op("core.maximum", *cx.promote(x, other))


@converts("aten.minimum.default")
def minimum(cx, x, other):
    """``core.minimum`` after type promotion"""
    return cx.op("core.minimum", *cx.promote(x, other))


def _compare(core_op: str):
    def convert(cx, x, other):
        return cx.op(core_op, *cx.promote(x, other))
    convert.__doc__ = f"``{core_op}`` after type promotion (bool result)"
    return convert


for _cmp in ("eq", "ne", "lt", "le", "gt", "ge"):
    converts(f"aten.{_cmp}.Tensor", f"aten.{_cmp}.Scalar")(_compare(f"core.{_cmp}"))


def _logical(core_op: str, bitwise: bool):
    def convert(cx, x, other):
        if bitwise and not all(isinstance(v, Value) and v.type.dtype is DType.bool or
                               isinstance(v, bool) for v in (x, other)):
            cx.fail("bitwise ops are supported on bool tensors only (as logical ops)")
        a, b = cx.promote(x, other, dtype=DType.bool)
        return cx.op(core_op, a, b)
    convert.__doc__ = (f"``{core_op}``" + (" (bool operands only)" if bitwise else
                                           " (operands compared with zero)"))
    return convert


converts("aten.__and__.Tensor", "aten.bitwise_and.Tensor", "aten.__and__.Scalar",
         "aten.bitwise_and.Scalar")(_logical("core.logical_and", True))
converts("aten.__or__.Tensor", "aten.bitwise_or.Tensor", "aten.__or__.Scalar",
         "aten.bitwise_or.Scalar")(_logical("core.logical_or", True))
converts("aten.logical_and.default")(_logical("core.logical_and", False))
converts("aten.logical_or.default")(_logical("core.logical_or", False))


@converts("aten.logical_not.default", "aten.bitwise_not.default")
def logical_not(cx, x):
    """``core.logical_not`` (``bitwise_not``: bool tensors only)"""
    if cx.op_name.startswith("aten.bitwise_not") and x.type.dtype is not DType.bool:
        cx.fail("bitwise_not is supported on bool tensors only")
    return cx.op("core.logical_not", x)


@converts("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther",
          "aten.where.Scalar")
def where(cx, condition, x, other):
    """``core.where`` (numbers become constants of the result dtype)"""
    cond = cx.cast(condition, DType.bool)
    a, b = cx.promote(x, other, dtype=cx.out_dtype, computed=False)
    return cx.op("core.where", cond, a, b)


@converts("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def masked_fill(cx, x, mask, value):
    """``core.masked_fill`` for floats and constant values, else ``core.where``"""
    mask = cx.cast(mask, DType.bool)
    if x.type.dtype.is_float and isinstance(value, (int, float)):
        return cx.op("core.masked_fill", x, mask, value=float(value))
    v = cx.cast(value, x.type.dtype) if isinstance(value, Value) else \
        cx.const(value, x.type.dtype)
    return cx.op("core.where", mask, v, x)


# ----- reductions, softmax, scans ---------------------------------------------------------------

def _dims(dim) -> tuple:
    if dim is None:
        return ()
    return tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)


@converts("aten.mean.dim", "aten.mean.default")
def mean(cx, x, dim=None, keepdim=False, dtype=None):
    """``core.mean {dims, keepdim}`` (``dtype``: cast first)"""
    if dtype is not None:
        x = cx.cast(x, cx.dtype(dtype))
    return cx.op("core.mean", x, dims=list(_dims(dim)), keepdim=keepdim)


@converts("aten.sum.dim_IntList", "aten.sum.default")
def sum_(cx, x, dim=None, keepdim=False, dtype=None):
    """``core.sum {dims, keepdim}`` (``dtype``: cast first; ints accumulate in i64)"""
    if dtype is not None:
        x = cx.cast(x, cx.dtype(dtype))
    out = cx.op("core.sum", x, dims=list(_dims(dim)), keepdim=keepdim)
    return cx.cast(out, cx.out_dtype)


@converts("aten.amax.default", "aten.amin.default")
def amax_amin(cx, x, dim=(), keepdim=False):
    """``core.amax`` / ``core.amin``"""
    name = "core.amax" if "amax" in cx.op_name else "core.amin"
    return cx.op(name, x, dims=list(_dims(dim)), keepdim=keepdim)


@converts("aten.max.dim")
def max_dim(cx, x, dim, keepdim=False):
    """``core.max {dim}``: (values, indices)"""
    return cx.op("core.max", x, dim=dim, keepdim=keepdim)


@converts("aten.max.default")
def max_all(cx, x):
    """``core.amax`` over all dims"""
    return cx.op("core.amax", x, dims=[], keepdim=False)


@converts("aten.argmax.default")
def argmax(cx, x, dim=None, keepdim=False):
    """``core.argmax {dim}`` (no dim: over the flattened tensor)"""
    if dim is None:
        flat = _reshape(cx, x, [x.type.numel()])
        return _reshape(cx, cx.op("core.argmax", flat, dim=0), cx.out_shape())
    return cx.op("core.argmax", x, dim=dim, keepdim=keepdim)


@converts("aten.any.dim", "aten.any.dims", "aten.any.default")
def any_(cx, x, dim=None, keepdim=False):
    """``core.ne(core.sum(x != 0), 0)``"""
    nonzero = cx.cast(x, DType.bool)
    count = cx.op("core.sum", nonzero, dims=list(_dims(dim)), keepdim=keepdim)
    return cx.op("core.ne", count, cx.const(0, DType.i64))


@converts("aten.all.dim", "aten.all.dims", "aten.all.default")
def all_(cx, x, dim=None, keepdim=False):
    """``core.eq(core.sum(x == 0), 0)``"""
    zero = cx.op("core.logical_not", x)
    count = cx.op("core.sum", zero, dims=list(_dims(dim)), keepdim=keepdim)
    return cx.op("core.eq", count, cx.const(0, DType.i64))


@converts("aten.softmax.int", "aten._softmax.default")
def softmax(cx, x, dim, dtype=None, half_to_float=False):
    """``core.softmax {dim}`` in the requested dtype (cast first, as torch does)"""
    return cx.op("core.softmax", cx.cast(x, cx.out_dtype), dim=dim)


@converts("aten._safe_softmax.default")
def safe_softmax(cx, x, dim, dtype=None):
    """``core.softmax``, with rows that are all -inf giving zeros instead of NaN
    (``core.where`` on a ``core.sum`` of the finite entries)"""
    x = cx.cast(x, cx.out_dtype)
    probs = cx.op("core.softmax", x, dim=dim)
    finite = cx.op("core.ne", x, cx.const(float("-inf"), x.type.dtype))
    count = cx.op("core.sum", finite, dims=[dim], keepdim=True)
    empty = cx.op("core.eq", count, cx.const(0, DType.i64))
    return cx.op("core.where", empty, cx.const(0.0, x.type.dtype), probs)


@converts("aten.log_softmax.int", "aten._log_softmax.default")
def log_softmax(cx, x, dim, dtype=None, half_to_float=False):
    """``core.log_softmax {dim}`` in the requested dtype"""
    return cx.op("core.log_softmax", cx.cast(x, cx.out_dtype), dim=dim)


@converts("aten.cumsum.default")
def cumsum(cx, x, dim, dtype=None):
    """``core.cumsum {dim}`` (``dtype``: cast first), cast to torch's result dtype"""
    if dtype is not None:
        x = cx.cast(x, cx.dtype(dtype))
    return cx.cast(cx.op("core.cumsum", x, dim=dim), cx.out_dtype)


@converts("aten.diff.default")
def diff(cx, x, n=1, dim=-1, prepend=None, append=None):
    """``core.concat`` of prepend/x/append, then ``core.sub`` of shifted ``core.slice`` s
    (``n`` times)"""
    d = _axis(dim, x.type.rank)
    parts = [p for p in (prepend, x, append) if p is not None]
    if len(parts) > 1:
        x = cx.op("core.concat", *[cx.cast(p, x.type.dtype) for p in parts], dim=d)
    for _ in range(n):
        length = normalize_dim(x.type.shape[d] - 1)
        later = _slice(cx, x, d, 1, None, 1, length)
        earlier = _slice(cx, x, d, 0, -1, 1, length)
        x = cx.op("core.sub", later, earlier)
    return x


@converts("aten.topk.default")
def topk(cx, x, k, dim=-1, largest=True, sorted=True):
    """``core.topk {k, dim, largest, sorted}``: (values, indices)"""
    if not isinstance(k, int):
        cx.fail(f"k must be a constant, got {k}")
    return cx.op("core.topk", x, k=k, dim=dim, largest=largest, sorted=sorted)


@converts("aten.sort.default", "aten.sort.stable")
def sort(cx, x, dim=-1, descending=False, stable=None):
    """``core.sort {dim, descending}`` (always stable)"""
    return cx.op("core.sort", x, dim=dim, descending=descending)


@converts("aten.histc.default")
def histc(cx, x, bins=100, min=0, max=0):
    """``core.histc {bins, min, max}``"""
    if min == max:
        cx.fail("histc with min == max takes its range from the data; give a range")
    return cx.op("core.histc", x, bins=bins, min=float(min), max=float(max))


# ----- matrix products and normalization --------------------------------------------------------

@converts("aten.linear.default")
def linear(cx, input, weight, bias=None):
    """``core.linear`` (x @ weight^T + bias)"""
    operands = [input, weight] + ([bias] if bias is not None else [])
    return cx.op("core.linear", *operands)


@converts("aten.matmul.default", "aten.mm.default")
def matmul(cx, x, other=None, mat2=None):
    """``core.matmul``"""
    return cx.op("core.matmul", x, other if other is not None else mat2)


@converts("aten.bmm.default")
def bmm(cx, x, mat2):
    """``core.bmm``"""
    return cx.op("core.bmm", x, mat2)


@converts("aten.addmm.default")
def addmm(cx, x, mat1, mat2, beta=1, alpha=1):
    """``core.linear`` when mat2 is a transposed 2-D weight, else ``core.matmul`` + ``core.add``"""
    producer = mat2.producer
    if (beta == 1 and alpha == 1 and x.type.rank == 1 and producer is not None
            and producer.name == "core.transpose" and producer.operands[0].type.rank == 2):
        weight = producer.operands[0]
        out = cx.op("core.linear", mat1, weight, x)
        if not mat2.uses:
            cx.builder.graph.erase(producer)
        return out
    product = _scaled(cx, cx.op("core.matmul", mat1, mat2), alpha)
    if beta == 0:
        return product
    return cx.op("core.add", product, _scaled(cx, x, beta))


@converts("aten.baddbmm.default")
def baddbmm(cx, x, batch1, batch2, beta=1, alpha=1):
    """``beta * x + alpha * core.bmm(batch1, batch2)`` (BLOOM's ALiBi scores)"""
    product = _scaled(cx, cx.op("core.bmm", batch1, batch2), alpha)
    if beta == 0:
        return product
    return cx.op("core.add", product, _scaled(cx, x, beta))


@converts("aten.t.default")
def t(cx, x):
    """``core.transpose {0, 1}`` (no op below rank 2)"""
    return x if x.type.rank < 2 else cx.op("core.transpose", x, dim0=0, dim1=1)


@converts("aten.numpy_T.default")
def numpy_t(cx, x):
    """``core.permute`` reversing all dims (``x.T``)"""
    if x.type.rank < 2:
        return x
    if x.type.rank == 2:
        return cx.op("core.transpose", x, dim0=0, dim1=1)
    return cx.op("core.permute", x, dims=list(reversed(range(x.type.rank))))


@converts("aten.layer_norm.default")
def layer_norm(cx, input, normalized_shape, weight=None, bias=None, eps=1e-5,
               cudnn_enable=True):
    """``core.layer_norm {normalized_shape, eps}``"""
    return _layer_norm(cx, input, normalized_shape, weight, bias, eps)


@converts("aten.native_layer_norm.default")
def native_layer_norm(cx, input, normalized_shape, weight, bias, eps):
    """``core.layer_norm`` (the mean and rstd results are not available)"""
    out = _layer_norm(cx, input, normalized_shape, weight, bias, eps)
    missing = Unavailable("native_layer_norm's mean/rstd results, which irlm does not compute")
    return [out, missing, missing]


def _layer_norm(cx, x, normalized_shape, weight, bias, eps):
    if weight is None and bias is not None:
        cx.fail("layer_norm with a bias but no weight is not supported")
    operands = [x] + [v for v in (weight, bias) if v is not None]
    return cx.op("core.layer_norm", *operands, normalized_shape=list(normalized_shape),
                 eps=float(eps))


@converts("aten.scaled_dot_product_attention.default")
def scaled_dot_product_attention(cx, query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """``core.scaled_dot_product_attention`` (not decomposed; a float mask is cast to q's
    dtype; keys/values with fewer batch or head dims than the query are expanded explicitly)"""
    if dropout_p != 0:
        cx.fail("attention dropout in training mode; trace the model in eval mode")
    if not enable_gqa:
        # torch broadcasts the leading dims (multi-query attention: one key head for all
        # query heads); irlm's op wants them equal, so the broadcast is an explicit expand.
        from irlm.ops._shape import broadcast_shapes
        lead = broadcast_shapes(query.type.shape[:-2], key.type.shape[:-2])
        key = _expand(cx, key, tuple(lead) + tuple(key.type.shape[-2:]))
        value = _expand(cx, value, tuple(lead) + tuple(value.type.shape[-2:]))
    operands = [query, key, value]
    if attn_mask is not None:
        if attn_mask.type.dtype is not DType.bool:
            attn_mask = cx.cast(attn_mask, query.type.dtype)
        operands.append(attn_mask)
    return cx.op("core.scaled_dot_product_attention", *operands, is_causal=is_causal,
                 scale=scale, enable_gqa=enable_gqa)


@converts("aten.embedding.default")
def embedding(cx, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    """``core.embedding`` (padding_idx only matters for training)"""
    return cx.op("core.embedding", weight, indices)


@converts("transformers.grouped_mm_fallback.default")
def grouped_mm_fallback(cx, input, weight, offs):
    """``core.grouped_mm`` (HF's grouped experts matmul: rows grouped by expert)"""
    return cx.op("core.grouped_mm", input, weight, offs)


@converts("aten._grouped_mm.default")
def grouped_mm(cx, x, mat2, offs=None, bias=None, out_dtype=None):
    """``core.grouped_mm`` (2-D input, 3-D weights, offsets; no bias)"""
    if offs is None or bias is not None or x.type.rank != 2 or mat2.type.rank != 3:
        cx.fail("only the 2-D input x 3-D weight form with offsets and no bias is supported")
    return cx.cast(cx.op("core.grouped_mm", x, mat2, offs), cx.out_dtype)


# ----- shapes ----------------------------------------------------------------------------------

@converts("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
          "aten.view_as.default", "aten.reshape_as.default", "aten.flatten.using_ints",
          "aten.unflatten.int", "aten._reshape_alias.default")
def reshape(cx, x, **_shape):
    """``core.reshape`` to torch's result shape (``[batch*seq, 576]``; no op if unchanged)"""
    return _reshape(cx, x, cx.out_shape())


@converts("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def squeeze(cx, x, dim=None):
    """``core.squeeze`` of the named size-1 dims (torch ignores dims not of size 1)"""
    rank = x.type.rank
    wanted = range(rank) if dim is None else [_axis(d, rank) for d in _dims(dim)]
    dims = [d for d in wanted if x.type.shape[d] == 1]
    return cx.op("core.squeeze", x, dims=dims) if dims else x


@converts("aten.unsqueeze.default")
def unsqueeze(cx, x, dim):
    """``core.unsqueeze``"""
    return cx.op("core.unsqueeze", x, dim=dim)


@converts("aten.expand.default", "aten.expand_as.default", "aten.broadcast_to.default")
def expand(cx, x, **_size):
    """``core.expand`` to torch's result shape"""
    return _expand(cx, x, cx.out_shape())


@converts("aten.permute.default")
def permute(cx, x, dims):
    """``core.permute`` (no op for the identity)"""
    dims = [_axis(d, x.type.rank) for d in dims]
    if dims == list(range(x.type.rank)):
        return x
    return cx.op("core.permute", x, dims=dims)


@converts("aten.transpose.int", "aten.swapaxes.default")
def transpose(cx, x, dim0=None, dim1=None, axis0=None, axis1=None):
    """``core.transpose``"""
    d0, d1 = (dim0, dim1) if dim0 is not None else (axis0, axis1)
    if _axis(d0, x.type.rank) == _axis(d1, x.type.rank):
        return x
    return cx.op("core.transpose", x, dim0=d0, dim1=d1)


def _slice(cx, x: Value, dim: int, start, end, step: int, length) -> Value:
    """``core.slice`` with bounds normalized against the dim's size (``length``: the result)."""
    dim = _axis(dim, x.type.rank)
    size = x.type.shape[dim]
    start = 0 if start is None else start
    if end is None or (isinstance(end, int) and end >= INT64_MAX // 2):
        end = size
    if isinstance(start, int) and start < 0:
        start = normalize_dim(size + start)
    if isinstance(end, int) and end < 0:
        end = normalize_dim(size + end)
    if isinstance(size, int) and isinstance(end, int):
        end = min(end, size)
    if step == 1 and dims_equal(start, 0) and dims_equal(end, size):
        return x
    if step == 1 and not dims_equal(normalize_dim(end - start), length):
        # A symbolic end past the dim (x[:, :n] with n > size) is clamped by torch.
        if dims_equal(normalize_dim(size - start), length):
            end = size
    attrs = {"dim": dim, "start": start, "step": step}
    if not dims_equal(end, size):
        attrs["end"] = end
    return cx.op("core.slice", x, **attrs)


@converts("aten.slice.Tensor")
def slice_(cx, x, dim=0, start=None, end=None, step=1):
    """``core.slice {dim, start, end, step}`` (``end`` = INT64_MAX means to the end; no op for
    the whole dim)"""
    return _slice(cx, x, dim, start, end, step, cx.out_shape()[_axis(dim, x.type.rank)])


@converts("aten.narrow.default")
def narrow(cx, x, dim, start, length):
    """``core.slice {dim, start, end = start + length}``"""
    return _slice(cx, x, dim, start, normalize_dim(start + length), 1, length)


@converts("aten.select.int")
def select(cx, x, dim, index):
    """``core.slice`` of one entry + ``core.squeeze``"""
    dim = _axis(dim, x.type.rank)
    if isinstance(index, int) and index < 0:
        index = normalize_dim(x.type.shape[dim] + index)
    piece = _slice(cx, x, dim, index, normalize_dim(index + 1), 1, 1)
    return cx.op("core.squeeze", piece, dims=[dim])


@converts("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default",
          "aten.split.sizes", "aten.tensor_split.sections")
def split(cx, x, dim=0, **_sizes):
    """``core.split {dim, sizes}`` with the piece sizes torch computed"""
    d = _axis(dim, x.type.rank)
    sizes = [cx.out_shape(i)[d] for i in range(len(cx.out))]
    if len(sizes) == 1:
        return [x]
    return cx.op("core.split", x, dim=d, sizes=sizes)


@converts("aten.unbind.int")
def unbind(cx, x, dim=0):
    """``core.split`` into size-1 pieces + ``core.squeeze`` each"""
    d = _axis(dim, x.type.rank)
    n = x.type.shape[d]
    if not isinstance(n, int):
        cx.fail("unbind along a symbolic dim")
    pieces = [x] if n == 1 else cx.op("core.split", x, dim=d, sizes=[1] * n)
    return [cx.op("core.squeeze", p, dims=[d]) for p in pieces]


@converts("aten.cat.default", "aten.concat.default")
def cat(cx, tensors, dim=0):
    """``core.concat`` (operands cast to the promoted dtype; empty 1-D operands dropped)"""
    dtype = cx.out_dtype
    parts = [cx.cast(t, dtype) for t in tensors
             if not (t.type.rank == 1 and t.type.shape[0] == 0)]
    if len(parts) == 1:
        return parts[0]
    return cx.op("core.concat", *parts, dim=_axis(dim, cx.out_type().rank))


@converts("aten.stack.default")
def stack(cx, tensors, dim=0):
    """``core.unsqueeze`` each + ``core.concat``"""
    rank = tensors[0].type.rank + 1
    d = _axis(dim, rank)
    dtype = cx.out_dtype
    parts = [cx.op("core.unsqueeze", cx.cast(t, dtype), dim=d) for t in tensors]
    return parts[0] if len(parts) == 1 else cx.op("core.concat", *parts, dim=d)


@converts("aten.repeat.default")
def repeat(cx, x, repeats):
    """``core.unsqueeze`` + ``core.expand`` + ``core.reshape`` (tile)"""
    if all(r == 1 for r in repeats) and len(repeats) == x.type.rank:
        return x
    shape = [1] * (len(repeats) - x.type.rank) + list(x.type.shape)
    x = _reshape(cx, x, shape)
    interleaved, expanded = [], []
    for r, d in zip(repeats, shape):
        interleaved += [1, d]
        expanded += [r, d]
    x = _reshape(cx, x, interleaved)
    x = _expand(cx, x, expanded)
    return _reshape(cx, x, cx.out_shape())


@converts("aten.repeat_interleave.self_int")
def repeat_interleave(cx, x, repeats, dim=None, output_size=None):
    """``core.unsqueeze`` + ``core.expand`` + ``core.reshape`` (each entry repeated in place)"""
    if not isinstance(repeats, int):
        cx.fail("repeats must be a constant")
    if dim is None:
        x = _reshape(cx, x, [x.type.numel()])
        dim = 0
    d = _axis(dim, x.type.rank)
    x = cx.op("core.unsqueeze", x, dim=d + 1)
    shape = list(x.type.shape)
    shape[d + 1] = repeats
    return _reshape(cx, _expand(cx, x, shape), cx.out_shape())


# ----- indexing --------------------------------------------------------------------------------

# Ops whose integer results are indices (never negative), and ops that move index values
# around without changing them: what _non_negative follows to avoid wrapping indices.
_INDEX_RESULTS = {("core.topk", 1), ("core.sort", 1), ("core.max", 1), ("core.argmax", 0)}
_VALUE_PRESERVING = {"core.reshape", "core.expand", "core.unsqueeze", "core.squeeze",
                     "core.permute", "core.transpose", "core.slice", "core.concat", "core.cast",
                     "core.split", "core.add", "core.mul", "core.scatter", "core.maximum",
                     "core.index_select", "core.gather", "core.floor_divide", "core.cumsum"}


def _non_negative(cx, v: Value, depth: int = 0) -> bool:
    """Can ``v`` (an integer tensor) be shown to hold no negative entry?"""
    op = v.producer
    if op is None or depth > 32:
        return False
    if (op.name, v.result_index) in _INDEX_RESULTS:
        return True
    if op.name == "core.arange":
        return op.attrs["step"] > 0 and (not isinstance(op.attrs["start"], int)
                                         or op.attrs["start"] >= 0)
    if op.name == "core.full":
        return op.attrs["value"] >= 0
    if op.name == "core.constant":
        return bool((op.attrs["value"] >= 0).all())
    if op.name == "param":
        data = cx.weight_data(op.attrs["name"])
        return data is not None and not data.dtype.is_floating_point and bool((data >= 0).all())
    if op.name in ("core.index_select", "core.gather", "core.floor_divide"):
        operands = op.operands[:1] if op.name != "core.floor_divide" else op.operands
    elif op.name == "core.scatter":
        operands = [op.operands[0], op.operands[2]]
    elif op.name in _VALUE_PRESERVING:
        operands = op.operands
    else:
        return False
    return all(_non_negative(cx, o, depth + 1) for o in operands)


def _index_in_range(cx, index: Value, size) -> Value:
    """torch allows negative indices (``x[..., [-1]]``); irlm's index ops do not: add the
    dim's size to negative entries unless the index is known to be non-negative."""
    if _non_negative(cx, index):
        return index
    if not isinstance(size, int):
        cx.fail("an index into a symbolic dim that may be negative is not supported")
    dtype = index.type.dtype
    negative = cx.op("core.lt", index, cx.const(0, dtype))
    return cx.op("core.where", negative, cx.op("core.add", index, cx.const(size, dtype)), index)


def _flat_index_select(cx, x: Value, dim: int, index: Value) -> Value:
    """``x`` indexed along ``dim`` by an index of any rank: result shape
    ``x.shape[:dim] + index.shape + x.shape[dim+1:]``."""
    shape = list(x.type.shape)
    index = _index_in_range(cx, index, shape[dim])
    flat = _reshape(cx, index, [index.type.numel()])
    out = cx.op("core.index_select", x, flat, dim=dim)
    return _reshape(cx, out, shape[:dim] + list(index.type.shape) + shape[dim + 1:])


@converts("aten.index.Tensor", "aten._unsafe_index.Tensor")
def index(cx, x, indices):
    """``x[i]``: ``core.index_select``; ``x[i, j, ...]``: index_select then ``core.gather``
    per further index (index tensors broadcast against each other)"""
    indices = list(indices)
    for i in indices:
        if i is not None and not i.type.dtype.is_int:
            cx.fail(f"indexing with a {i.type.dtype.value} tensor (a boolean mask gives a "
                    "data-dependent shape)")
    positions = [d for d, i in enumerate(indices) if i is not None]
    if len(positions) == 1:
        d = positions[0]
        return _flat_index_select(cx, x, d, indices[d])
    # Several index tensors: move the indexed dims to the front, broadcast the indices to
    # one shape B, take the first dim with index_select and each further one with gather.
    from irlm.ops._shape import broadcast_shapes
    rank = x.type.rank
    others = [d for d in range(rank) if d not in positions]
    x = cx.op("core.permute", x, dims=positions + others) if positions + others != \
        list(range(rank)) else x
    B = ()
    for d in positions:
        B = broadcast_shapes(B, indices[d].type.shape)
    B = list(B)
    idx = [_expand(cx, indices[d], B) for d in positions]
    y = _flat_index_select(cx, x, 0, idx[0])            # B + x.shape[1:]
    nb = len(B)
    for j in range(1, len(positions)):
        rest = list(y.type.shape[nb + 1:])
        i = _index_in_range(cx, idx[j], y.type.shape[nb])
        i = _reshape(cx, i, B + [1] + [1] * len(rest))
        i = _expand(cx, i, B + [1] + rest)
        y = cx.op("core.gather", y, i, dim=nb)
        y = cx.op("core.squeeze", y, dims=[nb])           # B + x.shape[j+1:]
    adjacent = positions == list(range(positions[0], positions[0] + len(positions)))
    if adjacent and positions[0] > 0:
        # torch keeps adjacent indexed dims in place: [x dims before, B, x dims after]
        before = positions[0]
        order = list(range(nb, nb + before)) + list(range(nb)) + \
            list(range(nb + before, y.type.rank))
        y = cx.op("core.permute", y, dims=order)
    return y


@converts("aten.index_select.default")
def index_select(cx, x, dim, index):
    """``core.index_select``"""
    return _flat_index_select(cx, x, _axis(dim, x.type.rank), index)


@converts("aten.gather.default")
def gather(cx, x, dim, index, sparse_grad=False):
    """``core.gather`` (negative indices wrapped)"""
    index = _index_in_range(cx, index, x.type.shape[_axis(dim, x.type.rank)])
    return cx.op("core.gather", x, index, dim=dim)


def _scatter_along(cx, x: Value, dim: int, index: Value, src: Value, reduce: str) -> Value:
    """Rows ``index[i]`` of ``x`` along ``dim`` receive slice ``i`` of ``src`` (1-D index)."""
    rank = x.type.rank
    n = index.type.shape[0]
    src_shape = list(x.type.shape)
    src_shape[dim] = n
    src = _expand(cx, cx.cast(src, x.type.dtype), src_shape)
    i = _reshape(cx, index, [n if k == dim else 1 for k in range(rank)])
    i = _expand(cx, i, src_shape)
    return cx.op("core.scatter", x, i, src, dim=dim, reduce=reduce)


@converts("aten.index_put.default")
def index_put(cx, x, indices, values, accumulate=False):
    """``core.scatter`` along dim 0 (``x[i] = v`` with one 1-D index; accumulate: reduce=add)"""
    indices = list(indices)
    if len(indices) != 1 or indices[0] is None or indices[0].type.rank != 1 \
            or not indices[0].type.dtype.is_int:
        cx.fail("only x[i] = v with one 1-D integer index on dim 0 is supported")
    return _scatter_along(cx, x, 0, indices[0], values, "add" if accumulate else "none")


@converts("aten.index_add.default")
def index_add(cx, x, dim, index, source, alpha=1):
    """``core.scatter {reduce = add}`` (index broadcast along the other dims)"""
    return _scatter_along(cx, x, _axis(dim, x.type.rank), index,
                          _scaled(cx, source, alpha), "add")


@converts("aten.scatter.src", "aten.scatter_add.default")
def scatter(cx, x, dim, index, src):
    """``core.scatter`` (``scatter_add``: reduce=add)"""
    reduce = "add" if "scatter_add" in cx.op_name else "none"
    return cx.op("core.scatter", x, index, cx.cast(src, x.type.dtype), dim=dim, reduce=reduce)


@converts("aten.slice_scatter.default")
def slice_scatter(cx, x, src, dim=0, start=None, end=None, step=1):
    """``core.concat`` of x before the slice, src, and x after it (the functional form of
    writing into ``x[..., start:end]``)"""
    if step != 1:
        cx.fail("slice_scatter with a step other than 1 is not supported")
    d = _axis(dim, x.type.rank)
    size = x.type.shape[d]
    start = 0 if start is None else start
    start = normalize_dim(size + start) if isinstance(start, int) and start < 0 else start
    end = normalize_dim(start + src.type.shape[d])
    parts = []
    if not dims_equal(start, 0):
        parts.append(_slice(cx, x, d, 0, start, 1, start))
    parts.append(cx.cast(src, x.type.dtype))
    if not dims_equal(end, size):
        parts.append(_slice(cx, x, d, end, None, 1, normalize_dim(size - end)))
    return parts[0] if len(parts) == 1 else cx.op("core.concat", *parts, dim=d)


@converts("aten.select_scatter.default")
def select_scatter(cx, x, src, dim, index):
    """``slice_scatter`` of ``src`` unsqueezed at dim (writing ``x[..., index, ...]``)"""
    d = _axis(dim, x.type.rank)
    if isinstance(index, int) and index < 0:
        index = normalize_dim(x.type.shape[d] + index)
    src = cx.op("core.unsqueeze", src, dim=d)
    return slice_scatter(cx, x, src, d, index, normalize_dim(index + 1), 1)


@converts("aten.one_hot.default")
def one_hot(cx, x, num_classes=-1):
    """``core.cast(core.eq(x[..., None], core.arange(num_classes)), i64)``"""
    if num_classes < 0:
        cx.fail("one_hot needs num_classes (otherwise the shape depends on the data)")
    classes = cx.op("core.arange", end=num_classes, dtype=x.type.dtype)
    hits = cx.op("core.eq", cx.op("core.unsqueeze", x, dim=-1), classes)
    return cx.cast(hits, DType.i64)


@converts("aten.triu.default", "aten.tril.default")
def tri(cx, x, diagonal=0):
    """``core.triu`` / ``core.tril``"""
    name = "core.triu" if "triu" in cx.op_name else "core.tril"
    return cx.op(name, x, diagonal=diagonal)


# ----- tensor factories ------------------------------------------------------------------------

def _full(cx, value) -> Value:
    value = _number(cx, value, "the fill value")
    return cx.op("core.full", shape=list(cx.out_shape()), value=float(value),
                 dtype=cx.out_dtype)


@converts("aten.full.default", "aten.full_like.default", "aten.new_full.default")
def full(cx, fill_value, **_shape):
    """``core.full {shape, value, dtype}``"""
    return _full(cx, fill_value)


@converts("aten.zeros.default", "aten.zeros_like.default", "aten.new_zeros.default",
          "aten.empty.memory_format", "aten.empty_like.default", "aten.new_empty.default",
          "aten.empty_strided.default")
def zeros(cx, **_shape):
    """``core.full {value = 0}`` (an uninitialized ``empty`` is zeros: any value is valid)"""
    return _full(cx, 0)


@converts("aten.ones.default", "aten.ones_like.default", "aten.new_ones.default")
def ones(cx, **_shape):
    """``core.full {value = 1}``"""
    return _full(cx, 1)


@converts("aten.fill.Scalar", "aten.fill.Tensor")
def fill(cx, x, value):
    """``core.full`` of x's type (a tensor value: ``core.expand`` of it)"""
    if isinstance(value, Value):
        return _expand(cx, cx.cast(value, x.type.dtype), x.type.shape)
    return _full(cx, value)


@converts("aten.scalar_tensor.default")
def scalar_tensor(cx, s, dtype=None):
    """0-d ``core.constant`` of torch's dtype"""
    return cx.const(_number(cx, s, "the value"), cx.out_dtype)


@converts("aten.arange.default", "aten.arange.start", "aten.arange.start_step")
def arange(cx, start=0, end=None, step=1, dtype=None):
    """``core.arange {start, end, step, dtype}`` (symbolic bounds allowed with step 1)"""
    if end is None:  # arange(end)
        start, end = 0, start
    for what, v in (("start", start), ("end", end), ("step", step)):
        if isinstance(v, float):
            if not v.is_integer():
                cx.fail(f"a non-integer {what} ({v}) is not supported")
    start, end, step = [int(v) if isinstance(v, float) else v for v in (start, end, step)]
    if not isinstance(step, int):
        cx.fail("a symbolic step is not supported")
    return cx.op("core.arange", start=start, end=end, step=step, dtype=cx.out_dtype)
