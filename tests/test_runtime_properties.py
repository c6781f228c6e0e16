"""Property test: whatever the load and configuration, every request's output equals its
output run alone.  Uses HistoryHashRunner (logits = a function of the history read back
through the block tables), so hundreds of scheduling situations run in seconds: chunked
prefill at any budget, both policies, preemption, prefix reuse on and off, n > 1 forks and
beams."""
from hypothesis import HealthCheck, given, settings, strategies as st

from irlm.runtime import LLM, SamplingParams
from irlm.runtime.testing import HistoryHashRunner

VOCAB = 64


@st.composite
def requests(draw):
    # Prompts from a few shared stems, so prefixes (and whole blocks) repeat.
    stems = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 20, 21], [30, 31, 32]]
    prompt = draw(st.sampled_from(stems))[:draw(st.integers(1, 8))]
    prompt = prompt + draw(st.lists(st.integers(2, VOCAB - 1), max_size=12))
    kind = draw(st.sampled_from(["greedy", "seeded", "n", "beam"]))
    max_tokens = draw(st.integers(1, 8))
    if kind == "greedy":
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
    elif kind == "seeded":
        params = SamplingParams(temperature=1.0, top_p=0.9, seed=draw(st.integers(0, 9)),
                                max_tokens=max_tokens)
    elif kind == "n":
        params = SamplingParams(n=draw(st.integers(2, 3)), seed=3, max_tokens=max_tokens)
    else:
        params = SamplingParams(use_beam_search=True, beam_width=draw(st.integers(2, 3)),
                                max_tokens=max_tokens, early_stopping=draw(st.booleans()))
    return prompt, params


def outputs(llm, prompts, params):
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(load=st.lists(requests(), min_size=1, max_size=10),
       block_size=st.integers(1, 4), spare_blocks=st.integers(0, 12),
       max_num_tokens=st.integers(1, 24), max_batch_size=st.integers(3, 12),
       policy=st.sampled_from(["guaranteed-no-evict", "max-utilization"]),
       reuse=st.booleans())
def test_any_load_gives_every_request_its_solo_output(load, block_size, spare_blocks,
                                                      max_num_tokens, max_batch_size, policy,
                                                      reuse):
    prompts = [p for p, _ in load]
    params = [s for _, s in load]
    solo = [outputs(LLM(HistoryHashRunner(VOCAB, block_size=block_size, num_blocks=256),
                        eos_token_id=1, enable_prefix_caching=False), [p], [s])[0]
            for p, s in load]
    # The cache: just enough for the biggest request alone, plus a little.
    need = max(s.num_sequences * -(-(len(p) + s.max_tokens) // block_size) for p, s in load)
    runner = HistoryHashRunner(VOCAB, block_size=block_size, num_blocks=need + spare_blocks)
    llm = LLM(runner, eos_token_id=1, max_num_tokens=max_num_tokens,
              max_batch_size=max_batch_size, policy=policy, enable_prefix_caching=reuse)
    assert outputs(llm, prompts, params) == solo
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == runner.num_blocks
    if policy == "guaranteed-no-evict":
        assert engine.scheduler.num_preemptions == 0
