"""Explicit (eager) attention becomes paged attention: BLOOM's ALiBi, GQA Llama, Mistral's
sliding window (passes/llm/eager_attention.py through substitute-attention); and GPT-J's
interleaved rotary in the paged form.

Oracle: transformers on the whole sequence of each request.  The compiled inference form
runs packed steps (two requests prefilled together, then decode steps, a third request
joining) on the reference interpreter's runner and on the CPU engine runner; every request's
last-token logits must equal HF's within 1e-4 of their range (fp32 on both sides; the
frontend tests' bound).  BLOOM's slopes must be the ones transformers builds.  A mask the
rewrite cannot express is refused with the op's location.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from irlm.compilation import compile_causal_lm  # noqa: E402
from irlm.errors import IRLMError  # noqa: E402
from irlm.runtime.model_runner import StepBatch  # noqa: E402

VOCAB = 128

CONFIGS = {
    # 6 heads: ALiBi slopes of a head count that is not a power of two (two slope series)
    "bloom": lambda: transformers.BloomConfig(hidden_size=96, n_layer=2, n_head=6,
                                              vocab_size=VOCAB),
    "llama-gqa": lambda: transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB),
    "mistral-window": lambda: transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, sliding_window=5),
    # not explicit attention (its sdpa path), but the other architecture that did not reach
    # the paged form before: interleaved partial rotary read from a position table
    "gptj-sdpa": lambda: transformers.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                                 n_positions=64, vocab_size=VOCAB,
                                                 bos_token_id=1, eos_token_id=2),
}


def build(arch):
    cfg = CONFIGS[arch]()
    cfg._attn_implementation = "sdpa" if arch.endswith("-sdpa") else "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


_compiled: dict = {}


def compiled(arch):
    """(HF model, its inference form), built once for both runners."""
    if arch not in _compiled:
        model = build(arch)
        _compiled[arch] = model, compile_causal_lm(model, max_seq=64, tokens_per_block=4)
    return _compiled[arch]


def runner(kind, graph):
    if kind == "interpreter":
        from irlm.runtime.runners.interpreter import GraphRunner
        return GraphRunner(graph, num_blocks=16)
    from irlm.runtime.runners.cpu import CpuGraphRunner
    # f32 linears: this checks the attention rewrite at 1e-4, not the f16 weights the CPU
    # executor defaults to where the CPU lacks bf16 (tests/test_cpu_runner.py covers those)
    return CpuGraphRunner(graph, num_blocks=16, linear_dtype="f32")


@pytest.mark.parametrize("kind", ["interpreter", "cpu"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_eager_attention_engine_matches_transformers(arch, kind):
    model, graph = compiled(arch)
    assert not any(op.name == "core.softmax" for op in graph.ops)   # every attention paged
    paged = [op for op in graph.ops if op.name == "llm.paged_attention"]
    assert len(paged) == 2
    assert [v.name for v in graph.inputs][:2] == ["input_ids", "position_ids"]
    if arch == "bloom":
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor
        alibi = build_alibi_tensor(torch.ones(1, 2), 6, torch.float32)   # slope * position
        want = alibi[:, 0, 1].tolist()
        for op in paged:
            assert op.attrs["alibi_slopes"] == pytest.approx(want, rel=1e-6)
    else:
        assert all(not op.attrs["alibi_slopes"] for op in paged)
    run = runner(kind, graph)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (24,), generator=g) for _ in range(3)]
    tables = [[0, 1, 2, 3], [11, 10, 9, 8], [12, 13, 14, 15]]      # 4 blocks of 4 tokens
    done = [0, 0, 0]
    schedule = [{0: 9, 1: 4}, {0: 1, 1: 1}, {0: 1, 1: 1, 2: 11}, {0: 1, 1: 1, 2: 1},
                {0: 3, 2: 1}]
    for step in schedule:
        reqs = sorted(step)
        batch = StepBatch.pack(reqs, [seqs[r][done[r]:done[r] + step[r]].tolist() for r in reqs],
                               [done[r] for r in reqs], [tables[r] for r in reqs])
        logits = run.step(batch)
        for j, r in enumerate(reqs):
            done[r] += step[r]
            with torch.no_grad():
                want = model(seqs[r][None, :done[r]]).logits[0, -1]
            diff = (logits[j] - want).abs().max().item()
            span = (want.max() - want.min()).item()
            assert diff <= 1e-4 * span, (arch, kind, step, r, diff, span)


@pytest.mark.slow
def test_bloom_compiles_to_an_engine(tmp_path):
    """irlm.compile's trace (BLOOM's forward takes no position_ids) and engine files."""
    import irlm
    from irlm.compilation import CompileConfig
    result = irlm.compile(build("bloom"), CompileConfig(output=tmp_path / "bloom", max_seq=64))
    assert result.engine_written
    assert sum(op.name == "llm.paged_attention" for op in result.graph.ops) == 2


def test_mask_the_rewrite_cannot_express_is_refused():
    """Mistral's eager mask hides keys 5 positions back; told there is no window,
    substitute-attention refuses rather than attending to them."""
    from irlm.frontends import trace
    from irlm.passes import run_pipeline
    from irlm.compilation import inference_example_inputs
    g = trace(build("mistral-window"), inference_example_inputs(VOCAB),
              dims={"batch": (1, 4), "seq": (1, 64)})
    with pytest.raises(IRLMError) as e:
        run_pipeline(g, "canonicalize,cse,substitute-attention{sliding_window=0}")
    msg = str(e.value)
    assert "model.layers.0.self_attn" in msg and "keys outside" not in msg
    assert "sliding window" in msg
