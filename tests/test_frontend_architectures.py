"""Hugging Face architectures traced end to end and checked against transformers.

Each architecture is built from its config class with a tiny config (2 layers, hidden 64,
4 heads / 2 KV heads where the architecture has them, vocab 128) and seeded random fp32
weights.  The test traces it with symbolic batch and seq on example inputs of shape [3, 8],
verifies the graph, prints it and parses it back, then runs the reference interpreter on a
different batch: 2 prompts of lengths 11 and 6, right-padded to 11 with an attention mask,
in one call.  Its logits (encoders: last hidden states) must equal transformers' output.

Tolerance: max |irlm - HF| <= 1e-4 * (max(HF) - min(HF)) over every position, padded ones
included.  Both sides run the same fp32 CPU kernels op for op, so the differences seen are
rounding-order effects around 1e-7 of the range (often exactly 0); the bound leaves room
for fused-vs-unfused kernels (addmm, baddbmm) while still catching any real mapping error,
which moves logits by a sizeable fraction of their range.
"""
import pytest
import torch

from irlm.frontends import trace
from irlm.interpreter import run_graph
from irlm.verifier import verify

transformers = pytest.importorskip("transformers")

H, LAYERS, HEADS, KV_HEADS, VOCAB, FFN = 64, 2, 4, 2, 128, 128
TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DECODER = dict(hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, **TOKENS)

# name: (config class, model class, config arguments)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", DECODER),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(DECODER, sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DECODER),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(DECODER, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", DECODER),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=256, **TOKENS)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, **TOKENS)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(n_embd=H, n_layer=LAYERS, n_head=HEADS, rotary_dim=8, n_positions=256,
                  **TOKENS)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=H, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 word_embed_proj_dim=H, **TOKENS)),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(hidden_size=H, n_layer=LAYERS, n_head=HEADS, **TOKENS)),
    "falcon": ("FalconConfig", "FalconForCausalLM",  # multi-query attention, rotary
               dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    **TOKENS)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "bert": ("BertConfig", "BertModel",
             dict(hidden_size=H, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, vocab_size=VOCAB, pad_token_id=0)),
}

# (architecture, attention implementation, experts implementation).  GPT-J and BLOOM have no
# sdpa path in transformers; the eager cases cover the ATen ops of explicit attention
# (matmul, softmax with dtype, where/masked_fill, baddbmm).  Mixtral's default experts path
# (grouped_mm: sort, histc, cumsum, scatter, grouped matmul) and its batched_mm path (gather of
# expert weights, bmm) are both traced with symbolic shapes.
CASES = [
    ("llama", "sdpa", None), ("llama", "eager", None),
    ("mistral", "sdpa", None), ("qwen2", "sdpa", None), ("gemma", "sdpa", None),
    ("phi3", "sdpa", None), ("gpt2", "sdpa", None), ("gpt2", "eager", None),
    ("gpt_neox", "sdpa", None), ("gptj", "eager", None), ("opt", "sdpa", None),
    ("bloom", "eager", None), ("falcon", "sdpa", None), ("falcon", "eager", None),
    ("mixtral", "sdpa", "grouped_mm"), ("mixtral", "sdpa", "batched_mm"),
    ("bert", "sdpa", None), ("bert", "eager", None),
]


def build(name: str, attn: str, experts):
    config_cls, model_cls, kwargs = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = attn
    if experts is not None:
        config._experts_implementation = experts
    return getattr(transformers, model_cls)(config).eval()


def reference(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False) \
            if "use_cache" in model.forward.__code__.co_varnames else \
            model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def padded_prompts():
    """Two prompts of lengths 11 and 6, right-padded to 11."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.int64)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("name,attn,experts", CASES,
                         ids=[f"{n}-{a}" + (f"-{e}" if e else "") for n, a, e in CASES])
def test_architecture_matches_transformers(name, attn, experts):
    model = build(name, attn, experts)
    example = {"input_ids": torch.randint(3, VOCAB, (3, 8)),
               "attention_mask": torch.ones(3, 8, dtype=torch.int64)}
    g = trace(model, example)
    verify(g)
    assert [v.name for v in g.inputs] == ["input_ids", "attention_mask"]
    assert set(g.dims) == {"batch", "seq"}
    if experts == "grouped_mm":  # routing with symbolic shapes, not a data-dependent loop
        assert {"core.topk", "core.sort", "core.histc", "core.grouped_mm",
                "core.scatter"} <= {op.name for op in g.ops}

    parser = pytest.importorskip("irlm.text.parser")
    text = str(g)
    reparsed = parser.parse_graph(text, f"{name}.irlm", weights=g.weights)
    verify(reparsed)
    assert str(reparsed) == text

    ids, mask = padded_prompts()
    want = reference(model, ids, mask)
    got = run_graph(g, {"input_ids": ids, "attention_mask": mask}).outputs[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(want).all()
    diff = (got - want).abs().max().item()
    span = (want.max() - want.min()).item()
    assert diff <= 1e-4 * span, f"{name}/{attn}: max |diff| {diff:.3g} vs range {span:.3g}"

