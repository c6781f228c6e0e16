"""fold-identity-arith: remove arithmetic that does nothing.

    irlm opt model.irlm --pass-plugin fold_identity_arith.py --pipeline fold-identity-arith
"""
from irlm.passes import Const, Option, RewritePattern, Var, apply_patterns, register_pass, rule

x = Var("x")


def keeps_type(m):
    # x * 1 has x's type unless broadcasting against the 1 makes it bigger (or the 1 is a
    # 0-d tensor of another dtype); only then would replacing it by x be wrong.
    return m.x.type == m.root.result.type


@rule(x * 1.0)
def mul_by_one(m, rw):
    """x * 1 = x"""
    return m.x if keeps_type(m) else None


@rule(x + 0.0)
def add_zero(m, rw):
    """x + 0 = x"""
    return m.x if keeps_type(m) else None


@rule(x - 0.0)
def sub_zero(m, rw):
    """x - 0 = x"""
    return m.x if keeps_type(m) else None


@rule(-(-x))
def double_negation(m, rw):
    """-(-x) = x"""
    return m.x


@rule((x * Const(name="a")) * Const(name="b"))
def merge_scales(m, rw):
    """(x * a) * b = x * (a * b)   for constants a and b; canonicalize then folds a * b"""
    scale = rw.op("core.mul", m.a, m.b)
    product = rw.op("core.mul", m.x, scale)
    return product if product.type == m.root.result.type else None


class SumOverUnitAxes(RewritePattern):
    """sum(x, dims, keepdim=true) = x   when every summed axis of x has size 1

    Imperative, because "every axis in the attribute has size 1 in the operand's type" is a
    loop over the attribute, not a shape of the DAG."""
    root = "core.sum"

    def match_and_rewrite(self, op, rw):
        x = op.operands[0]
        dims = op.attrs["dims"] or range(x.type.rank)
        if not op.attrs["keepdim"] or op.result.type != x.type:
            return False  # without keepdim the rank changes; int sums widen to i64
        if any(x.type.shape[d] != 1 for d in dims):
            return False
        rw.replace_op(op, x)
        return True


@register_pass("fold-identity-arith", options={
    "merge_scales": Option(bool, True, "also rewrite (x * a) * b to x * (a * b)"),
})
def fold_identity_arith(graph, ctx):
    """x * 1 = x, x + 0 = x, x - 0 = x, -(-x) = x, sum over size-1 axes = x."""
    patterns = [mul_by_one, add_zero, sub_zero, double_negation, SumOverUnitAxes]
    if ctx.options.merge_scales:
        patterns.append(merge_scales)
    apply_patterns(graph, patterns, ctx)
