"""The declarative pattern language: ops, captures, attributes, constraints, commutativity."""
import pytest
import torch

from irlm import Builder, DType, Graph, TensorType
from irlm.passes import (ANY, Const, Or, PassContext, RewriteError, RewritePattern, Rule, Var,
                         apply_patterns, op, rule)

F32 = DType.f32


def graph_with(*shapes, dtype=F32):
    g = Graph("t")
    xs = [g.add_input(TensorType(s, dtype), f"x{i}") for i, s in enumerate(shapes)]
    return g, Builder(g), xs


x, y = Var("x"), Var("y")


def first_match(pattern, g):
    r = Rule(pattern, lambda m, rw: None)
    for o in g.ops:
        m = r.match(o)
        if m is not None:
            return m
    return None


def test_op_and_var_capture():
    g, b, (a, c) = graph_with((4,), (4,))
    s = b.op("core.add", a, c)
    g.set_outputs([s])
    m = first_match(op("core.add")(x, y), g)
    assert m.x is a and m.y is c and m.root is s.producer


def test_alternative_op_names_and_wildcard_operands():
    g, b, (a,) = graph_with((4, 2))
    t = b.op("core.permute", a, dims=(1, 0))
    g.set_outputs([t])
    assert first_match(op("core.transpose", "core.permute"), g) is not None
    assert first_match(op("core.transpose"), g) is None


def test_commutative_operands_are_tried_both_ways():
    g, b, (a,) = graph_with((4,))
    one = b.constant(torch.ones(4))
    prod = b.op("core.mul", one, a)       # 1 * a, pattern says a * 1
    g.set_outputs([prod])
    m = first_match(x * 1.0, g)
    assert m is not None and m.x is a


def test_non_commutative_operands_are_not_swapped():
    g, b, (a,) = graph_with((4,))
    one = b.constant(torch.ones(4))
    d = b.op("core.sub", one, a)          # 1 - a is not a - 1
    g.set_outputs([d])
    assert first_match(x - 1.0, g) is None
    assert first_match(1.0 - x, g).x is a


def test_repeated_capture_requires_the_same_value():
    g, b, (a, c) = graph_with((4,), (4,))
    same = b.op("core.mul", a, a)
    other = b.op("core.mul", a, c)
    g.set_outputs([same, other])
    r = Rule(x * x, lambda m, rw: None)
    assert r.match(same.producer) is not None
    assert r.match(other.producer) is None


def test_attribute_equals_predicate_and_capture():
    g, b, (a,) = graph_with((2, 3, 4))
    t1 = b.op("core.transpose", a, dim0=0, dim1=1)
    t2 = b.op("core.transpose", t1, dim0=0, dim1=1)
    g.set_outputs([t2])
    d0, d1 = Var("a"), Var("b")
    pair = op("core.transpose", dim0=d0, dim1=d1)(op("core.transpose", dim0=d0, dim1=d1)(x))
    m = Rule(pair, lambda m, rw: None).match(t2.producer)
    assert m is not None and m.a == 0 and m.b == 1 and m.x is a
    assert first_match(op("core.transpose", dim0=1), g) is None
    assert first_match(op("core.transpose", dim1=lambda d: d > 0), g) is not None


def test_attribute_capture_must_agree_across_ops():
    g, b, (a,) = graph_with((2, 3, 4))
    t1 = b.op("core.transpose", a, dim0=0, dim1=1)
    t2 = b.op("core.transpose", t1, dim0=1, dim1=2)
    g.set_outputs([t2])
    d = Var("d")
    assert first_match(op("core.transpose", dim0=d)(op("core.transpose", dim0=d)), g) is None


def test_value_constraints():
    g, b, (a,) = graph_with((4, 8))
    r = b.op("core.relu", a)
    g.set_outputs([r])
    assert first_match(op("core.relu")(Var("v").has_dtype(F32)), g) is not None
    assert first_match(op("core.relu")(Var("v").has_dtype(DType.bf16)), g) is None
    assert first_match(op("core.relu")(Var("v").has_rank(2).has_shape(None, 8)), g) is not None
    assert first_match(op("core.relu")(Var("v").has_shape(4, 4)), g) is None
    assert first_match(op("core.relu")(Var("v").is_float()), g) is not None
    assert first_match(op("core.relu")(Var("v").where(lambda v: v.name == "x0")), g) is not None


def test_one_use():
    g, b, (a,) = graph_with((4,))
    e = b.op("core.exp", a)
    n1 = b.op("core.neg", e)
    g.set_outputs([n1])
    pat = op("core.neg")(op("core.exp")(x).one_use())
    assert first_match(pat, g) is not None
    n2 = b.op("core.abs", e)  # a second reader
    g.set_outputs([n1, n2])
    assert first_match(pat, g) is None


def test_one_use_counts_graph_outputs():
    g, b, (a,) = graph_with((4,))
    e = b.op("core.exp", a)
    n1 = b.op("core.neg", e)
    g.set_outputs([n1, e])
    assert first_match(op("core.neg")(op("core.exp")(x).one_use()), g) is None


def test_named_op_capture_gives_the_op():
    g, b, (a,) = graph_with((4,))
    e = b.op("core.exp", a)
    n = b.op("core.neg", e)
    g.set_outputs([n])
    m = first_match(op("core.neg")(op("core.exp")(x).named("inner")), g)
    assert m.inner is e.producer


def test_or_alternatives():
    g, b, (a,) = graph_with((4,))
    s = b.op("core.sigmoid", a)
    g.set_outputs([s])
    m = first_match(op("core.exp")(x) | op("core.sigmoid")(x), g)
    assert m is not None and m.x is a
    assert first_match(Or(op("core.exp")(x), op("core.log")(x)), g) is None


def test_const_matches_splats_only_with_that_value():
    g, b, (a,) = graph_with((4,))
    two = b.constant(torch.full((4,), 2.0))
    mixed = b.constant(torch.tensor([2.0, 1.0, 2.0, 2.0]))
    full = b.op("core.full", shape=(4,), value=2.0, dtype=F32)
    p1, p2, p3 = b.op("core.mul", a, two), b.op("core.mul", a, mixed), b.op("core.mul", a, full)
    g.set_outputs([p1, p2, p3])
    r = Rule(x * 2.0, lambda m, rw: None)
    assert r.match(p1.producer) and r.match(p3.producer)
    assert r.match(p2.producer) is None
    assert Rule(x * Const(), lambda m, rw: None).match(p2.producer) is not None


def test_variadic_operands():
    g, b, (a, c) = graph_with((4,), (4,))
    cat = b.op("core.concat", a, c, a, dim=0)
    g.set_outputs([cat])
    assert first_match(op("core.concat")(x, ...), g).x is a
    assert first_match(op("core.concat")(x, y), g) is None
    assert first_match(op("core.concat")(x, y, x), g) is not None


def test_patterns_print_readably():
    assert repr(x * 1.0) == "core.mul(x, 1.0)"
    assert repr(op("core.transpose", dim0=0)(ANY).one_use()) == \
        "core.transpose{dim0=0}(_).one use"


def test_rule_needs_an_op_root():
    with pytest.raises(TypeError):
        Rule(Var("x"), lambda m, rw: None)


def test_rule_declining_after_a_change_is_an_error():
    g, b, (a,) = graph_with((4,))
    e = b.op("core.exp", a)
    g.set_outputs([e])

    @rule(op("core.exp")(x))
    def sneaky(m, rw):
        """changes the IR, then declines"""
        rw.op("core.neg", m.x)
        return None

    with pytest.raises(RewriteError, match="sneaky.*declined"):
        apply_patterns(g, [sneaky])


def test_rewrite_declines_then_next_match_is_tried():
    # a * b where only the swapped binding satisfies the rewrite's condition
    g, b, (a, c) = graph_with((4,), (1,))
    p = b.op("core.mul", a, c)
    g.set_outputs([p])
    seen = []

    @rule(x * y)
    def record(m, rw):
        """records each binding, accepts none"""
        seen.append((m.x.name, m.y.name))
        return None

    apply_patterns(g, [record])
    assert seen == [("x0", "x1"), ("x1", "x0")]


def test_imperative_pattern_and_rule_docstrings():
    class FoldDoubleNeg(RewritePattern):
        """-(-x) = x"""
        root = "core.neg"

        def match_and_rewrite(self, o, rw):
            inner = o.operands[0].producer
            if inner is None or inner.name != "core.neg":
                return False
            rw.replace_op(o, inner.operands[0])
            return True

    g, b, (a,) = graph_with((4,))
    n = b.op("core.neg", b.op("core.neg", a))
    g.set_outputs([n])
    ctx = PassContext("test")
    apply_patterns(g, [FoldDoubleNeg], ctx)
    assert g.outputs == [a] and len(g) == 0
    assert ctx.stats.patterns == {"FoldDoubleNeg": 1}
    assert FoldDoubleNeg.__doc__ == "-(-x) = x"


def test_a_pattern_set_refuses_unknown_op_names():
    """op("core.mull") would never match; building the set says so, with a suggestion."""
    from irlm.passes import PassError, PatternSet, op, rule

    @rule(op("core.neg")(op("core.mull")(Var("a"), Var("b"))))
    def typo(m, rw):
        """-(a*b) = ..."""
        return None

    with pytest.raises(PassError, match=r"pattern 'typo' names unknown op 'core.mull'; "
                                        r"did you mean 'core.mul'\?"):
        PatternSet([typo])
