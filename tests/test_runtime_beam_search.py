"""Beam search on the step interface equals Hugging Face ``generate(num_beams=4)``.

Three EOS ids that the random model's beams often reach make hypotheses finish at different
lengths, so the finished set, the length penalty and early stopping all matter (the prompts
are ones where early_stopping=True and False give different beams), and HF keeps
``(1 + #eos) * width`` candidates per step, which a single EOS would not exercise.
"""
import random

import pytest
import torch

from irlm.runtime import LLM, ReferenceRunner, SamplingParams
from irlm.runtime.beam_search import BeamSearch
from irlm.runtime.testing import tiny_llama
from irlm_test_helpers import hf_generate

EOS = [44, 125, 116]      # tokens the random model's beams produce often




@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), eos_token_id=EOS[0])


@pytest.fixture(scope="module")
def prompts(tok):
    rng = random.Random(0)
    candidates = [[rng.randrange(2, len(tok)) for _ in range(rng.randrange(3, 25))]
                  for _ in range(12)]
    return [candidates[i] for i in (1, 6, 7, 10)]


def hf_beams(model, prompt, max_tokens, **kw):
    out = hf_generate(model, torch.tensor([prompt]), num_beams=4, num_return_sequences=4,
                      do_sample=False, max_new_tokens=max_tokens, pad_token_id=EOS[0],
                      eos_token_id=EOS, **kw)
    beams = []
    for row in out[:, len(prompt):].tolist():       # crop HF's padding after EOS
        end = min([row.index(e) for e in EOS if e in row], default=len(row) - 1)
        beams.append(row[:end + 1])
    return beams


SETTINGS = [dict(early_stopping=True, length_penalty=1.0),
            dict(early_stopping=False, length_penalty=1.0),
            dict(early_stopping="never", length_penalty=1.0),
            dict(early_stopping=False, length_penalty=0.5),
            dict(early_stopping="never", length_penalty=2.0),
            dict(early_stopping=True, length_penalty=-1.0)]


@pytest.mark.parametrize("setting", SETTINGS,
                         ids=lambda s: f"{s['early_stopping']}-lp{s['length_penalty']}")
def test_beam_search_equals_hf(model, tok, prompts, setting):
    # block_size 4 with chunked prefill: beams fork mid-block and recompute their tails.
    llm = LLM(ReferenceRunner(model, block_size=4, num_blocks=256), tok, max_num_tokens=16,
              max_batch_size=16, eos_token_id=EOS)
    params = SamplingParams(use_beam_search=True, beam_width=4, n=4, max_tokens=12, **setting)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        want = hf_beams(model, prompt, 12, **setting)
        assert [c.token_ids for c in out.outputs] == want
        assert [c.finish_reason for c in out.outputs] == [
            "stop" if b[-1] in EOS else "length" for b in want]
    assert llm.engine.block_manager.num_free_blocks == 256


def test_the_settings_matter_on_these_prompts(model, prompts):
    """Guard for the test above: beams end on EOS before max_tokens, and early stopping
    changes the result."""
    ended = [b for p in prompts for b in hf_beams(model, p, 12)]
    assert any(b[-1] in EOS and len(b) < 12 for b in ended)
    assert any(len(b) == 12 for b in ended)
    assert any(hf_beams(model, p, 12, early_stopping=True)
               != hf_beams(model, p, 12, early_stopping=False) for p in prompts)


class BlockCountingRunner(ReferenceRunner):
    """Records, per step, the distinct blocks the rows use and the sum of their table sizes."""

    def step(self, batch):
        used = [set(t[:-(-(c + q) // self.block_size)]) for t, c, q in
                zip(batch.block_tables.tolist(), batch.cached_lens.tolist(),
                    batch.q_lens.tolist())]
        self.usage.append((len(set().union(*used)), sum(len(u) for u in used)))
        return super().step(batch)


def test_beams_share_blocks_and_match_hf_with_repetition_penalty(model, tok):
    prompt = [int(t) for t in torch.randint(2, len(tok), (30,), generator=torch.Generator()
                                            .manual_seed(3))]
    runner = BlockCountingRunner(model, block_size=4, num_blocks=256)
    runner.usage = []
    llm = LLM(runner, tok, max_num_tokens=64, eos_token_id=EOS, enable_prefix_caching=False)
    params = SamplingParams(use_beam_search=True, beam_width=4, n=2, max_tokens=8,
                            repetition_penalty=1.5)
    out = llm.generate([prompt], params)[0]
    assert [c.token_ids for c in out.outputs] == hf_beams(model, prompt, 8,
                                                          repetition_penalty=1.5)[:2]
    # Without prefix caching, sharing comes from forks alone: the 7 full prompt blocks are
    # held once, not once per beam.
    distinct, total = max(runner.usage)
    assert distinct <= 7 + 4 * 3 < total


def test_beam_search_unit_first_step_and_length_stop():
    search = BeamSearch(width=2, prompt_len=3, max_len=5, stop_ids=[0], length_penalty=1.0)
    lp = torch.log_softmax(torch.tensor([[0.0, 3.0, 2.0, 1.0]]), -1)
    conts = search.step(lp, [[]])
    assert [(c.parent, c.token) for c in conts] == [(0, 1), (0, 2)]
    lp2 = torch.log_softmax(torch.tensor([[0.0, 1.0, 5.0, 1.0], [0.0, 4.0, 1.0, 1.0]]), -1)
    assert search.step(lp2, [[1], [2]]) == [] and search.done          # max_len reached
    assert [h.output_ids for h in search.finished] == [[1, 2], [2, 1]]
    assert not any(h.stopped for h in search.finished)
