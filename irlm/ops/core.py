"""The ``core`` dialect: what torch.export produces for decoder and encoder transformers.

Reference semantics follow the ATen op of the same name; where ATen has several overloads,
the op here is the one form the frontend maps them onto.  Integer attributes naming axes may
be negative and count from the end, as in torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import IRError
from ..registry import (ACTIVATION, CONSTANT_LIKE, ELEMENTWISE, RESHAPE_LIKE, VIEW, attr,
                        define_op)
from ..types import DType, TensorType, dims_equal, format_dim, normalize_dim
from ._shape import (broadcast_shapes, norm_axis, promote, reduce_shape, require_float,
                     require_int, require_rank, reshape_shape, same_dim)

# ----- weights and constants -------------------------------------------------------------------

define_op(
    "param", [], {"name": attr("str"), "type": attr("type")},
    infer=lambda t, a: [a["type"]],
    reference=lambda ctx, x, a: [ctx.load_weight(a["name"], a["type"])],
    doc="A weight read from the graph's weight store by name.", traits=[CONSTANT_LIKE])


def _infer_constant(t, a):
    v = a["value"]
    return [TensorType(tuple(v.shape), DType.from_torch(v.dtype))]


define_op("core.constant", [], {"value": attr("tensor")}, infer=_infer_constant,
          reference=lambda ctx, x, a: [a["value"].to(ctx.device or "cpu", copy=True)],
          doc="A small dense tensor stored in the op.", traits=[CONSTANT_LIKE])


def _full_shape(ctx, shape):
    return [ctx.dim(d) for d in shape]


define_op(
    "core.full", [], {"shape": attr("dims"), "value": attr("float"), "dtype": attr("dtype")},
    infer=lambda t, a: [TensorType(a["shape"], a["dtype"])],
    reference=lambda ctx, x, a: [torch.full(_full_shape(ctx, a["shape"]), a["value"],
                                            dtype=a["dtype"].torch, device=ctx.device)],
    doc="A tensor of one value (zeros and ones are full with 0 and 1).")


def _infer_arange(t, a):
    start, end, step = a["start"], a["end"], a["step"]
    if step == 0:
        raise IRError("step must not be 0")
    if isinstance(start, int) and isinstance(end, int):
        n = max(0, math.ceil((end - start) / step))
    elif step == 1:
        n = normalize_dim(end - start)
    else:
        raise IRError("a symbolic arange needs step 1")
    return [TensorType((n,), a["dtype"])]


define_op(
    "core.arange", [], {"start": attr("dim", 0), "end": attr("dim"), "step": attr("int", 1),
                        "dtype": attr("dtype", DType.i64)},
    infer=_infer_arange,
    reference=lambda ctx, x, a: [torch.arange(ctx.dim(a["start"]), ctx.dim(a["end"]), a["step"],
                                              dtype=a["dtype"].torch, device=ctx.device)],
    doc="Integers start, start+step, ... below end.")

# ----- elementwise -----------------------------------------------------------------------------


#: the elementwise nonlinearities that layers apply after a linear (tp-split follows them,
#: the fusions fold them into llm.gated_act / llm.linear_act when they have an ``act`` name)
_ACTIVATIONS = ("tanh", "sigmoid", "silu", "relu", "gelu")


def _traits(name):
    return [ACTIVATION] if name in _ACTIVATIONS else [ELEMENTWISE]


def _unary_float(name, fn, doc):
    def infer(t, a):
        require_float(t[0], "the operand")
        return [t[0]]
    define_op(f"core.{name}", ["x"], infer=infer, reference=lambda ctx, x, a: [fn(x[0])], doc=doc,
              traits=_traits(name))


for _name, _fn in {
    "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh, "erf": torch.erf,
    "sigmoid": torch.sigmoid, "silu": F.silu, "reciprocal": torch.reciprocal,
}.items():
    _unary_float(_name, _fn, f"Elementwise {_name}.")


def _unary_any(name, fn, doc):
    define_op(f"core.{name}", ["x"], infer=lambda t, a: [t[0]],
              reference=lambda ctx, x, a: [fn(x[0])], doc=doc, traits=_traits(name))


_unary_any("neg", torch.neg, "Elementwise negation.")
_unary_any("abs", torch.abs, "Elementwise absolute value.")
_unary_any("relu", torch.relu, "max(x, 0).")


def _infer_gelu(t, a):
    require_float(t[0], "the operand")
    return [t[0]]


define_op("core.gelu", ["x"], {"approximate": attr("str", "none", ["none", "tanh"])},
          infer=_infer_gelu,
          reference=lambda ctx, x, a: [F.gelu(x[0], approximate=a["approximate"])],
          doc="GELU, exact (erf) or with the tanh approximation.", traits=_traits("gelu"))

define_op("core.logical_not", ["x"], infer=lambda t, a: [t[0].with_dtype(DType.bool)],
          reference=lambda ctx, x, a: [torch.logical_not(x[0])], doc="Elementwise not.",
          traits=[ELEMENTWISE])


def _infer_cast(t, a):
    return [t[0].with_dtype(a["dtype"])]


define_op("core.cast", ["x"], {"dtype": attr("dtype")}, infer=_infer_cast,
          reference=lambda ctx, x, a: [x[0].to(a["dtype"].torch)],
          doc="Convert to another element type (round to nearest even for floats).",
          traits=[ELEMENTWISE])


def _infer_clamp(t, a):
    return [t[0]]


define_op("core.clamp", ["x"], {"min": attr("float", None), "max": attr("float", None)},
          infer=_infer_clamp,
          reference=lambda ctx, x, a: [torch.clamp(x[0], a["min"], a["max"])],
          doc="Clamp to [min, max]; either bound may be absent.", traits=[ELEMENTWISE])


def _binary(name, fn, result=None, commutative=False, float_only=False, doc=""):
    def infer(t, a):
        dtype = promote(t[0], t[1])
        if float_only and not dtype.is_float:
            raise IRError(f"operands must be floating-point, got {dtype.value}")
        shape = broadcast_shapes(t[0].shape, t[1].shape)
        return [TensorType(shape, result or dtype)]
    define_op(f"core.{name}", ["lhs", "rhs"], infer=infer,
              reference=lambda ctx, x, a: [fn(x[0], x[1])], commutative=commutative,
              doc=doc or f"Elementwise {name} with broadcasting.", traits=[ELEMENTWISE])


_binary("add", torch.add, commutative=True)
_binary("sub", torch.sub)
_binary("mul", torch.mul, commutative=True)
_binary("div", torch.div, float_only=True, doc="Elementwise true division (floats).")
_binary("pow", torch.pow, float_only=True)
_binary("maximum", torch.maximum, commutative=True)
_binary("minimum", torch.minimum, commutative=True)
for _name in ("eq", "ne"):
    _binary(_name, getattr(torch, _name), DType.bool, commutative=True,
            doc=f"Elementwise comparison ({_name}); the result is bool.")
for _name in ("lt", "le", "gt", "ge"):
    _binary(_name, getattr(torch, _name), DType.bool,
            doc=f"Elementwise comparison ({_name}); the result is bool.")
_binary("logical_and", torch.logical_and, DType.bool, commutative=True)
_binary("logical_or", torch.logical_or, DType.bool, commutative=True)


def _infer_where(t, a):
    if t[0].dtype is not DType.bool:
        raise IRError(f"the condition must be bool, got {t[0].dtype.value}")
    dtype = promote(t[1], t[2])
    shape = broadcast_shapes(broadcast_shapes(t[0].shape, t[1].shape), t[2].shape)
    return [TensorType(shape, dtype)]


define_op("core.where", ["cond", "lhs", "rhs"], infer=_infer_where,
          reference=lambda ctx, x, a: [torch.where(x[0], x[1], x[2])],
          doc="lhs where cond else rhs, with broadcasting.", traits=[ELEMENTWISE])


def _infer_masked_fill(t, a):
    if t[1].dtype is not DType.bool:
        raise IRError(f"the mask must be bool, got {t[1].dtype.value}")
    broadcast_shapes(t[0].shape, t[1].shape)
    return [t[0].with_shape(broadcast_shapes(t[0].shape, t[1].shape))]


define_op("core.masked_fill", ["x", "mask"], {"value": attr("float")}, infer=_infer_masked_fill,
          reference=lambda ctx, x, a: [x[0].masked_fill(x[1], a["value"])],
          doc="x with value where mask is true.", traits=[ELEMENTWISE])

# ----- matrix products -------------------------------------------------------------------------


def _infer_matmul(t, a):
    x, y = t
    if x.rank == 0 or y.rank == 0:
        raise IRError("matmul operands must have rank >= 1")
    if x.dtype is not y.dtype:
        raise IRError(f"operand dtypes differ: {x.dtype.value} vs {y.dtype.value}")
    xs = list(x.shape) if x.rank > 1 else [1] + list(x.shape)
    ys = list(y.shape) if y.rank > 1 else list(y.shape) + [1]
    same_dim(xs[-1], ys[-2], "contracted dimensions differ")
    batch = broadcast_shapes(xs[:-2], ys[:-2])
    out = list(batch) + [xs[-2], ys[-1]]
    if x.rank == 1:
        out.pop(-2)
    if y.rank == 1:
        out.pop(-1)
    return [TensorType(out, x.dtype)]


define_op("core.matmul", ["lhs", "rhs"], infer=_infer_matmul,
          reference=lambda ctx, x, a: [torch.matmul(x[0], x[1])],
          doc="torch.matmul: batched matrix product with broadcast batch dimensions.")


def _infer_bmm(t, a):
    require_rank(t[0], 3, "lhs")
    require_rank(t[1], 3, "rhs")
    same_dim(t[0].shape[0], t[1].shape[0], "batch dimensions differ")
    return _infer_matmul(t, a)


define_op("core.bmm", ["lhs", "rhs"], infer=_infer_bmm,
          reference=lambda ctx, x, a: [torch.bmm(x[0], x[1])],
          doc="Batched matrix product of rank-3 tensors.")


def _infer_linear(t, a):
    x, w, b = t[0], t[1], t[2] if len(t) > 2 else None
    require_rank(w, 2, "weight")
    if x.rank == 0:
        raise IRError("input must have rank >= 1")
    if x.dtype is not w.dtype:
        raise IRError(f"input and weight dtypes differ: {x.dtype.value} vs {w.dtype.value}")
    same_dim(x.shape[-1], w.shape[1], "input features differ from weight columns")
    if b is not None:
        require_rank(b, 1, "bias")
        same_dim(b.shape[0], w.shape[0], "bias length differs from weight rows")
    return [TensorType(tuple(x.shape[:-1]) + (w.shape[0],), x.dtype)]


define_op("core.linear", ["x", "weight", "bias?"], infer=_infer_linear,
          reference=lambda ctx, x, a: [F.linear(x[0], x[1], x[2] if len(x) > 2 else None)],
          doc="x @ weight^T + bias; weight is [out_features, in_features].")

# ----- reductions ------------------------------------------------------------------------------


def _reduce(name, fn, float_only=False, int_to_i64=False, doc=""):
    def infer(t, a):
        if float_only:
            require_float(t[0], "the operand")
        dtype = t[0].dtype
        if int_to_i64 and (dtype.is_int or dtype is DType.bool):
            dtype = DType.i64
        return [TensorType(reduce_shape(t[0].shape, a["dims"], a["keepdim"]), dtype)]

    def ref(ctx, x, a):
        dims = list(a["dims"]) or list(range(x[0].dim()))
        return [fn(x[0], dims, a["keepdim"])]
    define_op(f"core.{name}", ["x"], {"dims": attr("ints", ()), "keepdim": attr("bool", False)},
              infer=infer, reference=ref, doc=doc or f"{name} over dims (all when empty).")


_reduce("sum", lambda x, d, k: torch.sum(x, d, k), int_to_i64=True)
_reduce("mean", lambda x, d, k: torch.mean(x, d, k), float_only=True)
_reduce("amax", lambda x, d, k: torch.amax(x, d, k))
_reduce("amin", lambda x, d, k: torch.amin(x, d, k))


def _infer_max(t, a):
    norm_axis(a["dim"], t[0].rank)
    shape = reduce_shape(t[0].shape, [a["dim"]], a["keepdim"])
    return [TensorType(shape, t[0].dtype), TensorType(shape, DType.i64)]


define_op("core.max", ["x"], {"dim": attr("int"), "keepdim": attr("bool", False)},
          infer=_infer_max,
          reference=lambda ctx, x, a: list(torch.max(x[0], a["dim"], a["keepdim"])),
          doc="Maximum along one dim: (values, indices).")


def _infer_argmax(t, a):
    norm_axis(a["dim"], t[0].rank)
    return [TensorType(reduce_shape(t[0].shape, [a["dim"]], a["keepdim"]), DType.i64)]


define_op("core.argmax", ["x"], {"dim": attr("int"), "keepdim": attr("bool", False)},
          infer=_infer_argmax,
          reference=lambda ctx, x, a: [torch.argmax(x[0], a["dim"], a["keepdim"])],
          doc="Index of the maximum along one dim (the first on ties).")


def _infer_softmax(t, a):
    require_float(t[0], "the operand")
    norm_axis(a["dim"], t[0].rank)
    return [t[0]]


define_op("core.softmax", ["x"], {"dim": attr("int")}, infer=_infer_softmax,
          reference=lambda ctx, x, a: [torch.softmax(x[0], a["dim"])], doc="Softmax along dim.")
define_op("core.log_softmax", ["x"], {"dim": attr("int")}, infer=_infer_softmax,
          reference=lambda ctx, x, a: [torch.log_softmax(x[0], a["dim"])],
          doc="Log-softmax along dim.")


def _infer_cumsum(t, a):
    norm_axis(a["dim"], t[0].rank)
    dtype = DType.i64 if (t[0].dtype.is_int or t[0].dtype is DType.bool) else t[0].dtype
    return [t[0].with_dtype(dtype)]


define_op("core.cumsum", ["x"], {"dim": attr("int")}, infer=_infer_cumsum,
          reference=lambda ctx, x, a: [torch.cumsum(x[0], a["dim"])],
          doc="Inclusive prefix sum along dim (integers accumulate in i64).")

# ----- shape manipulation ----------------------------------------------------------------------


def _infer_reshape(t, a):
    return [t[0].with_shape(reshape_shape(t[0].shape, a["shape"]))]


define_op("core.reshape", ["x"], {"shape": attr("dims")}, infer=_infer_reshape,
          reference=lambda ctx, x, a: [x[0].reshape([ctx.dim(d) for d in a["shape"]])],
          doc="Same elements in a new shape (one -1 is inferred).", traits=[RESHAPE_LIKE])


def _infer_transpose(t, a):
    s = list(t[0].shape)
    i, j = norm_axis(a["dim0"], len(s)), norm_axis(a["dim1"], len(s))
    s[i], s[j] = s[j], s[i]
    return [t[0].with_shape(s)]


define_op("core.transpose", ["x"], {"dim0": attr("int"), "dim1": attr("int")},
          infer=_infer_transpose,
          reference=lambda ctx, x, a: [x[0].transpose(a["dim0"], a["dim1"])],
          doc="Swap two dims.", traits=[VIEW])


def _infer_permute(t, a):
    rank = t[0].rank
    perm = [norm_axis(d, rank) for d in a["dims"]]
    if sorted(perm) != list(range(rank)):
        raise IRError(f"dims {list(a['dims'])} is not a permutation of {rank} axes")
    return [t[0].with_shape([t[0].shape[p] for p in perm])]


define_op("core.permute", ["x"], {"dims": attr("ints")}, infer=_infer_permute,
          reference=lambda ctx, x, a: [x[0].permute(list(a["dims"]))],
          doc="Reorder dims: result dim i is operand dim dims[i].", traits=[VIEW])


def _infer_expand(t, a):
    src, tgt = list(t[0].shape), list(a["shape"])
    if len(tgt) < len(src):
        raise IRError(f"cannot expand rank {len(src)} to rank {len(tgt)}")
    out = []
    offset = len(tgt) - len(src)
    for i, d in enumerate(tgt):
        s = src[i - offset] if i >= offset else None
        if isinstance(d, int) and d == -1:
            if s is None:
                raise IRError("-1 is only allowed for existing dims")
            out.append(s)
        elif s is None or (isinstance(s, int) and s == 1) or dims_equal(s, d):
            out.append(d)
        else:
            raise IRError(f"cannot expand dim {i - offset} of size {format_dim(s)} to "
                          f"{format_dim(d)}")
    return [t[0].with_shape(out)]


define_op("core.expand", ["x"], {"shape": attr("dims")}, infer=_infer_expand,
          reference=lambda ctx, x, a: [x[0].expand([ctx.dim(d) for d in a["shape"]])],
          doc="Broadcast size-1 dims (and new leading dims) to shape; -1 keeps a dim.",
          traits=[VIEW])


def _infer_squeeze(t, a):
    rank = t[0].rank
    dims = {norm_axis(d, rank) for d in a["dims"]} if a["dims"] else \
        {i for i, d in enumerate(t[0].shape) if d == 1}
    for d in dims:
        if t[0].shape[d] != 1:
            raise IRError(f"cannot squeeze dim {d} of size {format_dim(t[0].shape[d])}")
    return [t[0].with_shape([d for i, d in enumerate(t[0].shape) if i not in dims])]


def _ref_squeeze(ctx, x, a):
    return [x[0].squeeze(tuple(a["dims"])) if a["dims"] else x[0].squeeze()]


define_op("core.squeeze", ["x"], {"dims": attr("ints", ())}, infer=_infer_squeeze,
          reference=_ref_squeeze, doc="Remove size-1 dims (all static ones when dims is empty).",
          traits=[RESHAPE_LIKE])


def _infer_unsqueeze(t, a):
    s = list(t[0].shape)
    s.insert(norm_axis(a["dim"], len(s) + 1), 1)
    return [t[0].with_shape(s)]


define_op("core.unsqueeze", ["x"], {"dim": attr("int")}, infer=_infer_unsqueeze,
          reference=lambda ctx, x, a: [x[0].unsqueeze(a["dim"])], doc="Insert a size-1 dim.",
          traits=[RESHAPE_LIKE])

_BIG = 2 ** 62


def _slice_bounds(size, start, end, step):
    """Clamp like Python slicing; symbolic bounds are taken as given (the frontend emits
    only in-range symbolic bounds)."""
    def clamp(v):
        if isinstance(v, int):
            if v >= _BIG:
                return size
            if v < 0:
                v = v + size if isinstance(size, int) else normalize_dim(size + v)
            if isinstance(v, int) and isinstance(size, int):
                return min(max(v, 0), size)
            return v if not isinstance(v, int) else max(v, 0)
        return v
    s, e = clamp(start), clamp(end)
    if isinstance(s, int) and isinstance(e, int):
        n = max(0, math.ceil((e - s) / step))
    elif step == 1:
        n = normalize_dim(e - s)
    else:
        raise IRError("a symbolic slice needs step 1")
    return s, e, n


def _infer_slice(t, a):
    if a["step"] <= 0:
        raise IRError(f"step must be positive, got {a['step']}")
    s = list(t[0].shape)
    d = norm_axis(a["dim"], len(s))
    s[d] = _slice_bounds(s[d], a["start"], a["end"], a["step"])[2]
    return [t[0].with_shape(s)]


def _ref_slice(ctx, x, a):
    d = a["dim"] % x[0].dim()
    start, end = a["start"], a["end"]
    start = ctx.dim(start) if not isinstance(start, int) else start
    end = ctx.dim(end) if not isinstance(end, int) else min(end, x[0].shape[d] + abs(end))
    idx = [slice(None)] * x[0].dim()
    idx[d] = slice(start, end, a["step"])
    return [x[0][tuple(idx)]]


define_op("core.slice", ["x"], {"dim": attr("int"), "start": attr("dim", 0),
                                 "end": attr("dim", _BIG), "step": attr("int", 1)},
          infer=_infer_slice, reference=_ref_slice,
          doc="x[..., start:end:step, ...] along dim, with Python's clamping.", traits=[VIEW])


def _infer_concat(t, a):
    if not t:
        raise IRError("concat needs at least one operand")
    first = t[0]
    d = norm_axis(a["dim"], first.rank)
    total = 0
    for i, x in enumerate(t):
        if x.rank != first.rank or x.dtype is not first.dtype:
            raise IRError(f"operand {i} is {x}, not compatible with {first}")
        for j in range(first.rank):
            if j != d:
                same_dim(x.shape[j], first.shape[j], f"operand {i} differs in dim {j}")
        total = total + x.shape[d]
    s = list(first.shape)
    s[d] = normalize_dim(total)
    return [first.with_shape(s)]


define_op("core.concat", ["inputs*"], {"dim": attr("int")}, infer=_infer_concat,
          reference=lambda ctx, x, a: [torch.cat(x, a["dim"])], doc="Join tensors along dim.")


def _infer_split(t, a):
    s = list(t[0].shape)
    d = norm_axis(a["dim"], len(s))
    if not a["sizes"]:
        raise IRError("sizes must not be empty")
    total = 0
    for x in a["sizes"]:
        total = total + x
    same_dim(normalize_dim(total), s[d], "split sizes do not add up to the dim")
    out = []
    for x in a["sizes"]:
        s2 = list(s)
        s2[d] = x
        out.append(t[0].with_shape(s2))
    return out


define_op("core.split", ["x"], {"dim": attr("int"), "sizes": attr("dims")}, infer=_infer_split,
          reference=lambda ctx, x, a: list(torch.split(x[0], [ctx.dim(s) for s in a["sizes"]],
                                                       a["dim"])),
          doc="Cut x along dim into pieces of the given sizes (one result each).", traits=[VIEW])


def _infer_gather(t, a):
    require_int(t[1], "index")
    if t[1].rank != t[0].rank:
        raise IRError(f"index rank {t[1].rank} differs from input rank {t[0].rank}")
    norm_axis(a["dim"], t[0].rank)
    return [t[0].with_shape(t[1].shape)]


define_op("core.gather", ["x", "index"], {"dim": attr("int")}, infer=_infer_gather,
          reference=lambda ctx, x, a: [torch.gather(x[0], a["dim"], x[1].long())],
          doc="out[i][j] = x[index[i][j]][j] along dim (torch.gather).")


def _infer_index_select(t, a):
    require_int(t[1], "index")
    require_rank(t[1], 1, "index")
    s = list(t[0].shape)
    s[norm_axis(a["dim"], len(s))] = t[1].shape[0]
    return [t[0].with_shape(s)]


define_op("core.index_select", ["x", "index"], {"dim": attr("int")}, infer=_infer_index_select,
          reference=lambda ctx, x, a: [torch.index_select(x[0], a["dim"], x[1].long())],
          doc="Select entries along dim by a 1-D index.")


def _infer_embedding(t, a):
    require_rank(t[0], 2, "weight")
    require_int(t[1], "ids")
    return [TensorType(tuple(t[1].shape) + (t[0].shape[1],), t[0].dtype)]


define_op("core.embedding", ["weight", "ids"], infer=_infer_embedding,
          reference=lambda ctx, x, a: [F.embedding(x[1].long(), x[0])],
          doc="Rows of weight [vocab, dim] for each id.")


def _infer_tri(t, a):
    if t[0].rank < 2:
        raise IRError("operand must have rank >= 2")
    return [t[0]]


define_op("core.triu", ["x"], {"diagonal": attr("int", 0)}, infer=_infer_tri,
          reference=lambda ctx, x, a: [torch.triu(x[0], a["diagonal"])],
          doc="Upper triangle (below diagonal zeroed).")
define_op("core.tril", ["x"], {"diagonal": attr("int", 0)}, infer=_infer_tri,
          reference=lambda ctx, x, a: [torch.tril(x[0], a["diagonal"])],
          doc="Lower triangle (above diagonal zeroed).")

# ----- normalization and attention -------------------------------------------------------------


def _infer_layer_norm(t, a):
    x = t[0]
    require_float(x, "input")
    if not a["eps"] >= 0:      # added to a variance
        raise IRError(f"eps {a['eps']} must be >= 0")
    ns = a["normalized_shape"]
    if len(ns) > x.rank:
        raise IRError("normalized_shape is longer than the input's rank")
    for i, d in enumerate(ns):
        same_dim(x.shape[x.rank - len(ns) + i], d, "normalized_shape differs from the input")
    for w, what in zip(t[1:], ("weight", "bias")):
        if w is not None and not (len(w.shape) == len(ns) and
                                  all(dims_equal(p, q) for p, q in zip(w.shape, ns))):
            raise IRError(f"{what} {w} does not have normalized_shape")
    return [x]


def _ref_layer_norm(ctx, x, a):
    ns = [ctx.dim(d) for d in a["normalized_shape"]]
    w = x[1] if len(x) > 1 else None
    b = x[2] if len(x) > 2 else None
    return [F.layer_norm(x[0], ns, w, b, a["eps"])]


define_op("core.layer_norm", ["x", "weight?", "bias?"],
          {"normalized_shape": attr("dims"), "eps": attr("float", 1e-5)},
          infer=_infer_layer_norm, reference=_ref_layer_norm,
          doc="Layer normalization over the trailing normalized_shape dims.")


def _infer_sdpa(t, a):
    q, k, v = t[0], t[1], t[2]
    mask = t[3] if len(t) > 3 else None
    for x, what in ((q, "query"), (k, "key"), (v, "value")):
        require_float(x, what)
        if x.rank < 2:
            raise IRError(f"{what} must have rank >= 2")
    if not (q.dtype is k.dtype is v.dtype):
        raise IRError("query, key and value dtypes differ")
    same_dim(q.shape[-1], k.shape[-1], "query and key head sizes differ")
    same_dim(k.shape[-2], v.shape[-2], "key and value lengths differ")
    if q.rank >= 3 and not a["enable_gqa"]:
        same_dim(q.shape[-3], k.shape[-3], "query and key head counts differ (enable_gqa?)")
    if mask is not None:
        if mask.dtype is not DType.bool and mask.dtype is not q.dtype:
            raise IRError(f"mask must be bool or {q.dtype.value}, got {mask.dtype.value}")
        broadcast_shapes(mask.shape, tuple(q.shape[:-1]) + (k.shape[-2],))
    return [q.with_shape(tuple(q.shape[:-1]) + (v.shape[-1],))]


def _ref_sdpa(ctx, x, a):
    mask = x[3] if len(x) > 3 else None
    return [F.scaled_dot_product_attention(x[0], x[1], x[2], attn_mask=mask,
                                           is_causal=a["is_causal"], scale=a["scale"],
                                           enable_gqa=a["enable_gqa"])]


define_op("core.scaled_dot_product_attention", ["query", "key", "value", "mask?"],
          {"is_causal": attr("bool", False), "scale": attr("float", None),
           "enable_gqa": attr("bool", False)},
          infer=_infer_sdpa, reference=_ref_sdpa,
          doc="softmax(q k^T * scale + mask) v over [..., heads, seq, head_dim].")

# ----- routing, sorting and scatter (mixture-of-experts) ---------------------------------------


def _infer_floor_divide(t, a):
    dtype = promote(t[0], t[1])
    if dtype is DType.bool:
        raise IRError("operands must be numbers, got bool")
    return [TensorType(broadcast_shapes(t[0].shape, t[1].shape), dtype)]


define_op("core.floor_divide", ["lhs", "rhs"], infer=_infer_floor_divide,
          reference=lambda ctx, x, a: [torch.floor_divide(x[0], x[1])],
          doc="Elementwise floor(lhs / rhs) (torch.floor_divide; integers stay integers).")


def _infer_topk(t, a):
    s = list(t[0].shape)
    d = norm_axis(a["dim"], len(s))
    if a["k"] < 0 or (isinstance(s[d], int) and a["k"] > s[d]):
        raise IRError(f"k = {a['k']} is out of range for dim {d} of size {format_dim(s[d])}")
    s[d] = a["k"]
    return [t[0].with_shape(s), TensorType(s, DType.i64)]


define_op("core.topk", ["x"], {"k": attr("int"), "dim": attr("int", -1),
                               "largest": attr("bool", True), "sorted": attr("bool", True)},
          infer=_infer_topk,
          reference=lambda ctx, x, a: list(torch.topk(x[0], a["k"], a["dim"], a["largest"],
                                                      a["sorted"])),
          doc="The k largest (or smallest) entries along dim: (values, indices).")


def _infer_sort(t, a):
    norm_axis(a["dim"], t[0].rank)
    return [t[0], t[0].with_dtype(DType.i64)]


define_op("core.sort", ["x"], {"dim": attr("int", -1), "descending": attr("bool", False)},
          infer=_infer_sort,
          reference=lambda ctx, x, a: list(torch.sort(x[0], dim=a["dim"],
                                                      descending=a["descending"], stable=True)),
          doc="Sort along dim: (values, indices); equal values keep their input order.")


def _infer_histc(t, a):
    require_float(t[0], "the operand")
    if a["bins"] <= 0:
        raise IRError(f"bins must be positive, got {a['bins']}")
    return [TensorType((a["bins"],), t[0].dtype)]


define_op("core.histc", ["x"], {"bins": attr("int"), "min": attr("float"), "max": attr("float")},
          infer=_infer_histc,
          reference=lambda ctx, x, a: [torch.histc(x[0], a["bins"], a["min"], a["max"])],
          doc="Counts of x in bins equal-width bins over [min, max] (torch.histc); values "
              "outside are ignored.")


def _infer_scatter(t, a):
    x, index, src = t
    require_int(index, "index")
    if not (x.rank == index.rank == src.rank):
        raise IRError(f"x, index and src must have one rank, got {x}, {index}, {src}")
    if src.dtype is not x.dtype:
        raise IRError(f"src dtype {src.dtype.value} differs from x dtype {x.dtype.value}")
    norm_axis(a["dim"], x.rank)
    return [x]


def _ref_scatter(ctx, x, a):
    if a["reduce"] == "add":
        return [torch.scatter_add(x[0], a["dim"], x[1].long(), x[2])]
    return [torch.scatter(x[0], a["dim"], x[1].long(), x[2])]


define_op("core.scatter", ["x", "index", "src"],
          {"dim": attr("int"), "reduce": attr("str", "none", ["none", "add"])},
          infer=_infer_scatter, reference=_ref_scatter,
          doc="x with out[index[i][j]][j] = src[i][j] along dim (torch.scatter); reduce=add "
              "accumulates instead (torch.scatter_add).")


def _infer_grouped_mm(t, a):
    x, w, offs = t
    require_rank(x, 2, "input")
    require_rank(w, 3, "weight")
    require_rank(offs, 1, "offsets")
    require_int(offs, "offsets")
    if x.dtype is not w.dtype:
        raise IRError(f"input and weight dtypes differ: {x.dtype.value} vs {w.dtype.value}")
    same_dim(x.shape[1], w.shape[1], "input features differ from the weights' rows")
    same_dim(offs.shape[0], w.shape[0], "one offset per expert")
    return [TensorType((x.shape[0], w.shape[2]), x.dtype)]


def _ref_grouped_mm(ctx, x, a):
    inp, w, offs = x
    out = torch.zeros(inp.shape[0], w.shape[2], dtype=inp.dtype, device=inp.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = inp[start:end] @ w[e]
        start = end
    return [out]


define_op("core.grouped_mm", ["input", "weight", "offsets"], infer=_infer_grouped_mm,
          reference=_ref_grouped_mm,
          doc="Rows offsets[e-1]:offsets[e] of input [rows, k] times weight[e] [k, n] for each "
              "expert e (rows sorted by expert; offsets are cumulative counts); rows past "
              "the last offset are zero.")
