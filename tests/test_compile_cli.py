"""``irlm compile``: the SmolLM2 GGUF compiles to a frontend IR file that parses and verifies;
bad inputs are one ``irlm: error:`` line naming the flag or path, exit status != 0, no
traceback.

The compiles here stop after the frontend (``-O0 --no-engine``): what is under test is
``OUT/ir/00-frontend.irlm``; the pass pipeline and the engine have their own tests.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from irlm.cli import main  # noqa: E402
from irlm_test_helpers import smollm_gguf  # noqa: E402




def irlm(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "irlm", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


FRONTEND_ONLY = ("-O0", "--no-engine")


def check_frontend_ir(out: Path, expect_params: int):
    from irlm.text.parser import parse_file
    from irlm.verifier import verify
    ir = out / "ir" / "00-frontend.irlm"
    assert ir.is_file()
    graph = parse_file(ir)
    verify(graph)
    assert sum(1 for _ in graph.params()) >= expect_params
    text = ir.read_text()
    assert 'param "model.layers.29.mlp.down_proj.weight"' in text
    assert "batch" in text and "seq" in text
    return graph


def test_compile_smollm_gguf_subprocess(tmp_path):
    out = tmp_path / "out"
    r = irlm("compile", "--gguf", smollm_gguf(), "-o", out, "--max-batch", 4, "--max-seq", 512,
             *FRONTEND_ONLY)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "00-frontend.irlm" in r.stdout and len(r.stdout.strip().splitlines()) == 1
    graph = check_frontend_ir(out, expect_params=272)
    assert graph.dims["batch"].max == 4 and graph.dims["seq"].max == 512


def test_compile_model_file_in_process(tmp_path, capsys):
    model = tmp_path / "model.py"
    model.write_text(
        "import torch\n"
        "class MLP(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.up = torch.nn.Linear(8, 16)\n"
        "        self.down = torch.nn.Linear(16, 8)\n"
        "    def forward(self, x):\n"
        "        return self.down(torch.relu(self.up(x)))\n"
        "def build_model():\n"
        "    torch.manual_seed(0)\n"
        "    return MLP()\n"
        "def example_inputs():\n"
        "    return (torch.randn(2, 5, 8),)\n")
    out = tmp_path / "out"
    assert main(["compile", str(model), "-o", str(out), *FRONTEND_ONLY]) == 0
    from irlm.text.parser import parse_file
    from irlm.verifier import verify
    graph = parse_file(out / "ir" / "00-frontend.irlm")
    verify(graph)
    assert "00-frontend.irlm" in capsys.readouterr().out


@pytest.mark.slow
def test_compile_smollm_gguf_in_process(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", "--gguf", str(smollm_gguf()), "-o", str(out), *FRONTEND_ONLY]) == 0
    check_frontend_ir(out, expect_params=272)
    assert "LlamaForCausalLM" in capsys.readouterr().out


# ----- bad input ------------------------------------------------------------------------------
def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    fake_py = tmp_path / "fake.py"
    fake_py.write_text("x = 1\n")
    out = str(tmp_path / "out")
    return [
        (["compile", "-o", out], "no model given"),
        (["compile", "--hf", str(tmp_path), "--gguf", str(text), "-o", out],
         "--hf and --gguf"),
        (["compile", "--gguf", str(tmp_path / "missing.gguf"), "-o", out],
         f"--gguf {tmp_path / 'missing.gguf'}: no such file"),
        (["compile", "--gguf", str(text), "-o", out], f"{text}: not a GGUF file"),
        (["compile", "--hf", str(text.parent / "nodir"), "-o", out], "--hf"),
        (["compile", "--hf", str(tmp_path), "-o", out], "config.json"),
        (["compile", "--safetensors", str(text), "-o", out], "--safetensors needs --config"),
        (["compile", "--config", str(text), "-o", out], "--config is only for --safetensors"),
        (["compile", str(fake_py), "-o", out], f"{fake_py}: defines no build_model()"),
        (["compile", "--gguf", str(text), "-o", str(text)], f"-o {text}"),
        (["compile", "--gguf", str(text), "-o", out, "--max-seq", "0"], "--max-seq 0"),
    ]


def test_bad_inputs_in_process(tmp_path, capsys):
    for argv, expected in _bad_inputs(tmp_path):
        assert main(argv) != 0, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("irlm: error:"), (argv, err)
        assert expected in lines[0], (argv, err)
        assert "Traceback" not in err


def test_bad_inputs_subprocess(tmp_path):
    # a subprocess proves no traceback reaches the terminal; two cases keep it quick
    cases = _bad_inputs(tmp_path)
    for argv, expected in (cases[1], cases[3]):
        r = irlm(*argv)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr
        assert r.stderr.strip().count("\n") == 0 and expected in r.stderr, r.stderr
