"""Kernel selection for the quantized linears (lowering/quant_linears.py), on the CPU.

Which GPU path each quantized linear of a compiled engine gets, and what falls back to the
reference op.  The paths' numerics are checked on the GPU (tests/test_quant_gpu.py).
"""
import json

import pytest
import torch
import transformers

from irlm.compilation import compile_causal_lm
from irlm.lowering.quant_linears import QuantLinearPlan

VOCAB = 256


def _engine(mode, dtype, tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=VOCAB)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps([list(range(1, 17))]))
    return compile_causal_lm(model, max_seq=64, extra_pipeline=(
        f'quantize{{mode={mode},fuse=false,calib="{calib}"}},fuse-quant,dce'))


@pytest.mark.parametrize("mode,path,linears", [
    ("int8", "int8: gemv / dequantize+cublas", 4),      # qkv, o, gate_up, down
    # without a GPU the fp8 GEMV's load-time check fails: the cuBLAS(Lt) paths
    ("fp8", "fp8: cublaslt _scaled_mm", 4),
    ("w8a8-sq", "w8a8: cublaslt _int_mm", 4),
    ("fp8-weight", "fp8 weight-only: dequantize+cublas", 4),
])
def test_each_quantized_linear_gets_its_path(mode, path, linears, tmp_path):
    graph = _engine(mode, torch.bfloat16, tmp_path)
    plan = QuantLinearPlan().prepare(graph, graph.weights, torch.device("cpu"))
    assert plan.summary() == {path: linears}
    if path != "reference":
        assert len(plan.prepared) == linears
        for entry in plan.prepared.values():      # scales converted once, to fp32
            for key in ("scales", "w_scale", "x_scale", "w_scales"):
                if key in entry:
                    assert entry[key].dtype == torch.float32


def test_fp32_engines_stay_on_the_reference_ops(tmp_path):
    graph = _engine("int8", torch.float32, tmp_path)
    plan = QuantLinearPlan().prepare(graph, graph.weights, torch.device("cpu"))
    assert plan.summary() == {"reference": 4} and not plan.prepared
