"""``irlm.compile(source, CompileConfig)``, the library under ``irlm compile``.

For an ``nn.Module`` source the oracle is transformers: the compiled engine's greedy tokens
equal ``generate``'s.  That the library and the CLI write the same SmolLM2 engine is in
tests/test_engine_smollm2.py (it reuses that file's CLI-compiled engine).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import irlm  # noqa: E402
from irlm.compilation import CompileConfig, Source  # noqa: E402
from irlm.errors import IRLMError  # noqa: E402


def test_module_source_compiles_to_an_engine_that_matches_transformers(tiny_llama, tmp_path):
    from irlm.runtime import LLM, SamplingParams
    engine = irlm.compile(tiny_llama, CompileConfig(output=tmp_path / "e", max_seq=64,
                                                    tokens_per_block=4))
    assert engine.engine_written and "substitute-attention{tokens_per_block=4" in engine.pipeline
    prompt = [5, 17, 3, 99, 42]
    llm = LLM.from_engine(engine.path, device="cpu")
    got = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0))[0]
    with torch.no_grad():
        want = tiny_llama.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)[0, len(prompt):].tolist()
    assert got.outputs[0].token_ids == want


@pytest.mark.parametrize("config, message", [
    (dict(max_seq=1), "--max-seq 1: must be at least 2"),
    (dict(opt_level="3"), "-O3: unknown optimization level"),
    (dict(quant="int5"), "--quant int5: not one of"),
    (dict(quant="int4", quant_group=48), "--quant-group 48: must be 32, 64 or 128"),
    (dict(tp=2, pp=2, quant="fp8"), "--tp 2 --pp 2 with --quant fp8: not supported together"),
    (dict(target="onnx", tp=2), "--target onnx writes one network: it does not take"),
    (dict(calib="x.txt"), "--calib is only read by"),
    (dict(max_batch="8"), "--max-batch '8': must be a whole number"),
    (dict(tokens_per_block=16.0), "--tokens-per-block 16.0: must be a whole number"),
    (dict(tp=True), "--tp True: must be a whole number"),
])
def test_bad_configs_are_refused_before_loading(tmp_path, config, message):
    with pytest.raises(IRLMError, match=message.replace("+", r"\+")):
        irlm.compile(tmp_path / "missing.gguf", CompileConfig(output=tmp_path / "o", **config))


def test_a_forced_format_names_its_flag(tmp_path):
    with pytest.raises(IRLMError, match="--gguf .*nope.gguf: no such file"):
        irlm.compile(Source(tmp_path / "nope.gguf", "gguf", flag="--gguf"),
                     CompileConfig(output=tmp_path / "o"))


def test_max_batch_1_is_a_static_batch_that_still_matches_transformers(tiny_llama, tmp_path):
    """docs/compile.md: the batch range is [1, N]; N = 1 was refused ("at least 2")."""
    from irlm.runtime import LLM, SamplingParams
    engine = irlm.compile(tiny_llama, CompileConfig(output=tmp_path / "e", max_seq=64,
                                                    max_batch=1, tokens_per_block=4))
    frontend = (tmp_path / "e" / "ir" / "00-frontend.irlm").read_text()
    assert "dim batch" not in frontend and "tensor<1x[seq]xi64>" in frontend
    prompt = [5, 17, 3, 99, 42]
    got = LLM.from_engine(engine.path, device="cpu").generate(
        [prompt], SamplingParams(max_tokens=6, temperature=0.0))[0]
    with torch.no_grad():
        want = tiny_llama.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)[0, len(prompt):].tolist()
    assert got.outputs[0].token_ids == want


def _weight_dtypes(engine_dir):
    """The dtypes of the engine's weight matrices (RoPE's inv_freq stays f32 in any dtype)."""
    from safetensors import safe_open
    out = set()
    for path in engine_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out |= {f.get_slice(k).get_dtype() for k in f.keys()
                    if len(f.get_slice(k).get_shape()) == 2}
    return out


# a CPU engine stores its linears' weights as its CPU runs them (cast-weights: f16)
@pytest.mark.parametrize("device, stored", [("cuda", "F32"), ("any", "F32"), ("cpu", "F16")])
def test_a_module_source_compiles_in_its_own_dtype(tiny_llama, tmp_path, device, stored):
    import json
    engine = irlm.compile(tiny_llama, CompileConfig(output=tmp_path / "e", max_seq=32,
                                                    device=device))
    assert json.loads((engine.path / "engine.json").read_text())["config"]["dtype"] == "f32"
    assert _weight_dtypes(engine.path) == {stored}


def test_a_module_source_in_another_dtype_than_asked_is_refused(tiny_llama, tmp_path):
    with pytest.raises(IRLMError, match=r"--dtype bf16: <LlamaForCausalLM> is a model of its "
                                        r"own dtype \(f32\); convert it first "
                                        r"\(model.to\(torch.bfloat16\)\)"):
        irlm.compile(tiny_llama, CompileConfig(output=tmp_path / "e", max_seq=32, dtype="bf16"))


MODEL_PY = """
import torch
import transformers


def build_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=128)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()
"""


def test_a_model_file_keeps_its_dtype_and_refuses_another(tmp_path):
    """A model.py builds its own weights: --device cuda records their dtype (f32 here), and
    --dtype bf16 says to build the model in bf16 instead of labelling f32 weights bf16."""
    import json
    from irlm.cli import main as irlm_main
    src = tmp_path / "model.py"
    src.write_text(MODEL_PY)
    out = tmp_path / "e"
    assert irlm_main(["compile", str(src), "--max-seq", "32", "--device", "cuda", "-o",
                      str(out)]) == 0
    assert json.loads((out / "engine.json").read_text())["config"]["dtype"] == "f32"
    assert _weight_dtypes(out) == {"F32"}
    with pytest.raises(IRLMError, match=r"--dtype bf16: .*model.py is a model of its own dtype "
                                        r"\(f32\); build it in bf16 in build_model\(\)"):
        irlm.compile(src, CompileConfig(output=tmp_path / "b", max_seq=32, dtype="bf16"))


def test_module_dtype_is_the_dtype_of_most_weights():
    from irlm.compilation.source import module_dtype
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    assert module_dtype(m) == "f32"
    m[0].to(torch.bfloat16)                  # a bf16 model with its norm kept in f32
    assert module_dtype(m) == "bf16"
    assert module_dtype(torch.nn.ReLU()) == "f32"


@pytest.mark.slow
@pytest.mark.parametrize("flags, want", [(["--device", "cuda"], "bf16"),
                                         (["--device", "cuda", "--dtype", "f32"], "f32"),
                                         ([], "f32")])
def test_an_engine_for_a_gpu_is_bf16_unless_asked_otherwise(tmp_path, flags, want):
    """``irlm compile --device cuda`` of a file source: bf16 weights and activations (what the
    GPU's tensor cores and irlm's quantized GPU kernels take) unless --dtype says otherwise."""
    import json
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from irlm_test_helpers import smollm_gguf
    from irlm.cli import main as irlm_main
    out = tmp_path / "e"
    assert irlm_main(["compile", "--gguf", str(smollm_gguf()), "--max-seq", "64", "-o",
                      str(out), *flags]) == 0
    assert json.loads((out / "engine.json").read_text())["config"]["dtype"] == want
    floats = _weight_dtypes(out) & {"F32", "BF16", "F16"}
    assert floats == {want.upper()}
