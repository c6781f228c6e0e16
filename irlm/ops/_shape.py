"""Shape and dtype rules shared by op definitions."""
from __future__ import annotations

from typing import Sequence

import sympy

from ..errors import IRError
from ..types import (Dim, DType, TensorType, dim_product, dims_equal, normalize_axis,
                     normalize_dim)


norm_axis = normalize_axis   # the ops' short name for irlm.types.normalize_axis


def broadcast_shapes(a: Sequence[Dim], b: Sequence[Dim]) -> tuple[Dim, ...]:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if isinstance(x, int) and x == 1:
            out.append(y)
        elif isinstance(y, int) and y == 1:
            out.append(x)
        elif dims_equal(x, y):
            out.append(x)
        else:
            raise IRError(f"shapes {_fmt(a)} and {_fmt(b)} do not broadcast")
    return tuple(reversed(out))


def _fmt(shape) -> str:
    from ..types import format_dim
    return "[" + ", ".join(format_dim(d) for d in shape) + "]"


def _category(d: DType) -> int:
    return 0 if d is DType.bool else (2 if d.is_float else 1)


def promote(*types: TensorType) -> DType:
    """torch's rule for tensors of one category: a 0-d operand takes the ranked operand's dtype.

    Mixing categories (int with float) or two ranked dtypes is an error: the frontend inserts
    explicit ``core.cast`` ops, so the IR states every conversion.
    """
    ranked = {t.dtype for t in types if t.rank > 0}
    scalars = {t.dtype for t in types if t.rank == 0}
    if len(ranked) > 1:
        raise IRError("operand dtypes differ: " + " vs ".join(sorted(d.value for d in ranked))
                      + " (insert core.cast)")
    if not ranked:
        if len(scalars) > 1:
            raise IRError("operand dtypes differ: " + " vs ".join(sorted(d.value for d in scalars))
                          + " (insert core.cast)")
        return next(iter(scalars))
    r = next(iter(ranked))
    for s in scalars:
        if _category(s) != _category(r):
            raise IRError(f"scalar operand of dtype {s.value} cannot combine with {r.value} "
                          "(insert core.cast)")
    return r


def reshape_shape(src: Sequence[Dim], target: Sequence[Dim]) -> tuple[Dim, ...]:
    """Resolve a ``-1`` in ``target`` and check that element counts agree."""
    total = dim_product(src)
    holes = [i for i, d in enumerate(target) if isinstance(d, int) and d == -1]
    if len(holes) > 1:
        raise IRError("reshape target has more than one -1")
    for d in target:
        if isinstance(d, int) and d < -1:
            raise IRError(f"reshape target has negative dimension {d}")
    if holes:
        known = dim_product([d for d in target if not (isinstance(d, int) and d == -1)])
        if known == 0:
            raise IRError("reshape with -1 and a zero-sized dimension is ambiguous")
        q = sympy.simplify(sympy.sympify(total) / known)
        if not (q.is_Integer or (q.free_symbols and sympy.fraction(sympy.together(q))[1] == 1)):
            raise IRError(f"cannot reshape {_fmt(src)} into {_fmt(target)}")
        target = list(target)
        target[holes[0]] = normalize_dim(q)
    elif not dims_equal(total, dim_product(target)):
        raise IRError(f"cannot reshape {_fmt(src)} ({total} elements) into {_fmt(target)}")
    return tuple(target)


def reduce_shape(shape: Sequence[Dim], dims: Sequence[int], keepdim: bool) -> tuple[Dim, ...]:
    rank = len(shape)
    axes = {norm_axis(d, rank) for d in dims} if dims else set(range(rank))
    if keepdim:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def require_float(t: TensorType, what: str) -> None:
    if not t.dtype.is_float:
        raise IRError(f"{what} must be a floating-point tensor, got {t.dtype.value}")


def require_int(t: TensorType, what: str) -> None:
    if not t.dtype.is_int:
        raise IRError(f"{what} must be an integer tensor, got {t.dtype.value}")


def require_rank(t: TensorType, ranks, what: str) -> None:
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if t.rank not in ranks:
        raise IRError(f"{what} must have rank {' or '.join(map(str, ranks))}, got {t}")


def same_dim(a: Dim, b: Dim, what: str) -> None:
    if not dims_equal(a, b):
        from ..types import format_dim
        raise IRError(f"{what}: {format_dim(a)} != {format_dim(b)}")
