"""In-flight batching, chunked prefill, preemption and prefix reuse, proven against oracles.

The runner is ReferenceRunner: its attention reads every cached key and value through the
block tables the runtime hands it, so a wrong table, a block freed too early or a wrong
sharing decision shows up as different tokens.  Oracles: the same request run alone, and
Hugging Face ``generate``.
"""
import random

import pytest
import torch

from irlm.runtime import LLM, RecomputeRunner, ReferenceRunner, SamplingParams
from irlm_test_helpers import hf_generate

BS = 4





class RecordingRunner:
    """Passes steps through, remembering each step's (q_lens, cached_lens)."""

    def __init__(self, inner):
        self.inner, self.steps = inner, []
        for name in ("vocab_size", "block_size", "num_blocks", "max_model_len"):
            setattr(self, name, getattr(inner, name))

    def step(self, batch):
        self.steps.append((batch.q_lens.tolist(), batch.cached_lens.tolist()))
        return self.inner.step(batch)


def make_load(vocab, count=16, seed=0):
    """Prompts of many lengths (3..40 tokens) with varied max_tokens, greedy."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, vocab) for _ in range(3 + (37 * i) // (count - 1))]
               for i in range(count)]
    rng.shuffle(prompts)
    params = [SamplingParams(temperature=0, max_tokens=8 + i % 7) for i in range(count)]
    return prompts, params


def solo(model, tok, prompt, params):
    """The request alone: no batching, no chunking, no prefix reuse."""
    llm = LLM(ReferenceRunner(model, block_size=BS, num_blocks=64), tok, max_num_tokens=4096,
              enable_prefix_caching=False)
    return llm.generate([prompt], params)[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def load(model, tok):
    prompts, params = make_load(len(tok))
    return prompts, params, [solo(model, tok, p, s) for p, s in zip(prompts, params)]


def hf_greedy(model, prompt, max_tokens):
    out = hf_generate(model, torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens,
                      pad_token_id=1, eos_token_id=1)
    return out[0, len(prompt):].tolist()


def test_16_concurrent_requests_with_chunked_prefill_equal_solo_and_hf(model, tok, load):
    prompts, params, want = load
    runner = RecordingRunner(ReferenceRunner(model, block_size=BS, num_blocks=256))
    llm = LLM(runner, tok, max_num_tokens=16, max_batch_size=16, policy="max-utilization")
    outs = llm.generate(prompts, params)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == want
    for prompt, p, tokens in zip(prompts, params, got):
        assert tokens == hf_greedy(model, prompt, p.max_tokens)
    # It really was in-flight batching: long prompts were split into chunks, and some steps
    # mixed prompt chunks with decode tokens of other requests.
    assert all(sum(q) <= 16 for q, _ in runner.steps)
    assert any(q > 1 and c > 0 for qs, cs in runner.steps for q, c in zip(qs, cs))
    assert any(1 in qs and max(qs) > 1 for qs, _ in runner.steps)
    assert max(len(qs) for qs, _ in runner.steps) >= 8
    assert all(o.outputs[0].finish_reason in ("stop", "length") for o in outs)


def test_recompute_runner_agrees_with_the_paged_kv_runner(model, tok, load):
    prompts, params, want = load
    llm = LLM(RecomputeRunner(model, block_size=BS, num_blocks=256), tok, max_num_tokens=16,
              max_batch_size=16)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts[:6], params[:6])] == want[:6]


def test_max_utilization_preempts_when_the_cache_is_too_small_and_loses_nothing(
        model, tok, load):
    prompts, params, want = load
    # 16 blocks of 4 tokens: the longest request needs 14 blocks alone, the load ~150.
    llm = LLM(ReferenceRunner(model, block_size=BS, num_blocks=16), tok, max_num_tokens=24,
              max_batch_size=16, policy="max-utilization")
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.engine.block_manager.num_free_blocks == 16


def test_guaranteed_no_evict_completes_the_same_load_without_preemption(model, tok, load):
    prompts, params, want = load
    runner = RecordingRunner(ReferenceRunner(model, block_size=BS, num_blocks=16))
    llm = LLM(runner, tok, max_num_tokens=24, max_batch_size=16, policy="guaranteed-no-evict")
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions == 0
    assert [o.outputs[0].token_ids for o in outs] == want
    assert max(len(qs) for qs, _ in runner.steps) >= 2       # still batched


def test_prefix_reuse_allocates_fewer_blocks_and_changes_nothing(model, tok):
    rng = random.Random(1)
    prefix = [rng.randrange(2, len(tok)) for _ in range(40)]          # 10 full blocks
    prompts = [prefix + [rng.randrange(2, len(tok)) for _ in range(3)] for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=6)

    def run(reuse):
        llm = LLM(ReferenceRunner(model, block_size=BS, num_blocks=128), tok,
                  max_num_tokens=32, enable_prefix_caching=reuse)
        first = llm.generate(prompts[:1], params)        # the prefix is now cached
        stats = llm.engine.block_manager.stats
        before = stats.blocks_allocated
        rest = llm.generate(prompts[1:], params)
        tokens = [o.outputs[0].token_ids for o in first + rest]
        return tokens, stats.blocks_allocated - before, stats

    with_reuse, allocated_reuse, stats = run(True)
    without, allocated_plain, _ = run(False)
    assert with_reuse == without
    assert stats.prefix_hits == 5 * 10
    assert allocated_plain - allocated_reuse == 5 * 10
    # Submitted all at once, later requests reuse what earlier ones have computed by then.
    llm = LLM(ReferenceRunner(model, block_size=BS, num_blocks=128), tok, max_num_tokens=16)
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == without
    assert llm.engine.block_manager.stats.prefix_hits > 0


def test_n_samples_share_the_prompt_blocks(model, tok):
    rng = random.Random(2)
    prompt = [rng.randrange(2, len(tok)) for _ in range(41)]
    params = SamplingParams(n=4, seed=11, temperature=1.0, max_tokens=5, ignore_eos=True)

    def run(runner_cls, reuse):
        llm = LLM(runner_cls(model, block_size=BS, num_blocks=64), tok, max_num_tokens=64,
                  enable_prefix_caching=reuse)
        out = llm.generate([prompt], params)[0]
        return [c.token_ids for c in out.outputs], llm.engine.block_manager.stats

    tokens, stats = run(ReferenceRunner, False)
    # 45 tokens computed per sample = 12 blocks; the forks share the 10 full prompt blocks
    # and own 2 each (the recomputed partial prompt block, then growth): 18, not 4 x 12.
    assert stats.blocks_allocated == 12 + 3 * 2
    assert len({tuple(t) for t in tokens}) > 1
    assert run(RecomputeRunner, False)[0] == tokens         # the shared KV is the right KV
    assert run(ReferenceRunner, True)[0] == tokens


def test_sharing_eviction_and_preemption_together_change_no_output(model, tok):
    """A tight cache under max-utilization with prefix reuse: shared blocks, reusable blocks
    evicted and reallocated, preempted requests (beams and n > 1 samples among them)
    recomputed.  A block freed while still shared, a block shared by content alone without
    its prefix (B below starts one prompt and follows A in others), or a fork that shares a
    partial block would all change some output."""
    rng = random.Random(7)

    def block():
        return [rng.randrange(2, len(tok)) for _ in range(BS)]

    A, B, C, D = block(), block(), block(), block()
    tail = lambda n: [rng.randrange(2, len(tok)) for _ in range(n)]      # noqa: E731
    prompts = [A + B + C + tail(2), A + B + tail(3), B + C + tail(1), A + B + C + D + tail(2),
               B + C + D + tail(3), A + tail(5), tail(19), A + B + C + D + tail(6),
               C + D + tail(2), A + B + tail(1)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(5, 13)) for _ in prompts]
    params[3] = SamplingParams(use_beam_search=True, beam_width=3, max_tokens=6)
    params[7] = SamplingParams(n=2, seed=5, max_tokens=7, ignore_eos=True)
    want = [[c.token_ids for c in
             LLM(ReferenceRunner(model, block_size=BS, num_blocks=64), tok,
                 enable_prefix_caching=False).generate([p], s)[0].outputs]
            for p, s in zip(prompts, params)]
    llm = LLM(ReferenceRunner(model, block_size=BS, num_blocks=20), tok, max_num_tokens=12,
              max_batch_size=12, policy="max-utilization")
    outs = llm.generate(prompts, params)
    assert [[c.token_ids for c in o.outputs] for o in outs] == want
    stats = llm.engine.block_manager.stats
    assert llm.engine.scheduler.num_preemptions > 0
    assert stats.prefix_hits > 0 and stats.evictions > 0
    assert llm.engine.block_manager.num_free_blocks == 20
