"""The LLM API: errors at submission, cancellation, streaming, stop strings, chat."""
import asyncio
import random

import pytest

from irlm.errors import IRLMError
from irlm.runtime import (LLM, QueueFullError, ReferenceRunner,
                          RequestRejectedError, SamplingParams)
from irlm.runtime.detokenizer import IncrementalDetokenizer
from irlm.runtime.testing import tiny_tokenizer





def make_llm(model, tok, num_blocks=64, **kw):
    return LLM(ReferenceRunner(model, block_size=4, num_blocks=num_blocks), tok, **kw)


def prompt_ids(vocab, n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(2, vocab) for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


# ----- (g) errors at submission ----------------------------------------------------------
def test_a_full_waiting_queue_raises_queue_full(model, tok):
    engine = make_llm(model, tok, max_waiting=2).engine
    engine.add_request([5, 6, 7])
    engine.add_request([5, 6, 8])
    with pytest.raises(QueueFullError, match="waiting queue is full \\(2 requests\\)"):
        engine.add_request([5, 6, 9])
    assert issubclass(QueueFullError, IRLMError)
    engine.step()                       # admits both: there is room again
    engine.add_request([5, 6, 9])


def test_generate_feeds_more_prompts_than_the_queue_holds(model, tok):
    llm = make_llm(model, tok, max_waiting=2, max_batch_size=2)
    outs = llm.generate([[5, 6, i] for i in range(2, 9)], SamplingParams(temperature=0,
                                                                         max_tokens=3))
    assert len(outs) == 7 and all(o.finished for o in outs)


def test_requests_that_can_never_run_are_rejected_clearly(model, tok):
    llm = make_llm(model, tok, num_blocks=8)            # 32 tokens of cache
    engine = llm.engine
    with pytest.raises(RequestRejectedError, match="max_model_len=512"):
        engine.add_request([3] * 600)
    with pytest.raises(RequestRejectedError, match="need 10 KV blocks of 4, the whole cache has 8"):
        engine.add_request([3] * 20, SamplingParams(max_tokens=20))
    with pytest.raises(RequestRejectedError, match="2 x 20 tokens"):
        engine.add_request([3] * 10, SamplingParams(n=2, max_tokens=10))
    with pytest.raises(RequestRejectedError, match="empty"):
        engine.add_request([])
    with pytest.raises(IRLMError, match="token ids must be in"):
        engine.add_request([10**6])
    assert not engine.has_unfinished() and engine.requests == {}
    with pytest.raises(IRLMError, match="unknown scheduler policy 'fastest'"):
        make_llm(model, tok, policy="fastest")


# ----- (h) cancellation ------------------------------------------------------------------
def test_cancelling_frees_the_blocks(model, tok):
    engine = make_llm(model, tok, num_blocks=64, max_num_tokens=8).engine
    bm = engine.block_manager
    ids = [engine.add_request(prompt_ids(len(tok), 10, seed=s),
                              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
           for s in range(3)]
    for _ in range(6):
        engine.step()
    held = bm.num_blocks - bm.num_free_blocks
    assert held > 0
    victim = engine.requests[ids[0]]
    victim_blocks = {b for s in victim.seqs for b in bm.block_table(s.seq_id)}
    engine.abort(ids[0])
    assert bm.num_free_blocks == bm.num_blocks - held + len(victim_blocks)
    out = engine.pop_output(ids[0])
    assert out.finished and out.outputs[0].finish_reason == "abort"
    engine.abort(ids[2])                # possibly still waiting: leaves the queue
    while engine.has_unfinished():
        engine.step()
    assert engine.output(ids[1]).outputs[0].finish_reason == "length"
    assert bm.num_free_blocks == bm.num_blocks


# ----- (i) streaming ---------------------------------------------------------------------
def collect(llm, prompts, params):
    async def one(p):
        return [d async for d in llm.generate_stream(p, params)]

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))
    return asyncio.run(main())


def test_stream_deltas_concatenate_to_the_final_text(model, tok):
    prompts = ["Café crème brûlée", "日本語の", "The quick brown fox"]
    llm = make_llm(model, tok, max_num_tokens=8)
    final = llm.generate(prompts, GREEDY)
    streams = collect(llm, prompts, GREEDY)
    for out, deltas in zip(final, streams):
        assert "".join(d.text for d in deltas) == out.outputs[0].text
        assert [t for d in deltas for t in d.token_ids] == out.outputs[0].token_ids
        assert deltas[-1].finish_reason == "length"
        assert all(d.finish_reason is None for d in deltas[:-1])
    # The random model emits bytes that are not whole characters: the stream held them back
    # rather than emitting U+FFFD that later turned into a character.
    for deltas in streams:
        shown = ""
        for d in deltas:
            shown += d.text
            assert shown == "".join(x.text for x in deltas)[:len(shown)]
    assert llm.engine.block_manager.num_free_blocks == 64 and not llm.engine.requests


def test_leaving_a_stream_early_cancels_its_request(model, tok):
    llm = make_llm(model, tok, max_num_tokens=8)

    async def main():
        seen = 0
        async for _ in llm.generate_stream("The quick", GREEDY):
            seen += 1
            if seen == 3:
                break
        await asyncio.sleep(0)
    asyncio.run(main())
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_free_blocks == 64 and not llm.engine.requests


def test_stream_of_n_samples_and_of_beams(model, tok):
    llm = make_llm(model, tok, num_blocks=128)
    params = SamplingParams(n=2, seed=1, max_tokens=6, ignore_eos=True)
    (deltas,) = collect(llm, ["hello"], params)
    final = llm.generate(["hello"], params)[0]
    for i in range(2):
        assert "".join(d.text for d in deltas if d.index == i) == final.outputs[i].text
    beams = SamplingParams(use_beam_search=True, beam_width=3, n=2, max_tokens=5)
    (deltas,) = collect(llm, ["hello"], beams)
    final = llm.generate(["hello"], beams)[0]
    assert [d.token_ids for d in deltas] == [o.token_ids for o in final.outputs]


# ----- stop strings and stop tokens ------------------------------------------------------
def test_stop_strings_truncate_the_text_before_the_stop_string(model, tok):
    llm = make_llm(model, tok)
    full = llm.generate(["The quick brown"], GREEDY)[0].outputs[0]
    text = full.text
    # A stop string from the middle of the output: printable, first seen there.
    stop = next(text[i:i + 3] for i in range(6, len(text) - 3)
                if text[i:i + 3].isprintable() and "\ufffd" not in text[i:i + 3]
                and text.index(text[i:i + 3]) == i)
    cut = llm.generate(["The quick brown"], SamplingParams(temperature=0, max_tokens=24,
                                                            ignore_eos=True, stop=[stop]))
    out = cut[0].outputs[0]
    assert out.text == text[:text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert full.token_ids[:len(out.token_ids)] == out.token_ids
    assert len(out.token_ids) < len(full.token_ids)
    # With min_tokens past the stop string's first occurrence, that occurrence is ignored.
    late = llm.generate(["The quick brown"], SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
        min_tokens=len(out.token_ids) + 2))[0].outputs[0]
    assert late.token_ids[:len(out.token_ids) + 2] == full.token_ids[:len(out.token_ids) + 2]
    assert late.text.startswith(text[:text.index(stop) + len(stop)])
    # Streaming never shows a stop string, not even its first characters.
    (deltas,) = collect(llm, ["The quick brown"], SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert "".join(d.text for d in deltas) == out.text


def test_stop_token_ids_and_eos(model, tok):
    llm = make_llm(model, tok)
    full = llm.generate(["hello"], GREEDY)[0].outputs[0].token_ids
    stop_id = full[4]
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=24,
                                                 stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == full[:full.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    as_eos = LLM(llm.engine.runner, tok, eos_token_id=stop_id).generate(
        ["hello"], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    assert as_eos.token_ids == out.token_ids and as_eos.stop_reason is None
    ignored = LLM(llm.engine.runner, tok, eos_token_id=stop_id).generate(["hello"], GREEDY)
    assert ignored[0].outputs[0].token_ids == full


# ----- detokenization --------------------------------------------------------------------
def test_incremental_detokenizer_never_emits_half_characters(tok):
    text = "Café 日本語 ünïcödé ☃ 🚀!"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2          # many tokens are parts of characters
    detok = IncrementalDetokenizer(tok)
    deltas = []
    for i in range(1, len(ids) + 1):
        detok.update(ids[:i])
        deltas.append(detok.delta(final=i == len(ids)))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_finds_a_stop_string_straddling_tokens(tok):
    text = "the word was with the compiler"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, stop=["with the"])
    found = None
    for i in range(1, len(ids) + 1):
        found = detok.update(ids[:i])
        if found:
            break
    assert found == "with the" and detok.text == "the word was "


# ----- chat ------------------------------------------------------------------------------
def test_chat_applies_a_jinja2_template(model, tok):
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    llm = make_llm(model, tok, chat_template=template)
    messages = [{"role": "user", "content": "hello there"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5))[0]
    assert out.prompt == "<s><|user|> hello there <|assistant|>"
    assert out.prompt_token_ids == tok.encode(out.prompt, add_special_tokens=False)
    direct = llm.generate([out.prompt_token_ids], SamplingParams(temperature=0, max_tokens=5))
    assert out.outputs[0].token_ids == direct[0].outputs[0].token_ids
    two = llm.chat([messages, messages + [{"role": "assistant", "content": "hi"}]],
                   SamplingParams(temperature=0, max_tokens=2))
    assert len(two) == 2


def test_chat_uses_the_tokenizers_template_and_says_when_there_is_none(model, tok):
    llm = make_llm(model, tok)
    with pytest.raises(IRLMError, match="chat needs a chat template"):
        llm.chat([{"role": "user", "content": "hi"}])
    tok2 = tiny_tokenizer()
    tok2.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    llm = LLM(llm.engine.runner, tok2)
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1))[0]
    assert out.prompt == "[hi]"
