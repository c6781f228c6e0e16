"""`irlm compile --quant`: the engine's linears are quantized and it still generates."""
import pytest
import torch
import transformers

from irlm.cli import main as irlm_main
from irlm.lowering.engine import load_engine
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
