"""``fuse-qkv``: linear layers that read one input -> one linear over concatenated weights.

Attention's q, k and v projections (and an MLP's gate and up projections, and any other
group of projections of one value) are N GEMMs over the same activations.  One GEMM over
the weights stacked by rows computes all of them; a ``core.split`` hands each reader its
columns.  The stacked weight is a *derived* store entry, concatenated lazily on first use
(irlm/passes/fusions/weights.py), never a copy made while rewriting.

A group is every ``core.linear`` that reads the value as its input, has a ``param`` weight,
and agrees with the others on the weight dtype and on having a ``param`` bias or none.  This
is a multi-root match (N ops with no common consumer), which a DAG pattern cannot state, so
it is written as an imperative pattern rooted at each linear.
"""
from __future__ import annotations

from typing import Optional

from irlm.ir import Op, Value

from ..rewriting.driver import pattern_pass
from ..rewriting.pattern import RewritePattern
from .constraints import common_module, is_param
from .weights import concat_params


def _fusable(linear: Op, x: Value) -> Optional[tuple]:
    """The grouping key of a linear that reads ``x`` (None if it cannot join a group)."""
    if linear.name != "core.linear" or linear.operands[0] is not x:
        return None
    weight = linear.operands[1]
    if not is_param(weight) or weight.type.rank != 2 or weight is x:
        return None
    bias = linear.operands[2] if len(linear.operands) > 2 else None
    if bias is not None and not is_param(bias):
        return None
    return (weight.type.dtype, None if bias is None else bias.type.dtype)


def projections_of(x: Value, key: tuple, graph) -> list[Op]:
    """The linears reading ``x`` with grouping ``key``, in graph order."""
    members = {id(u.op) for u in x.uses if _fusable(u.op, x) == key}
    out: list[Op] = []
    o = x.producer.next if x.producer is not None else graph.first
    while o is not None and len(out) < len(members):
        if id(o) in members:
            out.append(o)
        o = o.next
    return out


class FuseSharedInputLinears(RewritePattern):
    """linear(x, W₁, b₁), …, linear(x, Wₙ, bₙ)
    = split(linear(x, concat(W₁, …, Wₙ), concat(b₁, …, bₙ)), [out₁, …, outₙ], -1)"""
    root = "core.linear"
    name = "fuse_shared_input_linears"

    def match_and_rewrite(self, linear: Op, rw) -> bool:
        x = linear.operands[0]
        key = _fusable(linear, x)
        if key is None:
            return False
        group = projections_of(x, key, linear.graph)
        if len(group) < 2:
            return False
        weights = [g.operands[1] for g in group]
        biases = [g.operands[2] for g in group] if key[1] is not None else []
        with rw.insertion_point(before=group[0]):
            rw.loc = common_module(group)
            fused_weight = concat_params(rw, weights)
            operands = [x, fused_weight]
            if biases:
                operands.append(concat_params(rw, biases))
            fused = rw.op("core.linear", *operands)
            sizes = [w.type.shape[0] for w in weights]
            pieces = rw.op("core.split", fused, dim=fused.type.rank - 1, sizes=sizes)
        for g, piece in zip(group, pieces):
            rw.replace_op(g, piece)
        return True


QKV_PATTERNS = [FuseSharedInputLinears]

fuse_qkv = pattern_pass("fuse-qkv", QKV_PATTERNS)
