"""`irlm serve ENGINE_DIR --device cuda`: the engine core (a spawned process) runs the CUDA
executor; greedy output through OpenAI and gRPC streaming equals `LLM.generate` on the GPU.
Run on the device: python -m pytest -q tests/test_serving_gpu.py"""
from __future__ import annotations

import queue

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
openai = pytest.importorskip("openai")
grpcclient = pytest.importorskip("tritonclient.grpc")

from irlm.cli import main as irlm_main  # noqa: E402
from irlm.runtime import LLM, SamplingParams  # noqa: E402
from irlm.serving.testing import CHAT_TEMPLATE, ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    from irlm.runtime.testing import tiny_llama, tiny_tokenizer
    hf = tmp_path_factory.mktemp("tiny-hf")
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    # head_dim 64 (the attention kernels' smallest), bf16 as GPU engines run
    tiny_llama(len(tok), hidden=256, heads=4, kv_heads=2, max_len=256) \
        .to(torch.bfloat16).save_pretrained(hf)
    tok.save_pretrained(hf)
    out = tmp_path_factory.mktemp("tiny-engine")
    assert irlm_main(["compile", "--hf", str(hf), "-o", str(out), "--max-seq", "256"]) == 0
    return out


def test_served_on_cuda_equals_llm_generate(engine_dir):
    prompts = ["The quick brown fox", "kernels", "Café crème"]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    llm = LLM.from_engine(engine_dir, device="cuda", num_blocks=256)
    want = [o.outputs[0] for o in llm.generate(prompts, greedy)]
    ids = llm.tokenizer.encode(prompts[0])
    del llm
    torch.cuda.empty_cache()
    with ServerProcess([str(engine_dir), "--device", "cuda", "--num-blocks", "256",
                        "--served-model-name", "tiny"]) as srv:
        oai = openai.OpenAI(base_url=srv.openai_url, api_key="-", max_retries=0)
        got = oai.completions.create(model="tiny", prompt=prompts, temperature=0, max_tokens=16)
        assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == \
            [w.text for w in want]
        c = grpcclient.InferenceServerClient(srv.grpc_addr)
        q: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result, error: q.put((result, error)))
        inputs = []
        for name, arr in [("input_ids", np.array([ids], np.int32)),
                          ("input_lengths", np.array([[len(ids)]], np.int32)),
                          ("request_output_len", np.array([[16]], np.int32)),
                          ("runtime_top_k", np.array([[1]], np.int32)),
                          ("streaming", np.array([[True]], bool))]:
            i = grpcclient.InferInput(name, list(arr.shape),
                                      grpcclient.np_to_triton_dtype(arr.dtype))
            i.set_data_from_numpy(arr)
            inputs.append(i)
        c.async_stream_infer("tensorrt_llm", inputs)
        toks = []
        while True:
            result, error = q.get(timeout=120)
            assert error is None
            toks += result.as_numpy("output_ids").reshape(-1).tolist()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        c.stop_stream()
        assert toks == want[0].token_ids
    assert srv.returncode == 0
