"""The CPU executor (irlm/runtime/runners/cpu.py) computes what the reference interpreter does.

Oracles: the reference interpreter (``GraphRunner``) on the same graph and the same steps, and
Hugging Face transformers' greedy ``generate``.  Models: tiny seeded random-weight configs of
the architectures whose attention differs (Llama with GQA, Qwen2 with MQA and q/k/v biases,
Mistral with a sliding window of 4, Gemma with its
(1 + w) norms, OPT with biases, layer norm and ReLU), each also quantized (int8, int4
weight-only, int8 KV cache).

Steps: a chunked prefill of two requests (7 and 5 tokens, the first in chunks of 4 and 3, so
a chunk attends over cached keys), then decode steps of both, with block tables that are not
in order (the pool is read and written through them).  With f32 linears the executor runs the
reference's arithmetic op for op, up to the attention kernel's summation order: logits agree
to 1e-4 of their range.  With bf16 / int8 GEMMs (inputs rounded to bf16) the bound is the
relative L2 error a bf16 rounding of the activations gives (1e-2), and the greedy choice must
agree on nearly every row.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from irlm.compilation import compile_causal_lm  # noqa: E402
from irlm.errors import IRLMError  # noqa: E402
from irlm.passes import run_pipeline  # noqa: E402
from irlm.text.parser import parse_graph  # noqa: E402
from irlm.text.printer import print_graph  # noqa: E402
from irlm.runtime import LLM, SamplingParams  # noqa: E402
from irlm.runtime.runners.cpu import CpuGraphRunner, default_linear_dtype  # noqa: E402
from irlm.runtime.runners.interpreter import GraphRunner  # noqa: E402
from irlm.runtime.model_runner import StepBatch  # noqa: E402
from irlm_test_helpers import hf_generate  # noqa: E402

VOCAB, BS = 96, 4
DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
CONFIGS = {
    "llama-gqa": lambda: transformers.LlamaConfig(num_key_value_heads=2, **DECODER),
    "qwen2-mqa": lambda: transformers.Qwen2Config(num_key_value_heads=1, **DECODER),
    "mistral-window": lambda: transformers.MistralConfig(num_key_value_heads=2,
                                                         sliding_window=4, **DECODER),
    "gemma": lambda: transformers.GemmaConfig(num_key_value_heads=2, head_dim=16, **DECODER),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=64),
}
ATTN: dict = {}
QUANT = {
    "none": "",
    "int8": "quantize{mode=int8}",
    "int4": "quantize{mode=int4,group=32}",
    "kv-int8": 'quantize-kv-cache{dtype=int8,calib="%s"}',
}

_models: dict = {}


def hf_model(arch):
    if arch not in _models:
        cfg = CONFIGS[arch]()
        cfg._attn_implementation = ATTN.get(arch, "sdpa")
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        g = compile_causal_lm(model, level="2", max_seq=64, tokens_per_block=BS)
        _models[arch] = (model, print_graph(g), g.weights)
    return _models[arch]


def graph_of(arch, quant, calib):
    _, text, weights = hf_model(arch)
    g = parse_graph(text, weights=weights)
    if quant != "none":
        pipeline = QUANT[quant] % calib if "%s" in QUANT[quant] else QUANT[quant]
        run_pipeline(g, pipeline + ",dce")
    return g


@pytest.fixture(scope="module")
def calib(random_calibration):
    return random_calibration(VOCAB, prompts=4, length=16, seed=7)


# two requests: blocks handed out out of order, so a wrong table read shows
TABLES = [[5, 2, 7, 0], [3, 6, 1, 4]]


def steps(tokens_of):
    """The step sequence; ``tokens_of(i)`` gives decode step i's tokens (from the oracle)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, VOCAB, (7,), generator=g).tolist()
    b = torch.randint(0, VOCAB, (5,), generator=g).tolist()
    yield StepBatch.pack([0, 1], [a[:4], b], [0, 0], TABLES)      # prefill (a: first chunk)
    yield StepBatch.pack([0], [a[4:]], [4], TABLES[:1])             # chunk over cached keys
    lens = [7, 5]
    for i in range(4):
        yield StepBatch.pack([0, 1], [[t] for t in tokens_of(i)], lens, TABLES)
        lens = [n + 1 for n in lens]


def run_both(graph, **fast_kw):
    ref = GraphRunner(graph, num_blocks=8)
    fast = CpuGraphRunner(graph, num_blocks=8, **fast_kw)
    want, got, fed = [], [], []

    def tokens_of(i):
        fed.append(want[-1].argmax(-1).tolist() if want[-1].shape[0] == 2 else None)
        return fed[-1]
    gen = steps(tokens_of)
    for batch in gen:
        want.append(ref.step(batch))
        got.append(fast.step(batch))
        if want[-1].shape[0] == 1:     # the second prefill chunk: logits of request 0 only
            want[-1] = torch.cat([want[-1], want[0][1:]])
            got[-1] = torch.cat([got[-1], got[0][1:]])
    return torch.cat(want), torch.cat(got), fast


# ops a step spends its time in: never left to the reference implementation
HOT_OPS = {"core.linear", "quant.linear", "llm.paged_attention", "llm.rms_norm",
           "llm.add_rms_norm", "llm.rope", "llm.gated_act", "core.reshape", "core.transpose"}


@pytest.mark.slow
@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_f32_executor_equals_the_interpreter(arch, quant, calib):
    g = graph_of(arch, quant, calib)
    want, got, fast = run_both(g, linear_dtype="f32")
    scale = float(want.max() - want.min())
    assert (got - want).abs().max().item() <= 1e-4 * scale
    left = set(fast.stats["reference_ops"]) & HOT_OPS
    assert not left, left


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-mqa"])
@pytest.mark.parametrize("quant,linear", [("none", "bf16"), ("none", "f16"), ("int8", "int8"),
                                          ("int4", "int4"), ("int8", "f16")])
def test_low_precision_linears_stay_close(arch, quant, linear, calib):
    g = graph_of(arch, quant, calib)
    want, got, fast = run_both(g, linear_dtype=linear)
    assert fast.linear_dtype == linear
    err = ((got - want).norm() / want.norm()).item()
    # f16 rounds only the weights (11 significant bits); bf16/int paths also the activations
    assert err < (2e-3 if linear == "f16" else 1e-2), err
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree


def test_greedy_generation_equals_transformers():
    """Through the whole runtime (scheduler, chunked prefill, prefix reuse): the CPU
    executor's greedy tokens are HF's."""
    model, text, weights = hf_model("llama-gqa")
    g = parse_graph(text, weights=weights)
    llm = LLM(CpuGraphRunner(g, num_blocks=64, linear_dtype="f32"), None,
              max_num_tokens=8, eos_token_id=-1)
    prompts = [[5, 17, 33, 2, 9, 60, 41, 8, 8, 1, 30], [70, 3, 12], [5, 17, 33, 2, 9, 60, 41]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            want = hf_generate(model, torch.tensor([p]), max_new_tokens=10, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == want


def test_linear_dtype_choice_and_bad_values():
    assert default_linear_dtype("int8") == "int8"
    assert default_linear_dtype("int4") == "int4"
    # bf16 rounds activations and changes greedy tokens, so it is never chosen unasked,
    # even on a CPU with AVX512-BF16; x86 torch has fbgemm's f16-weight GEMM
    import platform
    want = {"f16"} if platform.machine() in ("x86_64", "AMD64") else {"f16", "f32"}
    assert default_linear_dtype(None) in want
    _, text, weights = hf_model("llama-gqa")
    g = parse_graph(text, weights=weights)
    with pytest.raises(IRLMError, match="linear dtype 'f8'"):
        CpuGraphRunner(g, linear_dtype="f8")
    with pytest.raises(IRLMError, match="--threads 0"):
        CpuGraphRunner(g, threads=0)


def test_a_failing_op_is_named_in_the_error():
    """The step runs as generated Python: an op that raises is still named, with its source
    location, and the runner stays usable afterwards."""
    _, text, weights = hf_model("llama-gqa")
    runner = CpuGraphRunner(parse_graph(text, weights=weights), num_blocks=8, linear_dtype="f32")
    batch = StepBatch.pack([0], [[1, 2, 3]], [0], TABLES[:1])
    good = runner.step(batch)
    bad = StepBatch.pack([0], [[VOCAB + 5, 2, 3]], [0], TABLES[:1])     # id past the vocab
    with pytest.raises(IRLMError, match=r"core\.embedding.*CPU executor failed: IndexError"):
        runner.step(bad)
    torch.testing.assert_close(runner.step(batch), good)


@pytest.mark.parametrize("window,alibi,cache_dtype,decode", [
    (0, False, torch.float32, False), (3, False, torch.float32, False),
    (0, True, torch.float32, False), (2, True, torch.int8, False),
    (0, False, torch.float32, True), (3, True, torch.float32, True)])
def test_batched_paged_attention_equals_the_reference_op(window, alibi, cache_dtype, decode):
    """The op alone, on random tensors: three requests (a fresh prompt, a chunk over cached
    keys, a decode row; or, ``decode``, three decode rows: the executor's decode path), GQA
    6/2 heads, against llm.paged_attention's reference (which also checks the pool it leaves
    behind)."""
    from irlm.registry import get_op_def
    from irlm.runtime.runners.cpu import AttentionPlan, _paged_attention
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, bs = 6, 2, 8, 4
    q_lens, cached = torch.tensor([5, 3, 1], dtype=torch.int32), \
        torch.tensor([0, 6, 9], dtype=torch.int32)
    if decode:
        q_lens, cached = torch.tensor([1, 1, 1], dtype=torch.int32), \
            torch.tensor([0, 6, 9], dtype=torch.int32)
    tables = torch.tensor([[7, 1, 0], [2, 9, 4], [3, 8, 5]], dtype=torch.int32)
    n = int(q_lens.sum())
    q = torch.randn(n, heads, d, generator=g)
    k, v = torch.randn(n, kv_heads, d, generator=g), torch.randn(n, kv_heads, d, generator=g)
    pool = torch.randn(2, 10, 2, bs, kv_heads, d, generator=g)
    if cache_dtype == torch.int8:
        pool = (pool * 40).round().clamp(-127, 127).to(torch.int8)
    attrs = {"layer": 1, "sliding_window": window, "scale": None,
             "alibi_slopes": (0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625) if alibi else (),
             "kv_scales": (0.03, 0.02) if cache_dtype == torch.int8 else ()}
    op = get_op_def("llm.paged_attention")
    ref_pool, fast_pool = pool.clone(), pool.clone()
    want = op.run_reference([q, k, v, ref_pool, tables, q_lens, cached], attrs)[0]
    plan = AttentionPlan(q_lens, cached, tables, bs)
    got = _paged_attention(plan, q, k, v, fast_pool, op.normalize_attrs(dict(attrs)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast_pool, ref_pool)


@pytest.fixture(scope="module")
def cpu_engine(tmp_path_factory):
    """A tiny Llama (GQA) with a word-level tokenizer, compiled with ``--device cpu``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from irlm.cli import main as irlm_main
    d = tmp_path_factory.mktemp("hf")
    model, _, _ = hf_model("llama-gqa")
    model.save_pretrained(d)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(d)
    out = tmp_path_factory.mktemp("engine") / "e"
    assert irlm_main(["compile", "--hf", str(d), "-o", str(out), "--tokens-per-block", "4",
                      "--device", "cpu"]) == 0
    return out


def test_irlm_run_threads_timing_and_reference_executor(cpu_engine, capsys):
    import json
    from irlm.cli import main as irlm_main
    config = json.loads((cpu_engine / "engine.json").read_text())["config"]
    assert config["cpu_linear"] == default_linear_dtype(None)
    argv = ["run", str(cpu_engine), "--prompt", "w5 w17 w33 w2", "--max-tokens", "6",
            "--device", "cpu", "--no-stream"]
    texts = []
    for extra in (["--threads", "1"], ["--executor", "reference", "--quiet"]):
        capsys.readouterr()
        assert irlm_main(argv + extra) == 0
        cap = capsys.readouterr()
        texts.append(cap.out)
        if "--quiet" in extra:
            assert cap.err == ""
        else:      # one timing line: prefill and decode rates, which executor, how many threads
            assert "TTFT" in cap.err and "decode" in cap.err and "tok/s" in cap.err
            assert "CpuGraphRunner" in cap.err and "threads 1" in cap.err
    assert texts[0] == texts[1] and len(texts[0].split()) == 6
    assert irlm_main(argv + ["--threads", "0"]) != 0
    assert "--threads 0: must be at least 1" in capsys.readouterr().err


def test_compile_cpu_linear_is_recorded_and_used(tmp_path, capsys):
    """``irlm compile --cpu-linear f32`` records the choice and the CPU executor runs it; bad
    values and a CUDA engine are refused."""
    import json
    from irlm.cli import main as irlm_main
    from irlm.lowering.engine_format import load_engine
    from irlm.runtime.runners.interpreter import runner_for_engine
    src = tmp_path / "src"
    model, _, _ = hf_model("llama-gqa")
    model.save_pretrained(src)
    out = tmp_path / "f32"
    assert irlm_main(["compile", "--hf", str(src), "-o", str(out), "--tokens-per-block", "4",
                      "--cpu-linear", "f32"]) == 0
    assert json.loads((out / "engine.json").read_text())["config"]["cpu_linear"] == "f32"
    runner = runner_for_engine(load_engine(out), device="cpu", num_blocks=8)
    assert runner.linear_dtype == "f32"
    from irlm.compilation import CompileConfig
    with pytest.raises(IRLMError, match="--cpu-linear"):
        CompileConfig(output=str(tmp_path / "bad"), cpu_linear="f64").check()
    capsys.readouterr()
    assert irlm_main(["compile", "--hf", str(src), "-o", str(tmp_path / "bad2"),
                      "--cpu-linear", "f32", "--device", "cuda"]) != 0
    assert "--cpu-linear f32 with --device cuda" in capsys.readouterr().err


def test_serve_threads_reach_the_cpu_executor(cpu_engine, capsys):
    from irlm.cli import main as irlm_main
    from irlm.serving import EngineSpec
    before = torch.get_num_threads()
    try:
        llm = EngineSpec(engine_dir=str(cpu_engine), device="cpu", threads=1).build()
        assert llm.engine.runner.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert irlm_main(["serve", str(cpu_engine), "--threads", "0"]) != 0
    assert "--threads 0: must be at least 1" in capsys.readouterr().err


_MISALIGNED_INT8 = """
import torch, transformers
from irlm.compilation import compile_causal_lm
from irlm.passes import run_pipeline
from irlm.runtime.model_runner import StepBatch
from irlm.runtime.runners.cpu import CpuGraphRunner
from irlm.runtime.runners.interpreter import GraphRunner
torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                               max_position_embeddings=64)
model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
g = compile_causal_lm(model, level="2", max_seq=64, tokens_per_block=4)
run_pipeline(g, "quantize{mode=int8},dce")
store, moved = g.weights, 0
for op in g.params():
    name = op.attrs["name"]
    t = store.get(name)
    if t.dtype == torch.int8:
        # where a memory-mapped engine file can put it: 8 bytes past a 64-byte boundary
        buf = torch.empty(t.numel() + 128, dtype=torch.int8)
        start = (8 - buf.data_ptr()) % 64
        view = buf[start:start + t.numel()].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 64 == 8
        store.add_tensor(name, view)
        moved += 1
assert moved
batch = StepBatch.pack([0], [[5, 17, 33, 2, 9, 60, 41]], [0], [[0, 1]])
got = CpuGraphRunner(g, num_blocks=4, linear_dtype="int8").step(batch)
want = GraphRunner(g, num_blocks=4).step(batch)
err = ((got - want).norm() / want.norm()).item()
assert err < 1e-2, err
print("ok", moved)
"""


def test_int8_weights_at_any_address_run():
    """torch's CPU int8 GEMM crashes on a weight that is not 64-byte aligned (7 rows here);
    a memory-mapped engine file puts weights anywhere, so the executor aligns them.  In a
    child process: without the alignment it dies with SIGSEGV."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _MISALIGNED_INT8], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), (r.returncode, r.stderr[-2000:])
