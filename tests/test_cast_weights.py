"""``cast-weights`` (passes/llm/cast_weights.py) and ``irlm compile --device cpu``: an engine
for a CPU stores its weight matrices in the dtype its linears run in.

Oracles: Hugging Face transformers on the same model with its weight matrices rounded to that
dtype (the reference interpreter's logits on the cast engine), and the CPU executor on the
engine compiled without the cast (it rounds the weights to f16 itself at load: the cast engine
must give the same logits).  Tiny seeded models: a Llama whose LM head is tied to the
embedding (one table read by both) and an OPT (biases, learned positions, layer norms).
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from irlm.cli import main as irlm_main  # noqa: E402
from irlm.lowering.engine_format import load_engine  # noqa: E402
from irlm.passes import run_pipeline  # noqa: E402
from irlm.runtime.model_runner import StepBatch  # noqa: E402
from irlm.runtime.runners.cpu import CpuGraphRunner  # noqa: E402
from irlm.runtime.runners.interpreter import GraphRunner  # noqa: E402
from irlm.types import DType  # noqa: E402

VOCAB = 96
CONFIGS = {
    "llama-tied": lambda: transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        tie_word_embeddings=True),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=64),
}
PROMPT = [5, 17, 33, 2, 9, 60, 41]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param]()).eval()
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d / "hf")
    return d


def compile_engine(d, name, *flags):
    out = d / name
    if not out.exists():
        assert irlm_main(["compile", "--hf", str(d / "hf"), "-o", str(out),
                          "--tokens-per-block", "4", *flags]) == 0
    return out


def prefill():
    return StepBatch.pack([0], [PROMPT], [0], [[0, 1]])


def hf_logits_with_rounded_matrices(d, dtype):
    """HF's last-token logits with every weight matrix rounded to ``dtype`` (vectors kept)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(d / "hf").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.to(dtype).float())
        return model(torch.tensor([PROMPT])).logits[0, -1]


@pytest.mark.parametrize("linear", ["f16", "bf16"])
def test_a_cpu_engine_stores_its_matrices_as_its_linears_run(model_dir, linear):
    flags = ["--device", "cpu"] + (["--cpu-linear", linear] if linear != "f16" else [])
    out = compile_engine(model_dir, f"cpu-{linear}", *flags)
    plain = compile_engine(model_dir, "plain")           # --device any: f32 weights
    config = json.loads((out / "engine.json").read_text())["config"]
    assert config["cpu_linear"] == linear
    assert config["pipeline"].endswith(f"cast-weights{{dtype={linear}}}")
    engine = load_engine(out)
    want = DType.f16 if linear == "f16" else DType.bf16
    matrices = [op for op in engine.graph.params() if len(op.results[0].type.shape) == 2]
    assert matrices and all(op.results[0].type.dtype == want for op in matrices)
    assert all(op.results[0].type.dtype == DType.f32 for op in engine.graph.params()
               if len(op.results[0].type.shape) == 1)                 # norms, biases
    size = (out / "weights.safetensors").stat().st_size
    assert size < 0.6 * (plain / "weights.safetensors").stat().st_size
    # the reference interpreter on the engine is HF on the rounded matrices
    got = GraphRunner(engine.graph, num_blocks=4).step(prefill())[0]
    ref = hf_logits_with_rounded_matrices(model_dir, want.torch)
    scale = float(ref.max() - ref.min())
    assert (got - ref).abs().max().item() <= 1e-4 * scale
    # and plainly not HF on the f32 weights, which the interpreter on the plain engine is
    f32 = GraphRunner(load_engine(plain).graph, num_blocks=4).step(prefill())[0]
    assert (f32 - ref).abs().max().item() > 1e-4 * scale


def test_the_cpu_executor_reads_the_stored_weights(model_dir):
    """The cast engine's CPU executor (f16 linears packed from the stored f16 weights, the
    embedding gathered from the stored table) computes the reference interpreter's logits,
    holding no f32 copy of any matrix; with f32 linears it widens the weights once at load."""
    cast = load_engine(compile_engine(model_dir, "cpu-f16", "--device", "cpu"))
    ref = GraphRunner(cast.graph, num_blocks=4).step(prefill())
    scale = float(ref.max() - ref.min())
    a = CpuGraphRunner(cast.graph, num_blocks=4, linear_dtype="f16")
    assert (a.step(prefill()) - ref).abs().max().item() <= 1e-5 * scale
    held = [t for t in a._table if isinstance(t, torch.Tensor) and t.dim() == 2]
    assert not any(t.dtype == torch.float32 for t in held)
    # no step widens a weight
    assert not any(op.name == "core.cast" and op.operands[0].producer is not None
                   and op.operands[0].producer.name == "param" for *_, op in a._program)
    c = CpuGraphRunner(cast.graph, num_blocks=4, linear_dtype="f32")
    assert (c.step(prefill()) - ref).abs().max().item() <= 1e-5 * scale


def test_quantized_engines_keep_their_weights(model_dir):
    """int8 engines run their float linears (the LM head) in bf16: no f16 cast for them."""
    out = compile_engine(model_dir, "cpu-int8", "--device", "cpu", "--quant", "int8")
    assert "cast-weights" not in json.loads((out / "engine.json").read_text())["config"][
        "pipeline"]


@pytest.mark.slow
def test_tp_ranks_store_their_shards_in_f16(model_dir):
    """--tp 2 --device cpu: each rank's shards are cast after the split, and the ranks (one
    process each, the CPU executor) give the unsplit cast engine's greedy tokens."""
    from irlm.runtime import LLM, SamplingParams
    out = compile_engine(model_dir, "cpu-tp2", "--device", "cpu", "--tp", "2")
    for r in (0, 1):
        config = json.loads((out / f"rank{r}" / "engine.json").read_text())["config"]
        assert config["pipeline"].endswith("cast-weights{dtype=f16}")
        params = load_engine(out / f"rank{r}").graph.params()
        assert all(op.results[0].type.dtype == DType.f16 for op in params
                   if len(op.results[0].type.shape) == 2)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [PROMPT, [70, 3, 12]]
    with LLM(str(compile_engine(model_dir, "cpu-f16", "--device", "cpu")), device="cpu") as one:
        want = [o.outputs[0].token_ids for o in one.generate(prompts, greedy)]
    with LLM(str(out), device="cpu") as two:
        assert [o.outputs[0].token_ids for o in two.generate(prompts, greedy)] == want


def test_the_pass_leaves_other_readers_alone():
    """A matrix also read by something other than a linear or an embedding stays f32, and
    so do the graph outputs."""
    from irlm.text.parser import parse_graph
    from irlm.weights import WeightStore
    text = """
graph @g(%x: tensor<2x4xf32>) -> (tensor<2x3xf32>, tensor<3x4xf32>, tensor<2x3xf32>) {
  %w = param "w" : tensor<3x4xf32>
  %v = param "v" : tensor<3x4xf32>
  %u = param "u" : tensor<3x4xf32>
  %y = core.linear(%x, %w) : tensor<2x3xf32>
  %z = core.linear(%x, %v) : tensor<2x3xf32>
  %t = core.mul(%v, %v) : tensor<3x4xf32>
  %s = core.linear(%x, %u) : tensor<2x3xf32>
  return %y, %t, %s
}
"""
    store = WeightStore()
    for n in "wvu":
        store.add_tensor(n, torch.randn(3, 4))
    g = parse_graph(text, weights=store)
    x = torch.randn(2, 4)
    from irlm.interpreter import Interpreter
    before = Interpreter(g, g.weights).run([x]).outputs
    run_pipeline(g, "cast-weights{dtype=bf16},dce")
    names = {op.attrs["name"]: op.results[0].type.dtype for op in g.params()}
    assert names == {"w.bf16": DType.bf16, "v": DType.f32, "u.bf16": DType.bf16}
    after = Interpreter(g, g.weights).run([x]).outputs
    w16 = store.get("w").to(torch.bfloat16).float()
    assert torch.allclose(after[0], x @ w16.T, atol=1e-6)
    assert torch.equal(after[1], before[1])
    assert not torch.equal(after[0], before[0])
