"""Unit tests of the IR core: types, use lists, builder, registry, verifier, interpreter."""
import pytest
import sympy
import torch

from irlm import Builder, DType, Graph, IRError, TensorType, VerificationError, make_op, sym
from irlm.interpreter import Interpreter, run_graph
from irlm.ir import Location, Op
from irlm.registry import all_ops, get_op_def
from irlm.types import dims_equal, format_type
from irlm.verifier import find_problems, verify
from irlm.weights import WeightStore

B, S = sym("batch"), sym("seq")


def f32(*shape):
    return TensorType(shape, DType.f32)


def test_types_and_symbolic_dims():
    t = TensorType((B, S, 576), DType.bf16)
    assert format_type(t) == "tensor<[batch]x[seq]x576xbf16>"
    assert format_type(TensorType((), DType.f32)) == "tensor<f32>"
    assert t == TensorType((B, S, 576), DType.bf16)
    assert t != TensorType((S, B, 576), DType.bf16)
    assert dims_equal(B * S * 2, 2 * S * B)
    assert not dims_equal(B, S)
    assert t.free_symbols() == {"batch", "seq"}
    assert TensorType((sympy.Integer(3),), DType.i32).shape == (3,)
    with pytest.raises(IRError):
        TensorType((1.5,), DType.f32)
    with pytest.raises(IRError, match="unknown dtype 'f99'"):
        DType.parse("f99")


def test_registry_covers_issue_op_list():
    ops = all_ops()
    for name in ["add", "sub", "mul", "div", "gelu", "silu", "erf", "tanh", "where", "eq", "lt",
                 "cast", "matmul", "linear", "bmm", "sum", "mean", "amax", "max", "argmax",
                 "softmax", "log_softmax", "reshape", "transpose", "permute", "expand",
                 "squeeze", "unsqueeze", "slice", "concat", "split", "gather", "index_select",
                 "embedding", "arange", "full", "triu", "tril",
                 "scaled_dot_product_attention", "layer_norm"]:
        assert f"core.{name}" in ops
    assert "param" in ops


def test_unknown_op_and_bad_attributes_are_clear_errors():
    g = Graph()
    x = g.add_input(f32(2, 3), "x")
    b = Builder(g)
    with pytest.raises(IRError, match="unknown op 'core.sofmax'; did you mean 'core.softmax'"):
        b.op("core.sofmax", x, dim=0)
    with pytest.raises(IRError, match="unknown attribute 'dimm'.*did you mean 'dim'"):
        b.op("core.softmax", x, dimm=0)
    with pytest.raises(IRError, match="missing required attribute 'dim'"):
        b.op("core.softmax", x)
    with pytest.raises(IRError, match="attribute 'dim' must be an integer, got 'a'"):
        b.op("core.softmax", x, dim="a")
    with pytest.raises(IRError, match="approximate' must be one of"):
        b.op("core.gelu", x, approximate="fast")
    with pytest.raises(IRError, match="do not broadcast"):
        b.op("core.add", x, g.add_input(f32(4), "y"))
    with pytest.raises(IRError, match="expects 2 operands"):
        b.op("core.add", x)
    with pytest.raises(IRError, match="not a permutation"):
        b.op("core.permute", x, dims=[0, 0])


def test_use_lists_replace_and_erase():
    g = Graph()
    x = g.add_input(f32(4), "x")
    b = Builder(g)
    y = b.op("core.exp", x)
    z = b.op("core.add", y, y)
    w = b.op("core.neg", z)
    g.set_outputs([w])
    assert [u.index for u in y.uses] == [0, 1]
    assert y.users == [z.producer]
    # Replace exp(x) by tanh(x): uses move over in O(uses), the old op becomes dead.
    t = Builder(g, before=y.producer).op("core.tanh", x)
    y.replace_all_uses_with(t)
    assert y.uses == [] and len(t.uses) == 2
    assert z.producer.operands == [t, t]
    g.erase(y.producer)
    assert [op.name for op in g.ops] == ["core.tanh", "core.add", "core.neg"]
    assert len(x.uses) == 1
    with pytest.raises(IRError, match="still used"):
        g.erase(t.producer)
    # Outputs follow replacement too.
    n = b.op("core.abs", z)
    w.replace_all_uses_with(n)
    assert g.outputs == [n]
    verify(g)


def test_verifier_finds_each_kind_of_problem():
    g = Graph()
    x = g.add_input(f32(2, 3), "x")
    b = Builder(g)
    y = b.op("core.exp", x)
    g.set_outputs([y])
    verify(g)

    # Wrong declared type.
    bad = make_op("core.neg", [y], loc=Location("model.layers.0.mlp", "m.py", 7),
                  result_types=[f32(3, 2)], result_names=["bad"])
    g.append(bad)
    with pytest.raises(VerificationError) as e:
        verify(g)
    assert "core.neg (%bad) at model.layers.0.mlp at m.py:7" in str(e.value)
    assert "declared tensor<3x2xf32> but core.neg infers tensor<2x3xf32>" in str(e.value)
    g.erase(bad)

    # Use before definition (ops out of order).
    late = make_op("core.exp", [x], result_names=["late"])
    early = make_op("core.neg", [late.results[0]], result_names=["early"])
    g.insert_before(g.first, early)
    g.append(late)
    assert any("not defined before its use" in p for p in find_problems(g))
    g.erase(early)
    g.erase(late)

    # Bad attribute slipped in without the builder.
    sm = b.create("core.softmax", [y], {"dim": 1})
    sm.attrs["dim"] = "one"
    assert any("attribute 'dim' must be an integer" in p for p in find_problems(g))
    sm.attrs["dim"] = 1

    # Undeclared symbolic dim.
    h = Graph()
    h.add_input(TensorType((B, 4), DType.f32), "x")
    assert any("undeclared dimension" in p for p in find_problems(h))
    h.declare_dim("batch", 1, 8)
    assert find_problems(h) == []

    # Output not defined in the graph.
    other = Graph().add_input(f32(1), "o")
    g.set_outputs([other])
    assert any("graph output 0 (%o) is not defined" in p for p in find_problems(g))


def test_verifier_checks_params_against_store():
    ws = WeightStore()
    ws.add_tensor("w", torch.zeros(4, 3))
    g = Graph(weights=ws)
    Builder(g).param("w", f32(3, 4))
    assert any("tensor<4x3xf32> in the store" in p for p in find_problems(g))
    g2 = Graph(weights=ws)
    Builder(g2).param("missing", f32(1))
    assert any("'missing' is not in the weight store" in p for p in find_problems(g2))


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(8)
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8, bias=False)

    def forward(self, x):
        h = self.ln(x)
        return torch.softmax(self.down(torch.nn.functional.gelu(self.up(h), approximate="tanh"))
                             + x, dim=-1)


def build_mlp_graph(m: TinyMLP) -> Graph:
    ws = WeightStore()
    for k, v in m.state_dict().items():
        ws.add_tensor(k, v)
    g = Graph("mlp", ws)
    g.declare_dim("batch", 1, 16)
    g.declare_dim("seq", 1, 128)
    x = g.add_input(TensorType((B, S, 8), DType.f32), "x")
    b = Builder(g)
    p = {k: b.param(k, ws.type_of(k)) for k in ws.names()}
    h = b.op("core.layer_norm", x, p["ln.weight"], p["ln.bias"], normalized_shape=[8])
    flat = b.op("core.reshape", h, shape=[B * S, 8])
    u = b.op("core.linear", flat, p["up.weight"], p["up.bias"])
    u = b.op("core.gelu", u, approximate="tanh")
    d = b.op("core.linear", u, p["down.weight"])
    d = b.op("core.reshape", d, shape=[B, S, 8])
    s = b.op("core.softmax", b.op("core.add", d, x), dim=-1)
    g.set_outputs([s])
    return g


def test_interpreter_matches_torch_module_with_symbolic_dims():
    torch.manual_seed(0)
    m = TinyMLP().eval()
    g = build_mlp_graph(m)
    verify(g)
    for shape in [(1, 1, 8), (3, 5, 8), (2, 17, 8)]:
        x = torch.randn(shape)
        got = run_graph(g, [x]).outputs[0]
        torch.testing.assert_close(got, m(x), rtol=1e-5, atol=1e-6)


def test_interpreter_captures_intermediates_and_checks_inputs():
    torch.manual_seed(0)
    m = TinyMLP().eval()
    g = build_mlp_graph(m)
    for i, op in enumerate(g.ops):
        for r in op.results:
            r.name = r.name or f"v{i}"
    ln_name = next(op for op in g.ops if op.name == "core.layer_norm").result.name
    x = torch.randn(2, 3, 8)
    res = Interpreter(g).run({"x": x}, capture=[ln_name])
    torch.testing.assert_close(res.captured[ln_name], m.ln(x))
    assert len(Interpreter(g).run([x], capture=True).captured) == len(g) + 1
    with pytest.raises(Exception, match="outside its range"):
        run_graph(g, [torch.randn(17, 1, 8)])
    with pytest.raises(Exception, match="dtype"):
        run_graph(g, [torch.randn(1, 1, 8, dtype=torch.float64)])
    with pytest.raises(Exception, match="no value named %nope"):
        Interpreter(g).run([x], capture=["nope"])


@pytest.mark.parametrize("name,attrs,shapes,dtype", [
    ("core.matmul", {}, [(2, 3, 4), (4, 5)], torch.float32),
    ("core.matmul", {}, [(4,), (2, 4, 3)], torch.float32),
    ("core.bmm", {}, [(2, 3, 4), (2, 4, 5)], torch.float32),
    ("core.sum", {"dims": [1], "keepdim": True}, [(2, 3, 4)], torch.float32),
    ("core.sum", {}, [(2, 3)], torch.int32),
    ("core.mean", {"dims": [-1]}, [(2, 3, 4)], torch.float32),
    ("core.amax", {"dims": [0, 2]}, [(2, 3, 4)], torch.float32),
    ("core.max", {"dim": 1}, [(2, 3, 4)], torch.float32),
    ("core.argmax", {"dim": -1}, [(2, 3, 4)], torch.float32),
    ("core.log_softmax", {"dim": 1}, [(2, 3)], torch.float32),
    ("core.transpose", {"dim0": 0, "dim1": 2}, [(2, 3, 4)], torch.float32),
    ("core.expand", {"shape": [5, 2, -1]}, [(2, 1)], torch.float32),
    ("core.expand", {"shape": [2, 7]}, [(2, 1)], torch.float32),
    ("core.squeeze", {"dims": [1]}, [(2, 1, 3)], torch.float32),
    ("core.unsqueeze", {"dim": -1}, [(2, 3)], torch.float32),
    ("core.slice", {"dim": 1, "start": 1, "end": 100, "step": 2}, [(2, 7)], torch.float32),
    ("core.slice", {"dim": 0, "start": -3}, [(5, 2)], torch.float32),
    ("core.triu", {"diagonal": 1}, [(4, 4)], torch.float32),
    ("core.tril", {}, [(3, 4)], torch.float32),
    ("core.cumsum", {"dim": 0}, [(5,)], torch.int64),
    ("core.gelu", {}, [(3, 4)], torch.bfloat16),
    ("core.cast", {"dtype": "bf16"}, [(3,)], torch.float32),
    ("core.clamp", {"min": -0.5}, [(6,)], torch.float32),
])
def test_inferred_types_match_reference_results(name, attrs, shapes, dtype):
    """Shape/dtype inference and the reference implementation agree for many cases."""
    g = Graph()
    ins = [g.add_input(TensorType(s, DType.from_torch(dtype)), f"x{i}") for i, s in
           enumerate(shapes)]
    op = Builder(g).create(name, ins, attrs)
    g.set_outputs(op.results)
    verify(g)
    torch.manual_seed(0)
    args = [torch.randn(s).to(dtype) if dtype.is_floating_point else torch.randint(0, 9, s,
            dtype=dtype) for s in shapes]
    run_graph(g, args)  # the interpreter checks every result against its type


def test_split_concat_gather_embedding_against_torch():
    g = Graph()
    x = g.add_input(f32(4, 6), "x")
    idx = g.add_input(TensorType((4, 2), DType.i64), "idx")
    ids = g.add_input(TensorType((5,), DType.i32), "ids")
    b = Builder(g)
    a, c = b.op("core.split", x, dim=1, sizes=[2, 4])
    cat = b.op("core.concat", c, a, dim=1)
    gat = b.op("core.gather", cat, idx, dim=1)
    emb = b.op("core.embedding", x, ids)
    sel = b.op("core.index_select", x, ids, dim=0)
    g.set_outputs([cat, gat, emb, sel])
    verify(g)
    xv = torch.randn(4, 6)
    iv = torch.randint(0, 6, (4, 2))
    idv = torch.tensor([0, 3, 1, 1, 2], dtype=torch.int32)
    out = run_graph(g, [xv, iv, idv]).outputs
    want_cat = torch.cat([xv[:, 2:], xv[:, :2]], 1)
    torch.testing.assert_close(out[0], want_cat)
    torch.testing.assert_close(out[1], torch.gather(want_cat, 1, iv))
    torch.testing.assert_close(out[2], xv[idv.long()])
    torch.testing.assert_close(out[3], xv[idv.long()])


def test_sdpa_matches_explicit_attention():
    g = Graph()
    q = g.add_input(f32(1, 2, 5, 8), "q")
    k = g.add_input(f32(1, 2, 5, 8), "k")
    v = g.add_input(f32(1, 2, 5, 8), "v")
    o = Builder(g).op("core.scaled_dot_product_attention", q, k, v, is_causal=True)
    g.set_outputs([o])
    verify(g)
    torch.manual_seed(0)
    qv, kv, vv = (torch.randn(1, 2, 5, 8) for _ in range(3))
    scores = qv @ kv.transpose(-1, -2) / 8 ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(5, 5, dtype=torch.bool), 1), -float("inf"))
    want = torch.softmax(scores, -1) @ vv
    torch.testing.assert_close(run_graph(g, [qv, kv, vv]).outputs[0], want, rtol=1e-5,
                               atol=1e-5)


def test_binary_promotion_rules():
    g = Graph()
    x = g.add_input(TensorType((3,), DType.bf16), "x")
    s = g.add_input(TensorType((), DType.f32), "s")
    i = g.add_input(TensorType((3,), DType.i64), "i")
    b = Builder(g)
    assert b.op("core.mul", x, s).type.dtype is DType.bf16  # 0-d operands act as scalars
    with pytest.raises(IRError, match="insert core.cast"):
        b.op("core.add", x, i)
    with pytest.raises(IRError, match="floating-point"):
        b.op("core.div", i, i)


def test_every_op_has_doc_and_schema():
    for name, d in all_ops().items():
        assert d.doc, f"{name} has no doc"
        assert get_op_def(name) is d


@pytest.mark.parametrize("expr", ["T", "4*T", "2*T + R - 1", "T*R", "floor(T/2)",
                                  "floor((T + 15)/16)*16", "Max(T, R)", "Mod(T, 16)"])
def test_compiled_dims_equal_sympy_substitution(expr):
    """The interpreter's compiled dims (a lookup or a lambdified expression, not sympy's slow
    subs) give what sympy's substitution gives."""
    from irlm.interpreter import RefContext
    T, R = sympy.Symbol("T", integer=True), sympy.Symbol("R", integer=True)
    d = sympy.sympify(expr, locals={"T": T, "R": R})
    dims: dict = {}
    for t, r in [(1, 1), (7, 3), (16, 5), (17, 64), (1000, 999), (2 ** 31 + 3, 11)]:
        ctx = RefContext(None, None, {T: t, R: r}, {}, dims=dims)
        assert ctx.dim(d) == int(d.subs({T: t, R: r}))
    assert len(dims) <= 1            # compiled once, reused


def test_an_unbound_or_fractional_dim_is_an_ir_error():
    from irlm.interpreter import RefContext
    T, R = sympy.Symbol("T", integer=True), sympy.Symbol("R", integer=True)
    ctx = RefContext(None, None, {T: 5}, {})
    with pytest.raises(IRError, match="not bound by the inputs"):
        ctx.dim(T * R)
    with pytest.raises(IRError, match="not an integer"):
        ctx.dim(T / 2)
    assert ctx.dim(T / 5 * 3) == 3
