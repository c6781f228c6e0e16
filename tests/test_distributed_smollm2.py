"""SmolLM2 compiled with ``--tp 3`` runs as three processes (gloo) and answers like HF.

SmolLM2-135M has 9 attention heads and 3 kv heads: ``--tp 3`` gives each rank 3 heads and 1
kv head, and a third of the MLP (1536 / 3) and of the LM head's vocabulary (49152 / 3).  The
engine is compiled from the real GGUF through the CLI and run by ``irlm.LLM`` (rank 0 here,
ranks 1 and 2 as worker processes).  Oracle: transformers' own GGUF loader and
``generate(do_sample=False)`` in fp32 on the README demo's chat prompt.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from irlm.cli import main as irlm_main  # noqa: E402
from irlm.runtime import SamplingParams  # noqa: E402
from irlm_test_helpers import alive, hf_generate, smollm_gguf  # noqa: E402

#: the question scripts/demo.sh asks
DEMO = "What is the capital of France? Answer in one sentence."
NEW_TOKENS = 16






@pytest.mark.slow
def test_smollm2_tp3_processes_answer_the_demo_like_transformers(tmp_path, monkeypatch):
    # one torch thread per rank: three processes share the machine's cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    gguf = smollm_gguf()
    out = tmp_path / "smollm2-tp3"
    assert irlm_main(["compile", "--gguf", str(gguf), "-o", str(out), "--max-seq", "256",
                      "--tp", "3"]) == 0
    manifest = json.loads((out / "engine.json").read_text())
    assert (manifest["parallel"]["tp"], manifest["parallel"]["pp"]) == (3, 1)

    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32).eval()
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    # the model's EOS, not the GGUF tokenizer's (transformers 5.17 reads that as <|im_start|>)
    eos = model.generation_config.eos_token_id
    conv = [{"role": "user", "content": DEMO}]
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        want = hf_generate(model, ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=eos)[0, ids.shape[1]:].tolist()
    del model

    import irlm
    with irlm.LLM(out, device="cpu", max_num_tokens=64) as llm:
        runner = llm.engine.runner
        assert type(runner).__name__ == "DistributedRunner"
        workers = list(runner._procs.values())
        assert sorted(runner._procs) == [1, 2] and all(alive(p.pid) for p in workers)
        [result] = llm.chat([conv], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    assert result.prompt == text
    got = result.outputs[0].token_ids
    # both stop at EOS (HF keeps it in the sequence): the answer is shorter than the budget
    assert want[-1] == eos and len(want) < NEW_TOKENS
    assert result.outputs[0].finish_reason == "stop"
    if got and got[-1] == eos:
        got = got[:-1]
    assert got == want[:-1]
    assert "Paris" in result.outputs[0].text
    assert not any(alive(p.pid) for p in workers)
