"""substitute-attention: the paged inference form reproduces the original model.

Oracle: the Hugging Face model run on each request's whole sequence (fp32).  The inference
form runs chunked prefill of requests with different prompt lengths, then decode steps with
requests joining and leaving; each request's last-token logits at every step must equal HF's
logits for the same prefix.
"""
import pytest
import torch
import transformers

from irlm.frontends.trace import trace
from irlm.interpreter import Interpreter
from irlm.passes import run_pipeline
from irlm.passes.llm.substitute_attention import INFERENCE_INPUTS
from irlm.verifier import verify

VOCAB, BS, BLOCKS = 96, 4, 64

CONFIGS = {
    "llama-gqa": lambda: transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                           n_positions=128),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=VOCAB),
    "mistral-sliding-window": lambda: transformers.MistralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, sliding_window=5),
    "gemma": lambda: transformers.GemmaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB),
    "phi3": lambda: transformers.Phi3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0),
    "gpt-neox-partial-rotary": lambda: transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, rotary_pct=0.5),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=128),
    "falcon-mqa": lambda: transformers.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        new_decoder_architecture=False, multi_query=True, alibi=False),
}


def build(arch):
    cfg = CONFIGS[arch]()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ex = {"input_ids": torch.randint(0, VOCAB, (2, 8)),
          "attention_mask": torch.ones(2, 8, dtype=torch.long),
          "position_ids": torch.arange(8).repeat(2, 1)}
    g = trace(model, ex)
    window = getattr(cfg, "sliding_window", None) or 0
    run_pipeline(g, f"substitute-attention{{tokens_per_block={BS},sliding_window={window}}},"
                    "canonicalize,dce")
    verify(g)
    return model, g


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_inference_form_matches_model_across_prefill_and_decode(arch):
    model, g = build(arch)
    assert [v.name for v in g.inputs] == list(INFERENCE_INPUTS)
    assert sum(op.name == "llm.paged_attention" for op in g.ops) == 2
    assert not any(op.name == "core.scaled_dot_product_attention" for op in g.ops)
    interp = Interpreter(g)
    kv_heads = g.inputs[-1].type.shape[4]
    cfg = model.config
    # the cache holds the model's own kv heads: repeat_kv (GQA) and Falcon's broadcast of its
    # one multi-query head were removed, not stored
    want = 1 if getattr(cfg, "multi_query", False) else \
        getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    assert kv_heads == want
    cache = torch.zeros([d if isinstance(d, int) else BLOCKS for d in g.inputs[-1].type.shape])
    torch.manual_seed(1)
    seqs = {r: torch.randint(0, VOCAB, (20,)) for r in range(4)}
    tables = {r: torch.arange(r * 5, r * 5 + 5, dtype=torch.int32).flip(0) for r in seqs}
    done = {r: 0 for r in seqs}
    # request -> tokens this step: chunked prefill, requests 1 and 3 join late, 1 leaves early
    schedule = [{0: 5, 2: 7}, {0: 4, 1: 4, 2: 5}, {0: 0, 1: 0, 2: 0, 3: 6}, {2: 0, 3: 0},
                {3: 0}]
    checked = 0
    for step in schedule:
        reqs = sorted(step)
        n_new = {r: step[r] or 1 for r in reqs}       # 0 means: one decode token
        ids = torch.cat([seqs[r][done[r]:done[r] + n_new[r]] for r in reqs])
        pos = torch.cat([torch.arange(done[r], done[r] + n_new[r]) for r in reqs])
        logits = interp.run([ids, pos, torch.tensor([n_new[r] for r in reqs], dtype=torch.int32),
                             torch.tensor([done[r] for r in reqs], dtype=torch.int32),
                             torch.stack([tables[r] for r in reqs]), cache]).outputs[0]
        for j, r in enumerate(reqs):
            done[r] += n_new[r]
            with torch.no_grad():
                want = model(seqs[r][None, :done[r]]).logits[0, -1]
            scale = (want.max() - want.min()).item()
            assert (logits[j] - want).abs().max().item() <= 1e-4 * scale, (arch, step, r)
            checked += 1
    assert checked == 12
