"""``canonicalize``: local simplifications that leave one spelling of each computation.

Later passes match on meaning, not on how a model happened to write it: after this pass a
chain of reshapes is one reshape, a transpose undone by another is gone, a cast to the type a
value already has is gone, and small all-constant subexpressions are folded.  Each rule is a
small pattern whose docstring is its equation.  Other subsystems add rules with
:func:`register_canonicalization`.
"""
from __future__ import annotations

from typing import Optional

import torch

from irlm.ir import Op
from irlm.registry import RESHAPE_LIKE, get_op_def, has_op, ops_with_trait
from irlm.types import DType, TensorType, normalize_axis

from ..context import PassContext
from ..rewriting.driver import PatternSet, apply_patterns
from ..options import Option
from ..rewriting.pattern import RewritePattern, Var, op, rule, same_type
from ..registry import register_pass

x = Var("x")

#: views that keep element order (reshape, squeeze, unsqueeze): the registry's reshape-like ops
VIEW_OPS = tuple(sorted(ops_with_trait(RESHAPE_LIKE)))
PERMUTE_OPS = ("core.transpose", "core.permute")


# ----- reshapes and views ----------------------------------------------------------------------


@rule(op("core.reshape")(x))
def fold_identity_reshape(m, rw):
    """reshape(x, shape(x)) = x"""
    return m.x if same_type(m.x, m.root.result) else None


@rule(op(*VIEW_OPS)(op(*VIEW_OPS)(x).named("inner")))
def fold_view_chain(m, rw):
    """reshape(view(x)) = view(reshape(x)) = reshape(x, shape(result))

    where view is reshape, squeeze or unsqueeze: none of them moves elements, so two in a row
    are one reshape to the final shape (or nothing, if that is x's shape).  Pairs of squeeze
    and unsqueeze alone are left to the rules below, which keep them readable."""
    if "core.reshape" not in (m.root.name, m.inner.name):
        return None
    result = m.root.result.type
    if same_type(m.x.type, result):
        return m.x
    return rw.op("core.reshape", m.x, shape=result.shape, result_types=[result])


@rule(op("core.squeeze")(op("core.unsqueeze")(x).named("unsqueeze")))
def fold_unsqueeze_squeeze(m, rw):
    """squeeze(unsqueeze(x, d), d) = x"""
    return m.x if same_type(m.x, m.root.result) and _squeezes_only(
        m.root, _axis(m.unsqueeze.attrs["dim"], m.x.type.rank + 1)) else None


@rule(op("core.unsqueeze")(op("core.squeeze")(x).named("squeeze")))
def fold_squeeze_unsqueeze(m, rw):
    """unsqueeze(squeeze(x, d), d) = x   (x has size 1 at d, or squeeze would be invalid)"""
    d = _axis(m.root.attrs["dim"], m.x.type.rank)
    return m.x if same_type(m.x, m.root.result) and _squeezes_only(m.squeeze, d) else None


def _squeezes_only(squeeze: Op, d: int) -> bool:
    """Does ``squeeze`` remove exactly axis ``d`` of its operand?"""
    src = squeeze.operands[0].type
    dims = squeeze.attrs["dims"]
    if dims:
        return {_axis(a, src.rank) for a in dims} == {d}
    # squeeze() drops every static size-1 axis: only d may be one
    return [i for i, s in enumerate(src.shape) if isinstance(s, int) and s == 1] == [d]


_axis = normalize_axis   # attributes of verified ops: always in range


# ----- transposes and permutes -----------------------------------------------------------------


def permutation_of(o: Op) -> Optional[tuple[int, ...]]:
    """The permutation a transpose or permute applies: result axis i is operand axis p[i]."""
    rank = o.operands[0].type.rank
    if o.name == "core.permute":
        return tuple(_axis(a, rank) for a in o.attrs["dims"])
    if o.name == "core.transpose":
        p = list(range(rank))
        i, j = _axis(o.attrs["dim0"], rank), _axis(o.attrs["dim1"], rank)
        p[i], p[j] = p[j], p[i]
        return tuple(p)
    return None


def _is_identity(p) -> bool:
    return all(a == i for i, a in enumerate(p))


@rule(op(*PERMUTE_OPS)(x))
def fold_identity_permutation(m, rw):
    """transpose(x, a, a) = x;  permute(x, [0, 1, ..., n-1]) = x"""
    return m.x if _is_identity(permutation_of(m.root)) else None


@rule(op(*PERMUTE_OPS)(op(*PERMUTE_OPS)(x).named("inner")))
def compose_permutations(m, rw):
    """permute(permute(x, p), q) = permute(x, [p[q[0]], p[q[1]], ...])

    transpose is the permutation that swaps two axes, so transpose(transpose(x, a, b), a, b)
    = x.  The composition is written as x itself (identity), one transpose (a single swap)
    or one permute."""
    p, q = permutation_of(m.inner), permutation_of(m.root)
    composed = tuple(p[i] for i in q)
    if _is_identity(composed):
        return m.x
    moved = [i for i, a in enumerate(composed) if a != i]
    result = [m.root.result.type]
    if len(moved) == 2:
        return rw.op("core.transpose", m.x, dim0=moved[0], dim1=moved[1], result_types=result)
    return rw.op("core.permute", m.x, dims=composed, result_types=result)


@rule(op("core.transpose")(x))
def normalize_transpose_axes(m, rw):
    """transpose(x, b, a) = transpose(x, a, b) = transpose(x, a - rank, b)

    The canonical spelling has 0 <= dim0 < dim1, so equal transposes look equal (to CSE and
    to patterns)."""
    rank = m.x.type.rank
    a, b = sorted((_axis(m.root.attrs["dim0"], rank), _axis(m.root.attrs["dim1"], rank)))
    if (m.root.attrs["dim0"], m.root.attrs["dim1"]) == (a, b) or a == b:
        return None
    return rw.op("core.transpose", m.x, dim0=a, dim1=b, result_types=[m.root.result.type])


# ----- casts, slices, expands ------------------------------------------------------------------


@rule(op("core.cast")(x))
def fold_identity_cast(m, rw):
    """cast(x, dtype(x)) = x"""
    return m.x if m.root.attrs["dtype"] is m.x.type.dtype else None


#: (narrow, wide): every value of ``narrow`` converts to ``wide`` and back exactly.
EXACT_WIDENINGS = frozenset({
    (DType.f16, DType.f32), (DType.bf16, DType.f32),
    (DType.f8e4m3, DType.f16), (DType.f8e4m3, DType.bf16), (DType.f8e4m3, DType.f32),
    (DType.i8, DType.i32), (DType.i8, DType.i64), (DType.u8, DType.i32), (DType.u8, DType.i64),
    (DType.i32, DType.i64), (DType.i8, DType.f32), (DType.u8, DType.f32),
    (DType.i8, DType.f16), (DType.u8, DType.f16), (DType.i8, DType.bf16), (DType.u8, DType.bf16),
}) | {(DType.bool, d) for d in DType if d not in (DType.bool, DType.i4)}


@rule(op("core.cast")(op("core.cast")(x).named("widen")))
def fold_round_trip_cast(m, rw):
    """cast(cast(x, wide), dtype(x)) = x   when wide represents every value of dtype(x)

    (bf16 -> f32 -> bf16, i32 -> i64 -> i32, ...; see EXACT_WIDENINGS).  Narrowing first
    (f32 -> bf16 -> f32) rounds, so it is kept."""
    narrow, wide = m.x.type.dtype, m.widen.attrs["dtype"]
    if m.root.attrs["dtype"] is narrow and (narrow, wide) in EXACT_WIDENINGS:
        return m.x
    return None


@rule(op("core.slice", start=0, step=1)(x))
def fold_noop_slice(m, rw):
    """x[..., 0:end:1, ...] = x   when end reaches the end of the axis"""
    return m.x if same_type(m.x, m.root.result) else None


@rule(op("core.expand")(x))
def fold_noop_expand(m, rw):
    """expand(x, shape(x)) = x"""
    return m.x if same_type(m.x, m.root.result) else None


@rule(op("core.index_select")(x, Var("index")))
def index_select_of_a_range(m, rw):
    """index_select(x, dim, [i, i+1, ..., j]) = x[..., i:j+1, ...]   (a view, not a gather)

    Falcon takes its one key / value head out of the fused projection as
    ``qkv[..., [-2], :]``, which traces to an index_select of a constant index."""
    index = m.index.producer
    if index is None or index.name != "core.constant":
        return None
    ids = index.attrs["value"]
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point:
        return None
    start = int(ids[0])
    axis = normalize_axis(m.root.attrs["dim"], m.x.type.rank)
    extent = m.x.type.shape[axis]
    if start < 0 or not isinstance(extent, int) or start + ids.numel() > extent or \
            ids.tolist() != list(range(start, start + ids.numel())):
        return None
    return rw.op("core.slice", m.x, dim=axis, start=start, end=start + ids.numel())


# ----- constant folding ------------------------------------------------------------------------

CONSTANT_OPS = ("core.constant", "core.full")
NOT_FOLDED = frozenset({"core.constant", "core.full", "param"})


class FoldConstants(RewritePattern):
    """f(c1, c2, ...) = c   for a pure op f whose operands are all constants

    c is computed with f's reference implementation; only results of at most ``max_elements``
    elements each are folded, so a dump never fills with large literals."""
    root = None  # any op
    name = "fold_constants"

    def __init__(self, max_elements: int = 1024):
        self.max_elements = max_elements
        self._foldable: dict[str, bool] = {}

    def _is_foldable_op(self, name: str) -> bool:
        ok = self._foldable.get(name)
        if ok is None:
            ok = self._foldable[name] = (name not in NOT_FOLDED and has_op(name)
                                         and get_op_def(name).pure)
        return ok

    def prefilter(self, o: Op) -> bool:
        """Cheap: the first operand is a constant (checked before the driver's setup)."""
        if not o.operands:
            return False
        p = o.operands[0].producer
        return p is not None and p.name in CONSTANT_OPS

    def match_and_rewrite(self, o: Op, rw) -> bool:
        if not o.operands or not self._is_foldable_op(o.name):
            return False
        for v in o.operands:
            p = v.producer
            if p is None or p.name not in CONSTANT_OPS or not v.type.is_static:
                return False
            # evaluating materializes the operands: a core.full is a few bytes of attributes
            # but may stand for gigabytes (a core.constant's tensor is already in memory)
            if p.name != "core.constant" and \
                    _static_numel(v.type.shape) > max(self.max_elements, MATERIALIZE_LIMIT):
                return False
        for r in o.results:
            if not r.type.is_static or _static_numel(r.type.shape) > self.max_elements:
                return False
        values = _evaluate(o)
        if values is None:
            return False
        rw.replace_op(o, [rw.constant(t) for t in values])
        return True


#: most elements folding materializes for an operand that is not a stored tensor
MATERIALIZE_LIMIT = 1 << 16


def _static_numel(shape) -> int:
    n = 1
    for d in shape:  # plain ints: TensorType.numel() goes through sympy
        n *= d
    return n


def _evaluate(o: Op) -> Optional[list[torch.Tensor]]:
    """Run ``o``'s reference implementation on its constant operands; None if it fails or
    produces something its declared types cannot hold (i4 has no torch dtype of its own)."""
    from irlm.interpreter import RefContext
    args = []
    for v in o.operands:
        p = v.producer
        if p.name == "core.constant":
            args.append(p.attrs["value"])
        else:
            a = p.attrs
            args.append(torch.full([int(d) for d in a["shape"]], a["value"],
                                   dtype=a["dtype"].torch))
    try:
        out = get_op_def(o.name).reference(RefContext(o.graph, None, {}, {}), args, o.attrs)
    except Exception:  # noqa: BLE001 - not foldable here; the interpreter will say why at run
        return None
    if len(out) != len(o.results):
        return None
    for t, r in zip(out, o.results):
        if not isinstance(t, torch.Tensor) or r.type.dtype is DType.i4 or \
                not same_type(TensorType(tuple(t.shape), DType.from_torch(t.dtype)), r.type):
            return None
    return [t.detach().clone().contiguous() for t in out]


# ----- the pass --------------------------------------------------------------------------------

CANONICALIZATION_PATTERNS: list = [
    fold_identity_reshape, fold_view_chain, fold_unsqueeze_squeeze, fold_squeeze_unsqueeze,
    fold_identity_permutation, compose_permutations, normalize_transpose_axes,
    fold_identity_cast, fold_round_trip_cast, fold_noop_slice, fold_noop_expand,
    index_select_of_a_range,
]


def register_canonicalization(pattern) -> None:
    """Add a pattern (a rule or RewritePattern) to what ``canonicalize`` applies."""
    CANONICALIZATION_PATTERNS.append(pattern)


def canonicalization_patterns(fold_limit: int = 1024) -> PatternSet:
    patterns = list(CANONICALIZATION_PATTERNS)
    if fold_limit > 0:
        patterns.append(FoldConstants(fold_limit))
    return PatternSet(patterns)


@register_pass("canonicalize", options={
    "fold_limit": Option(int, 1024, "fold constants with at most this many elements "
                                     "(0: no constant folding)"),
    "max_rewrites": Option(int, 0, "stop with an error after this many rewrites "
                                   "(0: 10 per op)"),
})
def canonicalize(graph, ctx: PassContext) -> None:
    """Simplify locally to one canonical spelling: fold view chains, transpose/permute pairs,
    identity casts/slices/expands, squeeze/unsqueeze pairs and small constant expressions;
    erase dead ops."""
    apply_patterns(graph, canonicalization_patterns(ctx.options.fold_limit), ctx,
                   max_rewrites=ctx.options.max_rewrites)
