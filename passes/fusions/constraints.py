"""Constraints the fusion patterns state: axes, constants, casts, params, activations.

A fusion is only correct when every assumption its rewrite makes holds -- the reduction is
over the last axis, the constant is the one the equation names, a cast only widens, a weight
is a stored param.  These predicates say so by name, so a rule's body reads as its list of
conditions.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from irlm.ir import Location, Op, Value
from irlm.ops.fused import ACTIVATIONS
from irlm.registry import ACTIVATION, ops_with_trait
from irlm.types import DType, dims_equal, normalize_axis

from ..transforms.canonicalize import EXACT_WIDENINGS
from ..rewriting.pattern import Const, Pattern, same_type, splat_value


# ----- axes ------------------------------------------------------------------------------------


def is_last_axis(a: int, rank: int) -> bool:
    return rank > 0 and -rank <= a < rank and normalize_axis(a, rank) == rank - 1


def reduces_last_axis(reduction: Op) -> bool:
    """``mean/sum(x, dims=[-1])`` over the last axis only, keeping it as size 1."""
    rank = reduction.operands[0].type.rank
    dims = reduction.attrs["dims"]
    return reduction.attrs["keepdim"] and len(dims) == 1 and is_last_axis(dims[0], rank)


def slices_last_axis(s: Op, start, size, step: int = 1) -> bool:
    """``x[..., start : start + size : step]``: a ``core.slice`` of the last axis with this
    start and step whose result has ``size`` entries on that axis."""
    x, out = s.operands[0], s.results[0]
    a = s.attrs
    return (is_last_axis(a["dim"], x.type.rank) and a["step"] == step
            and dims_equal(a["start"], start) and dims_equal(out.type.shape[-1], size))


def static_last_dim(v: Value) -> Optional[int]:
    d = v.type.shape[-1] if v.type.rank else None
    return d if isinstance(d, int) else None


# ----- constants -------------------------------------------------------------------------------


def scalar_splat(v: Value) -> Optional[float]:
    """The value of a constant that broadcasts like a scalar (all dims 1), else None."""
    if any(not (isinstance(d, int) and d == 1) for d in v.type.shape):
        return None
    return splat_value(v)


def approx(value: float, name: Optional[str] = None, rel: float = 1e-6) -> Pattern:
    """A scalar constant equal to ``value`` up to float32 rounding (sqrt(2/pi), 0.044715)."""
    def close(v: Value) -> bool:
        s = scalar_splat(v)
        return s is not None and math.isclose(s, value, rel_tol=rel)
    return Const(name=name).where(close, f"~{value:g}")


def scalar(value: float) -> Pattern:
    """A scalar constant exactly equal to ``value`` (0.5, 1, 2, 3 are exact in every float)."""
    return Const(value).where(lambda v: scalar_splat(v) is not None, "scalar")


# ----- casts and types -------------------------------------------------------------------------


def unwidened(v: Value) -> Value:
    """``x`` when ``v = cast(x)`` is an exact widening (bf16 -> f32, ...), else ``v``: the
    fused ops compute in float32 themselves, so reading x is the same as reading v."""
    p = v.producer
    if p is not None and p.name == "core.cast" and \
            (p.operands[0].type.dtype, v.type.dtype) in EXACT_WIDENINGS:
        return p.operands[0]
    return v


def keeps_type(result: Value, x: Value) -> bool:
    """Broadcasting did not make ``result`` bigger than ``x`` (nor change its dtype)."""
    return same_type(result, x)


def is_vector_of(v: Value, n, dtype: Optional[DType] = None) -> bool:
    """``v`` is a rank-1 float tensor of ``n`` entries (a norm weight, a bias)."""
    t = v.type
    return (t.rank == 1 and t.dtype.is_float and dims_equal(t.shape[0], n)
            and (dtype is None or t.dtype is dtype))


# ----- weights ---------------------------------------------------------------------------------


def is_param(v: Value) -> bool:
    """A weight read from the store (what derived weights can be computed from)."""
    return v.producer is not None and v.producer.name == "param"


# ----- activations -----------------------------------------------------------------------------

#: core activation ops the fusions absorb (their act name is given by :func:`activation_name`).
#: the registry's activation ops that a fused op's ``act`` attribute can name (silu, gelu, relu)
ACTIVATION_OPS = tuple(sorted(n for n in ops_with_trait(ACTIVATION)
                              if n.split(".", 1)[1] in ACTIVATIONS))


def activation_name(act: Op) -> Optional[str]:
    """The ``act`` attribute of llm.gated_act / llm.linear_act for a core activation op."""
    if act.name == "core.silu":
        return "silu"
    if act.name == "core.relu":
        return "relu"
    if act.name == "core.gelu":
        return "gelu_tanh" if act.attrs["approximate"] == "tanh" else "gelu"
    return None


def common_module(ops: Sequence[Op]) -> Location:
    """A location naming the innermost module that holds all ``ops`` (``...self_attn``)."""
    paths = [o.loc.module.split(".") for o in ops if o.loc.module]
    if not paths:
        return ops[0].loc
    common = paths[0]
    for p in paths[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return Location(".".join(common))
