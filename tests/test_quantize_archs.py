"""Quantization numerics on five architectures in the paged inference form (-O2, what
``irlm compile`` builds): Llama with GQA, OPT (biases, layer norm, ReLU MLP), Qwen2 (MQA,
q/k/v biases), and two whose projections are written as products (fuse-linear): Falcon
(``x @ W.T + b``, multi-query, attention and MLP in parallel off one norm) and GPT-2
(Conv1D ``x @ W + b``).

Oracle: the same unquantized graph, run by the reference interpreter on the same steps:
a prefill of two requests of different lengths, then decode steps in which the requests
read back what the prefill (and the earlier steps) wrote to the KV cache, so KV-cache
quantization is exercised on both sides of the cache.  Each step's logits are compared
(relative L2 error over all rows and steps) and the argmax agreement is counted.

Bounds are about twice what these seeded models measure (printed by ``-s``), so a change
that makes a mode clearly worse fails; the modes are also ordered against each other where
that is what the method promises (int8 closer than int4, W8A8 with SmoothQuant close to
weight-only int8).
"""
from __future__ import annotations

import pytest
import torch
import transformers

from irlm.compilation import compile_causal_lm
from irlm.interpreter import Interpreter
from irlm.text.parser import parse_graph
from irlm.passes import run_pipeline
from irlm.text.printer import print_graph
from irlm.verifier import verify

VOCAB, BS = 96, 4

CONFIGS = {
    "llama-gqa": lambda: transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=64),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64),
    "falcon": lambda: transformers.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        new_decoder_architecture=False, multi_query=True, alibi=False, bias=True,
        max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
        bos_token_id=0, eos_token_id=0),
}
#: quantized linears a layer: qkv, o, the MLP's up (gate|up) and down; Falcon's parallel
#: attention and MLP read one norm, so fuse-qkv joins qkv with the MLP's up projection
LINEARS_PER_LAYER = {"falcon": 3}

# mode -> (pipeline, bound on the relative logit error, minimum argmax agreement)
MODES = {
    "int8": ("quantize{{mode=int8}}", 0.015, 0.85),
    "int4": ("quantize{{mode=int4,group=32}}", 0.2, 0.75),
    "int4-awq": ('quantize{{mode=int4-awq,group=32,calib="{calib}"}}', 0.2, 0.75),
    "w8a8-sq": ('quantize{{mode=w8a8-sq,calib="{calib}"}}', 0.02, 0.85),
    "fp8": ('quantize{{mode=fp8,calib="{calib}"}}', 0.08, 0.75),
    "kv-int8": ('quantize-kv-cache{{dtype=int8,calib="{calib}"}}', 0.01, 0.85),
    "kv-fp8": ('quantize-kv-cache{{dtype=fp8,calib="{calib}"}}', 0.05, 0.85),
}

_compiled: dict = {}


@pytest.fixture(scope="module")
def calib(random_calibration):
    return random_calibration(VOCAB, prompts=6, length=20, seed=7)


def compiled(arch):
    if arch not in _compiled:
        cfg = CONFIGS[arch]()
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        g = compile_causal_lm(model, level="2", max_seq=64, tokens_per_block=BS)
        _compiled[arch] = (print_graph(g), g.weights, _run_steps(g))
    return _compiled[arch]


def _run_steps(g, feed_tokens=None):
    """Prefill requests of 7 and 5 tokens, then 3 decode steps.  Decode inputs are the
    unquantized run's greedy tokens (``feed_tokens``), so both runs see the same sequences.
    Returns (logits per step, tokens fed)."""
    by_name = {v.name: v for v in g.inputs}
    cache_t = by_name["kv_cache"].type
    shape = [8 if not isinstance(d, int) else d for d in cache_t.shape]
    cache = torch.zeros(shape, dtype=cache_t.dtype.torch)
    interp = Interpreter(g)
    tables = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (7,), generator=gen),
               torch.randint(0, VOCAB, (5,), generator=gen)]
    i32 = torch.int32

    def step(ids, pos, q_lens, cached):
        feed = dict(input_ids=ids, position_ids=pos, q_lens=torch.tensor(q_lens, dtype=i32),
                    cached_lens=torch.tensor(cached, dtype=i32), block_tables=tables,
                    kv_cache=cache)
        return interp.run([feed[v.name].to(v.type.dtype.torch) if v.name != "kv_cache"
                           else cache for v in g.inputs]).outputs[0]

    outs = [step(torch.cat(prompts), torch.cat([torch.arange(7), torch.arange(5)]),
                 [7, 5], [0, 0])]
    fed = []
    lens = [7, 5]
    for i in range(3):
        tok = outs[-1].argmax(-1) if feed_tokens is None else feed_tokens[i]
        fed.append(tok)
        outs.append(step(tok, torch.tensor(lens), [1, 1], lens))
        lens = [n + 1 for n in lens]
    return torch.cat(outs), fed


def quantized_error(arch, mode, calib):
    text, weights, (ref, fed) = compiled(arch)
    g = parse_graph(text, weights=weights)
    report = run_pipeline(g, MODES[mode][0].format(calib=calib) + ",dce")
    verify(g)
    out, _ = _run_steps(g, fed)
    err = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return g, report, err, agree


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_quantized_inference_form_close_to_unquantized(arch, mode, calib):
    g, report, err, agree = quantized_error(arch, mode, calib)
    _, bound, min_agree = MODES[mode]
    print(f"{arch} {mode}: logit rel. error {err:.4f}, argmax agreement {agree:.0%}")
    names = [op.name for op in g.ops]
    if mode.startswith("kv-"):
        cache = next(v for v in g.inputs if v.name == "kv_cache")
        assert cache.type.dtype.value == ("i8" if mode == "kv-int8" else "f8e4m3")
        assert all(len(op.attrs["kv_scales"]) == 2 for op in g.ops
                   if op.name == "llm.paged_attention")
    else:
        stats = report.stages[0].stats.counters
        n = stats["linears quantized"]
        assert n == 2 * LINEARS_PER_LAYER.get(arch, 4)
        # only the LM head still multiplies by a float param
        float_linears = [op for op in g.ops if op.name in ("core.linear", "llm.linear_act")]
        assert len(float_linears) == 1 and stats["linears skipped (lm_head)"] == 1
        fused = names.count("quant.linear") + names.count("quant.linear_a8")
        assert fused == n, names     # every quantized linear ended in one fused op
        if mode in ("w8a8-sq", "fp8"):
            assert names.count("quant.linear_a8") == n
    assert err < bound, (arch, mode, err)
    assert agree >= min_agree, (arch, mode, agree)
