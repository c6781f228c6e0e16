"""tp-split + the multi-rank simulator: every rank's logits equal the unsplit graph's.

Tiny seeded HF models (Llama with GQA, Qwen2 with a QKV bias and one kv head, Mistral with a
sliding window) are compiled at -O2 (fused QKV, gate|up, paged attention), split N ways, and run
with :func:`irlm.runtime.distributed.run_ranks` over a prefill step of two requests and a decode step,
each rank with its own KV cache of its kv heads.
"""
import pytest
import torch
import transformers

from irlm.compilation import compile_causal_lm
from irlm.runtime.distributed.simulator import CollectiveMismatch, DistributedError, run_ranks
from irlm.errors import IRError, IRLMError
from irlm.interpreter import Interpreter
from irlm.text.parser import parse_graph
from irlm.passes import run_pipeline
from irlm.passes.parallel.tp_split import split_for_tensor_parallel
from irlm.text.printer import print_graph
from irlm.verifier import verify

VOCAB, BLOCKS = 64, 16

CONFIGS = {
    "llama-gqa": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "qwen2-mqa-bias": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64),
    "mistral-sliding-window": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=3),
    # biases on every projection (row-parallel ones too), query scaled by a constant before
    # the reshape, a non-gated MLP fused as llm.linear_act (relu), LM head tied to the embedding
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
        num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64),
    # Conv1D projections (matmul by a [in, out] weight + bias add), a reshape between the QKV
    # projection and its split, linear_act (gelu_tanh) over a transposed c_fc weight
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    # the LM head reads the embedding's table (SmolLM2, Gemma): one vocab shard serves both
    "llama-tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True),
}
_cache = {}


def compiled(arch, level="2"):
    if (arch, level) not in _cache:
        cfg = CONFIGS[arch]()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        _cache[arch, level] = compile_causal_lm(model, level=level, max_seq=64,
                                                tokens_per_block=4)
    return _cache[arch, level]


def new_cache(g):
    return torch.zeros([d if isinstance(d, int) else BLOCKS for d in g.inputs[-1].type.shape])


def steps():
    """Prefill of two requests (5 and 3 tokens), then one decode token each."""
    torch.manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (6,)), torch.randint(0, VOCAB, (4,))]
    tables = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    prefill = [torch.cat([seqs[0][:5], seqs[1][:3]]), torch.cat([torch.arange(5), torch.arange(3)]),
               i32([5, 3]), i32([0, 0]), tables]
    decode = [torch.stack([seqs[0][5], seqs[1][3]]), torch.tensor([5, 3]), i32([1, 1]),
              i32([5, 3]), tables]
    return [prefill, decode]


def token_embedding_tables(g):
    """The tables of the embeddings that look up the token ids (graph input 0)."""
    found = []
    for op in g.ops:
        if op.name == "core.embedding":
            ids = op.operands[1]
            while ids.producer is not None and ids.producer.name in (
                    "core.reshape", "core.sub", "core.maximum", "core.minimum"):
                ids = ids.producer.operands[0]
            if ids is g.inputs[0]:
                found.append(op.operands[0])
    return found


def check_split(g, n):
    ranks = split_for_tensor_parallel(g, n)
    assert len(ranks) == n
    ref = Interpreter(g)
    ref_cache = new_cache(g)
    caches = [new_cache(r) for r in ranks]
    for step in steps():
        want = ref.run(step + [ref_cache]).outputs[0]
        outs = run_ranks(ranks, [step + [c] for c in caches])
        scale = (want.max() - want.min()).item()
        for r, (got,) in enumerate(outs):
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-4 * scale, (n, r)
    return ranks


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("n", [2, 4])
def test_ranks_match_unsplit_prefill_and_decode(arch, n):
    g = compiled(arch)
    kv = g.inputs[-1].type.shape[4]
    ranks = check_split(g, n)
    for rg in ranks:
        # the KV cache holds the rank's kv heads (replicated when there are fewer than n)
        assert rg.inputs[-1].type.shape[4] == max(kv // n, 1)
        names = [op.name for op in rg.ops]
        # o_proj and down_proj per layer, and the vocab-parallel embedding
        assert names.count("dist.all_reduce") == 2 * 2 + 1
        assert names.count("dist.all_gather") == 1       # vocab-parallel LM head
        (table,) = token_embedding_tables(rg)
        assert table.type.shape[0] == VOCAB // n          # the rank holds V/N rows


def test_plan_is_in_the_dump_and_round_trips():
    g = compiled("llama-gqa")
    before = print_graph(g)
    ranks = split_for_tensor_parallel(g, 2)
    assert print_graph(g) == before  # the input graph is left unchanged
    for r, rg in enumerate(ranks):
        verify(rg)
        text = print_graph(rg)
        back = parse_graph(text, weights=rg.weights)
        verify(back)
        assert print_graph(back) == text
        qkv = f"q{2 * r}:{2 * r + 2},k{r}:{r + 1},v{r}:{r + 1}"
        assert f"q_proj+k_proj+v_proj.weight#tp2.r{r}[{qkv}]" in text
        assert f"gate_proj+up_proj.weight#tp2.r{r}[gate{24 * r}:{24 * r + 24},up{24 * r}:" in text
        assert "row-parallel model.layers.0.self_attn.o_proj" in text
        assert "row-parallel model.layers.1.mlp.down_proj" in text
        assert f"vocab-parallel lm_head: logits {32 * r}:{32 * r + 32} of 64" in text
        assert f'param "model.embed_tokens.weight#tp2.r{r}[vocab{32 * r}:{32 * r + 32}]" : ' \
               f'tensor<32x32xf32>' in text
        assert f"vocab-parallel model.embed_tokens: rows {32 * r}:{32 * r + 32} of 64 on " \
               f"rank {r}, other ids zeroed, summed over 2 ranks" in text
    # the parsed-back graphs run too
    outs = run_ranks([parse_graph(print_graph(rg), weights=rg.weights) for rg in ranks],
                     [steps()[0] + [new_cache(rg)] for rg in ranks])
    want = Interpreter(g).run(steps()[0] + [new_cache(g)]).outputs[0]
    torch.testing.assert_close(outs[1][0], want, rtol=0, atol=1e-4 * float(want.max() - want.min()))


def test_pipeline_string_builds_each_rank():
    g = compiled("llama-gqa")
    ranks = split_for_tensor_parallel(g, 2)
    for r in range(2):
        h = parse_graph(print_graph(g), weights=g.weights)
        run_pipeline(h, f"tp-split{{size=2,rank={r}}}")
        assert print_graph(h) == print_graph(ranks[r])


@pytest.mark.parametrize("n, what", [(3, "4 query heads are not divisible by tp size 3"),
                                     (8, "4 query heads are not divisible by tp size 8")])
def test_indivisible_heads_are_refused(n, what):
    g = compiled("llama-gqa")
    with pytest.raises(IRError, match="llm.paged_attention.*" + what):
        split_for_tensor_parallel(g, n)


@pytest.mark.parametrize("make, mlp_op", [
    (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=50, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
     "llm.gated_act"),
    (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=50, num_hidden_layers=1,
        num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)),
     "llm.linear_act"),
], ids=["gated", "non-gated"])
def test_indivisible_intermediate_is_refused(make, mlp_op):
    torch.manual_seed(0)
    g = compile_causal_lm(make().eval(), level="2", max_seq=64)
    with pytest.raises(IRError, match=f"{mlp_op}.*intermediate size 50 is not divisible by "
                                      f"tp size 4"):
        split_for_tensor_parallel(g, 4)


def test_unfused_graph_is_refused():
    g = compiled("llama-gqa")
    h = parse_graph(print_graph(g), weights=g.weights)
    # give a query head an unrecognized use: the split cannot be proven
    att = next(op for op in h.ops if op.name == "llm.paged_attention")
    from irlm.builder import make_op
    neg = make_op("core.neg", [att.operands[0]])
    h.insert_after(att.operands[0].producer, neg)
    h.set_outputs(h.outputs + [neg.results[0]])
    with pytest.raises(IRError, match="core.neg.*unrecognized use of the query heads"):
        split_for_tensor_parallel(h, 2)


def test_simulator_collectives_and_errors():
    from irlm.builder import Builder
    from irlm.ir import Graph
    from irlm.types import DType, TensorType

    def graph(kind, **attrs):
        g = Graph()
        x = g.add_input(TensorType((2, 3), DType.f32), "x")
        g.set_outputs([Builder(g).op(kind, x, **attrs)])
        return g

    xs = [[torch.full((2, 3), float(r + 1))] for r in range(3)]
    out = run_ranks([graph("dist.all_reduce", group_size=3)] * 3, xs)
    assert all(torch.equal(o[0], torch.full((2, 3), 6.0)) for o in out)
    out = run_ranks([graph("dist.all_gather", axis=1, group_size=3)] * 3, xs)
    assert out[2][0].shape == (2, 9) and out[0][0][0].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    with pytest.raises(CollectiveMismatch, match="disagree"):
        run_ranks([graph("dist.all_reduce", group_size=2),
                   graph("dist.all_gather", axis=0, group_size=2)], xs[:2])
    with pytest.raises(DistributedError, match="rank 1"):
        run_ranks([graph("dist.all_reduce", group_size=2)] * 2,
                  [xs[0], [torch.zeros(2, 2)]])  # rank 1 has the wrong input shape
    with pytest.raises(IRError, match="needs the other ranks"):
        Interpreter(graph("dist.all_reduce", group_size=2)).run(xs[0])


def test_kv_heads_that_neither_divide_nor_are_divisible_are_refused():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=12,
                                   num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    g = compile_causal_lm(transformers.LlamaForCausalLM(cfg).eval(), level="2", max_seq=64)
    with pytest.raises(IRError, match="4 kv heads neither divide nor are divisible by tp size 6"):
        split_for_tensor_parallel(g, 6)


def test_split_graph_is_not_split_again():
    g = compiled("llama-gqa")
    rank0 = split_for_tensor_parallel(g, 2)[0]
    with pytest.raises(IRError, match="already split"):
        split_for_tensor_parallel(rank0, 2)


def test_pass_statistics():
    from irlm.passes.parallel.tp_split import split_rank
    from irlm.passes.context import Statistics
    g = compiled("llama-gqa")
    h = parse_graph(print_graph(g), weights=g.weights)
    stats = Statistics()
    split_rank(h, 2, 1, stats)
    # per layer: qkv, o, gate|up, down; plus the LM head and the embedding
    assert stats.counters["weights sharded"] == 2 * 4 + 2
    assert stats.counters["dist.all_reduce inserted"] == 2 * 2 + 1
    assert stats.counters["dist.all_gather inserted"] == 1


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-mqa-bias", "opt", "gpt2"])
def test_pipeline_stages_match_unsplit(arch):
    from irlm.passes.parallel.pp_split import split_for_pipeline
    g = compiled(arch)
    stages = split_for_pipeline(g, 2)
    for st in stages:
        verify(st)
        text = print_graph(st)
        assert print_graph(parse_graph(text, weights=st.weights)) == text
        assert st.inputs[-1].type.shape[0] == 1          # the stage's layers only
        assert sum(op.name == "llm.paged_attention" for op in st.ops) == 1
    assert any(op.name == "dist.send" for op in stages[0].ops)
    assert any(op.name == "dist.recv" for op in stages[1].ops)
    ref, ref_cache = Interpreter(g), new_cache(g)
    caches = [new_cache(st) for st in stages]
    for step in steps():
        want = ref.run(step + [ref_cache]).outputs[0]
        outs = run_ranks(stages, [step + [c] for c in caches])
        torch.testing.assert_close(outs[-1][0], want, rtol=0, atol=0)


def test_pipeline_needs_equal_stages():
    from irlm.passes.parallel.pp_split import split_for_pipeline
    with pytest.raises(IRError, match="2 layers cannot be cut into 3 equal stages"):
        split_for_pipeline(compiled("llama-gqa"), 3)


def test_opt_and_gpt2_plan_in_the_dump():
    """Row-parallel projections with a bias: the partial sums are reduced without it, then the
    bias is added once; fc1 of the non-gated MLP is column-parallel with its bias sliced."""
    text = print_graph(split_for_tensor_parallel(compiled("opt"), 2)[1])
    assert "model.decoder.layers.0.fc1.weight#tp2.r1[rows24:48]" in text
    assert "model.decoder.layers.0.fc1.bias#tp2.r1[rows24:48]" in text
    assert "row-parallel model.decoder.layers.1.fc2: in-features 24:48 of 48 on rank 1, " \
           "partial sums added over 2 ranks, then the bias (replicated)" in text
    assert '= param "model.decoder.layers.0.fc2.bias" : tensor<32xf32>' in text  # not sliced
    rank = parse_graph(text, weights=compiled("opt").weights)
    for op in rank.ops:
        if op.name == "dist.all_reduce" and op.attrs["plan"].startswith("row-parallel"):
            linear, (use,) = op.operands[0].producer, op.results[0].uses
            assert len(linear.operands) == 2                   # reduced without the bias
            assert use.op.name == "core.add" and use.op.operands[1].producer.name == "param"
    gpt2 = print_graph(split_for_tensor_parallel(compiled("gpt2"), 2)[0])
    assert "core.matmul" not in gpt2  # Conv1D became core.linear over a transposed weight
    assert "transformer.h.0.attn.c_attn.weight.T#tp2.r0[q0:2,k0:2,v0:2]" in gpt2
    assert "transformer.h.0.mlp.c_proj.weight.T#tp2.r0[cols0:64]" in gpt2




def test_refused_gpt2_split_leaves_the_graph_unchanged():
    """The pass rewrites Conv1D matmuls before planning (at -O1; -O2's fuse-linear already
    has); a refusal must undo nothing."""
    g = compiled("gpt2", level="1")
    assert any(op.name == "core.matmul" for op in g.ops)
    h = parse_graph(print_graph(g), weights=g.weights)
    with pytest.raises(IRLMError, match=r"llm.paged_attention \(%\d+\) at transformer.h.0.attn.*"
                                        "4 query heads are not divisible by tp size 3"):
        run_pipeline(h, "tp-split{size=3,rank=0}")
    assert print_graph(h) == print_graph(g)


def test_row_parallel_bias_that_is_not_a_weight_is_refused():
    g = compiled("opt")
    h = parse_graph(print_graph(g), weights=g.weights)
    fc2 = next(op for op in h.ops if op.name == "core.linear" and
               op.loc.module == "model.decoder.layers.0.fc2")
    from irlm.builder import make_op
    neg = make_op("core.neg", [fc2.operands[2]])   # a computed bias: no weight to keep
    h.insert_before(fc2, neg)
    fc2.set_operand(2, neg.results[0])
    with pytest.raises(IRError, match="core.linear.*the bias is not a weight"):
        split_for_tensor_parallel(h, 2)


def run_stages(g, stages):
    """Prefill + decode through the stages; the last stage's logits against the unsplit
    graph's (bit-identical: every stage runs the same ops on the same values)."""
    ref, ref_cache = Interpreter(g), new_cache(g)
    caches = [new_cache(st) for st in stages]
    for step in steps():
        want = ref.run(step + [ref_cache]).outputs[0]
        outs = run_ranks(stages, [step + [c] for c in caches])
        torch.testing.assert_close(outs[-1][0], want, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama-gqa", "opt", "gpt2"])
def test_pp_split_pass_builds_each_stage(arch):
    from irlm.passes.parallel.pp_split import split_for_pipeline
    g = compiled(arch)
    want = split_for_pipeline(parse_graph(print_graph(g), weights=g.weights), 2)
    built = []
    for s in range(2):
        h = parse_graph(print_graph(g), weights=g.weights)
        run_pipeline(h, f"pp-split{{stages=2,stage={s}}}")
        verify(h)
        assert print_graph(h) == print_graph(want[s])
        built.append(h)
    run_stages(g, built)


def test_pp_split_four_stages_middle_stages_send_and_receive():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    g = compile_causal_lm(transformers.LlamaForCausalLM(cfg).eval(), level="2", max_seq=64,
                          tokens_per_block=4)
    stages = []
    for s in range(4):
        h = parse_graph(print_graph(g), weights=g.weights)
        run_pipeline(h, f"pp-split{{stages=4,stage={s}}}")
        names = [op.name for op in h.ops]
        assert ("dist.recv" in names) == (s > 0) and ("dist.send" in names) == (s < 3)
        assert [op.attrs["layer"] for op in h.ops if op.name == "llm.paged_attention"] == [0]
        stages.append(h)
    run_stages(g, stages)


@pytest.mark.parametrize("pipeline, what", [
    ("pp-split{stages=3,stage=0}", "stages=3: 2 layers cannot be cut into 3 equal stages"),
    ("pp-split{stages=2,stage=2}", "stage=2 is not a stage of 2"),
    ("pp-split{stages=0,stage=0}", "stages=0: must be at least 1"),
    ("pp-split{stages=2,stage=0},pp-split{stages=2,stage=0}", "already split"),
    ("tp-split{size=2,rank=0},pp-split{stages=2,stage=1}", "already split"),
])
def test_pp_split_refusals(pipeline, what):
    g = compiled("llama-gqa")
    h = parse_graph(print_graph(g), weights=g.weights)
    with pytest.raises(IRLMError, match="pp-split.*" + what):
        run_pipeline(h, pipeline)


def test_unfused_mlp_linear_then_activation():
    """fc1 as core.linear + core.relu (the MLP below -O2's linear_act fusion) splits like
    linear_act: fc1 column-parallel through the elementwise activation, fc2 row-parallel."""
    from irlm.builder import make_op
    g = compiled("opt")
    h = parse_graph(print_graph(g), weights=g.weights)
    for la in [op for op in h.ops if op.name == "llm.linear_act"]:
        lin = make_op("core.linear", la.operands, {}, la.loc)
        act = make_op("core.relu", [lin.results[0]], {}, la.loc)
        h.insert_before(la, lin)
        h.insert_before(la, act)
        for u in list(la.results[0].uses):
            u.op.set_operand(u.index, act.results[0])
        h.erase(la)
    verify(h)
    ranks = check_split(h, 2)
    text = print_graph(ranks[0])
    assert "llm.linear_act" not in text
    assert "model.decoder.layers.1.fc1.weight#tp2.r0[rows0:24]" in text
    assert "row-parallel model.decoder.layers.1.fc2" in text


@pytest.mark.parametrize("arch", ["llama-tied", "opt", "gpt2"])
def test_tied_embedding_and_lm_head_read_one_vocab_shard(arch):
    """A tied table is sliced once per rank: the embedding and the LM head read the same
    shard param, of V/N rows; the position tables (OPT, GPT-2) stay whole."""
    g = compiled(arch)
    for r, rg in enumerate(split_for_tensor_parallel(g, 4)):
        (table,) = token_embedding_tables(rg)
        head = rg.outputs[0].producer.operands[0].producer
        assert head.name == "core.linear" and head.operands[1] is table
        assert table.type.shape[0] == VOCAB // 4
        assert table.producer.attrs["name"].endswith(f"#tp4.r{r}[vocab{16 * r}:{16 * r + 16}]")
        others = [op.operands[0] for op in rg.ops if op.name == "core.embedding"
                  and op.operands[0] is not table]
        assert all("#tp" not in t.producer.attrs["name"] for t in others)
        assert len(others) == (0 if arch == "llama-tied" else 1)


def test_indivisible_vocab_keeps_embedding_and_lm_head_replicated():
    cfg = transformers.LlamaConfig(vocab_size=66, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    g = compile_causal_lm(transformers.LlamaForCausalLM(cfg).eval(), level="2", max_seq=64,
                          tokens_per_block=4)
    for rg in split_for_tensor_parallel(g, 4):
        names = [op.name for op in rg.ops]
        assert names.count("dist.all_reduce") == 2 and "dist.all_gather" not in names
        (table,) = token_embedding_tables(rg)
        assert table.producer.attrs["name"] == "model.embed_tokens.weight"
        assert table.type.shape[0] == 66
