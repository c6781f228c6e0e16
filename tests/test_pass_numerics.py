"""--check-numerics: seeded inputs, tolerance, naming the pass and the values that drift."""
import io
from pathlib import Path

import pytest
import torch

from irlm.text.parser import parse_graph
from irlm.passes import (CheckNumerics, NumericsError, Rewriter, load_plugin, register_pass,
                         run_pipeline)
from irlm.passes.numerics import difference, make_inputs, symbol_values
from irlm.passes.registry import unregister_pass
from irlm.types import sym
from irlm.weights import WeightStore

PLUGINS = Path(__file__).resolve().parent / "plugins"

MLP = """
dim tokens = [1, 32]

graph @mlp(%ids: tensor<[tokens]xi64>, %x: tensor<[tokens]x8xf32>) -> (tensor<[tokens]x8xf32>) {
  %table = core.full {shape = [5, 8], value = 0.5, dtype = f32} : tensor<5x8xf32>
  %e = core.embedding(%table, %ids) : tensor<[tokens]x8xf32>
  %h = core.exp(%x) : tensor<[tokens]x8xf32>
  %d = core.sub(%h, %e) : tensor<[tokens]x8xf32>
  %y = core.tanh(%d) : tensor<[tokens]x8xf32>
  %out = core.mul(%y, %x) : tensor<[tokens]x8xf32>
  return %out
}
"""


def test_a_wrong_pass_is_named_with_the_values_that_drift():
    load_plugin(PLUGINS / "swap_sub_operands.py")
    g = parse_graph(MLP, "mlp.irlm")
    with pytest.raises(NumericsError) as e:
        run_pipeline(g, "canonicalize,swap-sub-operands,dce", instruments=[CheckNumerics()])
    msg = str(e.value)
    first, *rest = msg.splitlines()
    assert "pass 'swap-sub-operands' (stage 2) changed the graph's outputs" in first
    assert "output 0 (%out)" in first
    assert "first value that differs (in graph order): core.sub (%d)" in msg
    # the top differences, by relative size, include the culprit and what it feeds
    top = msg.split("values that differ most")[1]
    assert "core.sub (%d)" in top and "core.tanh (%y)" in top


def test_correct_passes_pass_the_check():
    g = parse_graph(MLP, "mlp.irlm")
    check = CheckNumerics(atol=0.0, rtol=0.0)
    run_pipeline(g, "canonicalize,cse,dce", instruments=[check])
    assert check.checked == 3


@pytest.fixture
def noisy_pass():
    @register_pass("add-noise")
    def add_noise(graph, ctx):
        """out = out + 1e-6 * out: a small rounding-sized change"""
        rw = Rewriter(graph, ctx.stats)
        out = graph.outputs[0]
        with rw.insertion_point(after=out.producer):
            eps = rw.constant(torch.tensor(1e-6))
            noisy = rw.op("core.add", out, rw.op("core.mul", out, eps))
        graph.outputs[0] = noisy

    yield
    unregister_pass("add-noise")


def test_tolerance_is_relative_to_the_output_magnitude(noisy_pass):
    run_pipeline(parse_graph(MLP), "add-noise", instruments=[CheckNumerics()])
    with pytest.raises(NumericsError, match="add-noise"):
        run_pipeline(parse_graph(MLP), "add-noise",
                     instruments=[CheckNumerics(atol=0.0, rtol=1e-8)])


def test_integer_inputs_stay_inside_the_tables_they_index():
    g = parse_graph(MLP)
    ids, x = make_inputs(g, seed=1)
    assert ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < 5
    assert x.dtype == torch.float32 and x.shape == ids.shape + (8,)
    ids, _ = make_inputs(g, seed=1, int_max=2)
    assert int(ids.max()) < 2
    assert torch.equal(make_inputs(g, seed=7)[1], make_inputs(g, seed=7)[1])


def test_symbolic_dims_take_small_values_in_range():
    g = parse_graph("""
dim a = [5, 8]
dim b = [1, 2]

graph @g(%x: tensor<[a]x[b]xbf16>, %m: tensor<[a]xbool>) -> (tensor<[a]x[b]xbf16>) {
  return %x
}
""")
    values = symbol_values(g)
    assert values == {sym("a"): 5, sym("b"): 2}
    x, m = make_inputs(g)
    assert x.shape == (5, 2) and x.dtype == torch.bfloat16 and m.dtype == torch.bool


WEIGHTED = """
graph @w(%x: tensor<3x4xf32>) -> (tensor<3x2xf32>) {
  %w = param "proj.weight" : tensor<2x4xf32>
  %y = core.linear(%x, %w) : tensor<3x2xf32>
  return %y
}
"""


def test_params_without_a_store_cannot_be_checked():
    g = parse_graph(WEIGHTED)
    with pytest.raises(NumericsError, match="reads 1 weight.*'proj.weight'.*no weight store.*"
                                            "cannot be checked"):
        run_pipeline(g, "dce", instruments=[CheckNumerics()])


def test_params_are_read_from_the_graph_store():
    store = WeightStore()
    store.add_tensor("proj.weight", torch.randn(2, 4))
    g = parse_graph(WEIGHTED, weights=store)
    check = CheckNumerics()
    run_pipeline(g, "canonicalize,dce", instruments=[check])
    assert check.checked == 2


def test_a_pass_that_changes_the_signature_restarts_the_comparison():
    @register_pass("rename-input")
    def rename_input(graph, ctx):
        """renames input 0 (changes the graph's signature)"""
        graph.inputs[0].name = "renamed"

    try:
        out = io.StringIO()
        check = CheckNumerics(stream=out)
        run_pipeline(parse_graph(MLP), "rename-input,canonicalize", instruments=[check])
        assert "changed the graph's inputs or outputs" in out.getvalue()
        assert check.checked == 1
    finally:
        unregister_pass("rename-input")


def test_difference_handles_nan_and_inf():
    a = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert difference(a, a.clone()).max_abs == 0
    b = torch.tensor([1.0, 0.0, float("inf"), 2.0])
    assert difference(a, b).max_abs == float("inf")
    d = difference(torch.tensor([4.0, -2.0]), torch.tensor([4.0, -1.0]))
    assert d.max_abs == 1.0 and d.scale == 4.0 and d.relative == 0.25


PAGED = """dim tokens = [1, 64]
dim reqs = [1, 8]
dim max_blocks = [1, 16]
dim cache_blocks = [1, 1024]

graph @paged(%input_ids: tensor<[tokens]xi64>, %position_ids: tensor<[tokens]xi64>, %q_lens: tensor<[reqs]xi32>, %cached_lens: tensor<[reqs]xi32>, %block_tables: tensor<[reqs]x[max_blocks]xi32>, %kv_cache: tensor<1x[cache_blocks]x2x4x2x8xf32>) -> (tensor<[reqs]x2x8xf32>) {
  %table = core.full {dtype = f32, shape = [10, 16], value = 0.25} : tensor<10x16xf32>
  %h = core.embedding(%table, %input_ids) : tensor<[tokens]x16xf32>
  %q = core.reshape(%h) {shape = [tokens, 2, 8]} : tensor<[tokens]x2x8xf32>
  %k = core.neg(%q) : tensor<[tokens]x2x8xf32>
  %a = llm.paged_attention(%q, %k, %q, %kv_cache, %block_tables, %q_lens, %cached_lens) {layer = 0} : tensor<[tokens]x2x8xf32>
  %last = llm.last_tokens(%a, %q_lens) : tensor<[reqs]x2x8xf32>
  return %last
}
"""


def test_paged_inference_form_gets_valid_metadata():
    g = parse_graph(PAGED, "paged.irlm")
    ids, pos, q_lens, cached, tables, cache = make_inputs(g, seed=0)
    assert q_lens.tolist() == [3, 1] and cached.tolist() == [2, 5]
    assert ids.shape == pos.shape == (4,) and int(ids.max()) < 10
    assert pos.tolist() == [2, 3, 4, 5]            # each request continues its cached prefix
    assert tables.shape == (2, 2) and len(set(tables.flatten().tolist())) == 4
    assert cache.shape == (1, 5, 2, 4, 2, 8)
    check = CheckNumerics(atol=0.0, rtol=0.0)
    run_pipeline(g, "canonicalize,cse,dce", instruments=[check])  # paged_attention runs
    assert check.checked == 3


def test_a_signature_random_inputs_cannot_serve_stops_the_check_with_a_note():
    from irlm.types import DType, TensorType

    @register_pass("add-lens-input")
    def add_lens_input(graph, ctx):
        """adds per-request lengths that random integers overrun (last_tokens indexes by them)"""
        graph.declare_dim("reqs", 1, 8)
        lens = graph.add_input(TensorType((sym("reqs"),), DType.i32), "lens")
        rw = Rewriter(graph, ctx.stats)
        out = graph.outputs[0]
        with rw.insertion_point(after=out.producer):
            graph.outputs[0] = rw.op("llm.last_tokens", out, lens)

    try:
        out = io.StringIO()
        check = CheckNumerics(stream=out, int_max=1000)
        g = parse_graph("""
dim tokens = [1, 8]

graph @g(%h: tensor<[tokens]x4xf32>) -> (tensor<[tokens]x4xf32>) {
  %e = core.exp(%h) : tensor<[tokens]x4xf32>
  return %e
}
""")
        run_pipeline(g, "add-lens-input,canonicalize", instruments=[check])
        assert "cannot run the new graph on random inputs, so later passes are not checked" \
            in out.getvalue()
        assert check.disabled and check.checked == 0
    finally:
        unregister_pass("add-lens-input")
