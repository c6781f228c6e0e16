"""canonicalize / cse / dce: determinism, fixpoint, exactness, and random chains of views."""
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from irlm import Builder, DType, Graph, TensorType
from irlm.interpreter import Interpreter
from irlm.text.parser import parse_graph
from irlm.passes import CheckNumerics, PassContext, run_pass, run_pipeline
from irlm.passes.transforms.canonicalize import EXACT_WIDENINGS, permutation_of
from irlm.text.printer import print_graph
from irlm.verifier import verify

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for p in (ROOT / "tests" / "filecheck" / "passes").glob("*.irlm")
               if p.read_text().startswith("# RUN:"))  # not the RUN-ERROR ones


def pipeline_of(path: Path) -> str:
    """The pipeline a FileCheck file's RUN line runs (loading the plugins it names)."""
    from irlm.passes import load_plugin
    run = path.read_text().splitlines()[0]
    for plugin in re.findall(r"--pass-plugin\s+(\S+)", run):
        load_plugin(ROOT / plugin)
    m = re.search(r'--pipeline\s+"([^"]*)"', run)
    if m:
        return m.group(1)
    from irlm.passes import named_pipeline
    return named_pipeline(re.search(r"-O(\d)", run).group(1))


def optimized(text: str, pipeline: str, name="<test>") -> str:
    g = parse_graph(text, name)
    run_pipeline(g, pipeline)
    return print_graph(g)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_deterministic_and_at_a_fixpoint(path):
    text, pipeline = path.read_text(), pipeline_of(path)
    once = optimized(text, pipeline)
    assert optimized(text, pipeline) == once, "same input, different output"
    assert optimized(once, pipeline) == once, "running the pipeline again changed the graph"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_rewrites_are_exact(path):
    """Every FileCheck input keeps its outputs bit for bit (checked by --check-numerics)."""
    g = parse_graph(path.read_text(), path.name)
    check = CheckNumerics(atol=0.0, rtol=0.0)
    run_pipeline(g, pipeline_of(path), instruments=[check])
    assert check.checked == len(pipeline_of(path).split(","))


def load_benchmark():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_rewrite",
                                                  ROOT / "benchmarks" / "rewrite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_canonicalize_twice_is_deterministic_on_a_big_mixed_graph():
    build_graph = load_benchmark().build_graph
    texts = []
    for _ in range(2):
        g = build_graph(2000, seed=3)
        run_pipeline(g, "canonicalize,cse,dce")
        texts.append(print_graph(g))
    assert texts[0] == texts[1]
    g = parse_graph(texts[0])
    run_pipeline(g, "canonicalize,cse,dce")
    assert print_graph(g) == texts[0]


def test_constant_folding_respects_the_limit_and_dtypes():
    g = Graph("t")
    b = Builder(g)
    c = b.constant(torch.arange(6, dtype=torch.int32).reshape(2, 3))
    s = b.op("core.sum", c, dims=(1,))            # i32 sums to i64
    t = b.op("core.transpose", c, dim0=0, dim1=1)
    g.set_outputs([s, t])
    stats = run_pass(g, "canonicalize", fold_limit=4)
    verify(g)
    assert [o.name for o in g.ops] == ["core.constant", "core.constant", "core.transpose"]
    assert stats.patterns["fold_constants"] == 1
    assert torch.equal(g.outputs[0].producer.attrs["value"], torch.tensor([3, 12]))
    run_pass(g, "canonicalize", fold_limit=0)
    assert len(g) == 3


def test_widening_table_is_exact():
    for narrow, wide in EXACT_WIDENINGS:
        if narrow is DType.bool:
            x = torch.tensor([True, False])
        elif narrow.is_float:
            x = torch.randn(1000).to(narrow.torch)
        else:
            info = torch.iinfo(narrow.torch)
            x = torch.tensor([info.min, -1, 0, 1, info.max], dtype=torch.int64).clamp(
                info.min, info.max).to(narrow.torch)
        assert torch.equal(x.to(wide.torch).to(narrow.torch), x), (narrow, wide)


# ----- random chains: canonicalize keeps the numbers ------------------------------------------

SHAPE = (2, 3, 4)


@st.composite
def view_chains(draw):
    steps = []
    rank = 3
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["transpose", "permute", "reshape", "unsqueeze", "cast",
                                     "squeeze_unsqueeze"]))
        if kind == "transpose":
            steps.append((kind, draw(st.integers(-rank, rank - 1)),
                          draw(st.integers(-rank, rank - 1))))
        elif kind == "permute":
            steps.append((kind, tuple(draw(st.permutations(range(6))))))
        elif kind == "cast":
            steps.append((kind, draw(st.sampled_from([DType.f32, DType.f16, DType.bf16]))))
        else:
            steps.append((kind, draw(st.integers(0, rank))))
    return steps


def build_chain(steps):
    g = Graph("chain")
    x = g.add_input(TensorType(SHAPE, DType.f32), "x")
    b = Builder(g)
    v = x
    for step in steps:
        kind = step[0]
        r = v.type.rank
        if kind == "transpose":  # axes fitted to the current rank; negative ones stay negative
            v = b.op("core.transpose", v, dim0=step[1] % r - (r if step[1] < 0 else 0),
                     dim1=step[2] % r - (r if step[2] < 0 else 0))
        elif kind == "permute":
            v = b.op("core.permute", v, dims=tuple(a for a in step[1] if a < r))
        elif kind == "reshape":
            v = b.op("core.reshape", v, shape=(-1,) if step[1] == 0 else
                     (v.type.shape[0], -1))
        elif kind == "unsqueeze":
            v = b.op("core.unsqueeze", v, dim=step[1] % (v.type.rank + 1))
        elif kind == "squeeze_unsqueeze":
            d = step[1] % (v.type.rank + 1)
            v = b.op("core.squeeze", b.op("core.unsqueeze", v, dim=d), dims=(d,))
        elif kind == "cast":
            v = b.op("core.cast", v, dtype=step[1])
    g.set_outputs([v])
    return g


@settings(max_examples=60, deadline=None)
@given(view_chains())
def test_random_view_chains_keep_their_values(steps):
    g = build_chain(steps)
    x = torch.randn(SHAPE)
    expected = Interpreter(g).run([x]).outputs[0]
    before = len(g)
    ctx = PassContext("canonicalize", {"fold_limit": 1024, "max_rewrites": 0})
    run_pipeline(g, "canonicalize,cse,dce")
    verify(g)
    got = Interpreter(g).run([x]).outputs[0]
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert len(g) <= before
    # at most one permutation op survives between two non-permutation ops
    names = [o.name for o in g.ops]
    for a, c in zip(names, names[1:]):
        assert not (a in ("core.transpose", "core.permute") and
                    c in ("core.transpose", "core.permute")), names


def test_permutation_of_transpose_and_permute():
    g = Graph("t")
    x = g.add_input(TensorType((2, 3, 4), DType.f32), "x")
    b = Builder(g)
    t = b.op("core.transpose", x, dim0=-1, dim1=0)
    p = b.op("core.permute", x, dims=(2, -3, 1))
    assert permutation_of(t.producer) == (2, 1, 0)
    assert permutation_of(p.producer) == (2, 0, 1)


def test_every_canonicalization_states_its_equation():
    from irlm.passes.transforms.canonicalize import canonicalization_patterns
    for p in canonicalization_patterns():
        doc = (p.__doc__ or "").strip()
        assert "=" in doc.splitlines()[0], f"{p.name}: the docstring's first line is its equation"
