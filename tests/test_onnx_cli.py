"""The ONNX target from the command line: ``irlm compile --target onnx``, ``irlm export-onnx``,
``--target tensorrt`` where TensorRT is missing, and polygraphy on the exported model.

A tiny seeded Llama saved as an HF directory is compiled (paged inference form, -O2) and, with
``--replace-pipeline --pipeline fuse-all`` (instead of the -O level), as a fused stateless graph; the stateless
export must run under ``polygraphy run --onnxrt`` (the tool TensorRT users check models with).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from irlm.cli import main as irlm_main  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64)
    out = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(out)
    return out


def test_export_onnx_of_an_engine_directory_writes_the_inference_form(hf_dir, tmp_path,
                                                                       capsys):
    engine = tmp_path / "engine"
    assert irlm_main(["compile", "--hf", str(hf_dir), "-o", str(engine), "--max-seq", "64",
                      "--max-num-tokens", "256"]) == 0
    out = tmp_path / "onnx"
    assert irlm_main(["export-onnx", str(engine), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("custom node: irlm.PagedAttention") == 2
    assert (out / "model.onnx.data").stat().st_size > 100_000
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in m.graph.node if n.domain == "irlm"] == ["PagedAttention"] * 2
    script = (out / "build_trt.sh").read_text()
    assert "trtexec --onnx=model.onnx" in script and "input_ids:256" in script


def test_compile_target_onnx_fused_stateless_graph_runs_in_polygraphy(hf_dir, tmp_path):
    out = tmp_path / "fused"
    assert irlm_main(["compile", "--hf", str(hf_dir), "-o", str(out), "--target", "onnx",
                      "--replace-pipeline", "--pipeline", "fuse-all"]) == 0
    assert not (out / "engine.json").exists()
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {"RMSNormalization", "RotaryEmbedding", "Attention"} <= {n.op_type
                                                                    for n in m.graph.node}
    polygraphy = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or \
        shutil.which("polygraphy")
    if polygraphy is None:
        pytest.skip("polygraphy is not installed")
    r = subprocess.run([polygraphy, "run", str(out / "model.onnx"), "--onnxrt",
                        "--input-shapes", "input_ids:[2,5]", "attention_mask:[2,5]",
                        "position_ids:[2,5]", "--val-range", "input_ids:[0,127]",
                        "attention_mask:[1,1]", "position_ids:[0,4]"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "PASSED" in r.stdout + r.stderr


def test_target_tensorrt_without_tensorrt_says_so_before_any_work(hf_dir, tmp_path, capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "trt"
    assert irlm_main(["compile", "--hf", str(hf_dir), "-o", str(out),
                      "--target", "tensorrt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "TensorRT is not installed" in err[0] and "--target onnx" in err[0]
    assert "build_trt.sh" in err[0] and "trtexec" in err[0]
    assert not out.exists()


def test_export_onnx_bad_inputs(tmp_path, capsys):
    assert irlm_main(["export-onnx", str(tmp_path / "nope.irlm"), "-o", str(tmp_path)]) == 1
    assert "nope.irlm: no such file" in capsys.readouterr().err
    ir = tmp_path / "g.irlm"
    ir.write_text("graph @g(%x: tensor<4xf32>) -> (tensor<4xf32>) {\n"
                  "  %w = param \"w\" : tensor<4xf32>\n"
                  "  %y = core.add(%x, %w) : tensor<4xf32>\n"
                  "  return %y\n}\n")
    assert irlm_main(["export-onnx", str(ir), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "weight 'w'" in err and "no weight store" in err
