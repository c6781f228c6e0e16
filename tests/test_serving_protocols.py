"""`irlm serve` over every protocol, checked with the real clients (openai, tritonclient.http,
tritonclient.grpc) against `LLM.generate` on the same model in this process (the oracle).

The served model is irlm.serving.testing.tiny_llm: a seeded random Llama over a byte-level
BPE tokenizer, so its outputs are full of partial UTF-8 characters."""
from __future__ import annotations

import asyncio
import queue
import re
import time
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

from irlm.runtime import SamplingParams  # noqa: E402
from irlm.serving.testing import ServerProcess, tiny_llm  # noqa: E402

KEY = "sk-test-key"
PROMPT = "The quick brown fox"
GREEDY = dict(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--factory", "irlm.serving.testing:tiny_llm", "--served-model-name",
                        "tiny"], api_key=KEY) as srv:
        yield srv
    assert srv.returncode == 0


@pytest.fixture(scope="module")
def oracle():
    return tiny_llm()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.openai_url, api_key=KEY, max_retries=0)


def metrics(server) -> dict[str, float]:
    req = urllib.request.Request(server.url + "/metrics",
                                 headers={"Authorization": f"Bearer {server.api_key}"})
    text = urllib.request.urlopen(req).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^([\w:]+)(\{[^}]*\})? ([-\d.e+]+)$', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            key = m.group(1) + ("" if "finished_reason" not in labels
                                else f"[{labels['finished_reason']}]")
            out[key] = float(m.group(3))
    return out


def wait_all_blocks_free(server, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["irlm:kv_cache_free_blocks"] == m["irlm:kv_cache_blocks"] and \
                m["vllm:num_requests_running"] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def want(oracle, prompt, **kw):
    return oracle.generate([prompt], SamplingParams(**kw))[0].outputs


def test_completion_greedy_equals_llm_generate(oai, oracle):
    got = oai.completions.create(model="tiny", prompt=PROMPT, **GREEDY)
    (w,) = want(oracle, PROMPT, **GREEDY)
    assert got.choices[0].text == w.text
    assert got.choices[0].finish_reason == w.finish_reason
    assert got.usage.completion_tokens == len(w.token_ids)
    assert got.usage.prompt_tokens == len(oracle.tokenizer.encode(PROMPT))


def test_chat_stream_with_usage_equals_llm_chat(oai, oracle):
    msgs = [{"role": "user", "content": "hello there"}]
    stream = oai.chat.completions.create(model="tiny", messages=msgs, stream=True,
                                         stream_options={"include_usage": True},
                                         max_completion_tokens=10, temperature=0)
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    (w,) = oracle.chat(msgs, SamplingParams(max_tokens=10, temperature=0))[0].outputs
    assert text == w.text and finish == w.finish_reason
    assert usage.completion_tokens == len(w.token_ids)
    # every streamed piece is whole characters: concatenation equals the final text above,
    # and no chunk of a byte-level model's stream ends inside a character (checked in load)


def test_n_seed_and_penalties_equal_llm_generate(oai, oracle):
    kw = dict(n=3, seed=1234, temperature=0.9, top_p=0.95, max_tokens=8,
              presence_penalty=1.0, frequency_penalty=0.5)
    got = oai.completions.create(model="tiny", prompt=PROMPT, **kw)
    ws = want(oracle, PROMPT, **kw)
    assert sorted(c.index for c in got.choices) == [0, 1, 2]
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [w.text for w in ws]
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in ws)


def test_stop_string_cuts_the_text_like_the_runtime(oai, oracle):
    (full,) = want(oracle, PROMPT, temperature=0, max_tokens=16)
    # a stop string of two whole characters from the middle of the greedy output
    stop = next(full.text[i:i + 2] for i in range(3, len(full.text) - 1)
                if "\ufffd" not in full.text[i:i + 2])
    got = oai.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=16,
                                 stop=[stop])
    (w,) = want(oracle, PROMPT, temperature=0, max_tokens=16, stop=[stop])
    assert got.choices[0].text == w.text == full.text[:full.text.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == len(w.token_ids)


def test_chat_logprobs_equal_the_runtimes(oai, oracle):
    msgs = [{"role": "user", "content": "hi"}]
    got = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=6,
                                      temperature=0, logprobs=True, top_logprobs=3)
    (w,) = oracle.chat(msgs, SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0].outputs
    content = got.choices[0].logprobs.content
    assert len(content) == len(w.token_ids)
    assert sum(c.logprob for c in content) == pytest.approx(w.cumulative_logprob, abs=1e-4)
    for c, top in zip(content, w.logprobs):
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(
            sorted(top.values(), reverse=True), abs=1e-5)


def test_async_client_concurrent_streams(server, oracle):
    prompts = ["hello", "The compiler", "Café crème", "kernels"]

    async def one(client, p):
        text = ""
        async for chunk in await client.completions.create(
                model="tiny", prompt=p, stream=True, **GREEDY):
            text += chunk.choices[0].text if chunk.choices else ""
        return text

    async def main():
        client = openai.AsyncOpenAI(base_url=server.openai_url, api_key=KEY, max_retries=0)
        return await asyncio.gather(*(one(client, p) for p in prompts))
    got = asyncio.run(main())
    assert got == [o.outputs[0].text for o in oracle.generate(prompts, SamplingParams(**GREEDY))]


def test_openai_errors_name_the_field(oai, server):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=4,
                               extra_body={"top_p": "high"})
    assert e.value.body["param"] == "top_p" and "top_p" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=100000)
    assert e.value.body["param"] == "max_tokens"
    assert "maximum length of 256" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=[{"content": "x"}], max_tokens=2)
    assert e.value.body["param"] == "messages[0].role"
    for messages, param, said in (
            ([{"role": "bogus", "content": "x"}], "messages[0].role", "'bogus' is not one of"),
            ([{"role": "system", "content": "x"}, {"role": "user"}], "messages[1].content",
             "is required for a user message"),
            (["hello"], "messages[0]", "must be a {role, content} object")):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        assert e.value.body["param"] == param and said in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=2,
                               extra_body={"stop_token_ids": [1, 999999]})
    assert e.value.body["param"] == "stop_token_ids[1]"
    assert "outside the vocabulary" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    bad = openai.OpenAI(base_url=server.openai_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert urllib.request.urlopen(server.url + "/health").status == 200   # no key needed
    assert [m.id for m in oai.models.list().data] == ["tiny"]             # still serving


def test_kserve_http_generate_infer_and_stream(server, oracle):
    c = httpclient.InferenceServerClient(server.http_addr)
    hdr = {"Authorization": f"Bearer {KEY}"}
    assert c.is_server_live() and c.is_server_ready(headers=hdr)
    assert c.is_model_ready("ensemble", headers=hdr)
    meta = c.get_model_metadata("tensorrt_llm", headers=hdr)
    assert {"input_ids", "request_output_len"} <= {i["name"] for i in meta["inputs"]}
    (w,) = want(oracle, PROMPT, **GREEDY)
    # tensorrt_llm tensors, binary encoding (tritonclient's default)
    ids = np.array([oracle.tokenizer.encode(PROMPT)], dtype=np.int32)
    ins = []
    for name, arr in [("input_ids", ids), ("input_lengths", np.array([[ids.shape[1]]], np.int32)),
                      ("request_output_len", np.array([[12]], np.int32)),
                      ("runtime_top_k", np.array([[1]], np.int32))]:
        dtype = httpclient.np_to_triton_dtype(arr.dtype)
        i = httpclient.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        ins.append(i)
    r = c.infer("tensorrt_llm", ins, headers=hdr)
    assert r.as_numpy("output_ids")[0, 0].tolist() == w.token_ids
    assert r.as_numpy("sequence_length").tolist() == [[len(w.token_ids)]]
    # generate and generate_stream with the ensemble's fields
    import json
    body = json.dumps({"text_input": PROMPT, "max_tokens": 12, "temperature": 0.0}).encode()
    req = urllib.request.Request(server.url + "/v2/models/ensemble/generate", body, hdr)
    assert json.load(urllib.request.urlopen(req))["text_output"] == w.text
    req = urllib.request.Request(server.url + "/v2/models/ensemble/generate_stream", body, hdr)
    pieces = [json.loads(line[6:])["text_output"] for line in
              urllib.request.urlopen(req).read().decode().splitlines()
              if line.startswith("data: ")]
    assert "".join(pieces) == w.text and len(pieces) > 1
    # malformed: 400 naming the field, and it keeps serving
    req = urllib.request.Request(server.url + "/v2/models/ensemble/generate",
                                 json.dumps({"text_input": PROMPT, "max_tokens": 4,
                                             "top_p": 7.0}).encode(), hdr)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "top_p" in json.load(e.value)["error"]
    # a misspelt field is refused, naming it (Triton: unexpected inference input); unknown
    # request parameters are ignored, as Triton's models ignore parameters they do not read
    req = urllib.request.Request(server.url + "/v2/models/ensemble/generate",
                                 json.dumps({"text_input": PROMPT, "max_token": 4}).encode(),
                                 hdr)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    err = json.load(e.value)["error"]
    assert e.value.code == 400 and "max_token" in err and "not an input" in err
    req = urllib.request.Request(server.url + "/v2/models/ensemble/generate",
                                 json.dumps({"text_input": PROMPT, "max_tokens": 12,
                                             "temperature": 0.0,
                                             "parameters": {"priority": 3}}).encode(), hdr)
    assert json.load(urllib.request.urlopen(req))["text_output"] == w.text
    with pytest.raises(Exception, match="401"):
        httpclient.InferenceServerClient(server.http_addr).infer("tensorrt_llm", ins)


def _grpc_inputs(ids, n, stream):
    ins = []
    for name, arr in [("input_ids", np.array([ids], np.int32)),
                      ("input_lengths", np.array([[len(ids)]], np.int32)),
                      ("request_output_len", np.array([[n]], np.int32)),
                      ("temperature", np.array([[0.0]], np.float32)),
                      ("streaming", np.array([[stream]], bool))]:
        dtype = grpcclient.np_to_triton_dtype(arr.dtype)
        i = grpcclient.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        ins.append(i)
    return ins


def test_grpc_stream_infer_and_cancellation(server, oracle):
    c = grpcclient.InferenceServerClient(server.grpc_addr)
    md = {"authorization": f"Bearer {KEY}"}
    assert c.is_server_live() and c.is_model_ready("tensorrt_llm", headers=md)
    assert c.get_model_config("tensorrt_llm", headers=md).config.max_batch_size == 64
    ids = oracle.tokenizer.encode(PROMPT)
    (w,) = want(oracle, PROMPT, **GREEDY)
    r = c.infer("tensorrt_llm", _grpc_inputs(ids, 12, False), headers=md)
    assert r.as_numpy("output_ids")[0, 0].tolist() == w.token_ids
    # decoupled streaming: responses as tokens come, the last flagged final
    q: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: q.put((result, error)), headers=md)
    c.async_stream_infer("tensorrt_llm", _grpc_inputs(ids, 12, True), request_id="s1")
    toks, responses = [], 0
    while True:
        result, error = q.get(timeout=30)
        assert error is None
        responses += 1
        toks += result.as_numpy("output_ids").reshape(-1).tolist()
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    # one response per step (several tokens in one only when the server ran behind)
    assert toks == w.token_ids and 1 < responses <= len(w.token_ids)
    # cancellation: a long request, cancelled after its first token, frees its blocks
    c.async_stream_infer("tensorrt_llm", _grpc_inputs(ids, 200, True), request_id="s2")
    q.get(timeout=30)
    aborted_before = metrics(server)["vllm:request_success_total[abort]"]
    c.stop_stream(cancel_requests=True)
    m = wait_all_blocks_free(server)
    assert m["irlm:kv_cache_free_blocks"] == m["irlm:kv_cache_blocks"]
    assert m["vllm:request_success_total[abort]"] == aborted_before + 1
    with pytest.raises(Exception, match="UNAUTHENTICATED"):
        grpcclient.InferenceServerClient(server.grpc_addr).infer(
            "tensorrt_llm", _grpc_inputs(ids, 2, False))
    with pytest.raises(Exception, match="INVALID_ARGUMENT.*request_output_len"):
        c.infer("tensorrt_llm", _grpc_inputs(ids, 0, False), headers=md)


def test_metrics_count_what_was_served(server, oai, oracle):
    before = metrics(server)
    prompts = ["alpha beta", "gamma", "the word was with the compiler"]
    done = [oai.completions.create(model="tiny", prompt=p, temperature=0, max_tokens=5 + i)
            for i, p in enumerate(prompts)]
    after = wait_all_blocks_free(server)

    def d(k):
        return after[k] - before.get(k, 0.0)
    assert d("vllm:prompt_tokens_total") == sum(len(oracle.tokenizer.encode(p)) for p in prompts)
    assert d("vllm:generation_tokens_total") == sum(r.usage.completion_tokens for r in done)
    assert d("vllm:request_success_total[length]") + d("vllm:request_success_total[stop]") == 3
    assert d("vllm:time_to_first_token_seconds_count") == 3
    assert d("vllm:e2e_request_latency_seconds_count") == 3
    assert d("vllm:request_queue_time_seconds_count") == 3
    assert d("vllm:inter_token_latency_seconds_count") == sum(
        r.usage.completion_tokens - 1 for r in done)
    assert d("irlm:iteration_latency_seconds_count") >= max(r.usage.completion_tokens
                                                            for r in done)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0


def test_playground_chats_in_headless_chromium(server, oracle):
    page = urllib.request.urlopen(server.url + "/").read().decode()    # public, no key
    assert "/v1/chat/completions" in page and "<html" in page
    import os
    import shutil
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    browser = webdriver.Chrome(service=Service(driver_path, env=dict(os.environ)), options=opts)
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "key").send_keys(KEY)
        for field, value in (("max_tokens", "8"), ("temperature", "0")):
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        browser.find_element(By.ID, "input").send_keys("hello there\n")
        WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.ID, "stats").get_attribute("data-tokens"))
        reply = browser.execute_script(
            "return document.querySelector('.msg.assistant .text').textContent")
        tokens = int(browser.find_element(By.ID, "stats").get_attribute("data-tokens"))
        stats = browser.find_element(By.ID, "stats").text
    finally:
        browser.quit()
    (w,) = oracle.chat([{"role": "user", "content": "hello there"}],
                       SamplingParams(max_tokens=8, temperature=0))[0].outputs
    assert reply == w.text and tokens == len(w.token_ids)
    assert re.match(rf"TTFT \d+ ms · {tokens} tokens · [\d.]+ tokens/s", stats)


def test_kserve_bad_words_equal_the_runtimes(server, oracle):
    """bad_words (ensemble text, each word tokenized alone) over HTTP generate and
    bad_words_list (tensorrt_llm [batch, 2, N] ids + offsets) over gRPC infer ban what
    ``SamplingParams.bad_words_ids`` bans in LLM.generate."""
    import json
    tok = oracle.tokenizer
    hdr = {"Authorization": f"Bearer {KEY}"}
    ids = tok.encode(PROMPT)
    (free,) = want(oracle, PROMPT, **GREEDY)
    # a one-token word and a two-token word out of the unconstrained output
    words = [[free.token_ids[1]], free.token_ids[4:6]]
    (w,) = want(oracle, PROMPT, bad_words_ids=words, **GREEDY)
    assert w.token_ids != free.token_ids
    flat = [t for word in words for t in word]
    offsets = [1, 3] + [-1] * (len(flat) - 2)
    ins = _grpc_inputs(ids, 12, False)
    arr = np.array([[flat, offsets]], np.int32)
    i = grpcclient.InferInput("bad_words_list", list(arr.shape), "INT32")
    i.set_data_from_numpy(arr)
    r = grpcclient.InferenceServerClient(server.grpc_addr).infer(
        "tensorrt_llm", ins + [i], headers={"authorization": f"Bearer {KEY}"})
    assert r.as_numpy("output_ids")[0, 0].tolist() == w.token_ids
    # text words: what the words encode to alone is what is banned; a word from the output
    # that encodes back to its own token (not half a character), so that the ban bites
    text_words = [s for s in (tok.decode([t]) for t in free.token_ids)
                  if tok.encode(s, add_special_tokens=False) in ([t] for t in free.token_ids)]
    text_words = text_words[:1]
    banned = [tok.encode(s, add_special_tokens=False) for s in text_words]
    (wt,) = want(oracle, PROMPT, bad_words_ids=banned, **GREEDY)
    assert text_words and wt.token_ids != free.token_ids
    body = json.dumps({"text_input": PROMPT, "max_tokens": 12, "temperature": 0.0,
                       "bad_words": text_words}).encode()
    req = urllib.request.Request(server.url + "/v2/models/ensemble/generate", body, hdr)
    assert json.load(urllib.request.urlopen(req))["text_output"] == wt.text
    # a word outside the vocabulary: 400 naming the field
    body = json.dumps({"text_input": PROMPT, "max_tokens": 4}).encode()
    arr = np.array([[[10**6], [1]]], np.int32)
    i = grpcclient.InferInput("bad_words_list", list(arr.shape), "INT32")
    i.set_data_from_numpy(arr)
    with pytest.raises(Exception, match="bad_words_list"):
        grpcclient.InferenceServerClient(server.grpc_addr).infer(
            "tensorrt_llm", ins + [i], headers={"authorization": f"Bearer {KEY}"})
