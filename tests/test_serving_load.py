"""A bounded loopback load test of `irlm serve`: 64 concurrent streaming clients mixed across
OpenAI completions, OpenAI chat, KServe generate_stream and gRPC ModelStreamInfer, a quarter
of them cancelled at a random point.  Every request that was not cancelled must produce its
solo output (`LLM.generate` of that prompt alone, in this process); afterwards every KV block
is free and the metrics count what was sent.  Then: a full queue gets 429 /
RESOURCE_EXHAUSTED while the server keeps serving, and SIGTERM drains a stream in flight."""
from __future__ import annotations

import asyncio
import json
import random
import signal
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
grpcaio = pytest.importorskip("tritonclient.grpc.aio")
grpcclient = pytest.importorskip("tritonclient.grpc")

from irlm.runtime import SamplingParams  # noqa: E402
from irlm.serving.testing import ServerProcess, tiny_llm  # noqa: E402
from test_serving_protocols import (_grpc_inputs as grpc_inputs, metrics,  # noqa: E402
                                    wait_all_blocks_free)

pytestmark = pytest.mark.slow
CLIENTS = 64
LONG = 200          # tokens a cancelling client asks for (prompts are at most ~30 tokens)
KEY = "k"
WORDS = ["fox", "compiler", "Café", "crème", "kernels", "日本語", "block", "the", "word", "lazy"]


class Client:
    """One streaming client: its protocol, prompt, length, and when it cancels (or never)."""

    def __init__(self, i, rng, tok):
        self.i, self.protocol = i, ("completions", "chat", "kserve", "grpc")[i % 4]
        self.prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        self.max_tokens = rng.randint(4, 16)
        self.cancel_after = rng.randint(1, 3) if rng.random() < 0.25 else None
        # A client that cancels asks for a long answer that EOS cannot end (min tokens = max),
        # so that its cancellation reaches the server while the request still runs: with 4-16
        # tokens all of them could finish first on a fast machine, and none count as aborted.
        self.min_tokens = 0
        if self.cancel_after is not None:
            self.max_tokens = self.min_tokens = LONG
        self.chat = [{"role": "user", "content": self.prompt}]
        self.text, self.ids, self.cancelled = "", [], False

    async def run(self, srv, http, oai):
        n = 0
        if self.protocol == "grpc":
            it = await self._grpc(srv)
            async for result, error in it:
                assert error is None, error
                self.ids += result.as_numpy("output_ids").reshape(-1).tolist()
                n += 1
                if self.cancel_after is not None and n >= self.cancel_after:
                    it.cancel()
                    self.cancelled = True
                    return
                if result.get_response().parameters["triton_final_response"].bool_param:
                    return
            return
        async for piece in self._pieces(srv, http, oai):
            self.text += piece
            n += 1
            if self.cancel_after is not None and n >= self.cancel_after:
                self.cancelled = True
                return

    async def _grpc(self, srv):
        client = grpcaio.InferenceServerClient(srv.grpc_addr)
        ids = self.tok_ids

        async def requests():
            inputs = grpc_inputs(ids, self.max_tokens, True)
            if self.min_tokens:
                m = grpcclient.InferInput("min_length", [1, 1], "INT32")
                m.set_data_from_numpy(np.array([[self.min_tokens]], np.int32))
                inputs.append(m)
            yield {"model_name": "tensorrt_llm", "inputs": inputs, "request_id": str(self.i)}
        return client.stream_infer(requests(), headers={"authorization": f"Bearer {KEY}"})

    async def _pieces(self, srv, http, oai):
        if self.protocol == "completions":
            stream = await oai.completions.create(model="tiny", prompt=self.prompt, stream=True,
                                                  temperature=0, max_tokens=self.max_tokens,
                                                  extra_body={"min_tokens": self.min_tokens})
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        yield chunk.choices[0].text
        elif self.protocol == "chat":
            stream = await oai.chat.completions.create(
                model="tiny", messages=self.chat, stream=True, temperature=0,
                max_tokens=self.max_tokens, extra_body={"min_tokens": self.min_tokens})
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        else:
            body = {"text_input": self.prompt, "max_tokens": self.max_tokens,
                    "min_length": self.min_tokens, "temperature": 0.0, "stream": True}
            async with http.stream("POST", srv.url + "/v2/models/ensemble/generate_stream",
                                   json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        yield json.loads(line[6:])["text_output"]


@pytest.fixture(scope="module")
def srv():
    with ServerProcess(["--factory", "irlm.serving.testing:tiny_llm", "--served-model-name",
                        "tiny", "--max-batch-size", "16", "--max-queue", "48"],
                       api_key=KEY) as s:
        yield s


def test_64_mixed_streaming_clients_with_cancellations(srv):
    oracle = tiny_llm()
    tok = oracle.tokenizer
    rng = random.Random(7)
    clients = [Client(i, rng, tok) for i in range(CLIENTS)]
    for c in clients:
        c.tok_ids = tok.encode(c.prompt)
    before = metrics(srv)

    async def main():
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            oai = openai.AsyncOpenAI(base_url=srv.openai_url, api_key=KEY, max_retries=0,
                                     http_client=httpx.AsyncClient(timeout=60, limits=limits))
            await asyncio.wait_for(asyncio.gather(*(c.run(srv, http, oai) for c in clients)),
                                   timeout=120)
    asyncio.run(main())
    after = wait_all_blocks_free(srv)
    assert after["irlm:kv_cache_free_blocks"] == after["irlm:kv_cache_blocks"]
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0

    completed = [c for c in clients if not c.cancelled]
    cancelled = [c for c in clients if c.cancelled]
    assert completed and cancelled
    for c in completed:
        params = SamplingParams(temperature=0, max_tokens=c.max_tokens)
        if c.protocol == "chat":
            (w,) = oracle.chat(c.chat, params)[0].outputs
        else:
            (w,) = oracle.generate([c.tok_ids], params)[0].outputs
        if c.protocol == "grpc":
            assert c.ids == w.token_ids, c.i
        else:
            assert c.text == w.text, c.i

    def d(k):
        return after[k] - before.get(k, 0.0)
    prompt_tokens = sum(len(c.tok_ids) if c.protocol != "chat" else
                        len(tok.encode(oracle.apply_chat_template(c.chat),
                                       add_special_tokens=False)) for c in clients)
    assert d("vllm:prompt_tokens_total") == prompt_tokens
    # Every request ended once; a cancelled one counts as aborted unless it had already
    # finished when the cancellation reached the server (its last token was in flight).
    aborted = d("vllm:request_success_total[abort]")
    finished = d("vllm:request_success_total[stop]") + d("vllm:request_success_total[length]")
    assert aborted + finished == CLIENTS
    assert 1 <= aborted <= len(cancelled) and finished >= len(completed)
    assert d("vllm:e2e_request_latency_seconds_count") == CLIENTS


def test_full_queue_is_refused_and_the_server_keeps_serving(srv):
    async def main():
        oai = openai.AsyncOpenAI(base_url=srv.openai_url, api_key=KEY, max_retries=0)
        # fill running (16) + queue (48) with requests as long as the model takes, sent at
        # once: sent one after another, the first could finish (240 steps of a tiny model)
        # before the last was queued, and the queue would never be full
        streams = await asyncio.gather(*[
            oai.completions.create(model="tiny", prompt="the word", stream=True,
                                   max_tokens=240, extra_body={"ignore_eos": True})
            for _ in range(64)])
        with pytest.raises(openai.RateLimitError):
            await oai.completions.create(model="tiny", prompt="x", max_tokens=2)
        grpc = grpcaio.InferenceServerClient(srv.grpc_addr)
        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
            await grpc.infer("tensorrt_llm", grpc_inputs([5, 6], 2, False),
                             headers={"authorization": f"Bearer {KEY}"})
        for s in streams:
            await s.close()                    # client goes away: request aborted
    asyncio.run(main())
    m = wait_all_blocks_free(srv)
    assert m["irlm:kv_cache_free_blocks"] == m["irlm:kv_cache_blocks"]
    oai = openai.OpenAI(base_url=srv.openai_url, api_key=KEY, max_retries=0)
    assert oai.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens


def test_sigterm_drains_the_stream_in_flight(srv):
    oracle = tiny_llm()
    oai = openai.OpenAI(base_url=srv.openai_url, api_key=KEY, max_retries=0)
    stream = oai.completions.create(model="tiny", prompt="kernels", stream=True,
                                    temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    it = iter(stream)
    text = next(it).choices[0].text
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises((openai.APIStatusError, openai.APIConnectionError)):
        oai.completions.create(model="tiny", prompt="late", max_tokens=2)
    for chunk in it:
        text += chunk.choices[0].text if chunk.choices else ""
    (w,) = oracle.generate(["kernels"], SamplingParams(temperature=0, max_tokens=40,
                                                       ignore_eos=True))[0].outputs
    assert text == w.text
    assert srv.proc.wait(30) == 0
