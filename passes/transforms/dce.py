"""``dce``: dead-code elimination.

A pure op none of whose results is read (by an op or as a graph output) is erased.  Walking
the graph backwards erases whole dead chains in one pass: an op's readers come after it, so
they are gone by the time it is visited.
"""
from __future__ import annotations

from typing import Optional

from irlm.ir import Graph
from irlm.registry import is_dead

from ..context import PassContext
from ..registry import register_pass
from ..rewriting.rewriter import Rewriter


def eliminate_dead_code(graph: Graph, ctx: Optional[PassContext] = None) -> int:
    """Erase unused pure ops; returns how many."""
    rw = Rewriter(graph, ctx.stats if ctx is not None else None)
    erased = 0
    op = graph.last
    while op is not None:
        prev = op.prev
        if is_dead(op):
            rw.erase_op(op)
            erased += 1
        op = prev
    return erased


@register_pass("dce")
def dce(graph: Graph, ctx: PassContext) -> None:
    """Erase pure ops whose results nothing reads."""
    eliminate_dead_code(graph, ctx)
