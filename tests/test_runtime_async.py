"""Async decode (``LLMEngine(async_decode=True)``): step N+1 is scheduled and launched before
step N's sampled tokens are read on the host.

Oracle: the same requests through the synchronous engine (which the other runtime tests tie
to Hugging Face).  Every output (tokens, finish reasons, text, log-probabilities) must be
identical, through requests joining and leaving, stops, length limits, seeded sampling and
chunked prefill.  Both runner kinds are covered: GraphRunner fills the in-flight tokens
itself (``supports_device_inputs``), ReferenceRunner does not, so the engine reads them.
"""
import random

import pytest

from irlm.compilation import compile_causal_lm
from irlm.runtime import LLM, ReferenceRunner, SamplingParams
from irlm.runtime.runners.interpreter import GraphRunner
from irlm.runtime.sequence import PLACEHOLDER

BS = 4


class CountingRunner:
    """Passes steps through, counting them and the rows that carried in-flight tokens."""

    def __init__(self, inner):
        self.inner, self.steps, self.device_rows = inner, 0, 0
        for name in ("vocab_size", "block_size", "num_blocks", "max_model_len"):
            setattr(self, name, getattr(inner, name))
        self.supports_device_inputs = getattr(inner, "supports_device_inputs", False)

    def step(self, batch):
        self.steps += 1
        if batch.device_inputs is not None:
            self.device_rows += len(batch.device_inputs[1])
        return self.inner.step(batch)


@pytest.fixture(scope="module")
def graph(model):
    return compile_causal_lm(model, level="2", max_seq=256, tokens_per_block=BS)


def runners(model, graph):
    return {"graph-runner": lambda: GraphRunner(graph, num_blocks=96),
            "reference-runner": lambda: ReferenceRunner(model, block_size=BS, num_blocks=96)}


def workload(vocab, count=12, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randrange(3, 30))]
               for _ in range(count)]
    params = []
    for i in range(count):
        if i % 3 == 0:    # seeded sampling with top-k / top-p and log-probabilities
            params.append(SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=100 + i,
                                         max_tokens=5 + i % 6, logprobs=2))
        elif i % 3 == 1:  # greedy that may stop at EOS (id 1) or a stop token
            params.append(SamplingParams(temperature=0, max_tokens=4 + i % 9,
                                         stop_token_ids=[7]))
        else:             # greedy to the length limit, min_tokens holding off the stops
            params.append(SamplingParams(temperature=0, max_tokens=9, min_tokens=3,
                                         ignore_eos=True))
    return prompts, params


def run(make_runner, tok, prompts, params, async_decode, **kw):
    runner = CountingRunner(make_runner())
    llm = LLM(runner, tok, max_num_tokens=kw.get("max_num_tokens", 24),
              max_batch_size=kw.get("max_batch_size", 5), async_decode=async_decode)
    outs = llm.generate(prompts, params)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].text,
             o.outputs[0].cumulative_logprob, o.outputs[0].logprobs) for o in outs], runner


def with_stops(make, tok, prompts, params):
    """Make the greedy requests stop early: on a token id, or on a stop string, that their
    unconstrained output contains (so stops are really hit, mid-stream)."""
    free, _ = run(make, tok, prompts, params, async_decode=False)
    out = list(params)
    for i, (ids, *_rest) in enumerate(free):
        if i % 3 == 1 and len(ids) > 3:
            out[i] = SamplingParams(temperature=0, max_tokens=params[i].max_tokens,
                                    stop_token_ids=[ids[2]])
        elif i % 3 == 2 and len(ids) > 5:
            text = tok.decode(ids[4:6])
            if text.strip():
                out[i] = SamplingParams(temperature=0, max_tokens=9, stop=[text.strip()])
    return out


@pytest.mark.parametrize("kind", ["graph-runner", "reference-runner"])
def test_async_decode_gives_the_synchronous_outputs(model, tok, graph, kind):
    make = runners(model, graph)[kind]
    prompts, params = workload(len(tok))
    params = with_stops(make, tok, prompts, params)
    want, sync_runner = run(make, tok, prompts, params, async_decode=False)
    reasons = [w[1] for w in want]
    assert reasons.count("stop") >= 3 and reasons.count("length") >= 3   # both really occur
    got, async_runner = run(make, tok, prompts, params, async_decode=True)
    for (w_ids, w_reason, w_text, w_lp, w_top), (g_ids, g_reason, g_text, g_lp, g_top) in \
            zip(want, got):
        assert g_ids == w_ids and g_reason == w_reason and g_text == w_text
        assert g_lp == pytest.approx(w_lp, abs=1e-4)
        assert (g_top is None) == (w_top is None)
        if w_top is not None:
            assert [sorted(d) for d in g_top] == [sorted(d) for d in w_top]
        assert PLACEHOLDER not in g_ids
    # the overlap really happened: steps read tokens still in flight
    if kind == "graph-runner":
        assert async_runner.device_rows > 0
    # at most one wasted step per request that ended on a token read late
    assert async_runner.steps <= sync_runner.steps + len(prompts)


def test_requests_that_cannot_overlap_fall_back_to_synchronous_steps(model, tok, graph):
    make = runners(model, graph)["graph-runner"]
    prompts, params = workload(len(tok), count=6, seed=3)
    params[2] = SamplingParams(temperature=0, max_tokens=6, repetition_penalty=1.3)
    params[4] = SamplingParams(temperature=0.7, max_tokens=5, n=2, seed=5)
    want, _ = run(make, tok, prompts, params, async_decode=False)
    got, _ = run(make, tok, prompts, params, async_decode=True)
    assert [w[:3] for w in want] == [g[:3] for g in got]


def test_abort_while_a_token_is_in_flight_leaves_no_placeholder(model, tok, graph):
    llm = LLM(GraphRunner(graph, num_blocks=64), tok, max_num_tokens=64, async_decode=True)
    engine = llm.engine
    rid = engine.add_request([5, 9, 14, 3], SamplingParams(temperature=0, max_tokens=20,
                                                           ignore_eos=True))
    other = engine.add_request([8, 2, 6], SamplingParams(temperature=0, max_tokens=20,
                                                         ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None          # a step's tokens are on the "device"
    engine.abort(rid)
    out = engine.pop_output(rid)
    assert out.finished and PLACEHOLDER not in out.outputs[0].token_ids
    assert out.outputs[0].finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    done = engine.pop_output(other).outputs[0]
    assert len(done.token_ids) == 20 and PLACEHOLDER not in done.token_ids


def test_async_decode_defaults_to_on_for_a_gpu_runner_and_off_on_a_cpu(graph):
    import torch
    from irlm.runtime import LLMEngine
    cpu = GraphRunner(graph, num_blocks=16)
    assert LLMEngine(cpu).async_decode is False
    assert LLMEngine(cpu, async_decode=True).async_decode is True

    class OnGpu(CountingRunner):
        device = torch.device("cuda")
    gpu = OnGpu(cpu)
    assert LLMEngine(gpu).async_decode is True
    assert LLMEngine(gpu, async_decode=False).async_decode is False


def test_serve_flag_turns_async_decode_on_and_off():
    from irlm.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["serve", "e"]).async_decode is None
    assert parse(["serve", "e", "--async-decode"]).async_decode is True
    assert parse(["serve", "e", "--no-async-decode"]).async_decode is False
