"""``dce``: dead-code elimination.

A pure op none of whose results is read (by an op or as a graph output) is erased.  Walking
the graph backwards erases whole dead chains in one pass: an op's readers come after it, so
they are gone by the time it is visited.
"""
from __future__ import annotations

from irlm.ir import Graph
from irlm.registry import get_op_def, has_op

from .context import PassContext
from .registry import register_pass
from .rewriter import Rewriter


def eliminate_dead_code(graph: Graph, ctx: PassContext) -> int:
    """Erase unused pure ops; returns how many."""
    rw = Rewriter(graph, ctx.stats)
    outputs = {id(v) for v in graph.outputs}
    pure: dict[str, bool] = {}
    erased = 0
    op = graph.last
    while op is not None:
        prev = op.prev
        p = pure.get(op.name)
        if p is None:
            p = pure[op.name] = has_op(op.name) and get_op_def(op.name).pure
        if p and not any(r.uses or id(r) in outputs for r in op.results):
            rw.erase_op(op)
            erased += 1
        op = prev
    return erased


@register_pass("dce")
def dce(graph: Graph, ctx: PassContext) -> None:
    """Erase pure ops whose results nothing reads."""
    eliminate_dead_code(graph, ctx)
