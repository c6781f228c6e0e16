"""The serving hot path's shortcuts against the plain code they stand in for: pre-formatted
SSE frames equal ``json.dumps`` of the chunk dict; a stream that falls behind merges what
queued into one chunk with every token in order; the proxy engine streams through a real
server to the openai client."""
from __future__ import annotations

import asyncio
import json

import pytest

from irlm.serving.engine_core import Delta
from irlm.serving.openai_api import _jstr, _sse_head

TEXTS = ["", "plain", "quote \" backslash \\ slash /", "line\nbreak\ttab\r\x00\x1f\x7f",
         "naïve ☃ 😀 \u2028\u2029", "\ud7ff\ue000"]


def oracle_sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("model", ["m", 'we"ird/mödel'])
def test_preformatted_frames_equal_json_dumps(text, model):
    rid, created = "cmpl-0123abc", 1733300000
    fast = (f'{_sse_head(rid, "text_completion", created, model)}7,"text":{_jstr(text)},'
            f'"logprobs":null,"finish_reason":null}}]}}\n\n')
    assert fast == oracle_sse({"id": rid, "object": "text_completion", "created": created,
                               "model": model, "choices": [{
                                   "index": 7, "text": text, "logprobs": None,
                                   "finish_reason": None}]})
    fast = (f'{_sse_head(rid, "chat.completion.chunk", created, model)}0,"delta":'
            f'{{"content":{_jstr(text)}}},"logprobs":null,"finish_reason":null}}]}}\n\n')
    assert fast == oracle_sse({"id": rid, "object": "chat.completion.chunk",
                               "created": created, "model": model, "choices": [{
                                   "index": 0, "delta": {"content": text}, "logprobs": None,
                                   "finish_reason": None}]})
    assert json.loads(fast[6:])["choices"][0]["delta"]["content"] == text


class _Metrics:
    """Counters and histograms that accept anything (the stream reports into them)."""
    def __getattr__(self, name):
        return self

    def __getitem__(self, key):
        return self

    def observe(self, *a):
        pass

    def inc(self, *a):
        pass


class _Client:
    def __init__(self):
        from irlm.serving.engine_core import CoreInfo
        self.metrics, self.aborted, self.forgot = _Metrics(), [], []
        self.info = CoreInfo(None, None, [], 100, 64, 8, 4, 64, 4, 4, "cpu", 0)

    def _abort(self, rid):
        self.aborted.append(rid)

    def _forget(self, rid):
        self.forgot.append(rid)


def test_a_stream_behind_merges_its_deltas_in_order():
    from irlm.runtime import SamplingParams
    from irlm.serving.client import RequestStream

    async def run():
        client = _Client()
        s = RequestStream(client, 3, [1, 2], SamplingParams(max_tokens=5), [])
        for k, t in enumerate([10, 11, 12]):        # three steps arrive before it runs
            s.put(Delta(3, 0, [t], [-0.5 * k], None))
        chunks = []
        it = s.__aiter__()
        chunks.append(await it.__anext__())
        s.put(Delta(3, 0, [13, 14], [-1.0, -2.0], None, "length"))
        async for c in it:
            chunks.append(c)
        return client, chunks
    client, chunks = asyncio.run(run())
    assert [c.token_ids for c in chunks] == [[10, 11, 12], [13, 14]]
    assert [c.logprobs for c in chunks] == [[0.0, -0.5, -1.0], [-1.0, -2.0]]
    assert chunks[-1].finish_reason == "length" and client.forgot == [3]


@pytest.mark.slow
def test_proxy_engine_streams_through_the_server():
    openai = pytest.importorskip("openai")
    from irlm.serving.testing import ServerProcess

    async def run(url):
        c = openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0)

        async def one(i):
            stream = await c.completions.create(
                model="proxy", prompt=[100 + i, 7], max_tokens=20, stream=True,
                stream_options={"include_usage": True})
            n, usage = 0, None
            async for ev in stream:
                n += bool(ev.choices)
                usage = ev.usage or usage
            return n, usage.completion_tokens
        return await asyncio.gather(*(one(i) for i in range(16)))
    with ServerProcess(["--factory", "irlm.serving.proxy:proxy_llm", "--served-model-name",
                        "proxy"], env={"IRLM_PROXY_STEP_MS": "2"}) as srv:
        results = asyncio.run(run(srv.openai_url))
    assert all(tokens == 20 and 1 <= events <= 20 for events, tokens in results)


@pytest.mark.parametrize("ids", [[5], [0, 2**31 - 1, 17, 3]])
@pytest.mark.parametrize("wanted", [[], ["sequence_length"], ["sequence_length", "output_ids"]])
def test_grpc_ids_increment_equals_the_tensor_encoder(ids, wanted):
    pytest.importorskip("tritonclient.grpc")
    from irlm.runtime import SamplingParams
    from irlm.serving.kserve_grpc import encode_ids_increment, encode_response
    from irlm.serving.kserve_tensors import TRTLLM_MODEL, Beam, Job, result_tensors
    job = Job([1, 2, 3], SamplingParams(), TRTLLM_MODEL, stream=True)
    for final in (False, True):
        res = result_tensors(job, [Beam(list(ids))], None, partial=True)
        want = encode_response("tensorrt_llm", "1", "r7", res, wanted, final=final)
        got = encode_ids_increment("tensorrt_llm", "1", "r7", list(ids), wanted, final)
        assert got == want
