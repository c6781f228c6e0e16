"""Sampling: HF-equivalent logits processing, seeded reproducibility, parameter validation."""
import random

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from irlm.errors import IRLMError
from irlm_test_helpers import hf_generate
from irlm.runtime import LLM, ReferenceRunner, SamplingParams, SamplingParamsError
from irlm.runtime.sampling import (SampleRow, apply_min_p, apply_penalties, apply_temperature,
                                   apply_top_k, apply_top_p, argmax_rows, draw,
                                   logsumexp_rows, process_logits, sample)

V = 50



def random_logits(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 3


# ----- (f) logits processing against HF's processors, row by row -------------------------
def test_repetition_penalty_matches_hf():
    logits = random_logits(3)
    prompts = [[1, 2, 3], [4, 4], []]
    outputs = [[5, 1], [], [7, 8, 7]]
    penalties = [1.3, 0.7, 2.0]
    got = apply_penalties(logits, prompts, outputs, torch.tensor(penalties), torch.zeros(3),
                          torch.zeros(3))
    for r in range(3):
        ids = torch.tensor([prompts[r] + outputs[r]], dtype=torch.long)
        want = RepetitionPenaltyLogitsProcessor(penalties[r])(ids, logits[r:r + 1].clone())
        torch.testing.assert_close(got[r:r + 1], want, rtol=0, atol=0)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = random_logits(2)
    got = apply_penalties(logits, [[9, 9], [3]], [[3, 3, 4], []], torch.ones(2),
                          torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.25]))
    want = logits.clone()
    want[0, 3] -= 0.5 + 2 * 0.25
    want[0, 4] -= 0.5 + 1 * 0.25
    torch.testing.assert_close(got, want)           # token 9 / 3 only in prompts: untouched


@pytest.mark.parametrize("name,ours,hf,values", [
    ("temperature", apply_temperature, TemperatureLogitsWarper, [0.5, 1.7, 0.9]),
    ("top_k", apply_top_k, TopKLogitsWarper, [1, 5, 49]),
    ("top_p", apply_top_p, TopPLogitsWarper, [0.3, 0.9, 0.999]),
    ("min_p", apply_min_p, MinPLogitsWarper, [0.05, 0.2, 0.9]),
])
def test_warpers_match_hf_with_per_row_values(name, ours, hf, values):
    logits = random_logits(3, seed=len(name))
    dtype = torch.int64 if name == "top_k" else torch.float32
    got = ours(logits, torch.tensor(values, dtype=dtype))
    for r, value in enumerate(values):
        want = hf(value)(None, logits[r:r + 1].clone())
        torch.testing.assert_close(got[r:r + 1], want, rtol=0, atol=0)


def test_disabled_stages_leave_rows_alone():
    logits = random_logits(2)
    assert torch.equal(apply_top_k(logits, torch.tensor([0, 0])), logits)
    assert torch.equal(apply_top_p(logits, torch.tensor([1.0, 1.0])), logits)
    assert torch.equal(apply_min_p(logits, torch.tensor([0.0, 0.0])), logits)
    assert torch.equal(apply_temperature(logits, torch.tensor([0.0, 1.0])), logits)


def test_full_pipeline_matches_hf_processor_chain():
    logits = random_logits(1)
    p = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    got = process_logits(logits, [SampleRow(p, [1, 2], [3])])
    ids = torch.tensor([[1, 2, 3]])
    want = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7),
                 TopKLogitsWarper(20), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        want = proc(ids, want)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_draw_is_argmax_for_greedy_rows_and_follows_the_distribution_otherwise():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]] * 2000))
    tokens = draw(logits, [False] * 1999 + [True],
                  [torch.Generator().manual_seed(0)] + [None] * 1999)
    assert tokens[-1] == 0
    freq = torch.bincount(tokens[:-1], minlength=4).float() / 1999
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.04)
    assert freq[3] == 0                              # never a token of probability 0


@pytest.mark.parametrize("vocab", [49152, 32000, 50257, 151936, 1021, 64])
def test_row_reductions_equal_torch(vocab):
    """argmax_rows / logsumexp_rows (the CPU sampler's chunked argmax and exp2-based
    logsumexp) against torch's argmax / logsumexp: ties across chunks (first wins), NaN, all
    -inf and +inf rows, a prime vocabulary (no chunking)."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(7, vocab, generator=g) * 4
    x[1, 3] = x[1, vocab - 2] = 99.0                     # a tie: the first index wins
    x[2, vocab // 2] = x[2, vocab // 2 + 1] = 99.0
    x[3] = float("-inf")
    x[4, vocab // 3] = float("nan")
    x[4, vocab - 1] = float("nan")
    x[5, 7] = float("inf")
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(argmax_rows(x[:, ::2]), x[:, ::2].argmax(dim=-1))   # not contiguous
    torch.testing.assert_close(logsumexp_rows(x), x.logsumexp(dim=-1), equal_nan=True,
                               rtol=1e-6, atol=1e-6)
    finite = x[[0, 1, 2, 6]]
    torch.testing.assert_close(logsumexp_rows(finite), finite.logsumexp(dim=-1),
                               rtol=1e-6, atol=1e-6)


def test_logprobs_are_the_raw_model_logprobs_of_the_top_and_sampled_tokens():
    logits = random_logits(2)
    rows = [SampleRow(SamplingParams(temperature=0, logprobs=3), [], []),
            SampleRow(SamplingParams(temperature=0), [], [])]
    res = sample(logits, rows)
    lp = logits.log_softmax(-1)
    top = lp[0].topk(3)
    assert res.top_logprobs[0] == pytest.approx(dict(zip(top.indices.tolist(),
                                                         top.values.tolist())))
    assert res.top_logprobs[1] is None
    # logit - logsumexp(logits) in float32: equal to log_softmax up to float rounding
    assert res.token_logprobs[1] == pytest.approx(lp[1].max().item(), rel=1e-5)


# ----- (d) seeded sampling on the model ---------------------------------------------------


def make_llm(model, tok):
    return LLM(ReferenceRunner(model, block_size=4, num_blocks=256), tok, max_num_tokens=32,
               max_batch_size=16)


def prompts(vocab, count, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randrange(3, 20))] for _ in range(count)]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model, tok):
    target = prompts(len(tok), 1, seed=5)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12,
                            ignore_eos=True)
    alone = make_llm(model, tok).generate([target], params)[0].outputs[0].token_ids
    again = make_llm(model, tok).generate([target], params)[0].outputs[0].token_ids
    assert alone == again
    # In a batch with unseeded, greedy and other-seeded neighbours, before and after it.
    others = prompts(len(tok), 6, seed=6)
    mix = [SamplingParams(temperature=1.0, max_tokens=9), SamplingParams(temperature=0),
           SamplingParams(temperature=1.2, top_k=5, seed=7, max_tokens=15)] * 2
    outs = make_llm(model, tok).generate(others[:3] + [target] + others[3:],
                                         mix[:3] + [params] + mix[3:])
    assert outs[3].outputs[0].token_ids == alone
    other_seed = make_llm(model, tok).generate(
        [target], SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=12,
                                 ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone


def test_top_k_1_equals_greedy(model, tok):
    ps = prompts(len(tok), 4, seed=8)
    greedy = make_llm(model, tok).generate(ps, SamplingParams(temperature=0, max_tokens=10))
    top1 = make_llm(model, tok).generate(ps, SamplingParams(temperature=1.5, top_k=1,
                                                            max_tokens=10))
    assert ([o.outputs[0].token_ids for o in top1]
            == [o.outputs[0].token_ids for o in greedy])


def test_n_samples_are_independent_and_the_first_equals_n_1(model, tok):
    target = prompts(len(tok), 1, seed=9)[0]
    base = dict(temperature=1.0, seed=42, max_tokens=8, ignore_eos=True)
    many = make_llm(model, tok).generate([target], SamplingParams(n=3, **base))[0]
    one = make_llm(model, tok).generate([target], SamplingParams(n=1, **base))[0]
    assert [c.index for c in many.outputs] == [0, 1, 2]
    assert many.outputs[0].token_ids == one.outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in many.outputs}) == 3


def test_request_logprobs_and_cumulative_logprob(model, tok):
    target = prompts(len(tok), 1, seed=10)[0]
    out = make_llm(model, tok).generate([target], SamplingParams(temperature=0, max_tokens=5,
                                                                 logprobs=2))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token] == max(entry.values())   # greedy: the top one
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids,
                                                                           out.logprobs)))


def test_min_tokens_suppresses_stop_tokens_like_hf_min_new_tokens(model, tok):
    target = prompts(len(tok), 1, seed=11)[0]
    free = make_llm(model, tok).generate([target], SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    eos = free[2]                          # make the greedy path want to stop early
    llm = LLM(ReferenceRunner(model, block_size=4, num_blocks=64), tok, eos_token_id=eos)
    stopped = llm.generate([target], SamplingParams(temperature=0, max_tokens=12))
    assert stopped[0].outputs[0].token_ids == free[:3]
    held = llm.generate([target], SamplingParams(temperature=0, max_tokens=12, min_tokens=8))
    want = hf_generate(model, torch.tensor([target]), do_sample=False, max_new_tokens=12,
                       min_new_tokens=8, eos_token_id=eos, pad_token_id=eos)
    want = want[0, len(target):].tolist()
    want = want[:want.index(eos) + 1] if eos in want else want
    got = held[0].outputs[0].token_ids
    assert got == want and len(got) >= 8 and eos not in got[:8]
    rows = [SampleRow(SamplingParams(), [], [], suppress_ids=[3, 5]),
            SampleRow(SamplingParams(), [], [])]
    out = process_logits(random_logits(2), rows)
    assert out[0, [3, 5]].isinf().all() and not out[1].isinf().any()


# ----- (g) bad parameters -----------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field,valid", [
    (dict(temperature=-0.5), "temperature", ">= 0"),
    (dict(temperature=float("nan")), "temperature", "finite"),
    (dict(top_p=0.0), "top_p", r"\(0, 1\]"),
    (dict(top_p=1.5), "top_p", r"\(0, 1\]"),
    (dict(top_k=-3), "top_k", ">= 1"),
    (dict(min_p=2.0), "min_p", r"\[0, 1\]"),
    (dict(n=0), "n", ">= 1"),
    (dict(max_tokens=0), "max_tokens", ">= 1"),
    (dict(max_tokens=4, min_tokens=5), "min_tokens", r"\[0, max_tokens=4\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "> 0"),
    (dict(presence_penalty=3.0), "presence_penalty", r"\[-2, 2\]"),
    (dict(frequency_penalty=-2.5), "frequency_penalty", r"\[-2, 2\]"),
    (dict(seed=-1), "seed", "None or an int"),
    (dict(stop=[""]), "stop", "non-empty"),
    (dict(stop_token_ids=[-1]), "stop_token_ids", "token ids"),
    (dict(logprobs=-1), "logprobs", ">= 0"),
    (dict(use_beam_search=True, beam_width=1), "beam_width", ">= 2"),
    (dict(use_beam_search=True, beam_width=2, n=3), "n", "<= beam_width"),
    (dict(use_beam_search=True, early_stopping="sometimes"), "early_stopping", "'never'"),
    (dict(use_beam_search=True, top_k=5), "top_k", "beam search"),
    (dict(use_beam_search=True, seed=1), "seed", "beam search"),
])
def test_bad_sampling_params_name_the_field_and_the_valid_range(kwargs, field, valid):
    with pytest.raises(SamplingParamsError, match=rf"SamplingParams\.{field} must be .*{valid}"):
        SamplingParams(**kwargs)
    assert issubclass(SamplingParamsError, IRLMError)


def test_good_sampling_params_normalize():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ("###",) and p.top_k == 0 and not p.greedy
    assert SamplingParams(temperature=0).greedy
