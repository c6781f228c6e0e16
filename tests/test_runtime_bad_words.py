"""``SamplingParams.bad_words_ids`` against HF transformers' ``generate(bad_words_ids=...)`` on
the same seeded model: one-token words are never drawn, a longer word's last token is banned
right after the word's other tokens."""
from __future__ import annotations

import pytest
import torch

from irlm.runtime import LLM, ReferenceRunner, SamplingParams
from irlm.runtime.errors import SamplingParamsError
from irlm.runtime.sampling import bad_word_bans
from irlm.runtime.testing import tiny_llama, tiny_tokenizer

N = 16


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    llm = LLM(ReferenceRunner(model, block_size=4, num_blocks=256), tok)
    return tok, model, llm


def hf_greedy(model, prompt_ids, bad_words_ids=None):
    kw = {"bad_words_ids": bad_words_ids} if bad_words_ids else {}
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=N,
                             min_new_tokens=N, pad_token_id=0, **kw)
    return out[0, len(prompt_ids):].tolist()


def irlm_greedy(llm, prompt_ids, bad_words_ids=()):
    # min_tokens = N: EOS is suppressed throughout, as HF's min_new_tokens does
    p = SamplingParams(temperature=0.0, max_tokens=N, min_tokens=N, bad_words_ids=bad_words_ids)
    return llm.generate([prompt_ids], p)[0].outputs[0].token_ids


@pytest.mark.parametrize("prompt", ["The quick brown fox", "Hello, world"])
def test_bad_words_equal_hf_generate(setup, prompt):
    tok, model, llm = setup
    ids = tok.encode(prompt)
    free = irlm_greedy(llm, ids)
    assert free == hf_greedy(model, ids)            # the two agree without bad words
    # ban what the unconstrained run draws: its 3rd token alone, and the pair at 6..7
    words = [[free[2]], [free[5], free[6]]]
    got = irlm_greedy(llm, ids, words)
    assert got == hf_greedy(model, ids, words)
    assert got != free                              # the words changed the output
    assert free[2] not in got
    assert all(got[i:i + 2] != words[1] for i in range(len(got) - 1))


def test_bad_word_bans_matches_the_tail():
    assert bad_word_bans([5, 6, 7], [[9], [6, 7, 8], [5, 8], [7, 4]]) == [9, 8, 4]
    assert bad_word_bans([], [[1, 2], [3]]) == [3]


def test_bad_words_are_validated():
    with pytest.raises(SamplingParamsError, match="bad_words_ids"):
        SamplingParams(bad_words_ids=[[]])
    with pytest.raises(SamplingParamsError, match="bad_words_ids"):
        SamplingParams(bad_words_ids=[[1, -2]])
    with pytest.raises(SamplingParamsError, match="bad_words_ids"):
        SamplingParams(use_beam_search=True, temperature=0.0, bad_words_ids=[[1]])
    assert SamplingParams(bad_words_ids=[[1, 2]]).bad_words_ids == ((1, 2),)
