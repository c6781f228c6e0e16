"""SmolLM2-135M (real weights, GGUF) exported to ONNX generates HF's greedy tokens.

The GGUF loads through irlm's loader, traces to the stateless graph, fuses (-O2's fusions),
and exports to ONNX with external data; onnxruntime (CPU) then decodes greedily on the demo
prompt (scripts/demo.sh) by re-running the growing sequence.  Oracle: transformers' own GGUF
loader and generate(do_sample=False) in fp32.
"""
from __future__ import annotations

import os

import pytest
import torch
from irlm_test_helpers import hf_generate, smollm_gguf  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

DEMO_PROMPT = "What is the capital of France? Answer in one sentence."
NEW_TOKENS = 8




@pytest.mark.slow
def test_smollm2_onnx_greedy_equals_transformers(tmp_path):
    from irlm.frontends import trace
    from irlm.frontends.gguf import load_gguf
    from irlm.lowering.onnx import export_onnx
    from irlm.lowering.onnx.ort import onnxruntime_session, run
    from irlm.passes import run_pipeline
    from irlm.passes.fusions import FUSION_PIPELINE

    path = smollm_gguf()
    loaded = load_gguf(path)
    graph = trace(loaded.module, loaded.example_inputs(), weights=loaded.weights,
                  dims={"batch": (1, 2), "seq": (1, 128)})
    run_pipeline(graph, FUSION_PIPELINE)
    export = export_onnx(graph, tmp_path)
    assert export.data_path.stat().st_size > 400e6          # 135M f32 weights, external
    assert export.model_path.stat().st_size < 5e6
    session = onnxruntime_session(export.model_path, threads=2)

    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = tok.apply_chat_template([{"role": "user", "content": DEMO_PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    got = []
    seq = ids
    for _ in range(NEW_TOKENS):
        n = seq.shape[1]
        feeds = {"input_ids": seq, "attention_mask": torch.ones(1, n, dtype=torch.int64),
                 "position_ids": torch.arange(n)[None]}
        logits = run(session, {v.name: feeds[v.name] for v in graph.inputs})[0]
        nxt = int(logits[0, -1].argmax())
        got.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    del session

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf_generate(hf, ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=hf.generation_config.eos_token_id)
    want = want[0, ids.shape[1]:].tolist()
    assert got[:len(want)] == want
