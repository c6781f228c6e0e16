"""The GPU executor's rope + paged-attention fusion (lowering/rope_attention.py) on the CPU.

The oracle is the reference interpreter running the unfused graph: every fused graph must give
the same logits and the same KV cache, step by step (prompt, decode, a mixed step), bit for
bit, since ``llm.rope_paged_attention``'s reference is ``llm.rope`` then
``llm.paged_attention``: every decoder architecture of tests/test_frontend_architectures.py
(those without rotary embeddings must be left alone) and partial rotary dims.  The GPU
kernel behind it is tested in tests/test_rope_attention_gpu.py.
"""
import pytest
import torch
import transformers

from irlm import Builder, DType, Graph, TensorType, sym
from irlm.compilation import compile_causal_lm
from irlm.errors import IRError
from irlm.interpreter import Interpreter
from irlm.lowering.rope_attention import fuse_rope_attention, fusion_enabled
from irlm.runtime.model_runner import StepBatch
from irlm.verifier import verify

from irlm_test_helpers import run_schedule
from test_frontend_architectures import CASES as ARCH_CASES, build as build_architecture
from test_prefill_graphs import CpuPiecewise, _Runner

VOCAB, BS = 128, 16


def _tiny(kind: str):
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=VOCAB)
    cfg = {
        "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, head_dim=16, **small),
        # rotate-half over half of each head
        "gpt_neox": lambda: transformers.GPTNeoXConfig(rotary_pct=0.5, **small),
        "phi": lambda: transformers.PhiConfig(partial_rotary_factor=0.5, **small),
    }[kind]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return compile_causal_lm(model, max_seq=256, tokens_per_block=BS)


def _cache(g, blocks):
    t = [v for v in g.inputs if v.name == "kv_cache"][0].type
    shape = [int(d) if isinstance(d, int) else None for d in t.shape]
    shape[1] = blocks
    return torch.zeros(shape, dtype=t.dtype.torch)


def _feeds(g, batch, cache):
    by = {"input_ids": batch.input_ids, "position_ids": batch.positions,
          "q_lens": batch.q_lens, "cached_lens": batch.cached_lens,
          "block_tables": batch.block_tables, "kv_cache": cache}
    return [by[v.name] for v in g.inputs]


#: (name, builder, ropes fused per layer pair, style): every decoder of the frontend tests,
#: plus partial rotary (half of each head) in rotate-half form
ROPE_STYLE = {"gptj": "interleaved"}
NO_ROPE = ("gpt2", "opt", "bloom")
CASES = [(f"{n}-{a}" + (f"-{e}" if e else ""), (n, a, e)) for n, a, e in ARCH_CASES
         if n != "bert"] + [("gpt_neox-half-rotary", "gpt_neox"), ("phi-half-rotary", "phi")]


def _graph(spec):
    if isinstance(spec, str):
        return _tiny(spec)
    model = build_architecture(*spec)
    return compile_causal_lm(model, max_seq=256, tokens_per_block=BS)


@pytest.mark.parametrize("spec", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_fused_graph_steps_equal_the_unfused_graph(spec):
    name = spec if isinstance(spec, str) else spec[0]
    g = _graph(spec)
    f = g.clone()
    fused = fuse_rope_attention(f)
    verify(f)
    if name in NO_ROPE:
        assert fused == 0 and str(f) == str(g)
        return
    assert fused == 2
    names = [op.name for op in f.ops]
    assert "llm.rope" not in names and "llm.paged_attention" not in names
    style = ROPE_STYLE.get(name, "rotate_half")
    assert [op.attrs["style"] for op in f.ops if op.name == "llm.rope_paged_attention"] == \
        [style, style]
    assert str(g).count("llm.rope(") == 4          # the engine's graph is left as it was
    want_i, got_i = Interpreter(g, g.weights), Interpreter(f, f.weights)
    want_c, got_c = _cache(g, 12), _cache(g, 12)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, VOCAB, (40,), generator=gen).tolist() for _ in range(3)]

    def both(b):
        want = want_i.run(_feeds(g, b, want_c)).outputs[0]
        got = got_i.run(_feeds(f, b, got_c)).outputs[0]
        assert torch.equal(got, want)
        assert torch.equal(got_c, want_c)
        return got.shape[0]
    # prompts, decode, and a step mixing a prompt's rest with decoding requests
    rows = run_schedule(both, seqs, [[5, 2], [7, 0], [9, 11]],
                        [{0: 13, 1: 20}, {0: 1, 1: 1}, {0: 1, 1: 1, 2: 9}, {2: 1}])
    assert rows == [2, 2, 3, 1]


def test_fused_prompt_steps_run_as_piecewise_graphs():
    """cos / sin now cross the cut at the attention: they are token rows like q, k and v, so
    the padded, replayed stretches still give the interpreter's logits and cache."""
    g = _tiny("llama")
    f = g.clone()
    fuse_rope_attention(f)
    runner = _Runner(f, num_blocks=12)
    plan = CpuPiecewise(runner)
    assert plan.why is None, plan.why
    ref = Interpreter(g, g.weights)
    ref_cache = runner.kv_cache.clone()
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, VOCAB, (30,), generator=gen).tolist() for _ in range(2)]
    done = [0, 0]
    for step in ({0: 21, 1: 6}, {0: 1, 1: 5}):
        reqs = sorted(step)
        b = StepBatch.pack(reqs, [seqs[r][done[r]:done[r] + step[r]] for r in reqs],
                           [done[r] for r in reqs], [[r * 3, r * 3 + 1] for r in reqs])
        feeds = runner._feeds(b.input_ids, b.positions, b.q_lens, b.cached_lens,
                              b.block_tables)
        got = plan.run(feeds, {}, b.num_tokens)
        want = ref.run([ref_cache if x is runner.kv_cache else x for x in feeds]).outputs[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for r in reqs:
            done[r] += step[r]
    torch.testing.assert_close(runner.kv_cache[:, :12], ref_cache[:, :12], rtol=0, atol=0)
    assert runner.stats["prefill_captures"] == 2


# ----- what is left alone ----------------------------------------------------------------------

H, KVH, D = 4, 2, 16


def _layer(*, k_cos_of_its_own=False, rope_read_twice=False, cos_per_head=False,
           style="rotate_half", rot=D, kv_heads=KVH):
    """q, k, v projections -> ropes on [1, heads, tokens, D] views -> paged attention, as the
    HF frontends write a layer."""
    g = Graph("layer")
    g.declare_dim("tokens", 1, 64)
    g.declare_dim("reqs", 1, 4)
    g.declare_dim("max_blocks", 1, 8)
    T, R, MB = sym("tokens"), sym("reqs"), sym("max_blocks")
    qkv = g.add_input(TensorType((T, (H + 2 * kv_heads) * D), DType.f32), "qkv")
    heads_of_cos = H if cos_per_head else 1
    cos = g.add_input(TensorType((1, heads_of_cos, T, rot), DType.f32), "cos")
    sin = g.add_input(TensorType((1, heads_of_cos, T, rot), DType.f32), "sin")
    cache = g.add_input(TensorType((1, 8, 2, BS, kv_heads, D), DType.f32), "kv_cache")
    tables = g.add_input(TensorType((R, MB), DType.i32), "block_tables")
    q_lens = g.add_input(TensorType((R,), DType.i32), "q_lens")
    cached = g.add_input(TensorType((R,), DType.i32), "cached_lens")
    b = Builder(g)
    q, k, v = b.op("core.split", qkv, dim=1, sizes=[H * D, kv_heads * D, kv_heads * D])

    def heads_first(x, n):
        return b.op("core.transpose", b.op("core.reshape", x, shape=[1, T, n, D]), dim0=1,
                    dim1=2)

    def packed(x, n):
        return b.op("core.reshape", b.op("core.transpose", x, dim0=1, dim1=2), shape=[T, n, D])

    qr = b.op("llm.rope", heads_first(q, H), cos, sin, style=style)
    kc, ks = (b.op("core.neg", sin), cos) if k_cos_of_its_own else (cos, sin)
    kr = b.op("llm.rope", heads_first(k, kv_heads), kc, ks, style=style)
    out = b.op("llm.paged_attention", packed(qr, H), packed(kr, kv_heads),
               b.op("core.reshape", v, shape=[T, kv_heads, D]), cache, tables, q_lens, cached,
               layer=0)
    g.set_outputs([out, qr] if rope_read_twice else [out])
    verify(g)
    return g


def _run(g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = 7
    feeds = {v.name: torch.randn([T if not isinstance(d, int) else d for d in v.type.shape],
                                 generator=gen)
             for v in g.inputs if v.type.dtype is DType.f32}
    feeds["kv_cache"] = torch.zeros(1, 8, 2, BS, KVH, D)
    feeds["block_tables"] = torch.tensor([[3, 1]], dtype=torch.int32)
    feeds["q_lens"] = torch.tensor([T], dtype=torch.int32)
    feeds["cached_lens"] = torch.tensor([4], dtype=torch.int32)
    out = Interpreter(g, g.weights).run(feeds).outputs
    return out, feeds["kv_cache"]


@pytest.mark.parametrize("style,rot", [("rotate_half", D), ("interleaved", D),
                                       ("rotate_half", 8)])
def test_a_layer_as_frontends_write_it_is_fused(style, rot):
    g = _layer(style=style, rot=rot)
    f = g.clone()
    assert fuse_rope_attention(f) == 1
    verify(f)
    (want,), want_cache = _run(g)
    (got,), got_cache = _run(f)
    assert torch.equal(got, want) and torch.equal(got_cache, want_cache)


@pytest.mark.parametrize("case", [dict(k_cos_of_its_own=True), dict(rope_read_twice=True),
                                  dict(cos_per_head=True, kv_heads=H)],
                         ids=["k_cos_of_its_own", "rope_read_twice", "cos_per_head"])
def test_ropes_that_differ_or_are_read_elsewhere_stay(case):
    g = _layer(**case)
    before = str(g)
    assert fuse_rope_attention(g) == 0
    assert str(g) == before


def test_fusion_is_on_unless_turned_off(monkeypatch):
    monkeypatch.delenv("IRLM_FUSE_ROPE", raising=False)
    assert fusion_enabled()
    monkeypatch.setenv("IRLM_FUSE_ROPE", "0")
    assert not fusion_enabled()
    monkeypatch.setenv("IRLM_FUSE_ROPE", " 1 ")
    assert fusion_enabled()
    monkeypatch.setenv("IRLM_FUSE_ROPE", "yes")
    with pytest.raises(Exception, match="IRLM_FUSE_ROPE must be 0 or 1, got 'yes'"):
        fusion_enabled()


def test_the_fused_op_checks_its_rows():
    g = _layer()
    f = g.clone()
    fuse_rope_attention(f)
    att = next(op for op in f.ops if op.name == "llm.rope_paged_attention")
    T = sym("tokens")
    bad = {"cos": TensorType((T, 3), DType.f32), "sin": TensorType((T, D), DType.f16)}
    for name, typ in bad.items():
        x = f.add_input(typ, "bad_" + name)
        ops = list(att.operands)
        ops[3 if name == "cos" else 4] = x
        with pytest.raises(IRError, match="rotary dim|dtype|one type"):
            Builder(f).op("llm.rope_paged_attention", *ops, layer=0)
