"""``cse``: common-subexpression elimination.

Two pure ops compute the same thing when they have the same name, the same operands (in
either order for a commutative op) and equal attributes; the later one is replaced by the
earlier.  One forward walk suffices: by the time an op is visited its operands have already
been merged, so chains of duplicates collapse together.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from irlm.ir import Graph, Op
from irlm.registry import get_op_def, has_op
from irlm.types import TensorType, format_type

from ..context import PassContext
from ..registry import register_pass
from ..rewriting.rewriter import Rewriter


def attr_key(v: Any) -> Any:
    """A hashable key equal for equal attribute values.

    Tensors hash by dtype, shape and a digest of their bytes (so -0.0 and 0.0 differ, and a
    NaN equals itself); floats by their repr for the same reasons."""
    if isinstance(v, torch.Tensor):
        t = v.detach().contiguous().reshape(-1)
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return ("tensor", str(v.dtype), tuple(v.shape), hashlib.sha1(data).hexdigest())
    if isinstance(v, float):
        return ("float", repr(v))
    if isinstance(v, (list, tuple)):
        return tuple(attr_key(x) for x in v)
    if isinstance(v, TensorType):
        return ("type", format_type(v))
    return v


_PLAIN = (int, str, bool, type(None))


def op_key(op: Op, commutative: bool) -> tuple:
    ids = [id(v) for v in op.operands]  # operands are alive for the whole walk
    if commutative and len(ids) >= 2 and ids[1] < ids[0]:
        ids[0], ids[1] = ids[1], ids[0]
    attrs = []
    for k, a in op.attrs.items():
        # the common cases hash as they are; floats, tensors, lists and types need a key
        if type(a) in _PLAIN or (type(a) is tuple and all(type(e) is int for e in a)):
            attrs.append((k, a))
        else:
            attrs.append((k, attr_key(a)))
    attrs.sort(key=lambda kv: kv[0])
    return (op.name, tuple(ids), tuple(attrs))


def eliminate_common_subexpressions(graph: Graph, ctx: PassContext) -> int:
    """Merge duplicate pure ops; returns how many were removed."""
    rw = Rewriter(graph, ctx.stats)
    seen: dict[tuple, Op] = {}
    kinds: dict[str, tuple[bool, bool]] = {}
    merged = 0
    for op in graph.ops:
        kind = kinds.get(op.name)
        if kind is None:
            d = get_op_def(op.name) if has_op(op.name) else None
            kind = kinds[op.name] = (bool(d and d.pure), bool(d and d.commutative))
        pure, commutative = kind
        if not pure or not op.results:
            continue
        key = op_key(op, commutative)
        first = seen.get(key)
        if first is None:
            seen[key] = op
            continue
        rw.replace_op(op, first.results, check_type=False)  # same op, operands, attrs
        merged += 1
    if merged:
        ctx.stats.bump("ops merged", merged)
    return merged


@register_pass("cse")
def cse(graph: Graph, ctx: PassContext) -> None:
    """Merge pure ops that compute the same value (same op, operands and attributes)."""
    eliminate_common_subexpressions(graph, ctx)
