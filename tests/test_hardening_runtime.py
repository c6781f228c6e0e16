"""Runtime isolation (issue 21, findings 7 and 8): a request's parameters cannot change after
they were validated, and a failure attributable to one request ends that request alone, with its
reason, while every other request of the batch completes with exactly the output it has when
run without the poisoned one (oracle: the same requests run without it)."""
from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from irlm.runtime import (LLM, RequestFailedError, SamplingParams, SamplingParamsError)
from irlm.runtime.testing import HistoryHashRunner

POISON = 63          # a token id the poisoned runner refuses to run


@pytest.mark.parametrize("field,value", [("temperature", math.nan), ("max_tokens", -1),
                                         ("n", 0), ("seed", 2 ** 70)])
def test_sampling_params_cannot_change_after_validation(field, value):
    """Old behaviour: the assignment succeeded and the bad value reached the step."""
    p = SamplingParams(temperature=0.5, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(p, field, value)
    with pytest.raises(SamplingParamsError, match=f"SamplingParams.{field} must be"):
        dataclasses.replace(p, **{field: value})


def test_stop_lists_cannot_be_mutated_in_place():
    p = SamplingParams(stop=["###"], stop_token_ids=[3])
    assert p.stop == ("###",) and p.stop_token_ids == (3,)
    with pytest.raises(AttributeError):
        p.stop_token_ids.append(-5)


class PoisonRunner(HistoryHashRunner):
    """Raises (like a kernel fault) on any batch that holds the token POISON."""

    def step(self, batch):
        if (batch.input_ids == POISON).any():
            raise RuntimeError("device fault on poisoned input")
        logits = super().step(batch)
        logits[:, POISON] = float("-inf")        # only a prompt can hold it
        return logits


def prompts(count: int) -> list[list[int]]:
    return [[(7 * i + j) % 50 + 1 for j in range(3 + i % 5)] for i in range(count)]


def params(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=12, temperature=0.8, seed=1000 + i, ignore_eos=True)


def fresh_llm() -> LLM:
    return LLM(PoisonRunner(vocab_size=POISON + 1, block_size=4, num_blocks=256),
               max_num_tokens=64, max_batch_size=32)


def test_poisoned_request_fails_alone_in_a_batch():
    """Old behaviour: the exception left generate() and every request was lost."""
    good = prompts(20)
    expected = [o.outputs[0].token_ids for o in fresh_llm().generate(good, [params(i) for i in
                                                                            range(20)])]
    batch = good[:7] + [[5, POISON, 9]] + good[7:]
    outs = fresh_llm().generate(batch, [params(i) for i in range(7)] + [params(99)] +
                                [params(i) for i in range(7, 20)])
    bad = outs.pop(7)
    assert bad.outputs[0].finish_reason == "error"
    assert bad.error == f"request {bad.request_id} failed: RuntimeError: device fault on " \
                        f"poisoned input"
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.error is None and o.outputs[0].finish_reason == "length" for o in outs)


def test_poisoned_stream_fails_alone_among_20_streams():
    """Old behaviour: the step's exception was handed to all 21 open streams."""
    async def consume(llm, prompt, p):
        ids = []
        try:
            async for delta in llm.generate_stream(prompt, p):
                ids += delta.token_ids
        except RequestFailedError as e:
            return str(e)
        return ids

    async def run_all(batch, ps):
        llm = fresh_llm()
        results = await asyncio.gather(*(consume(llm, b, p) for b, p in zip(batch, ps)))
        assert not llm.engine.has_unfinished()
        assert llm.engine.block_manager.num_free_blocks == 256
        return results

    good = prompts(20)
    expected = asyncio.run(run_all(good, [params(i) for i in range(20)]))
    got = asyncio.run(run_all(good[:3] + [[POISON]] + good[3:],
                              [params(i) for i in range(3)] + [params(99)] +
                              [params(i) for i in range(3, 20)]))
    assert "failed: RuntimeError: device fault on poisoned input" in got.pop(3)
    assert got == expected and all(len(ids) == 12 for ids in got)


# ----- chat templates (finding 9) -----------------------------------------------------------------
MESSAGES = [{"role": "user", "content": "hi"}]


def render(template):
    return LLM(HistoryHashRunner()).apply_chat_template(MESSAGES, chat_template=template)


def test_chat_template_renders_like_transformers():
    """Oracle: transformers' own renderer on a typical template."""
    from irlm.runtime.testing import tiny_tokenizer
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = tiny_tokenizer()        # its own: the session's `tok` fixture must keep no template
    tok.chat_template = template
    expected = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert LLM(HistoryHashRunner(), tok).apply_chat_template(MESSAGES) == expected


@pytest.mark.parametrize("template,match", [
    ("{% for m in messages %}{{ m.content }", r"chat template:1: syntax error: unexpected"),
    ("{{ messages.__class__.__mro__ }}", r"refused by the sandbox: access to attribute "
                                         r"'__class__'"),
    ("{{ messages.append(1) }}", r"refused by the sandbox"),
    ("{{ 'x' * 10**10 }}", r"repetition of 10000000000 items is too large"),
    ("{{ 1 / 0 }}", r"chat template: ZeroDivisionError"),
])
def test_bad_chat_template_is_one_clear_line(bounded, template, match):
    """Old behaviour: jinja2's own exception (a traceback) for syntax and sandbox errors, and
    an unbounded allocation for a huge repetition."""
    from irlm.runtime.chat_template import ChatTemplateError
    with pytest.raises(ChatTemplateError, match=match) as e:
        bounded(render, template, seconds=20, memory_mb=512)
    assert "\n" not in str(e.value)


def test_runaway_chat_template_is_cut_off_by_its_time_budget(bounded):
    """Old behaviour: 10**10 loop iterations ran for hours."""
    from irlm.runtime.chat_template import ChatTemplateError
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="longer than its 2 s budget"):
        bounded(render, loop, seconds=20)
