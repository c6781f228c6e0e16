"""swap-sub-operands: a deliberately WRONG pass, a - b -> b - a, for --check-numerics tests."""
from irlm.passes import Rewriter, register_pass


@register_pass("swap-sub-operands")
def swap_sub_operands(graph, ctx):
    """a - b = b - a   (false: tests use it to see --check-numerics name this pass)"""
    rw = Rewriter(graph, ctx.stats)
    for op in list(graph.ops):
        if op.name == "core.sub":
            with rw.insertion_point(before=op):
                swapped = rw.op("core.sub", op.operands[1], op.operands[0])
            rw.replace_op(op, swapped)  # the new value takes the old one's name
