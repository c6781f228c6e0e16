"""The rewriter and the greedy driver: fixpoint, dead-op erasure, bound, statistics, weights."""
import pytest
import torch

from irlm import Builder, DType, Graph, TensorType
from irlm.interpreter import Interpreter
from irlm.passes import (PassContext, PatternSet, RewriteError, RewriteLimitError,
                         RewritePattern, Rewriter, Var, apply_patterns, op, rule)
from irlm.verifier import verify
from irlm.weights import WeightStore

F32 = DType.f32
x = Var("x")


def chain_graph():
    g = Graph("t")
    a = g.add_input(TensorType((4, 6), F32), "a")
    b = Builder(g)
    return g, b, a


class TransposeToPermute(RewritePattern):
    """transpose(x, 0, 1) = permute(x, [1, 0])  (half of a ping-pong pair)"""
    root = "core.transpose"

    def match_and_rewrite(self, o, rw):
        rw.replace_op(o, rw.op("core.permute", o.operands[0], dims=(1, 0)))
        return True


class PermuteToTranspose(RewritePattern):
    """permute(x, [1, 0]) = transpose(x, 0, 1)  (the other half)"""
    root = "core.permute"

    def match_and_rewrite(self, o, rw):
        rw.replace_op(o, rw.op("core.transpose", o.operands[0], dim0=0, dim1=1))
        return True


def test_ping_pong_patterns_hit_the_bound_with_a_clear_error():
    g, b, a = chain_graph()
    g.set_outputs([b.op("core.transpose", a, dim0=0, dim1=1)])
    with pytest.raises(RewriteLimitError) as e:
        apply_patterns(g, [TransposeToPermute, PermuteToTranspose], PassContext("pingpong"),
                       max_rewrites=100)
    msg = str(e.value)
    assert "pass 'pingpong'" in msg and "no fixpoint after 100 rewrites" in msg
    assert "TransposeToPermute" in msg and "PermuteToTranspose" in msg


def test_dead_pure_ops_are_erased_and_chains_collapse():
    g, b, a = chain_graph()
    dead = b.op("core.exp", b.op("core.neg", a))
    keep = b.op("core.relu", a)
    g.set_outputs([keep])
    res = apply_patterns(g, [])
    assert res.erased_dead == 2 and [o.name for o in g.ops] == ["core.relu"]
    assert dead.producer.graph is None


def test_impure_ops_are_kept():
    from irlm.registry import all_ops
    impure = [n for n, d in all_ops().items() if not d.pure]
    assert impure, "expected at least one impure op in the registry"
    g, b, a = chain_graph()
    keep = b.op("core.relu", a)
    g.set_outputs([keep])
    # fake an impure op by its name only: driver consults OpDef.pure
    from irlm.ir import Op
    fake = Op(impure[0], [], [TensorType((1,), F32)])
    g.append(fake)
    apply_patterns(g, [])
    assert fake.graph is g


def test_fixpoint_applies_rewrites_created_by_rewrites():
    g, b, a = chain_graph()
    v = a
    for _ in range(5):
        v = b.op("core.neg", v)
    g.set_outputs([v])

    @rule(op("core.neg")(op("core.neg")(x)))
    def double_neg(m, rw):
        """-(-x) = x"""
        return m.x

    ctx = PassContext("t")
    res = apply_patterns(g, [double_neg], ctx)
    assert [o.name for o in g.ops] == ["core.neg"]
    assert ctx.stats.patterns["double_neg"] == 2 and res.rewrites == 2
    assert apply_patterns(g, [double_neg]).rewrites == 0


def test_benefit_orders_patterns_for_the_same_root():
    g, b, a = chain_graph()
    g.set_outputs([b.op("core.neg", a)])
    fired = []

    @rule(op("core.neg")(x), benefit=1)
    def low(m, rw):
        """low"""
        fired.append("low")
        return None

    @rule(op("core.neg")(x), benefit=5)
    def high(m, rw):
        """high"""
        fired.append("high")
        return None

    apply_patterns(g, [low, high])
    assert fired == ["high", "low"]


def test_patterns_are_indexed_by_root():
    pset = PatternSet([TransposeToPermute, PermuteToTranspose])
    assert [p.name for p, _ in pset.for_op("core.transpose")] == ["TransposeToPermute"]
    assert pset.for_op("core.add") == ()


def test_replacement_takes_the_old_name_and_type_is_checked():
    g, b, a = chain_graph()
    e = b.op("core.exp", a)
    e.name = "h"
    g.set_outputs([e])
    rw = Rewriter(g)
    rw.set_insertion_point(before=e.producer)
    n = rw.op("core.neg", a)
    rw.replace_op(e.producer, n)
    assert n.name == "h" and g.outputs == [n]
    wrong = rw.op("core.sum", a)
    with pytest.raises(RewriteError, match="different type"):
        rw.replace_all_uses_with(n, wrong)


def test_erasing_a_used_op_names_the_reader():
    g, b, a = chain_graph()
    e = b.op("core.exp", a)
    n = b.op("core.neg", e)
    g.set_outputs([n])
    with pytest.raises(RewriteError, match="still read by core.neg"):
        Rewriter(g).erase_op(e.producer)


def test_insertion_points():
    g, b, a = chain_graph()
    e = b.op("core.exp", a)
    g.set_outputs([e])
    rw = Rewriter(g)
    with rw.insertion_point(after=e.producer):
        n1 = rw.op("core.neg", e)
        n2 = rw.op("core.abs", n1)
    with rw.insertion_point(before=e.producer):
        r = rw.op("core.relu", a)
    assert [o.name for o in g.ops] == ["core.relu", "core.exp", "core.neg", "core.abs"]
    assert rw.stats.counters["ops created"] == 3


def test_update_attrs_keeps_types():
    g, b, a = chain_graph()
    s = b.op("core.softmax", a, dim=1)
    g.set_outputs([s])
    rw = Rewriter(g)
    rw.update_attrs(s.producer, dim=-1)
    assert s.producer.attrs["dim"] == -1
    t = b.op("core.transpose", a, dim0=0, dim1=1)
    with pytest.raises(RewriteError, match="changes its type"):
        rw.update_attrs(t.producer, dim0=1)


def test_derived_param_concatenates_stored_weights_lazily():
    store = WeightStore()
    ws = {n: torch.randn(r, 6) for n, r in (("q", 4), ("k", 2), ("v", 2))}
    for n, t in ws.items():
        store.add_tensor(n, t)
    g = Graph("t", weights=store)
    a = g.add_input(TensorType((3, 6), F32), "a")
    b = Builder(g)
    params = [b.param(n, store.type_of(n)) for n in ("q", "k", "v")]
    outs = [b.op("core.linear", a, p) for p in params]
    g.set_outputs(outs)
    calls = []

    class FuseQKV(RewritePattern):
        """linear(a, q), linear(a, k), linear(a, v) = split(linear(a, concat(q, k, v)))"""
        root = "core.linear"

        def match_and_rewrite(self, o, rw):
            if o is not outs[0].producer:
                return False
            def cat(*t):
                calls.append(t[0].device.type)
                return torch.cat(t)
            w = rw.derived_param("qkv", params, cat, how="concat")
            fused = rw.op("core.linear", a, w)
            parts = rw.op("core.split", fused, dim=1, sizes=(4, 2, 2))
            for old, new in zip(outs, parts):
                rw.replace_op(old.producer, new)
            return True

    expected = [t.clone() for t in Interpreter(g).run([torch.ones(3, 6)]).outputs]
    ctx = PassContext("fuse")
    apply_patterns(g, [FuseQKV], ctx)
    verify(g)
    assert calls == ["meta"]  # only its type was inferred: the new weight is lazy
    assert store.type_of("qkv") == TensorType((8, 6), F32)
    assert store.entry("qkv").source == "concat(q, k, v)"
    assert ctx.stats.counters["weights derived"] == 1
    got = Interpreter(g).run([torch.ones(3, 6)]).outputs
    assert all(torch.allclose(e, o) for e, o in zip(expected, got))
    assert [o.name for o in g.ops].count("param") == 1  # q, k, v params are dead and erased


def test_derived_param_without_a_store_is_an_error():
    g, b, a = chain_graph()
    g.set_outputs([a])
    with pytest.raises(RewriteError, match="no weight store"):
        Rewriter(g).derived_param("w", ["x"], lambda t: t)


def test_pattern_bug_is_reported_with_the_pattern_and_op():
    g, b, a = chain_graph()
    g.set_outputs([b.op("core.exp", a)])

    @rule(op("core.exp")(x))
    def buggy(m, rw):
        """1/0"""
        return 1 / 0

    from irlm.passes import PassFailedError
    with pytest.raises(PassFailedError, match=r"pattern 'buggy' failed on core.exp.*"
                                              r"ZeroDivisionError.*test_pass_driver.py"):
        apply_patterns(g, [buggy])


def test_derived_param_reuses_an_identical_weight_and_refuses_a_clash():
    store = WeightStore()
    store.add_tensor("a", torch.ones(2, 3))
    g = Graph("t", weights=store)
    b = Builder(g)
    a = b.param("a", store.type_of("a"))
    g.set_outputs([a])
    rw = Rewriter(g)
    t1 = rw.derived_param("a.t", [a], lambda t: t.t().contiguous(), how="transpose")
    t2 = rw.derived_param("a.t", [a], lambda t: t.t().contiguous(), how="transpose")
    assert t1.type == t2.type == TensorType((3, 2), F32)
    with pytest.raises(RewriteError, match="weight 'a.t' already exists.*transpose\\(a\\)"):
        rw.derived_param("a.t", [a], lambda t: t * 2, how="scale")
    assert torch.equal(store.get("a.t"), torch.ones(3, 2))


def test_changing_the_ir_without_reporting_it_is_an_error():
    class Liar(RewritePattern):
        """changes the IR, then says it did not"""
        root = "core.exp"

        def match_and_rewrite(self, o, rw):
            rw.op("core.neg", o.operands[0])
            return False

    g, b, a = chain_graph()
    g.set_outputs([b.op("core.exp", a)])
    with pytest.raises(RewriteError, match="'Liar' changed the IR at core.exp.*return True"):
        apply_patterns(g, [Liar])
