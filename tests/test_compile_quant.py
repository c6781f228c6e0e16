"""`irlm compile --quant`: the engine's linears are quantized and it still generates."""
import pytest
import torch
import transformers

from irlm.cli import main as irlm_main
from irlm.lowering.engine_format import load_engine
from irlm.runtime import LLM, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                   max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d)
    return d, model


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_engine_generates_close_to_the_model(model_dir, tmp_path, mode):
    d, model = model_dir
    out = tmp_path / mode
    assert irlm_main(["compile", "--hf", str(d), "-o", str(out), "--quant", mode,
                      "--quant-group", "32"]) == 0
    engine = load_engine(out)
    names = [op.name for op in engine.graph.ops]
    assert names.count("quant.linear") == 2 * 4     # fused qkv, o, gate|up, down per layer
    llm = LLM.from_engine(out, device="cpu")
    prompt = [5, 17, 33, 2, 9, 60, 41]
    got = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))[0]
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0, -1]
    # the unquantized model's top token is among the quantized engine's top 5
    assert int(want.argmax()) in got.outputs[0].logprobs[0]


def test_bad_quant_group_is_a_clear_error(model_dir, tmp_path, capsys):
    d, _ = model_dir
    assert irlm_main(["compile", "--hf", str(d), "-o", str(tmp_path / "x"), "--quant", "int4",
                      "--quant-group", "48"]) == 1
    err = capsys.readouterr().err
    assert "--quant-group 48" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def calib_tokens(random_calibration):
    from pathlib import Path
    return Path(random_calibration(96, prompts=4, length=20, seed=2))


def test_w8a8_engine_with_int8_kv_cache_generates_the_models_greedy_tokens(
        model_dir, tmp_path, calib_tokens):
    d, model = model_dir
    out = tmp_path / "w8a8"
    assert irlm_main(["compile", "--hf", str(d), "-o", str(out), "--quant", "w8a8-sq",
                      "--kv-cache-dtype", "int8", "--calib", str(calib_tokens),
                      "--dump-ir"]) == 0
    engine = load_engine(out)
    names = [op.name for op in engine.graph.ops]
    assert names.count("quant.linear_a8") == 2 * 4
    cache = next(v for v in engine.graph.inputs if v.name == "kv_cache")
    assert cache.type.dtype.value == "i8"
    # every stage is dumped, the explicit quantize/dequantize form included
    dumps = sorted(p.name for p in (out / "ir").glob("*.irlm"))
    assert any(n.endswith("-quantize.irlm") for n in dumps)
    assert any(n.endswith("-fuse-quant.irlm") for n in dumps)
    assert any(n.endswith("-quantize-kv-cache.irlm") for n in dumps)
    explicit = next((out / "ir").glob("*-quantize.irlm")).read_text()
    assert "quant.quantize_per_token" in explicit and "quant.linear_a8" not in explicit
    # the recorded pipeline names the calibration tokens it read
    assert (out / "calib-tokens.json").exists()
    assert "calib-tokens.json" in engine.config["pipeline"]
    llm = LLM.from_engine(out, device="cpu")
    prompt = [5, 17, 33, 2, 9, 60, 41]
    got = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))[0]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert list(got.outputs[0].token_ids) == want[0, len(prompt):].tolist()


def test_awq_engine_keeps_the_models_top_token(model_dir, tmp_path, calib_tokens):
    d, model = model_dir
    out = tmp_path / "awq"
    assert irlm_main(["compile", "--hf", str(d), "-o", str(out), "--quant", "int4-awq",
                      "--quant-group", "32", "--kv-cache-dtype", "fp8",
                      "--calib", str(calib_tokens)]) == 0
    engine = load_engine(out)
    assert [op.name for op in engine.graph.ops].count("quant.linear") == 2 * 4
    llm = LLM.from_engine(out, device="cpu")
    prompt = [5, 17, 33, 2, 9, 60, 41]
    got = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))[0]
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0, -1]
    assert int(want.argmax()) in got.outputs[0].logprobs[0]


@pytest.mark.parametrize("argv, message", [
    (["--quant", "fp8"], "--quant fp8 calibrates on irlm's built-in text prompts, but "),
    (["--quant", "fp8"], "has no tokenizer to read them with; give --calib FILE.json"),
    (["--calib", "CALIB"], "--calib is only read by --quant int4-awq, w8a8-sq, fp8 and "
                           "--kv-cache-dtype"),
    (["--quant", "int8", "--calib", "CALIB"], "with --quant int8 nothing is calibrated"),
    (["--quant", "w8a8-sq", "--calib", "missing.json"], "--calib missing.json: no such file"),
    (["--quant", "int4-awq", "--quant-group", "48"], "--quant-group 48: must be 32, 64 or 128"),
    (["--kv-cache-dtype", "int4"], "invalid choice: 'int4'"),
])
def test_bad_quantization_flags_are_clear_errors(model_dir, tmp_path, capsys, calib_tokens,
                                                 argv, message):
    d, _ = model_dir
    argv = [str(calib_tokens) if a == "CALIB" else a for a in argv]
    out = tmp_path / "x"
    try:
        rc = irlm_main(["compile", "--hf", str(d), "-o", str(out)] + argv)
    except SystemExit as e:          # argparse's own choice errors
        rc = e.code
    assert rc not in (0, None)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "engine.json").exists()
    assert not (out / "ir").exists()             # refused before tracing (no IR written)
