"""The fusion passes on traced Hugging Face models: they fire, and the logits do not move.

Each architecture is a tiny seeded fp32 model traced once per module.  For each one the
fusion pipeline (irlm.passes.fusions.FUSION_PIPELINE) must produce the expected number of
fused ops (2 layers: 2*2 + 1 RMSNorms, 2 per layer RoPEs, ...), leave none of the unfused
spelling behind, and give logits within 1e-4 x (logit range) of the HF model.  The same holds
in the paged inference form, with the fusions run after substitute-attention and before it
(chunked prefill and decode steps checked against HF on each request's prefix).  The
pattern-level cases, positive and negative, are FileCheck files in tests/filecheck/fusions/.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import transformers

from irlm.frontends.trace import trace
from irlm.interpreter import Interpreter
from irlm.ir import Value
from irlm.text.parser import parse_graph
from irlm.passes import run_pipeline
from irlm.passes.fusions import FUSION_PASSES, FUSION_PIPELINE
from irlm.verifier import verify

VOCAB, BLOCK_SIZE, CACHE_BLOCKS = 96, 4, 32
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=VOCAB)

CONFIGS = {
    # GQA, and Llama-3 rope scaling (which only changes inv_freq)
    "llama3-gqa": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, max_position_embeddings=64,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Conv1D (matmul + bias) MLP with gelu_new written out; nn.LayerNorm
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                           n_positions=64),
    # MQA, q/k/v with biases
    "qwen2-mqa": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=1),
    # partial rotary (rotary_pct 0.5), fused qkv weight, parallel residual, linear + gelu
    "gpt-neox": lambda: transformers.GPTNeoXConfig(**SMALL, rotary_pct=0.5,
                                                   max_position_embeddings=64),
    # FalconLinear (x @ W.T + b): projections written as products; multi-query attention
    "falcon": lambda: transformers.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        new_decoder_architecture=False, multi_query=True, parallel_attn=False, alibi=False,
        bias=True, max_position_embeddings=64),
    # RMSNorm with (1 + w), gelu(tanh) gated MLP
    "gemma": lambda: transformers.GemmaConfig(**SMALL, num_key_value_heads=2, head_dim=16,
                                              max_position_embeddings=64),
}

#: fused ops each architecture must have after FUSION_PIPELINE (2 layers).
EXPECTED = {
    "llama3-gqa": {"llm.rms_norm": 1, "llm.add_rms_norm": 4, "llm.rope": 4, "llm.gated_act": 2},
    "gpt2": {"llm.linear_act": 2, "core.layer_norm": 5},
    "qwen2-mqa": {"llm.rms_norm": 1, "llm.add_rms_norm": 4, "llm.rope": 4, "llm.gated_act": 2},
    "gpt-neox": {"llm.rope": 4, "llm.linear_act": 2, "core.layer_norm": 5},
    "gemma": {"llm.rms_norm": 1, "llm.add_rms_norm": 4, "llm.rope": 4, "llm.gated_act": 2},
    # qkv, dense, dense_4h_to_h a layer and the head; dense_h_to_4h with its gelu
    "falcon": {"core.linear": 7, "llm.linear_act": 2, "llm.rope": 4, "core.layer_norm": 5},
}
#: ops the unfused spelling needs; none may survive the fusions.
UNFUSED = ("core.rsqrt", "core.pow", "core.neg", "core.silu", "core.tanh", "core.gelu",
           "core.relu")


def example(batch=2, seq=8):
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq)),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "position_ids": torch.arange(seq).repeat(batch, 1)}


def build(config, attn="sdpa", dtype=torch.float32):
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    return model, trace(model, example())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny GEMMs gain nothing from threads, and on a shared machine spin-waiting threads
    make each one ~100x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def traced():
    """arch -> (HF model, traced graph); each architecture is traced once."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = build(CONFIGS[arch]())
        return cache[arch]
    return get


def copy(g):
    """An independent copy of a graph (same weight store)."""
    return parse_graph(str(g), weights=g.weights)


def op_counts(g) -> Counter:
    return Counter(op.name for op in g.ops)


def assert_close(got, want, what):
    scale = (want.max() - want.min()).item()
    diff = (got.float() - want.float()).abs().max().item()
    assert diff <= 1e-4 * scale, f"{what}: max |diff| {diff:.3g} > 1e-4 x range {scale:.3g}"


def hf_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def assert_fused(arch, g):
    counts = op_counts(g)
    for name, n in EXPECTED[arch].items():
        assert counts[name] == n, f"{arch}: {counts[name]} x {name}, expected {n}"
    left = {name: counts[name] for name in UNFUSED if counts[name]}
    assert not left, f"{arch}: unfused ops left: {left}"
    # every projection is a core.linear (fuse-linear): no product reads a weight
    products = [op.describe() for op in g.ops if op.name == "core.matmul" and any(
        v.producer is not None and (v.producer.name == "param" or (
            v.producer.name == "core.transpose" and v.producer.operands[0].producer is not None
            and v.producer.operands[0].producer.name == "param")) for v in op.operands)]
    assert not products, f"{arch}: products of a weight left: {products}"


# ----- the fused ops' reference semantics ------------------------------------------------------


def reference(name, *inputs, **attrs):
    """Run one op's registry reference implementation."""
    from irlm.builder import make_op
    from irlm.interpreter import RefContext
    from irlm.registry import get_op_def
    from irlm.types import DType, TensorType
    types = [TensorType(tuple(t.shape), DType.from_torch(t.dtype)) for t in inputs]
    op = make_op(name, [Value(t) for t in types], attrs)
    out = get_op_def(name).reference(RefContext(None, None, {}, {}), list(inputs), op.attrs)
    for t, r in zip(out, op.results):  # the inferred types are what the reference produces
        assert (tuple(t.shape), DType.from_torch(t.dtype)) == (tuple(r.type.shape), r.type.dtype)
    return out


def test_rope_reference_matches_hf():
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    for rot in (16, 8):  # full and partial rotary (NeoX / Phi)
        cos, sin = torch.randn(2, 5, rot), torch.randn(2, 5, rot)
        want_q, want_k = neox(q, k, cos, sin)
        c, s_ = cos[:, None], sin[:, None]
        assert torch.equal(reference("llm.rope", q, c, s_)[0], want_q)
        assert torch.equal(reference("llm.rope", k, c, s_)[0], want_k)
    x = torch.randn(2, 5, 4, 16)  # GPT-J: [b, s, heads, d], rotary_dim 8 of 16
    sin, cos = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    want = gptj(x[..., :8], sin, cos)
    c2, s2 = (torch.repeat_interleave(t[:, :, None, :], 2, 3) for t in (cos, sin))
    got = reference("llm.rope", x, c2, s2, style="interleaved")[0]
    assert torch.equal(got[..., :8], want) and torch.equal(got[..., 8:], x[..., 8:])


def test_norm_references_match_hf():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(0)
    x, r = torch.randn(3, 7, 32), torch.randn(3, 7, 32)
    llama, gemma = LlamaRMSNorm(32, eps=1e-5), GemmaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        for norm in (llama, gemma):
            norm.weight.normal_()
        assert torch.equal(reference("llm.rms_norm", x, llama.weight, eps=1e-5)[0], llama(x))
        got = reference("llm.rms_norm", x, gemma.weight, eps=1e-5, weight_offset=1.0)[0]
        assert torch.allclose(got, gemma(x), rtol=0, atol=1e-6)
        normed, total = reference("llm.add_rms_norm", x, r, llama.weight, eps=1e-5)
        assert torch.equal(total, x + r) and torch.equal(normed, llama(x + r))
        # bf16: one rounding at the end, HF's Llama rounds before the weight: <= 1 ulp apart
        xb, wb = x.bfloat16(), llama.weight.bfloat16()
        llama_b = LlamaRMSNorm(32, eps=1e-5).to(torch.bfloat16)
        llama_b.weight.copy_(wb)
        got, want = reference("llm.rms_norm", xb, wb, eps=1e-5)[0], llama_b(xb)
        assert got.dtype == torch.bfloat16
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all()


def test_activation_references():
    import torch.nn.functional as F
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 6, 16), torch.randn(24, 16), torch.randn(24)
    gate_up = torch.randn(4, 6, 48)
    for act, fn in (("silu", F.silu), ("gelu", F.gelu),
                    ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"))):
        want = fn(gate_up[..., :24]) * gate_up[..., 24:]
        assert torch.equal(reference("llm.gated_act", gate_up, act=act)[0], want)
    for act, fn in (("relu", torch.relu), ("silu", F.silu), ("gelu", F.gelu)):
        assert torch.equal(reference("llm.linear_act", x, w, b, act=act)[0],
                           fn(F.linear(x, w, b)))
    assert torch.equal(reference("llm.linear_act", x, w, act="relu")[0], torch.relu(x @ w.T))


# ----- the traced (stateless) form -------------------------------------------------------------


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_fusions_fire_and_preserve_logits(traced, arch):
    model, g0 = traced(arch)
    g = copy(g0)
    run_pipeline(g, FUSION_PIPELINE)
    verify(g)
    assert_fused(arch, g)
    torch.manual_seed(1)
    inputs = example()
    want = hf_logits(model, inputs)
    assert_close(Interpreter(g0).run(inputs).outputs[0], want, f"{arch} unfused")
    assert_close(Interpreter(g).run(inputs).outputs[0], want, f"{arch} fused")


def test_gqa_attention_reads_kv_heads_and_qkv_is_one_gemm(traced):
    _, g0 = traced("llama3-gqa")
    g = copy(g0)
    run_pipeline(g, FUSION_PIPELINE)
    sdpas = [op for op in g.ops if op.name == "core.scaled_dot_product_attention"]
    assert len(sdpas) == 2 and all(op.attrs["enable_gqa"] for op in sdpas)
    assert all(op.operands[1].type.shape[1] == 2 for op in sdpas)  # 2 kv heads, not 4
    # q/k/v and gate/up: one GEMM each over a derived, lazily concatenated weight
    fused = [op.attrs["name"] for op in g.params() if "+" in op.attrs["name"]]
    assert sorted(fused) == sorted(
        [f"model.layers.{i}.self_attn.q_proj+k_proj+v_proj.weight" for i in range(2)] +
        [f"model.layers.{i}.mlp.gate_proj+up_proj.weight" for i in range(2)])
    assert op_counts(g)["core.linear"] == 2 * 4 + 1  # qkv, o, gate|up, down per layer; head
    store = g.weights
    name = "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"
    assert store.entry(name).source.startswith("concat(model.layers.0.self_attn.q_proj.weight")
    parts = [store.get(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
    assert torch.equal(store.get(name), torch.cat(parts))


def test_llama3_rope_scaling_stays_in_inv_freq(traced):
    """Llama-3 scaling changes inv_freq only: rope's cos/sin are still computed from
    position_ids x inv_freq (the scaled buffer), once for all layers."""
    model, g0 = traced("llama3-gqa")
    default = transformers.LlamaConfig(**SMALL, num_key_value_heads=2)
    plain = transformers.AutoModelForCausalLM.from_config(default).model.rotary_emb.inv_freq
    scaled = model.model.rotary_emb.inv_freq
    assert not torch.allclose(scaled, plain)  # the scaling really is in effect
    g = copy(g0)
    run_pipeline(g, FUSION_PIPELINE)
    ropes = [op for op in g.ops if op.name == "llm.rope"]
    assert len({id(op.operands[1]) for op in ropes}) == 1  # one cos for every layer
    producers, stack = set(), [ropes[0].operands[1]]
    while stack:
        v = stack.pop()
        if v.producer is not None:
            producers.add(v.producer.name if v.producer.name != "param"
                          else v.producer.attrs["name"])
            stack.extend(v.producer.operands)
    assert {"core.cos", "model.rotary_emb.inv_freq"} <= producers
    assert torch.equal(g.weights.get("model.rotary_emb.inv_freq"), scaled)


def test_fusion_order_does_not_matter(traced):
    """fuse-gated-mlp before or after fuse-qkv (and fuse-all) give the same graph."""
    _, g0 = traced("llama3-gqa")
    outputs = []
    for fusions in (",".join(FUSION_PASSES),
                    "fuse-rms-norm,fuse-residual-norm,fuse-rope,remove-repeat-kv,"
                    "fuse-gated-mlp,fuse-qkv,fuse-bias-act",
                    "fuse-all"):
        g = copy(g0)
        run_pipeline(g, f"canonicalize,cse,{fusions},canonicalize,cse,dce")
        outputs.append(str(g))
    assert outputs[0] == outputs[1] == outputs[2]


def test_gptj_interleaved_partial_rope():
    """GPT-J rotates interleaved pairs of the first rotary_dim dims (eager attention)."""
    config = transformers.GPTJConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                     rotary_dim=8, n_positions=64)
    model, g0 = build(config, attn="eager")
    g = copy(g0)
    run_pipeline(g, FUSION_PIPELINE)
    ropes = [op for op in g.ops if op.name == "llm.rope"]
    assert len(ropes) == 4 and all(op.attrs["style"] == "interleaved" for op in ropes)
    assert all(op.operands[1].type.shape[-1] == 8 < op.operands[0].type.shape[-1]
               for op in ropes)
    assert op_counts(g)["llm.linear_act"] == 2
    torch.manual_seed(1)
    inputs = example()
    assert_close(Interpreter(g).run(inputs).outputs[0], hf_logits(model, inputs), "gpt-j")


def test_bf16_llama_fuses_through_the_casts():
    """In bf16, HF's RMSNorm casts to float32 and back: the norms still fuse, and the fused
    graph stays within bf16 rounding of the unfused one."""
    config = transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": 1},
                                      num_key_value_heads=2)
    _, g0 = build(config, dtype=torch.bfloat16)
    g = copy(g0)
    run_pipeline(g, FUSION_PIPELINE)
    counts = op_counts(g)
    assert counts["llm.rms_norm"] + counts["llm.add_rms_norm"] == 3
    assert counts["llm.rope"] == 2 and counts["llm.gated_act"] == 1
    assert counts["core.rsqrt"] == 0
    norms = [op for op in g.ops if op.name in ("llm.rms_norm", "llm.add_rms_norm")]
    assert all(op.results[0].type.dtype.value == "bf16" for op in norms)
    torch.manual_seed(1)
    inputs = example()
    want = Interpreter(g0).run(inputs).outputs[0].float()
    got = Interpreter(g).run(inputs).outputs[0].float()
    scale = (want.max() - want.min()).item()
    assert (got - want).abs().max().item() <= 2e-2 * scale


# ----- the paged inference form ----------------------------------------------------------------

#: request -> tokens this step (0: one decode token): chunked prefill, a late joiner, decode.
SCHEDULE = [{0: 4, 1: 6}, {0: 3, 1: 0, 2: 5}, {0: 0, 1: 0, 2: 0}, {2: 0}]


def run_schedule(model, g, arch):
    """Run SCHEDULE through an inference-form graph; every request's last-token logits must
    match HF on the request's prefix."""
    interp = Interpreter(g)
    cache_type = g.inputs[-1].type
    cache = torch.zeros([d if isinstance(d, int) else CACHE_BLOCKS for d in cache_type.shape],
                        dtype=cache_type.dtype.torch)
    torch.manual_seed(2)
    seqs = {r: torch.randint(0, VOCAB, (12,)) for r in range(3)}
    tables = {r: torch.arange(r * 4, r * 4 + 4, dtype=torch.int32).flip(0) for r in seqs}
    done = {r: 0 for r in seqs}
    for step in SCHEDULE:
        reqs = sorted(step)
        n_new = {r: step[r] or 1 for r in reqs}
        ids = torch.cat([seqs[r][done[r]:done[r] + n_new[r]] for r in reqs])
        pos = torch.cat([torch.arange(done[r], done[r] + n_new[r]) for r in reqs])
        logits = interp.run([ids, pos, torch.tensor([n_new[r] for r in reqs], dtype=torch.int32),
                             torch.tensor([done[r] for r in reqs], dtype=torch.int32),
                             torch.stack([tables[r] for r in reqs]), cache]).outputs[0]
        for j, r in enumerate(reqs):
            done[r] += n_new[r]
            with torch.no_grad():
                want = model(seqs[r][None, :done[r]]).logits[0, -1]
            assert_close(logits[j], want, f"{arch} request {r} after {done[r]} tokens")


SUBSTITUTE = f"substitute-attention{{tokens_per_block={BLOCK_SIZE}}},canonicalize,dce"


@pytest.mark.parametrize("order", ["fusions-then-substitute", "substitute-then-fusions"])
@pytest.mark.parametrize("arch", ["llama3-gqa", "gpt2", "qwen2-mqa", "gpt-neox"])
def test_fusions_in_the_inference_form(traced, arch, order):
    model, g0 = traced(arch)
    g = copy(g0)
    if order == "fusions-then-substitute":
        run_pipeline(g, f"{FUSION_PIPELINE},{SUBSTITUTE}")
    else:
        run_pipeline(g, f"{SUBSTITUTE},{FUSION_PIPELINE}")
    verify(g)
    counts = op_counts(g)
    assert counts["llm.paged_attention"] == 2
    kv_heads = getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)
    assert g.inputs[-1].type.shape[4] == kv_heads  # the cache holds kv heads only
    assert_fused(arch, g)
    run_schedule(model, g, arch)


# ----- fuse-linear on small graphs --------------------------------------------------------------

def _products(bias_shape=(6,), weight_is_input=False):
    """x @ W.T + b (Falcon), x @ V + c (GPT-2's Conv1D), and x @ Y with Y an input."""
    from irlm import Builder, DType, Graph, TensorType, sym
    from irlm.weights import WeightStore
    g = Graph("p")
    g.declare_dim("tokens", 1, 16)
    T = sym("tokens")
    x = g.add_input(TensorType((T, 4), DType.f32), "x")
    y = g.add_input(TensorType((4, 6), DType.f32), "y")
    store = WeightStore()
    gen = torch.Generator().manual_seed(0)
    for name, shape in (("w", (6, 4)), ("b", bias_shape), ("v", (4, 6)), ("c", (6,))):
        store.add_tensor(name, torch.randn(shape, generator=gen))
    g.weights = store
    b = Builder(g)

    def param(name):
        return b.param(name, TensorType(tuple(store.entry(name).type.shape), DType.f32))
    falcon = b.op("core.add", b.op("core.matmul", x, b.op("core.transpose", param("w"),
                                                            dim0=1, dim1=0)), param("b"))
    conv1d = b.op("core.add", b.op("core.matmul", x, param("v")), param("c"))
    other = b.op("core.matmul", x, y)
    g.set_outputs([falcon, conv1d, other])
    verify(g)
    return g


def test_fuse_linear_rewrites_products_of_weights():
    g = _products()
    gen = torch.Generator().manual_seed(1)
    feeds = {"x": torch.randn(5, 4, generator=gen), "y": torch.randn(4, 6, generator=gen)}
    want = Interpreter(g).run(feeds).outputs
    run_pipeline(g, "fuse-linear,dce")
    verify(g)
    linears = [op for op in g.ops if op.name == "core.linear"]
    assert [len(op.operands) for op in linears] == [3, 3]           # bias in the GEMM
    assert [op.operands[1].producer.attrs["name"] for op in linears] == ["w", "v.T"]
    assert [op.name for op in g.ops].count("core.matmul") == 1     # x @ y: no weight
    got = Interpreter(g).run(feeds).outputs
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fuse_linear_keeps_a_bias_that_broadcasts_wider():
    g = _products(bias_shape=(1,))     # b of one entry: not a bias of the output width
    run_pipeline(g, "fuse-linear,dce")
    first = g.outputs[0].producer
    assert first.name == "core.add" and first.operands[0].producer.name == "core.linear"


def test_bloom_gelu_is_one_op_in_the_gemm_epilogue():
    """BLOOM writes gelu(tanh) as 0.5x(1 + tanh(0.79788456 x (1 + 0.044715 x x))): after the
    fusions its MLP's up projection is one llm.linear_act, and the logits stay HF's."""
    config = transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB)
    config._attn_implementation = "eager"          # transformers has no sdpa path for BLOOM
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 8)),
              "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    g0 = trace(model, inputs)
    g = copy(g0)
    run_pipeline(g, FUSION_PIPELINE)
    verify(g)
    counts = op_counts(g)
    assert counts["llm.linear_act"] == 2 and counts["core.tanh"] == 0, dict(counts)
    want = hf_logits(model, inputs)
    assert_close(Interpreter(g).run(inputs).outputs[0], want, "bloom fused")
